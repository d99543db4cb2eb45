"""Huge-page placement of CPU tensors: same values, tied weights stay tied, loads land there; and a malloc that
keeps freed memory: a large tensor made again costs no page faults."""

from __future__ import annotations

import mmap
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from smoe import ModelConfig, Transformer
from smoe.checkpoint import load_model
from smoe.kernels import memory
from smoe.kernels.memory import HUGE_MIN_BYTES, HUGE_PAGE, huge_copy, huge_empty, huge_page_bytes, to_huge_pages
from smoe.model.attention import KVCache

THP = memory.thp_mode() != "never" and hasattr(mmap, "MADV_HUGEPAGE")


def _advised(t: torch.Tensor) -> bool:
    return t.data_ptr() % HUGE_PAGE == 0 and t.untyped_storage().nbytes() == t.nbytes + HUGE_PAGE


def test_small_tensors_stay_ordinary():
    t = huge_empty((HUGE_MIN_BYTES // 4 - 1,), torch.float32)
    assert t.untyped_storage().nbytes() == t.nbytes
    x = torch.arange(10.0)
    assert huge_copy(x, torch.bfloat16).equal(x.bfloat16())


@pytest.mark.skipif(not THP, reason="transparent huge pages are off on this system")
def test_huge_copy_is_aligned_equal_and_backed_by_huge_pages():
    x = torch.randn(3, 1024, 1000)  # 12 MB, not a multiple of 2 MiB
    y = huge_copy(x)
    assert _advised(y) and y.is_contiguous() and y.shape == x.shape
    assert torch.equal(x, y)
    z = huge_copy(x, torch.bfloat16)
    assert z.dtype == torch.bfloat16 and torch.equal(z, x.bfloat16())
    # written after madvise: the kernel backs (most of) it with 2 MiB pages
    assert huge_page_bytes(y) >= HUGE_PAGE
    assert huge_page_bytes(torch.zeros(10)) == 0


@pytest.mark.skipif(not THP, reason="transparent huge pages are off on this system")
def test_to_huge_pages_keeps_values_and_ties(tmp_path):
    cfg = ModelConfig(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=256, n_experts=4, top_k=2,
                      vocab_size=16000, tie_embeddings=True)
    model = Transformer(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emb = model.tok_embeddings.weight
    moved = to_huge_pages(model)
    assert moved == emb.nbytes  # 8 MB table: the only tensor of 4+ MB, counted once though tied
    assert model.output.weight is model.tok_embeddings.weight is emb and _advised(emb)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert _advised(loaded.tok_embeddings.weight)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.skipif(not THP, reason="transparent huge pages are off on this system")
def test_load_places_stacked_experts_in_huge_pages(tmp_path):
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=1024, n_experts=4, top_k=2,
                      vocab_size=512)
    model = Transformer(cfg).eval()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype="float32")
    moe = loaded.layers[0].feed_forward
    assert moe.w1.nbytes >= HUGE_MIN_BYTES  # 4 MiB stacked experts, filled slice by slice
    assert _advised(moe.w1) and _advised(moe.w2) and _advised(moe.w3)
    assert not _advised(moe.gate.weight)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_kv_cache_buffers_are_zero():
    cache = KVCache(2, 1, 4, 128, 4096)  # 8 MB per layer and tensor: huge pages where available
    assert len(cache.k) == 2 and all(t.shape == (1, 4, 4097, 128) and not t.any() for t in cache.k + cache.v)
    assert cache.k[0].data_ptr() != cache.k[1].data_ptr()


GLIBC = platform.libc_ver()[0] == "glibc"
_FAULTS = textwrap.dedent("""
    import resource, torch
    from smoe.kernels.memory import keep_freed_memory

    def faults_of_a_large_tensor_made_again():
        for _ in range(2):
            r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = torch.empty(64 << 20, dtype=torch.uint8)
            t.fill_(1)
            del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0

    before = faults_of_a_large_tensor_made_again()
    kept = keep_freed_memory()
    faults_of_a_large_tensor_made_again()  # the first one after: memory from the heap, faulted once
    print(before, kept, faults_of_a_large_tensor_made_again(), keep_freed_memory())
""")


def _child(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2])
    return out.stdout.split()


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's malloc")
def test_kept_freed_memory_spares_the_page_faults_of_a_large_tensor_made_again():
    before, kept, after, again = _child({})
    # 64 MiB is 16384 pages of 4 KiB: glibc maps it afresh each time, then no longer
    assert kept == again == "True"
    assert int(before) >= 8192 and int(after) < 256, (before, after)


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_can_be_turned_off():
    before, kept, after, _ = _child({"SMOE_KEEP_FREED_MEMORY": "0"})
    assert kept == "False" and int(after) >= 8192
