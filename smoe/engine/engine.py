"""The engine: requests in, one packed model step at a time, tokens out.

Each `step()` asks the scheduler for a plan, packs every planned token of every sequence into one
row (1, T) with its own positions, runs the model with a PagedAttention for that plan, samples the
sequences whose prompt (or recompute) is complete with the shared sampler, and reports one
StepOutput per sampled token. Sequences that ask for another MoE top-k run in a separate forward in
the same step (the model takes one top_k per call).
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass

import torch

from smoe.engine.attention import PagedAttention, SeqSlice
from smoe.engine.kv import BlockPool, bytes_per_block, parse_bytes
from smoe.engine.scheduler import Scheduler, Sequence, Status
from smoe.generation import SamplingParams, StopChecker, make_generator, sample, token_logprobs
from smoe.tokenizer import Tokenizer

TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class EngineConfig:
    """Sizes of the KV pool and of a step."""

    kv_cache_memory: int | str | None = None  # bytes (or '2GiB'); None: see Engine.default_kv_memory
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per step (decodes + prefill chunks)


@dataclass
class StepOutput:
    """One sampled token of one request (or its end without one, when aborted)."""

    request_id: str
    token: int | None
    text: str  # newly visible text (stop strings held back until ruled out)
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    num_prompt_tokens: int
    num_output_tokens: int
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    prompt_logprobs: list[tuple[float, TopLogprobs]] | None = None  # in the first output, when asked for


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    blocks_used: int = 0
    blocks_free: int = 0
    blocks_total: int = 0
    preemptions: int = 0
    steps: int = 0
    computed_tokens: int = 0  # tokens run through the model (prompts, recomputes, decodes)
    generated_tokens: int = 0
    last_step_s: float = 0.0


class Engine:
    """Paged-KV continuous-batching engine around one Transformer (not thread-safe: one caller)."""

    def __init__(self, model, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config or EngineConfig()
        cfg = model.config
        self.window = cfg.sliding_window
        c = self.config
        per_seq = -(-cfg.max_seq_len // c.block_size)
        memory = c.kv_cache_memory if c.kv_cache_memory is not None else self.default_kv_memory()
        self.pool = BlockPool.for_model(model, memory, c.block_size, max_blocks=c.max_num_seqs * per_seq + 1)
        self.scheduler = Scheduler(self.pool, c.max_num_seqs, c.max_num_batched_tokens, self.window)
        self.seqs: dict[str, Sequence] = {}
        self._arrival = itertools.count()
        self.stats = EngineStats(blocks_total=self.pool.n_blocks)

    def default_kv_memory(self) -> int:
        """KV pool bytes when none are given: 80% of free GPU memory, or 2 GiB on CPU."""
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return int(free * 0.8)
        return parse_bytes("2GiB")

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config
        return bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 1, self.model.dtype)

    # ---- requests -------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text needs the tokenizer), checked against the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            return self.tokenizer.encode(prompt, bos=True)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("a prompt must have at least one token")
        V = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {V}); got {bad[0]}")
        return ids

    def check(self, n_prompt: int, params: SamplingParams) -> int:
        """Raise ValueError if a request cannot run; else its max new tokens (cut to the context)."""
        cfg = self.model.config
        if n_prompt >= cfg.max_seq_len:
            raise ValueError(f"prompt of {n_prompt} tokens does not fit the model's context of {cfg.max_seq_len}")
        if params.moe_top_k is not None and params.moe_top_k > cfg.n_experts:
            raise ValueError(f"moe_top_k must be <= the model's {cfg.n_experts} experts, got {params.moe_top_k}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        max_new = min(params.max_tokens, cfg.max_seq_len - n_prompt)
        need = self.scheduler.max_blocks_needed(n_prompt + max_new)
        if need > self.pool.n_blocks:
            raise ValueError(f"{n_prompt} prompt + {max_new} new tokens need {need} KV blocks of "
                             f"{self.pool.block_size} tokens; the KV cache has {self.pool.n_blocks} "
                             f"(give it more memory)")
        return max_new

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (text or ids); returns its id. Raises ValueError for a request that cannot run."""
        params = params or SamplingParams()
        ids = self.prompt_ids(prompt)
        max_new = self.check(len(ids), params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop_ids = set(params.stop_token_ids)
        if self.tokenizer is not None and not params.ignore_eos:
            stop_ids.add(self.tokenizer.eos_id)
        seq = Sequence(request_id, ids, params, max_new, next(self._arrival), make_generator(params.seed),
                       StopChecker(self.tokenizer, params.stop), stop_ids)
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = []
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> StepOutput | None:
        """Cancel a request and free its blocks now; returns its final output (None if unknown)."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self._update_stats()
        return StepOutput(request_id, None, seq.checker.finish(), "abort", len(seq.prompt), seq.num_output)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---- one step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one scheduled step; returns the outputs of the sequences that sampled a token."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan:
            self._update_stats()
            return []
        groups: dict[int, list[tuple[Sequence, int]]] = {}
        for seq, n in plan:
            groups.setdefault(seq.params.moe_top_k or self.model.config.top_k, []).append((seq, n))
        samplers: list[Sequence] = []
        logits: list[torch.Tensor] = []
        for top_k, items in groups.items():
            s, lg = self._forward(items, top_k)
            samplers += s
            logits.append(lg)
        for seq, n in plan:
            seq.num_computed += n
        self.stats.computed_tokens += sum(n for _, n in plan)
        outputs = self._sample(samplers, torch.cat(logits)) if samplers else []
        self.stats.steps += 1
        self.stats.last_step_s = time.perf_counter() - t0
        self._update_stats()
        return outputs

    def _forward(self, items: list[tuple[Sequence, int]], top_k: int) -> tuple[list[Sequence], torch.Tensor]:
        """Run one packed forward for these (sequence, n) pairs; record prompt logprobs; returns the
        sequences that sample now and their logits rows (S, V)."""
        device = self.model.device
        tokens, positions, slices, rows = [], [], [], []
        samplers: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # (seq, first logits row, first position, count)
        row = 0
        for seq, n in items:
            a = seq.num_computed
            tokens += seq.tokens[a: a + n]
            positions += range(a, a + n)
            slices.append(SeqSlice(a, n, seq.blocks))
            if seq.prompt_logprobs is not None:  # rows predicting prompt tokens not yet scored
                lo, hi = max(a, len(seq.prompt_logprobs)), min(a + n, len(seq.prompt) - 1)
                if hi > lo:
                    prompt_rows.append((seq, len(rows), lo, hi - lo))
                    rows += range(row + lo - a, row + hi - a)
            row += n
        sample_at = []
        for (seq, n), start in zip(items, itertools.accumulate([0] + [n for _, n in items])):
            if seq.num_computed + n == len(seq.tokens):
                samplers.append(seq)
                sample_at.append(len(rows))
                rows.append(start + n - 1)
        tokens_1T = torch.tensor([tokens], dtype=torch.long).to(device)
        pos_1T = torch.tensor([positions], dtype=torch.long).to(device)
        attn = PagedAttention(self.pool, slices, self.window, device)
        sel = None if rows == list(range(row)) else torch.tensor(rows, dtype=torch.long).to(device)
        logits_RV = self.model(tokens_1T, pos_1T, attn, top_k=top_k, logits_at=sel)[0]
        for seq, r, lo, count in prompt_rows:  # logits at position p score prompt token p + 1
            targets = torch.tensor(seq.prompt[lo + 1: lo + 1 + count], device=logits_RV.device)
            chosen, top_ids, top_lp = token_logprobs(logits_RV[r: r + count], targets, seq.params.prompt_logprobs)
            seq.prompt_logprobs += _pairs(chosen, top_ids, top_lp)
        if sample_at == list(range(len(rows))):  # every row samples, in order (decode steps)
            return samplers, logits_RV
        idx = torch.tensor(sample_at, dtype=torch.long, device=logits_RV.device)
        return samplers, logits_RV.index_select(0, idx)

    def _sample(self, seqs: list[Sequence], logits_SV: torch.Tensor) -> list[StepOutput]:
        new = sample(logits_SV, [s.params for s in seqs], [s.generator for s in seqs])
        lp_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        lps: dict[int, tuple[float, TopLogprobs]] = {}
        if lp_rows:
            top_n = max(seqs[i].params.logprobs for i in lp_rows)
            idx = torch.tensor(lp_rows, device=logits_SV.device)
            chosen, top_ids, top_lp = token_logprobs(logits_SV[idx], new.to(logits_SV.device)[idx], top_n)
            for i, (lp, top) in zip(lp_rows, _pairs(chosen, top_ids, top_lp)):
                lps[i] = (lp, top[: seqs[i].params.logprobs])
        outputs = []
        for i, (seq, tok) in enumerate(zip(seqs, new.tolist())):
            seq.tokens.append(tok)
            self.stats.generated_tokens += 1
            text, finish = seq.checker.feed(tok, seq.stop_ids, last=seq.num_output == seq.max_new)
            lp, top = lps.get(i, (None, None))
            out = StepOutput(seq.request_id, tok, text, finish, len(seq.prompt), seq.num_output, lp, top)
            if seq.num_output == 1 and seq.prompt_logprobs is not None:
                out.prompt_logprobs = seq.prompt_logprobs
            if finish is not None:
                self.scheduler.finish(seq, finish)
                del self.seqs[seq.request_id]
            outputs.append(out)
        return outputs

    def _update_stats(self) -> None:
        s = self.stats
        s.waiting, s.running = len(self.scheduler.waiting), len(self.scheduler.running)
        s.blocks_used, s.blocks_free = self.pool.num_used, self.pool.num_free
        s.preemptions = self.scheduler.num_preemptions

    def running_ids(self) -> list[str]:
        return [s.request_id for s in self.seqs.values() if s.status == Status.RUNNING]


def _pairs(chosen: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor) -> list[tuple[float, TopLogprobs]]:
    """Per row: (chosen log-probability, [(id, log-probability) of the top ones])."""
    return [(c, list(zip(ids, lps))) for c, ids, lps in zip(chosen.tolist(), top_ids.tolist(), top_lp.tolist())]
