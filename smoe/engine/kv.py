"""Paged KV cache: one pool of fixed-size blocks shared by all sequences, and its free list.

Storage is k, v: (n_layers, n_blocks * block_size, Hkv, hd). Block b owns the token slots
[b * block_size, (b + 1) * block_size); a sequence's block table maps its logical block i (positions
i * block_size ...) to a physical block, so its token at position p lives in slot
table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import re

import torch

from smoe.kernels.memory import huge_zeros

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(size: int | float | str) -> int:
    """Bytes from an int or a string such as '512MiB', '2GB', '1.5GiB'."""
    if isinstance(size, int | float) and not isinstance(size, bool):
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {size!r}; use e.g. 512MiB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def bytes_per_block(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Memory of one block: K and V of block_size tokens in every layer."""
    return 2 * n_layers * block_size * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class BlockPool:
    """The K/V storage of every layer in n_blocks blocks of block_size tokens, and which blocks are free."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one token, got {n_blocks} "
                             f"blocks of {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        shape = (n_layers, n_blocks * block_size, n_kv_heads, head_dim)
        self.k = huge_zeros(shape, dtype, device)  # (L, slots, Hkv, hd); in huge pages on the CPU
        self.v = huge_zeros(shape, dtype, device)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: low ids are handed out first

    @classmethod
    def for_model(cls, model, memory: int | str, block_size: int = 16, max_blocks: int | None = None) -> BlockPool:
        """A pool using `memory` bytes (at most max_blocks blocks) for the model's layers, dtype and device."""
        cfg = model.config
        per_block = bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size, model.dtype)
        n_blocks = parse_bytes(memory) // per_block
        if max_blocks is not None:
            n_blocks = min(n_blocks, max_blocks)
        if n_blocks < 1:
            raise ValueError(f"KV cache memory {memory!r} is below one block ({per_block} bytes of "
                             f"{block_size} tokens)")
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, n_blocks, block_size, model.dtype, model.device)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.n_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n free blocks (raises RuntimeError when fewer are free: callers check num_free first)."""
        if n > len(self._free):
            raise RuntimeError(f"KV pool: {n} blocks asked for, {len(self._free)} free")
        out = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return out

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool (entries < 0, dropped earlier, are skipped)."""
        self._free.extend(b for b in reversed(blocks) if b >= 0)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold n_tokens positions starting at 0."""
        return -(-n_tokens // self.block_size)
