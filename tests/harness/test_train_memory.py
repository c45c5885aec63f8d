"""The blocked distillation KL equals the plain one, in value and gradient, with padding masked,
over block boundaries, in fp32 and bf16 logits (the CPU-testable part of the GPU path)."""

import pytest
import torch

from harness.train import _BlockedKL, distillation_kl, distillation_kl_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [7, 256, 600])  # under, at and across the block size
def test_the_blocked_kl_matches_the_reference(dtype, positions):
    g = torch.Generator().manual_seed(positions)
    dense = (3 * torch.randn(2, positions, 97, generator=g)).to(dtype)
    student = (3 * torch.randn(2, positions, 97, generator=g)).to(dtype).requires_grad_()
    mask = torch.ones(2, positions, dtype=torch.long)
    mask[1, positions // 2 :] = 0  # padding
    reference_student = student.detach().clone().requires_grad_()
    ours, theirs = distillation_kl(dense, student, mask), distillation_kl_reference(dense, reference_student, mask)
    (2.5 * ours).backward()
    (2.5 * theirs).backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert student.grad.dtype == dtype
    torch.testing.assert_close(student.grad.float(), reference_student.grad.float(), rtol=1e-4, atol=1e-6)
    assert student.grad[1, positions // 2 :].abs().max() == 0  # no gradient through padding


def test_the_blocked_kl_keeps_one_logits_sized_tensor_for_backward():
    dense, student = torch.randn(1, 300, 50), torch.randn(1, 300, 50, requires_grad=True)
    loss = distillation_kl(dense, student, torch.ones(1, 300))
    saved = loss.grad_fn.saved_tensors
    assert sum(t.numel() for t in saved) <= student.numel() + 1  # the gradient and the count
    assert _BlockedKL.BLOCK < 300  # the test crosses a block boundary
