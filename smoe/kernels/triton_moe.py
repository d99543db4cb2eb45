"""Fused MoE expert compute in Triton: two launches per layer, the vLLM fused_moe / MegaBlocks idea.

Token-slots are grouped by expert and each expert's rows are padded to the block size, so every
BLOCK_M-row block belongs to one expert. Then
  1. up kernel: gathers the block's token rows of x straight from x (no x_SD copy), multiplies them
     by the expert's w1 and w3 tiles (two accumulators sharing the loads of x), and writes
     SiLU(x w1^T) * (x w3^T) for each slot;
  2. down kernel: multiplies those rows by the expert's w2 and scales them by the router weight,
     writing one row per token-slot; the K rows of a token are summed (deterministic, no atomics).
Blocks with no slot (experts no token chose) return at once, so their weights are never read. The
layouts by size (block_config): a few slots run matrix-vector kernels, one program per (slot, column
block), with no layout at all; up to 16 slots every expert gets one block, built without sorting;
beyond, slots are sorted by expert. None of them synchronises with the host, so a decode step
is a fixed sequence of launches (CUDA-graph friendly).

Forward only: with autograd the `grouped` path (segment matmuls and their backward) is used.
Runs on CUDA tensors; on the CPU only through Triton's interpreter (TRITON_INTERPRET=1, for tests).
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

from smoe.kernels.grouped import grouped_moe


@triton.jit
def _up_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, ids_ptr, blk_expert_ptr, n_pad_ptr,
               n_slots, n_rows_pad, D, H, top_k,
               s_xn, s_xd, s_we, s_wh, s_wd, s_hs, s_hh,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    n_pid_m = (n_rows_pad + BLOCK_M - 1) // BLOCK_M
    n_pid_n = (H + BLOCK_N - 1) // BLOCK_N
    in_group = GROUP_M * n_pid_n  # blocks of GROUP_M row-blocks share weight tiles in L2
    first_m = (pid // in_group) * GROUP_M
    group_m = min(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    if pid_m * BLOCK_M >= tl.load(n_pad_ptr):
        return
    if tl.load(ids_ptr + pid_m * BLOCK_M) >= n_slots:  # an expert no token chose: its weights stay unread
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(ids_ptr + offs_m)
    row_ok = slot < n_slots
    token = tl.where(row_ok, slot // top_k, 0)
    e = tl.load(blk_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None].to(tl.int64) * s_xn + offs_k[None, :] * s_xd
    b_off = e * s_we + offs_n[None, :].to(tl.int64) * s_wh + offs_k[:, None] * s_wd  # (BLOCK_K, BLOCK_N)
    b1_ptrs = w1_ptr + b_off
    b3_ptrs = w3_ptr + b_off
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b1 = tl.load(b1_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        b3 = tl.load(b3_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's dot mishandles bfloat16 inputs: multiply exact fp32 copies instead
            a, b1, b3 = a.to(tl.float32), b1.to(tl.float32), b3.to(tl.float32)
        if IEEE:
            acc1 = tl.dot(a, b1, acc1, input_precision="ieee")
            acc3 = tl.dot(a, b3, acc3, input_precision="ieee")
        else:
            acc1 = tl.dot(a, b1, acc1)
            acc3 = tl.dot(a, b3, acc3)
        a_ptrs += BLOCK_K * s_xd
        b1_ptrs += BLOCK_K * s_wd
        b3_ptrs += BLOCK_K * s_wd
    h = acc1 / (1.0 + tl.exp(-acc1)) * acc3  # SiLU(x w1^T) * (x w3^T)
    h_ptrs = h_ptr + slot[:, None].to(tl.int64) * s_hs + offs_n[None, :] * s_hh
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w2_ptr, y_ptr, rw_ptr, ids_ptr, blk_expert_ptr, n_pad_ptr,
                 n_slots, n_rows_pad, D, H,
                 s_hs, s_hh, s_we, s_wd, s_wh, s_ys, s_yd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    n_pid_m = (n_rows_pad + BLOCK_M - 1) // BLOCK_M
    n_pid_n = (D + BLOCK_N - 1) // BLOCK_N
    in_group = GROUP_M * n_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    if pid_m * BLOCK_M >= tl.load(n_pad_ptr):
        return
    if tl.load(ids_ptr + pid_m * BLOCK_M) >= n_slots:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(ids_ptr + offs_m)
    row_ok = slot < n_slots
    safe_slot = tl.where(row_ok, slot, 0).to(tl.int64)
    e = tl.load(blk_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + safe_slot[:, None] * s_hs + offs_k[None, :] * s_hh
    b_ptrs = w2_ptr + e * s_we + offs_n[None, :].to(tl.int64) * s_wd + offs_k[:, None] * s_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * s_hh
        b_ptrs += BLOCK_K * s_wh
    rw = tl.load(rw_ptr + safe_slot, mask=row_ok, other=0.0).to(tl.float32)
    y = acc * rw[:, None]
    y_ptrs = y_ptr + safe_slot[:, None] * s_ys + offs_n[None, :] * s_yd
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _up_gemv_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, experts_ptr, D, H, top_k,
                    s_xn, s_xd, s_we, s_wh, s_wd, s_hs, s_hh,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # one slot's h[slot, n-block] = SiLU(x w1^T) * (x w3^T): weight tiles (BLOCK_N, BLOCK_K), read along D
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(H, BLOCK_N)
    slot = pid // n_pid_n
    pid_n = pid % n_pid_n
    token = (slot // top_k).to(tl.int64)
    e = tl.load(experts_ptr + slot).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token * s_xn + offs_k * s_xd
    w_off = e * s_we + tl.where(n_ok, offs_n, 0)[:, None].to(tl.int64) * s_wh + offs_k[None, :] * s_wd
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over K once, after the loop
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            xk = tl.load(x_ptrs).to(tl.float32)
            w1 = tl.load(w1_ptr + w_off).to(tl.float32)
            w3 = tl.load(w3_ptr + w_off).to(tl.float32)
        else:
            k_ok = offs_k < D - k0
            xk = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            w1 = tl.load(w1_ptr + w_off, mask=k_ok[None, :], other=0.0).to(tl.float32)
            w3 = tl.load(w3_ptr + w_off, mask=k_ok[None, :], other=0.0).to(tl.float32)
        acc1 += w1 * xk[None, :]
        acc3 += w3 * xk[None, :]
        x_ptrs += BLOCK_K * s_xd
        w_off += BLOCK_K * s_wd
    a1 = tl.sum(acc1, axis=1)
    a3 = tl.sum(acc3, axis=1)
    h = a1 / (1.0 + tl.exp(-a1)) * a3
    tl.store(h_ptr + slot.to(tl.int64) * s_hs + offs_n * s_hh, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_gemv_kernel(h_ptr, w2_ptr, y_ptr, rw_ptr, experts_ptr, D, H,
                      s_hs, s_hh, s_we, s_wd, s_wh, s_ys, s_yd,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    # one slot's y[slot, d-block] = rw[slot] * (h w2^T): weight tiles (BLOCK_N, BLOCK_K), read along H
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(D, BLOCK_N)
    slot = (pid // n_pid_n).to(tl.int64)
    pid_n = pid % n_pid_n
    e = tl.load(experts_ptr + slot).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + slot * s_hs + offs_k * s_hh
    w_off = e * s_we + tl.where(n_ok, offs_n, 0)[:, None].to(tl.int64) * s_wd + offs_k[None, :] * s_wh
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            hk = tl.load(h_ptrs).to(tl.float32)
            w = tl.load(w2_ptr + w_off).to(tl.float32)
        else:
            k_ok = offs_k < H - k0
            hk = tl.load(h_ptrs, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w2_ptr + w_off, mask=k_ok[None, :], other=0.0).to(tl.float32)
        acc += w * hk[None, :]
        h_ptrs += BLOCK_K * s_hh
        w_off += BLOCK_K * s_wh
    y = tl.sum(acc, axis=1) * tl.load(rw_ptr + slot).to(tl.float32)
    tl.store(y_ptr + slot * s_ys + offs_n * s_yd, y.to(y_ptr.dtype.element_ty), mask=n_ok)


# kernels built by Triton's interpreter (TRITON_INTERPRET=1 when this module was imported) run on the CPU
INTERPRETED = type(_up_kernel).__name__ == "InterpretedFunction"

# slots up to which the matrix-vector kernels run (each slot reads its expert's weights itself)
GEMV_MAX_SLOTS = 4
# slots up to which every expert gets one block (no sort): the decode batches
PER_EXPERT_MAX_SLOTS = 16
# slots beyond which the `triton` backend hands over to `grouped` (sorted rows, one cuBLAS matmul per
# expert): faster from 1024 tokens on at the 8x7B shape on an H200 (docs/performance.md)
FUSED_MAX_SLOTS = 1024


def block_config(n_slots: int, n_experts: int) -> dict:
    """The kernels and tile sizes for a batch, as benchmarks/moe_tune.py measured them fastest on an H200
    at Mixtral 8x7B's shape (D 4096, H 14336, E 8; docs/performance.md): matrix-vector kernels for a few
    slots, per-expert blocks of 16 rows for decode batches, 128-row sorted blocks beyond."""
    if n_slots <= GEMV_MAX_SLOTS:
        return dict(kind="gemv", up=dict(BLOCK_N=8, BLOCK_K=512, num_warps=4, num_stages=3),
                    down=dict(BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=3))
    if n_slots <= PER_EXPERT_MAX_SLOTS:
        return dict(kind="dot", BLOCK_M=PER_EXPERT_MAX_SLOTS, GROUP_M=1,
                    up=dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
                    down=dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3))
    if n_slots <= 64 * n_experts:
        return dict(kind="dot", BLOCK_M=128, GROUP_M=8, up=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
                    down=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3))
    return dict(kind="dot", BLOCK_M=128, GROUP_M=8, up=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                down=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4))


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def _count(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([n], device=device)


def align_blocks(experts_NK: torch.Tensor, n_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Slot ids grouped by expert, each expert's run padded to block_m rows (padding = n_slots), the
    expert of each block, the padded row count (a 1-element tensor) and the row capacity. Up to block_m
    slots every expert gets one block (no sort); beyond, a stable sort by expert. No host synchronisation."""
    flat = experts_NK.reshape(-1)
    S, E, dev = flat.numel(), n_experts, flat.device
    if S <= block_m:  # per-expert blocks: slot s goes to row (its expert, its rank among that expert's slots)
        onehot = flat[None, :] == _arange(E, dev)[:, None]  # (E, S)
        col = torch.where(onehot, onehot.cumsum(1) - 1, block_m)  # non-members to a spare column, dropped
        src = torch.where(onehot, _arange(S, dev)[None, :], S)
        ids = torch.full((E, block_m + 1), S, dtype=torch.long, device=dev).scatter_(1, col, src)
        return ids[:, :block_m].reshape(-1), _arange(E, dev), _count(E * block_m, dev), E * block_m
    capacity = S + min(E, S) * (block_m - 1)
    capacity = triton.cdiv(capacity, block_m) * block_m
    counts = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    cnt_start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + _arange(S, dev) - cnt_start[sorted_e]
    ids = torch.full((capacity,), S, dtype=torch.long, device=dev).scatter_(0, dest, order)
    blk = torch.searchsorted(pad_end, torch.arange(0, capacity, block_m, device=dev), right=True)
    return ids, blk.clamp_(max=E - 1), pad_end[-1:], capacity


