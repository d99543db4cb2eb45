"""The attention of one engine step: many sequences of different lengths packed into one row.

The model runs tokens (1, T) where T is the sum of every scheduled sequence's new tokens, decodes
first (one token each), then prefill chunks. For every layer this object writes the new K/V into the
sequences' blocks, then attends: all decodes together as one batch over their gathered (padded) keys,
and each prefill chunk on its own with a causal (and sliding-window) mask over its gathered keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smoe.engine.kv import BlockPool
from smoe.model.attention import sdpa


@dataclass
class SeqSlice:
    """One sequence's part of a packed step."""

    start: int  # position of its first new token (positions before it are cached)
    n: int  # new tokens in this step
    table: list[int]  # block table: physical block of each logical block (-1: dropped)


class PagedAttention:
    """Attend for a packed step: slices of decodes (n == 1) first, then prefill chunks, in row order."""

    def __init__(self, pool: BlockPool, slices: list[SeqSlice], window: int | None, device: torch.device):
        self.pool = pool
        bs = pool.block_size
        n_dec = 0
        while n_dec < len(slices) and slices[n_dec].n == 1:
            n_dec += 1
        if any(s.n == 1 for s in slices[n_dec:]):
            raise ValueError("PagedAttention: decodes (one new token) must come before prefill chunks")
        write = [s.table[p // bs] * bs + p % bs for s in slices for p in range(s.start, s.start + s.n)]
        self.write_slots = torch.tensor(write, dtype=torch.long).to(device)
        self.n_dec = n_dec
        self.dec_slots = self.dec_mask = None
        self.dec_shape: tuple[int, ...] = ()
        if n_dec:
            dec = slices[:n_dec]
            ctx = torch.tensor([s.start + 1 for s in dec])  # keys after writing this step's token
            first = (ctx - window).clamp(min=0) if window else torch.zeros_like(ctx)
            L = int((ctx - first).max())
            width = max(len(s.table) for s in dec)
            tables = torch.tensor([s.table + [0] * (width - len(s.table)) for s in dec], dtype=torch.long)
            kpos = first[:, None] + torch.arange(L)[None]  # (S, L)
            valid = kpos < ctx[:, None]
            kpos = torch.minimum(kpos, ctx[:, None] - 1)
            slots = tables.gather(1, kpos // bs) * bs + kpos % bs
            self.dec_shape = tuple(slots.shape)
            self.dec_slots = slots.reshape(-1).to(device)  # (S * L,): index_select is far faster than [slots]
            self.dec_mask = valid[:, None, None, :].to(device)  # (S, 1, 1, L)
        self.prefills: list[tuple[torch.Tensor, torch.Tensor]] = []
        for s in slices[n_dec:]:
            first = max(0, s.start - window + 1) if window else 0
            kpos = torch.arange(first, s.start + s.n)
            qpos = torch.arange(s.start, s.start + s.n)
            table = torch.tensor(s.table, dtype=torch.long)
            slots = table[kpos // bs] * bs + kpos % bs
            mask = kpos[None, :] <= qpos[:, None]  # (n, keys)
            if window:
                mask = mask & (qpos[:, None] - kpos[None, :] < window)
            self.prefills.append((slots.to(device), mask[None, None].to(device)))
        self.rows = [s.n for s in slices[n_dec:]]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, T, hd), k and v (1, Hkv, T, hd) of the packed step -> (1, H, T, hd)."""
        kc, vc = self.pool.k[layer], self.pool.v[layer]  # (slots, Hkv, hd)
        kc.index_copy_(0, self.write_slots, k[0].transpose(0, 1))
        vc.index_copy_(0, self.write_slots, v[0].transpose(0, 1))
        outs = []
        if self.n_dec:
            q_SH1d = q[0, :, : self.n_dec].transpose(0, 1)[:, :, None]
            shape = (*self.dec_shape, *kc.shape[1:])  # (S, L, Hkv, hd)
            k_SHLd = kc.index_select(0, self.dec_slots).view(shape).permute(0, 2, 1, 3)
            v_SHLd = vc.index_select(0, self.dec_slots).view(shape).permute(0, 2, 1, 3)
            o_SH1d = sdpa(q_SH1d, k_SHLd, v_SHLd, self.dec_mask)
            outs.append(o_SH1d[:, :, 0].transpose(0, 1)[None])  # (1, H, S, hd)
        row = self.n_dec
        for (slots, mask), n in zip(self.prefills, self.rows):
            k_1HLd = kc.index_select(0, slots).transpose(0, 1)[None]
            v_1HLd = vc.index_select(0, slots).transpose(0, 1)[None]
            outs.append(sdpa(q[:, :, row: row + n], k_1HLd, v_1HLd, mask))
            row += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
