"""Attention over positions and caches, kept outside the layer math.

A model forward is handed one `Attend` object: a callable (layer, q, k, v) -> out that knows the
positions, the mask and any KV cache of this step. q is (B, H, T, hd), k and v (B, Hkv, T, hd).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from smoe.kernels.linear import materialize
from smoe.kernels.memory import huge_zeros


class Attend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query K/V heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sdpa for one query per sequence (q (B, H, 1, hd), mask (B, 1, 1, S)) as fp32 multiply-and-sum
    reductions: under torch.compile these fuse into a pass over the cache, where the library kernel
    costs far more than the few flops of a decode step. q is materialized first, or inductor would
    recompute its rotary embedding (sines and cosines) for every cached position."""
    B, H, _, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q_BKG1D = materialize(q.view(B, Hkv, H // Hkv, 1, hd).float() * hd**-0.5)
    s_BKGS = (q_BKG1D * k[:, :, None].float()).sum(-1)  # (B, Hkv, G, S)
    s_BKGS = s_BKGS.masked_fill(~mask.view(B, 1, 1, S), float("-inf"))
    p_BKGS = torch.softmax(s_BKGS, dim=-1)
    o_BKGD = (p_BKGS[..., None] * v[:, :, None].float()).sum(-2)
    return o_BKGD.view(B, H, 1, hd).to(q.dtype)


class SelfAttention:
    """Causal attention among the T tokens of this step (training, scoring, prefill without cache).

    positions (B, T): token positions (for the sliding window); valid (B, T): False for padding;
    segments (B, T): ids of packed sequences, which never attend to each other.
    """

    def __init__(self, positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 window: int | None = None, segments: torch.Tensor | None = None):
        self.positions, self.valid, self.window, self.segments = positions, valid, window, segments
        self._mask: torch.Tensor | None = None

    def mask(self, T: int, device: torch.device) -> torch.Tensor:
        """Boolean (B or 1, 1, T, T) mask: True where query i may attend key j."""
        idx = torch.arange(T, device=device)
        m = (idx[None, :] <= idx[:, None])[None]  # (1, T, T)
        if self.window is not None:
            pos = self.positions if self.positions is not None else idx[None]
            m = m & (pos[:, :, None] - pos[:, None, :] < self.window)
        if self.segments is not None:
            m = m & (self.segments[:, :, None] == self.segments[:, None, :])
        if self.valid is not None:
            # padding keys are never seen; a padding query sees itself so no row is empty
            m = (m & self.valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        return m[:, None]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.window is None and self.valid is None and self.segments is None:
            return sdpa(q, k, v, causal=True)
        if self._mask is None:
            self._mask = self.mask(q.shape[2], q.device)
        return sdpa(q, k, v, self._mask)


def visible(k_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which cached keys a query sees, from their positions (-1: an empty or padding slot): earlier or its
    own, and within the sliding window if there is one. k_pos (B, 1, n), q_pos (B, T, 1) -> (B, T, n)."""
    m = (k_pos >= 0) & (k_pos <= q_pos)
    return m if window is None else m & (q_pos - k_pos < window)


class KVCache:
    """Static K/V buffers for B sequences decoded in lock-step (left-padded), one column per step.

    With a sliding window W the buffer is a rolling one of W slots (Mistral's semantics: column c
    lives in slot c % W); otherwise it holds max_len columns. slot_pos keeps the position stored in
    each slot (-1: empty or padding), from which every step's mask is derived.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 window: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, static: bool = False):
        self.window = window
        self.static = static  # attend over the whole buffer every step (fixed shapes, for CUDA graphs)
        self.size = min(max_len, window) if window else max_len
        # one tensor per layer, not views of one: a compiled step then updates each in place, where
        # in-place writes into views of a shared buffer made it rebuild and copy back the whole cache;
        # one spare column past `size`, never used, so the n <= size slots a step attends over are
        # always fewer than the buffer's: one compiled graph then holds for every n (see _StepModule)
        shape = (batch_size, n_kv_heads, self.size + 1, head_dim)
        self.k = [huge_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.v = [huge_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.slot_pos = torch.full((batch_size, self.size), -1, dtype=torch.long, device=device)
        self.length = 0  # columns appended so far
        self.index = torch.arange(self.size + 1, device=device)  # slot numbers, sliced into a compiled step's inputs

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, static: bool = False) -> KVCache:
        cfg = model.config
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, cfg.head_dim, max_len, cfg.sliding_window,
                   model.dtype, model.device, static)

    def column(self) -> tuple[int, int]:
        """Where one more column goes: its slot, and how many slots (from the first) its query attends over.
        Appends nothing (see step; a compiled step that writes the column itself then adds 1 to length)."""
        c0, S = self.length, self.size
        if self.window is None and c0 + 1 > S:
            raise ValueError(f"KV cache holds {S} tokens; {c0} used, 1 more asked for")
        return c0 % S, (S if self.static else min(c0 + 1, S))  # empty slots (position -1) are masked out

    def step(self, positions: torch.Tensor, valid: torch.Tensor | None = None) -> Attend:
        """The attention for appending T columns at positions (B, T); valid (B, T) marks real tokens."""
        B, T = positions.shape
        c0, S = self.length, self.size
        if self.window is None and c0 + T > S:
            raise ValueError(f"KV cache holds {S} tokens; {c0} used, {T} more asked for")
        device = positions.device
        cols = torch.arange(c0, c0 + T, device=device)
        new_pos = positions if valid is None else positions.masked_fill(~valid, -1)
        q_pos = positions[:, :, None]  # (B, T, 1)
        self.length += T
        if c0 + T <= S or T == 1:
            # write first, then attend over the filled part of the buffer
            slots = cols % S
            self.slot_pos[:, slots] = new_pos
            n = S if self.static else min(c0 + T, S)  # empty slots (position -1) are masked out
            m = visible(self.slot_pos[:, None, :n], q_pos, self.window)
            if valid is not None:  # a padding query sees its own slot, so no row is empty (real ones do already)
                m = m | (slots[:, None] == torch.arange(n, device=device))[None]
            return _WriteThenAttend(self, slots, m[:, None])
        # a chunk that wraps the rolling buffer: attend over [old slots | new keys], keep the last S
        keep = min(T, S)
        k_pos = torch.cat([self.slot_pos, new_pos], dim=1)[:, None, :]  # (B, 1, S+T)
        order_ok = torch.cat([torch.ones(T, S, dtype=torch.bool, device=device),
                              torch.ones(T, T, dtype=torch.bool, device=device).tril()], dim=1)
        own = torch.cat([torch.zeros(T, S, dtype=torch.bool, device=device),
                         torch.eye(T, dtype=torch.bool, device=device)], dim=1)
        m = (order_ok & (k_pos >= 0) & (q_pos - k_pos < self.window)) | own
        slots = cols[T - keep:] % S
        self.slot_pos[:, slots] = new_pos[:, T - keep:]
        return _AttendThenWrite(self, slots, T - keep, m[:, None])


class _WriteThenAttend:
    """Write the new columns into their slots, then attend over the first n slots, n = mask.shape[-1]
    (a compiled step takes n from the mask, so one graph serves every cache length)."""

    def __init__(self, cache: KVCache, slots: torch.Tensor, mask: torch.Tensor):
        self.cache, self.slots, self.mask = cache, slots, mask  # mask (B, 1, T, n)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (B, Hkv, S + 1, hd)
        ck.index_copy_(2, self.slots, k)
        cv.index_copy_(2, self.slots, v)
        n = self.mask.shape[-1]
        if q.shape[2] == 1 and torch.compiler.is_compiling():  # a compiled decode step
            return attend_one(q, ck[:, :, :n], cv[:, :, :n], self.mask)
        return sdpa(q, ck[:, :, :n], cv[:, :, :n], self.mask)


class _AttendThenWrite:
    def __init__(self, cache: KVCache, slots: torch.Tensor, first_kept: int, mask: torch.Tensor):
        self.cache, self.slots, self.first_kept, self.mask = cache, slots, first_kept, mask

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        S = self.cache.size  # the buffer's slots (less the spare column), then the T new keys
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        out = sdpa(q, torch.cat([ck[:, :, :S], k], dim=2), torch.cat([cv[:, :, :S], v], dim=2), self.mask)
        ck.index_copy_(2, self.slots, k[:, :, self.first_kept:])
        cv.index_copy_(2, self.slots, v[:, :, self.first_kept:])
        return out