def _launch_options(tiles: dict, dtype: torch.dtype, dot: bool = True) -> dict:
    """Triton launch options of one kernel's tiles. float32 tiles are twice the bytes: the matmul
    kernels then take half the K depth and at most 2 pipeline stages, so they fit shared memory."""
    opts = dict(tiles)
    if dtype == torch.float32 and dot:
        opts["BLOCK_K"] = max(16, opts["BLOCK_K"] // 2)
        opts["num_stages"] = min(opts["num_stages"], 2)
    return opts


def slot_layout(cfg: dict, experts_NK: torch.Tensor, n_experts: int) -> tuple | None:
    """What a config's kernels read to find their rows: None for the matrix-vector kernels (a program per
    slot), else align_blocks' (ids, block experts, padded rows, capacity) for its BLOCK_M."""
    return None if cfg["kind"] == "gemv" else align_blocks(experts_NK, n_experts, cfg["BLOCK_M"])


def launch_up(cfg: dict, tiles: dict, layout: tuple | None, x_ND: torch.Tensor, w1_EHD: torch.Tensor,
              w3_EHD: torch.Tensor, h_SH: torch.Tensor, experts_NK: torch.Tensor) -> None:
    """h_SH = SiLU(x w1^T) * (x w3^T) for every token-slot, with the config's kernel and these tiles."""
    (N, D), (_, H, _), K = x_ND.shape, w1_EHD.shape, experts_NK.shape[1]
    t = _launch_options(tiles, x_ND.dtype, cfg["kind"] == "dot")
    args = (*x_ND.stride(), *w1_EHD.stride(), *h_SH.stride())
    if layout is None:
        _up_gemv_kernel[(N * K * triton.cdiv(H, t["BLOCK_N"]),)](
            x_ND, w1_EHD, w3_EHD, h_SH, experts_NK.reshape(-1), D, H, K, *args, EVEN_K=D % t["BLOCK_K"] == 0, **t)
        return
    ids, blk, n_pad, capacity = layout
    bm = cfg["BLOCK_M"]
    _up_kernel[(triton.cdiv(capacity, bm) * triton.cdiv(H, t["BLOCK_N"]),)](
        x_ND, w1_EHD, w3_EHD, h_SH, ids, blk, n_pad, N * K, capacity, D, H, K, *args, BLOCK_M=bm,
        GROUP_M=cfg["GROUP_M"], IEEE=x_ND.dtype == torch.float32, UPCAST=INTERPRETED, **t)


def launch_down(cfg: dict, tiles: dict, layout: tuple | None, h_SH: torch.Tensor, w2_EDH: torch.Tensor,
                y_SD: torch.Tensor, rw_S: torch.Tensor, experts_NK: torch.Tensor) -> None:
    """y_SD = rw_S * (h w2^T) for every token-slot, with the config's kernel and these tiles."""
    (S, H), D = h_SH.shape, w2_EDH.shape[1]
    t = _launch_options(tiles, h_SH.dtype, cfg["kind"] == "dot")
    args = (*h_SH.stride(), *w2_EDH.stride(), *y_SD.stride())
    if layout is None:
        _down_gemv_kernel[(S * triton.cdiv(D, t["BLOCK_N"]),)](
            h_SH, w2_EDH, y_SD, rw_S, experts_NK.reshape(-1), D, H, *args, EVEN_K=H % t["BLOCK_K"] == 0, **t)
        return
    ids, blk, n_pad, capacity = layout
    bm = cfg["BLOCK_M"]
    _down_kernel[(triton.cdiv(capacity, bm) * triton.cdiv(D, t["BLOCK_N"]),)](
        h_SH, w2_EDH, y_SD, rw_S, ids, blk, n_pad, S, capacity, D, H, *args, BLOCK_M=bm,
        GROUP_M=cfg["GROUP_M"], IEEE=h_SH.dtype == torch.float32, UPCAST=INTERPRETED, **t)


def fused_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
              experts_NK: torch.Tensor, weights_NK: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """The two fused launches (no autograd): out_ND = sum_k weights_NK[:, k] * SwiGLU_{experts_NK[:, k]}(x_ND)."""
    N, D = x_ND.shape
    E, H, _ = w1_EHD.shape
    K = experts_NK.shape[1]
    if not (w1_EHD.dtype == w2_EDH.dtype == w3_EHD.dtype == x_ND.dtype):
        raise ValueError(f"triton MoE wants one dtype, got x {x_ND.dtype}, w1 {w1_EHD.dtype}, w2 {w2_EDH.dtype}, "
                         f"w3 {w3_EHD.dtype}")
    if w3_EHD.stride() != w1_EHD.stride():
        raise ValueError("w1 and w3 must have the same strides")
    cfg = config or block_config(N * K, E)
    layout = slot_layout(cfg, experts_NK, E)
    h_SH = x_ND.new_empty(N * K, H)
    y_SD = x_ND.new_empty(N * K, D)
    launch_up(cfg, cfg["up"], layout, x_ND, w1_EHD, w3_EHD, h_SH, experts_NK)
    # the router weights are read in any dtype, in float32
    launch_down(cfg, cfg["down"], layout, h_SH, w2_EDH, y_SD, weights_NK.reshape(-1), experts_NK)
    if K == 2:  # one elementwise add: a reduction kernel over a dimension of 2 costs several times more
        y_NKD = y_SD.view(N, K, D)
        return y_NKD[:, 0] + y_NKD[:, 1]
    return y_SD.view(N, K, D).sum(1) if K > 1 else y_SD


_state = {"checked": False, "broken": None}  # first launch on this machine: did the kernels build?


def _fused_or_grouped(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                      experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Inference: the fused kernels up to FUSED_MAX_SLOTS token-slots, else (or if they cannot be built on this
    GPU, warned once) the grouped path."""
    args = (x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)
    if x_ND.shape[0] == 0:
        return torch.zeros_like(x_ND)
    if _state["broken"] is not None or experts_NK.numel() > FUSED_MAX_SLOTS:
        return grouped_moe(*args)
    if _state["checked"]:
        return fused_moe(*args)
    try:
        out = fused_moe(*args)
    except (TritonError, RuntimeError) as err:
        _state["broken"] = f"{type(err).__name__}: {err}"
        warnings.warn(f"triton MoE kernels failed on this device ({_state['broken'][:300]}); "
                      f"using the grouped backend", stacklevel=2)
        return grouped_moe(*args)
    _state["checked"] = True
    return out


# the same, as one opaque op for torch.compile: inductor fuses the code around it and leaves the kernels
# (and their host-side layout choice) alone, so a compiled decode step keeps the fused MoE
@torch.library.custom_op("smoe::triton_moe", mutates_args=())
def triton_moe_op(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                  experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """_fused_or_grouped as a torch.library op (inference only: it has no autograd formula)."""
    return _fused_or_grouped(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


@triton_moe_op.register_fake
def _(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK):
    return x_ND.new_empty(x_ND.shape)  # contiguous, as every path returns


def triton_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
               experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """The `triton` backend: fused kernels for inference up to FUSED_MAX_SLOTS token-slots; the `grouped`
    path beyond (cuBLAS is faster there), when gradients are needed, or when the kernels cannot be built
    on this GPU (warned once). Under torch.compile the kernels are one opaque op (smoe::triton_moe)."""
    args = (x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w1_EHD, w2_EDH, w3_EHD, weights_NK)):
        return grouped_moe(*args)
    if x_ND.device.type != "cuda" and not INTERPRETED:
        if torch.compiler.is_compiling():  # e.g. a CPU step compiled with this backend set: grouped's formulations
            return grouped_moe(*args)
        raise ValueError(f"the triton MoE backend runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1), "
                         f"got {x_ND.device}; use the 'grouped' backend")
    if torch.compiler.is_compiling():
        return triton_moe_op(*args)
    return _fused_or_grouped(*args)
