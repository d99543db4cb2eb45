"""Continuous batching: which sequences run in the next step, with how many tokens, in which blocks.

Every step: running sequences first (decodes, then unfinished prefill chunks, oldest first), each
growing its block table; when the pool runs dry the newest running sequence is preempted (its blocks
freed, its prompt and output recomputed later). Then waiting sequences join, oldest first, while the
token budget, the sequence limit and the free blocks allow. A long prompt is prefilled in chunks of
at most the remaining token budget, so decodes are never starved. With a sliding window, blocks that
fall wholly out of the window are freed as soon as no future query can see them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from smoe.engine.kv import BlockPool
from smoe.generation import SamplingParams, StopChecker


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's token sequence: prompt + generated ids, how many have K/V cached, its blocks."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int  # tokens to generate at most (max_tokens cut to the context)
    arrival: int  # admission order (newest = largest)
    generator: torch.Generator | None = None
    checker: StopChecker | None = None
    stop_ids: set[int] = field(default_factory=set)
    tokens: list[int] = field(default_factory=list)  # prompt + output
    blocks: list[int] = field(default_factory=list)  # block table; -1 where dropped by the window
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    dropped: int = 0  # leading blocks freed by the sliding window
    status: Status = Status.WAITING
    prompt_logprobs: list | None = None  # [(logprob, [(id, logprob)])] of prompt tokens 1.., once computed
    finish_reason: str | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next one can be sampled."""
        return len(self.tokens) - self.num_computed


class Scheduler:
    """Waiting queue, running set and the block pool; `schedule()` plans one step."""

    def __init__(self, pool: BlockPool, max_num_seqs: int = 256, max_num_batched_tokens: int = 512,
                 window: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.pool, self.window = pool, window
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def max_blocks_needed(self, n_tokens: int) -> int:
        """Most blocks a sequence of n_tokens positions ever holds at once."""
        need = self.pool.blocks_for(n_tokens)
        if self.window:  # the window plus one chunk, plus a block straddling the window's start
            need = min(need, self.pool.blocks_for(self.window + self.max_num_batched_tokens) + 1)
        return need

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (done, or cancelled) and free its blocks at once."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first for recompute."""
        self.running.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks, seq.num_computed, seq.dropped = [], 0, 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _drop_out_of_window(self, seq: Sequence) -> None:
        if not self.window:
            return
        keep_from = max(0, seq.num_computed - self.window + 1) // self.pool.block_size
        if keep_from > seq.dropped:
            self.pool.free(seq.blocks[seq.dropped:keep_from])
            seq.blocks[seq.dropped:keep_from] = [-1] * (keep_from - seq.dropped)
            seq.dropped = keep_from

    def _blocks_to_add(self, seq: Sequence, n: int) -> int:
        return self.pool.blocks_for(seq.num_computed + n) - len(seq.blocks)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Plan the next step: (sequence, new tokens) pairs, decodes first. Allocates their blocks."""
        budget = self.max_num_batched_tokens
        plan: dict[Sequence, int] = {}
        preempted = False
        for seq in sorted(self.running, key=lambda s: (s.pending > 1, s.arrival)):
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.pending, budget)
            self._drop_out_of_window(seq)
            while self._blocks_to_add(seq, n) > self.pool.num_free:
                victim = max(self.running, key=lambda s: s.arrival)
                budget += plan.pop(victim, 0)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            seq.blocks += self.pool.allocate(self._blocks_to_add(seq, n))
            plan[seq] = n
            budget -= n
        # new sequences join only when nobody had to make room this step
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.pending, budget)
            if self._blocks_to_add(seq, n) > self.pool.num_free:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            seq.blocks += self.pool.allocate(self._blocks_to_add(seq, n))
            plan[seq] = n
            budget -= n
        return sorted(plan.items(), key=lambda sn: sn[1] > 1)
