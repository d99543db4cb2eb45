"""Fused MoE expert compute in Triton: two launches per layer, the vLLM fused_moe / MegaBlocks idea.

Token-slots are sorted by expert and each expert's run is padded to the block size, so every
BLOCK_M-row block of the sorted order belongs to one expert. Then
  1. up kernel: gathers the block's token rows of x straight from x (no x_SD copy), multiplies them
     by the expert's w1 and w3 tiles (two accumulators sharing the loads of x), and writes
     SiLU(x w1^T) * (x w3^T) for each slot;
  2. down kernel: multiplies those rows by the expert's w2 and scales them by the router weight,
     writing one row per token-slot; the K rows of a token are summed (deterministic, no atomics).
At decode sizes (few slots) every slot gets its own block: no sorting at all, and the block layout
is a constant, so a decode step launches just the two kernels and a sum (CUDA-graph friendly).

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


# kernels built by Triton's interpreter (TRITON_INTERPRET=1 when this module was imported) run on the CPU
INTERPRETED = type(_up_kernel).__name__ == "InterpretedFunction"

# slots up to which every slot gets its own block (no sort: the decode layout)
PER_SLOT_MAX_SLOTS = 16


def block_config(n_slots: int, n_experts: int) -> dict:
    """Tile sizes by the number of token-slots: thin blocks for decode, square-ish for prefill."""
    if n_slots <= PER_SLOT_MAX_SLOTS:
        # memory-bound: thin tiles so that even the down projection (D columns) spreads over every SM
        return dict(BLOCK_M=16, up=dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
                    down=dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4), GROUP_M=1)
    if n_slots <= 64 * n_experts:
        return dict(BLOCK_M=32, up=dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
                    down=dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4), GROUP_M=4)
    return dict(BLOCK_M=64, up=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                down=dict(BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3), GROUP_M=8)


@functools.lru_cache(maxsize=64)
def _per_slot_layout(n_slots: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids (slot s at row s * block_m, padding elsewhere) and the padded row count, as constants."""
    rows = torch.arange(n_slots * block_m, device=device).view(n_slots, block_m)
    ids = torch.where(rows % block_m == 0, rows // block_m, n_slots).reshape(-1)
    return ids, torch.tensor([n_slots * block_m], device=device)


def align_blocks(experts_NK: torch.Tensor, n_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sorted slot ids padded per expert to block_m rows (padding = n_slots), the expert of each block,
    the padded row count (a 1-element tensor) and the row capacity. No host synchronisation."""
    flat = experts_NK.reshape(-1)
    S = flat.numel()
    if S <= PER_SLOT_MAX_SLOTS:
        ids, n_pad = _per_slot_layout(S, block_m, flat.device)
        return ids, flat, n_pad, S * block_m
    E = n_experts
    capacity = S + min(E, S) * (block_m - 1)
    capacity = triton.cdiv(capacity, block_m) * block_m
    counts = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    cnt_start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + torch.arange(S, device=flat.device) - cnt_start[sorted_e]
    ids = torch.full((capacity,), S, dtype=torch.long, device=flat.device).scatter_(0, dest, order)
    blk = torch.searchsorted(pad_end, torch.arange(0, capacity, block_m, device=flat.device), right=True)
    return ids, blk.clamp_(max=E - 1), pad_end[-1:], capacity


def fused_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
              experts_NK: torch.Tensor, weights_NK: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """The two fused launches (no autograd): out_ND = sum_k weights_NK[:, k] * SwiGLU_{experts_NK[:, k]}(x_ND)."""
    N, D = x_ND.shape
    E, H, _ = w1_EHD.shape
    K = experts_NK.shape[1]
    S = N * K
    if not (w1_EHD.dtype == w2_EDH.dtype == w3_EHD.dtype == x_ND.dtype):
        raise ValueError(f"triton MoE wants one dtype, got x {x_ND.dtype}, w1 {w1_EHD.dtype}, w2 {w2_EDH.dtype}, "
                         f"w3 {w3_EHD.dtype}")
    cfg = config or block_config(S, E)
    bm, gm = cfg["BLOCK_M"], cfg["GROUP_M"]
    ids, blk, n_pad, capacity = align_blocks(experts_NK, E, bm)
    if w3_EHD.stride() != w1_EHD.stride():
        raise ValueError("w1 and w3 must have the same strides")
    ieee = x_ND.dtype == torch.float32
    h_SH = x_ND.new_empty(S, H)
    up, down = dict(cfg["up"]), dict(cfg["down"])
    if x_ND.element_size() > 2:  # fp32 tiles are twice the bytes: fewer pipeline stages fit in shared memory
        up["num_stages"], down["num_stages"] = min(up["num_stages"], 2), min(down["num_stages"], 2)
    grid_up = (triton.cdiv(capacity, bm) * triton.cdiv(H, up["BLOCK_N"]),)
    _up_kernel[grid_up](x_ND, w1_EHD, w3_EHD, h_SH, ids, blk, n_pad, S, capacity, D, H, K,
                        x_ND.stride(0), x_ND.stride(1), w1_EHD.stride(0), w1_EHD.stride(1), w1_EHD.stride(2),
                        h_SH.stride(0), h_SH.stride(1), BLOCK_M=bm, BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"],
                        GROUP_M=gm, IEEE=ieee, UPCAST=INTERPRETED, num_warps=up["num_warps"],
                        num_stages=up["num_stages"])
    y_SD = x_ND.new_empty(S, D)
    rw_S = weights_NK.reshape(-1).float()
    grid_down = (triton.cdiv(capacity, bm) * triton.cdiv(D, down["BLOCK_N"]),)
    _down_kernel[grid_down](h_SH, w2_EDH, y_SD, rw_S, ids, blk, n_pad, S, capacity, D, H,
                            h_SH.stride(0), h_SH.stride(1), w2_EDH.stride(0), w2_EDH.stride(1), w2_EDH.stride(2),
                            y_SD.stride(0), y_SD.stride(1), BLOCK_M=bm, BLOCK_N=down["BLOCK_N"],
                            BLOCK_K=down["BLOCK_K"], GROUP_M=gm, IEEE=ieee, UPCAST=INTERPRETED,
                            num_warps=down["num_warps"], num_stages=down["num_stages"])
    return y_SD.view(N, K, D).sum(1) if K > 1 else y_SD


_state = {"checked": False, "broken": None}  # first launch on this machine: did the kernels build?


def triton_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
               experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """The `triton` backend: fused kernels for inference; the `grouped` path when gradients are needed,
    under torch.compile, or when the kernels cannot be built on this GPU (warned once)."""
    args = (x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)
    if torch.compiler.is_compiling():  # inside torch.compile: grouped's fixed-shape formulations
        return grouped_moe(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w1_EHD, w2_EDH, w3_EHD, weights_NK)):
        return grouped_moe(*args)
    if x_ND.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the triton MoE backend runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1), "
                         f"got {x_ND.device}; use the 'grouped' backend")
    if x_ND.shape[0] == 0:
        return torch.zeros_like(x_ND)
    if _state["broken"] is not None:
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
