"""The layer-wise stage: before end-to-end training, each factorized FFN learns to
reproduce its dense output on the cached calibration inputs.

No token beyond the calibration ones is read and nothing runs through the rest of
the model: per layer, the target is the dense FFN's output on that layer's dense
inputs (the sum of all experts as factorized, shared ones and bias included), the
router keeps its choices (it is not trained here), and Adam updates the expert
slices to cut the mean squared error. The last FIT_HOLDOUT of the calibration
tokens are never fitted: the relative error on them, before and after, is what
the record reports.
"""

from __future__ import annotations

import torch

from factorllm_core import Calibration, factorized_layers
from factorllm_core.router import FIT_HOLDOUT

BATCH_TOKENS = 512


def layerwise_fit(model, calibration: Calibration, steps: int, lr: float, device: str, seed: int) -> dict:
    """Fit every FactorizedFFN's experts to its dense output; returns, averaged over
    layers, the held-out relative error |y - dense| / |dense| before and after."""
    layers = factorized_layers(model)
    before, after = [], []
    for name, layer in layers:
        x = calibration.inputs[name].to(device)
        n_fit = x.shape[0] - max(1, int(x.shape[0] * FIT_HOLDOUT))
        with torch.no_grad():
            target = torch.cat([_dense_output(layer, chunk) for chunk in x.split(1024)])
            before.append(_relative_error(layer, x[n_fit:], target[n_fit:]))
        params = [p for module in (layer.experts, layer.shared) if module is not None for p in module.parameters()]
        optimizer = torch.optim.Adam(params, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        layer.train(False)  # plain routed forward: no PAR teacher, no aux losses
        with torch.enable_grad():
            for _ in range(steps):
                rows = torch.randint(0, n_fit, (min(BATCH_TOKENS, n_fit),), generator=generator).to(device)
                loss = (layer(x[rows]) - target[rows]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            after.append(_relative_error(layer, x[n_fit:], target[n_fit:]))
    return {
        "steps": steps,
        "lr": lr,
        "batch_tokens": BATCH_TOKENS,
        "layers": len(layers),
        "heldout_relative_error_before": sum(before) / len(before),
        "heldout_relative_error_after": sum(after) / len(after),
        "per_layer": [[b, a] for b, a in zip(before, after)],
    }


def _dense_output(layer, x: torch.Tensor) -> torch.Tensor:
    """What the dense FFN gave on x: every expert, shared ones and the bias."""
    y = layer.experts.all_outputs(x).sum(dim=1)
    if layer.shared is not None:
        y = y + layer.shared.expert_forward(0, x)
    return y if layer.down_bias is None else y + layer.down_bias


def _relative_error(layer, x: torch.Tensor, target: torch.Tensor) -> float:
    return float((layer(x) - target).norm() / target.norm())
