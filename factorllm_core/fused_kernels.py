"""Triton kernels of the `fused` dispatch (see fused.py for the layout), and
their launchers. Importing this module needs Triton.

On a GPU the tile sizes are autotuned per (hidden, expert width, rows rounded up
to a power of two) on first use; under TRITON_INTERPRET=1 (CPU, the tests) one
fixed tiling is used, since autotuning times kernels on a GPU.
"""

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FIXED = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
# Each compiles for sm_90 with wgmma and pipelined loads, within its shared memory
# (perf/fused_compile_check.py, a test): 128x256 fits only with 2 stages, as
# gate/up loads two weight tiles per step.
CONFIGS = [
    triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=st)
    for m, n, k, w, st in [
        (64, 128, 64, 4, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 256, 64, 8, 2),
        (32, 64, 128, 4, 4),
    ]
]
TUNE_KEY = ["H", "W", "M_BUCKET"]


def launch_gate_up(x, gate_weight, up_weight, token_of, scales, counts, starts, hidden):
    rows, width = hidden.shape
    _launch(
        _gate_up,
        _gate_up_tuned,
        rows,
        counts.numel(),
        width,
        (
            x,
            gate_weight,
            up_weight,
            token_of,
            scales,
            counts,
            starts,
            hidden,
            x.shape[1],
            width,
            _bucket(rows),
            counts.numel(),
        ),
    )


def launch_down(hidden, down_weight, order, counts, starts, out):
    rows, width = hidden.shape
    hidden_size = out.shape[1]
    _launch(
        _down,
        _down_tuned,
        rows,
        counts.numel(),
        hidden_size,
        (hidden, down_weight, order, counts, starts, out, hidden_size, width, _bucket(rows), counts.numel()),
    )


def _launch(kernel, tuned, rows, n_experts, columns, args):
    def grid(meta):  # every expert may leave one partial tile: sum of ceil(count / BLOCK_M) <= this
        return triton.cdiv(rows, meta["BLOCK_M"]) + n_experts, triton.cdiv(columns, meta["BLOCK_N"])

    if INTERPRETED:
        kernel[grid(FIXED)](*args, **FIXED)
    else:
        tuned[grid](*args)


def _bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


@triton.jit
def _tile(pid_m, counts_ptr, starts_ptr, N_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program pid_m -> (expert, its BLOCK_M sorted rows (int64), which of them exist);
    expert -1 when the program has no tile."""
    expert, first, n_rows = -1, 0, 0
    tiles_before = 0
    for e in tl.static_range(N_EXPERTS):
        count = tl.load(counts_ptr + e)
        tiles = tl.cdiv(count, BLOCK_M)
        mine = (pid_m >= tiles_before) & (pid_m < tiles_before + tiles)
        local = (pid_m - tiles_before) * BLOCK_M
        expert = tl.where(mine, e, expert)
        first = tl.where(mine, tl.load(starts_ptr + e) + local, first)
        n_rows = tl.where(mine, count - local, n_rows)
        tiles_before += tiles
    offs_m = tl.arange(0, BLOCK_M)
    return expert, (first + offs_m).to(tl.int64), offs_m < n_rows


@triton.jit
def _gate_up(x_ptr, wg_ptr, wu_ptr, token_ptr, scale_ptr, counts_ptr, starts_ptr, hidden_ptr,
             H, W, M_BUCKET, N_EXPERTS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    expert, rows, row_ok = _tile(tl.program_id(0), counts_ptr, starts_ptr, N_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < W
    offs_k = tl.arange(0, BLOCK_K)
    w_base = expert.to(tl.int64) * W * H
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = (k + offs_k) < H
        a = tl.load(
            x_ptr + tokens[:, None] * H + (k + offs_k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w_off = w_base + offs_n[None, :] * H + (k + offs_k)[:, None]  # (BLOCK_K, BLOCK_N) of W[e].T
        w_ok = k_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(a, tl.load(wg_ptr + w_off, mask=w_ok, other=0.0), acc_g)
        acc_u = tl.dot(a, tl.load(wu_ptr + w_off, mask=w_ok, other=0.0), acc_u)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    h = acc_g * tl.sigmoid(acc_g) * acc_u * scale[:, None]
    tl.store(
        hidden_ptr + rows[:, None] * W + offs_n[None, :],
        h.to(hidden_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _down(hidden_ptr, wd_ptr, order_ptr, counts_ptr, starts_ptr, out_ptr,
          H, W, M_BUCKET, N_EXPERTS: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    expert, rows, row_ok = _tile(tl.program_id(0), counts_ptr, starts_ptr, N_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    w_base = expert.to(tl.int64) * H * W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, W, BLOCK_K):
        k_ok = (k + offs_k) < W
        a = tl.load(
            hidden_ptr + rows[:, None] * W + (k + offs_k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b = tl.load(
            wd_ptr + w_base + offs_n[None, :] * W + (k + offs_k)[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc)
    dest = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # (token, slot) position
    tl.store(
        out_ptr + dest[:, None] * H + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


_gate_up_tuned = None if INTERPRETED else triton.autotune(CONFIGS, key=TUNE_KEY)(_gate_up)
_down_tuned = None if INTERPRETED else triton.autotune(CONFIGS, key=TUNE_KEY)(_down)
