"""CPU memory: transparent huge pages (Linux) for the weights a decode step streams, and a malloc that
keeps freed memory for reuse (glibc) so a training step's gradients cost no page faults.

With the default 4 KiB pages, a single core streaming a weight matrix takes a TLB miss every 4 KiB
and its prefetchers stop at every page boundary; on this machine's EPYC that held a one-thread
read to 24-27 GB/s, against 32-34 GB/s for the same read from huge pages. torch allocates CPU memory
in huge pages only with THP_MEM_ALLOC_ENABLE=1 set before it is imported (for every allocation);
these helpers do it for chosen tensors: memory is freshly mapped, advised MADV_HUGEPAGE, then filled.
Where the kernel has THP off (or on non-Linux systems) they return ordinary tensors.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
# tensors of at least this many bytes go into huge pages (smaller ones waste too much of a 2 MiB page)
HUGE_MIN_BYTES = 4 << 20


@functools.cache
def thp_mode() -> str:
    """The kernel's transparent-huge-page mode: 'always', 'madvise' or 'never' ('never' off Linux)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "never"


def _worth_huge(nbytes: int) -> bool:
    return nbytes >= HUGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() != "never"


def huge_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
               device: torch.device | str | None = None) -> torch.Tensor:
    """torch.empty; on the CPU in memory advised into huge pages (a plain tensor where THP is off).

    The memory is a fresh private anonymous mapping (never recycled heap, whose pages may already be
    4 KiB ones), one huge page longer so the tensor starts on a 2 MiB boundary; the spare tail is never
    touched, so it costs address space, not memory. Pages become huge ones as they are first written."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if torch.device(device or "cpu").type != "cpu" or not _worth_huge(nbytes):
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
        raw = torch.frombuffer(buf, dtype=torch.uint8)  # keeps buf alive as long as any view of it
        start = -raw.data_ptr() % HUGE_PAGE
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    except OSError:  # mapping or advice refused (a memory limit, a sandbox): ordinary memory
        return torch.empty(shape, dtype=dtype)
    return raw[start:start + nbytes].view(dtype).view(shape)


def huge_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """torch.zeros; on the CPU a large buffer in huge pages (a KV cache is streamed like the weights)."""
    return huge_empty(shape, dtype, device).zero_()


def huge_copy(t: torch.Tensor, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """t converted to dtype, contiguous, on device (default: t's), on the CPU in huge pages; as
    t.to(device, dtype).contiguous() (t itself if it already is) where huge pages are not used."""
    dtype, device = dtype or t.dtype, torch.device(device or t.device)
    if device.type != "cpu" or not _worth_huge(t.numel() * dtype.itemsize):
        return t.to(device=device, dtype=dtype).contiguous()
    out = huge_empty(t.shape, dtype)
    if out.untyped_storage().nbytes() == out.nbytes:  # not advised (mapping refused): no need for a new copy
        return t.to(device=device, dtype=dtype).contiguous()
    return out.copy_(t)


@torch.no_grad()
def to_huge_pages(module: torch.nn.Module) -> int:
    """Move a CPU module's large parameters and buffers into huge pages, in place; returns bytes moved.

    Tied parameters stay tied (each tensor is moved once)."""
    moved: dict[int, torch.Tensor] = {}
    total = 0
    for sub in module.modules():
        for group in (sub._parameters, sub._buffers):
            for name, t in group.items():
                if t is None or t.device.type != "cpu" or t.nbytes < HUGE_MIN_BYTES:
                    continue
                if id(t) not in moved:
                    new = huge_copy(t.detach())
                    if new.data_ptr() == t.data_ptr():
                        continue
                    moved[id(t)] = new
                    total += t.nbytes
                if isinstance(t, torch.nn.Parameter):
                    t.data = moved[id(t)]
                else:
                    group[name] = moved[id(t)]
    return total


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of t's memory that the kernel backs with huge pages now (from /proc/self/smaps; 0 if unknown)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.nbytes
    total, cur = 0, None
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            a, b = (int(v, 16) for v in head.split("-"))
            cur = (a, b) if a < hi and b > lo else None
        elif cur is not None and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return min(total, t.nbytes)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, large blocks included; True where it took effect.

    By default glibc serves blocks over 32 MiB (less, before its threshold adapts) with fresh mmaps and gives
    them back on free, so each training step pays a page fault per 4 KiB of every large tensor it makes
    again: an 8-expert layer's stacked weight gradients, set to None by zero_grad and re-made by the next
    backward. With no mmaps and no trimming, freed memory stays in the heap and is reused, as jemalloc or
    tcmalloc (what PyTorch's CPU tuning guides preload) would do; the process then holds its peak memory.
    Set SMOE_KEEP_FREED_MEMORY=0 to leave malloc as it is. Process-wide and idempotent; False off glibc."""
    if os.environ.get("SMOE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (an AttributeError off glibc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1: never trim (mallopt(3)); trimming goes first, or memory freed with mmaps off would leave through the top
    return bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_MMAP_MAX, 0))
