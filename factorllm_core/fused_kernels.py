"""Triton kernels of the `fused` dispatch (see fused.py for the layout).
Importing this module needs Triton."""

import triton
import triton.language as tl


@triton.jit
def _tile(pid_m, counts_ptr, starts_ptr, N_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program pid_m -> (expert, first row, rows in tile); expert -1 when idle."""
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
    return expert, first, n_rows

@triton.jit
def gate_up(x_ptr, wg_ptr, wu_ptr, token_ptr, scale_ptr, counts_ptr, starts_ptr, hidden_ptr,
            H, W, N_EXPERTS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, first, n_rows = _tile(tl.program_id(0), counts_ptr, starts_ptr, N_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    rows = first + offs_m
    tokens = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < W
    offs_k = tl.arange(0, BLOCK_K)
    w_base = expert.to(tl.int64) * W * H
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = (k + offs_k) < H
        a = tl.load(x_ptr + tokens[:, None] * H + (k + offs_k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_off = w_base + offs_n[None, :] * H + (k + offs_k)[:, None]  # (BLOCK_K, BLOCK_N) of W[e].T
        w_ok = k_ok[:, None] & col_ok[None, :]
        acc_g = tl.dot(a, tl.load(wg_ptr + w_off, mask=w_ok, other=0.0), acc_g)
        acc_u = tl.dot(a, tl.load(wu_ptr + w_off, mask=w_ok, other=0.0), acc_u)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    h = acc_g * tl.sigmoid(acc_g) * acc_u * scale[:, None]
    tl.store(hidden_ptr + rows.to(tl.int64)[:, None] * W + offs_n[None, :],
             h.to(hidden_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

@triton.jit
def down(hidden_ptr, wd_ptr, order_ptr, counts_ptr, starts_ptr, out_ptr,
         H, W, N_EXPERTS: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, first, n_rows = _tile(tl.program_id(0), counts_ptr, starts_ptr, N_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    rows = (first + offs_m).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    w_base = expert.to(tl.int64) * H * W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, W, BLOCK_K):
        k_ok = (k + offs_k) < W
        a = tl.load(hidden_ptr + rows[:, None] * W + (k + offs_k)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(wd_ptr + w_base + offs_n[None, :] * W + (k + offs_k)[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    dest = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # (token, slot) position
    tl.store(out_ptr + dest[:, None] * H + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
