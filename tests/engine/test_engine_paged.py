"""The paged pieces on their own: packed attention against a naive float64 loop, the block pool, and
the scheduler's budget, priorities, preemption and window dropping."""

import math

import pytest
import torch

from smoe import SamplingParams
from smoe.engine.attention import PagedAttention, SeqSlice
from smoe.engine.kv import BlockPool, parse_bytes
from smoe.engine.scheduler import Scheduler, Sequence, Status


def _naive_attention(q_HTd, k_HkLd, v_HkLd, q_pos, k_pos, window):
    """Softmax attention written out: repeat K/V heads, mask future (and out-of-window) keys."""
    H, Hk = q_HTd.shape[0], k_HkLd.shape[0]
    k, v = k_HkLd.repeat_interleave(H // Hk, 0), v_HkLd.repeat_interleave(H // Hk, 0)
    scores = q_HTd @ k.transpose(1, 2) / math.sqrt(q_HTd.shape[-1])
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window:
        allowed &= q_pos[:, None] - k_pos[None, :] < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("window", [None, 5])
def test_packed_attention_equals_a_naive_loop(window):
    g = torch.Generator().manual_seed(0)
    H, Hk, hd, bs, n_blocks = 4, 2, 8, 4, 64
    pool = BlockPool(n_layers=2, n_kv_heads=Hk, head_dim=hd, n_blocks=n_blocks, block_size=bs, dtype=torch.float64)
    free = torch.randperm(n_blocks, generator=g).tolist()  # scattered physical blocks
    # (cached tokens, new tokens): decodes first, then prefill chunks (one from scratch, one continuing)
    shapes = [(0, 1), (6, 1), (13, 1), (3, 1), (0, 7), (9, 5)]
    slices, history = [], []
    for cached, new in shapes:
        nb = -(-(cached + new) // bs)
        table = [free.pop() for _ in range(nb)]
        k_old = torch.randn(Hk, cached, hd, generator=g, dtype=torch.float64)
        v_old = torch.randn(Hk, cached, hd, generator=g, dtype=torch.float64)
        for p in range(cached):  # what earlier steps would have written
            slot = table[p // bs] * bs + p % bs
            pool.k[1, slot], pool.v[1, slot] = k_old[:, p], v_old[:, p]
        slices.append(SeqSlice(cached, new, table))
        history.append((k_old, v_old))
    T = sum(n for _, n in shapes)
    q = torch.randn(1, H, T, hd, generator=g, dtype=torch.float64)
    k = torch.randn(1, Hk, T, hd, generator=g, dtype=torch.float64)
    v = torch.randn(1, Hk, T, hd, generator=g, dtype=torch.float64)
    out = PagedAttention(pool, slices, window, torch.device("cpu"))(1, q, k, v)
    row = 0
    for (cached, new), s, (k_old, v_old) in zip(shapes, slices, history):
        kk = torch.cat([k_old, k[0, :, row: row + new]], 1)
        vv = torch.cat([v_old, v[0, :, row: row + new]], 1)
        ref = _naive_attention(q[0, :, row: row + new], kk, vv, torch.arange(cached, cached + new),
                               torch.arange(cached + new), window)
        torch.testing.assert_close(out[0, :, row: row + new], ref, rtol=1e-12, atol=1e-12)
        for j in range(new):  # the new keys landed in their blocks
            p = cached + j
            slot = s.table[p // bs] * bs + p % bs
            assert torch.equal(pool.k[1, slot], k[0, :, row + j]) and torch.equal(pool.v[1, slot], v[0, :, row + j])
        row += new
    with pytest.raises(ValueError, match="decodes .* must come before prefill chunks"):
        PagedAttention(pool, [SeqSlice(0, 3, [0]), SeqSlice(2, 1, [1])], None, torch.device("cpu"))


def test_block_pool_allocates_frees_and_sizes_from_memory():
    pool = BlockPool(n_layers=2, n_kv_heads=2, head_dim=4, n_blocks=5, block_size=3)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 2 and pool.num_used == 3
    with pytest.raises(RuntimeError, match="3 blocks asked for, 2 free"):
        pool.allocate(3)
    pool.free([a[0], -1, a[2]])  # -1: a block already dropped by the window
    assert pool.num_free == 4 and pool.blocks_for(7) == 3 and pool.blocks_for(6) == 2
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5 MB") == 1_500_000 and parse_bytes(1024) == 1024
    with pytest.raises(ValueError, match="cannot read a memory size"):
        parse_bytes("lots")

    class M:  # what for_model reads of a model
        config = type("C", (), dict(n_layers=2, n_kv_heads=2, head_dim=4))
        dtype, device = torch.float32, torch.device("cpu")
    per_block = 2 * 2 * 3 * 2 * 4 * 4  # K and V, layers, tokens, heads, head dim, bytes
    assert BlockPool.for_model(M, 10 * per_block + 5, block_size=3).n_blocks == 10
    assert BlockPool.for_model(M, 10 * per_block, block_size=3, max_blocks=4).n_blocks == 4
    with pytest.raises(ValueError, match="below one block"):
        BlockPool.for_model(M, per_block - 1, block_size=3)


def _seq(i: int, n_prompt: int, max_new: int = 100) -> Sequence:
    return Sequence(f"r{i}", list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_new), max_new, i)


def _run(sched: Scheduler, plan) -> None:
    """What the engine does after a step: tokens computed, one sampled where a sequence is complete."""
    for seq, n in plan:
        seq.num_computed += n
        if seq.num_computed == len(seq.tokens):
            seq.tokens.append(7)


def test_scheduler_chunks_prefills_puts_decodes_first_and_respects_limits():
    pool = BlockPool(1, 1, 2, n_blocks=100, block_size=4)
    sched = Scheduler(pool, max_num_seqs=3, max_num_batched_tokens=10)
    seqs = [_seq(0, 3), _seq(1, 25), _seq(2, 2), _seq(3, 2)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [(s.request_id, n) for s, n in plan] == [("r0", 3), ("r1", 7)]  # the budget cuts r1's prompt
    _run(sched, plan)
    plan = sched.schedule()
    assert [(s.request_id, n) for s, n in plan] == [("r0", 1), ("r1", 9)]  # decode first, then the chunk
    _run(sched, plan)
    plan = sched.schedule()
    assert [(s.request_id, n) for s, n in plan] == [("r0", 1), ("r1", 9)]
    _run(sched, plan)
    plan = sched.schedule()  # r1's prompt is done: r2 joins; r3 waits (3 sequences at most)
    assert [(s.request_id, n) for s, n in plan] == [("r0", 1), ("r1", 1), ("r2", 2)]
    assert [s.request_id for s in sched.waiting] == ["r3"]
    assert all(len(s.blocks) == pool.blocks_for(s.num_computed + n) for s, n in plan)
    sched.finish(seqs[0], "stop")
    assert seqs[0].status == Status.FINISHED and seqs[0].blocks == []


def test_scheduler_preempts_the_newest_and_recomputes_it():
    pool = BlockPool(1, 1, 2, n_blocks=6, block_size=4)
    sched = Scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = _seq(0, 11), _seq(1, 11)
    sched.add(old)
    sched.add(new)
    _run(sched, sched.schedule())  # 3 blocks each: the pool is full
    _run(sched, sched.schedule())  # 12 tokens: still 3 blocks each
    assert pool.num_free == 0
    plan = sched.schedule()  # the old one needs a 4th block: the newest makes room
    assert [s.request_id for s, _ in plan] == ["r0"]
    assert new.status == Status.WAITING and new.num_computed == 0 and new.blocks == [] and sched.num_preemptions == 1
    assert sched.waiting[0] is new and len(new.tokens) == 13  # its output is kept and will be recomputed
    sched.finish(old, "stop")
    plan = sched.schedule()
    assert plan == [(new, 13)]


def test_scheduler_drops_blocks_out_of_the_window():
    pool = BlockPool(1, 1, 2, n_blocks=50, block_size=4)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=8, window=6)
    s = _seq(0, 30)
    sched.add(s)
    for _ in range(20):
        plan = sched.schedule()
        # every block before the one holding the first key of this step's first query is gone
        first_needed = max(0, s.num_computed - 6 + 1) // 4
        assert all(b < 0 for b in s.blocks[:first_needed]) and all(b >= 0 for b in s.blocks[first_needed:])
        assert pool.num_used == len(s.blocks) - first_needed <= pool.blocks_for(6 + 8) + 1
        _run(sched, plan)
    assert s.dropped > 5
