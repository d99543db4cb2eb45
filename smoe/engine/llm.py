"""Offline batch generation on the engine: `smoe.LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from smoe.engine.engine import Engine, EngineConfig, TopLogprobs
from smoe.generation import Completion, SamplingParams
from smoe.tokenizer import Tokenizer


@dataclass
class RequestOutput(Completion):
    """A Completion plus the log-probabilities asked for with SamplingParams.logprobs / prompt_logprobs."""

    logprobs: list[tuple[float, TopLogprobs]] | None = None  # per generated token
    prompt_logprobs: list[tuple[float, TopLogprobs]] | None = None  # per prompt token after the first


class LLM:
    """Many prompts at once through the paged-KV continuous-batching engine.

    model: a Transformer, or a checkpoint directory (loaded with its tokenizer). Keyword arguments
    are EngineConfig fields (kv_cache_memory, block_size, max_num_seqs, max_num_batched_tokens).
    """

    def __init__(self, model, tokenizer: Tokenizer | str | Path | None = None, *,
                 dtype: torch.dtype | str | None = None, device: torch.device | str | None = None, **engine_options):
        from smoe.tokenizer import load_tokenizer
        if isinstance(model, str | Path):
            from smoe.model.transformer import Transformer
            path = model
            model = Transformer.from_pretrained(path, dtype=dtype, device=device)
            tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
        if isinstance(tokenizer, str | Path):
            tokenizer = load_tokenizer(tokenizer)
        self.engine = Engine(model, tokenizer, EngineConfig(**engine_options))

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
                 **overrides) -> RequestOutput | list[RequestOutput]:
        """Generate for one prompt (returns one output) or a list of them (returns a list, in order).

        Like smoe.generate, one SamplingParams with a seed gives prompt b the seed seed + b; a list
        gives each prompt its own params.
        """
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
            plist = [dataclasses.replace(p, **overrides) for p in params]
        else:
            base = SamplingParams(**overrides) if params is None else dataclasses.replace(params, **overrides)
            plist = [base if base.seed is None else dataclasses.replace(base, seed=base.seed + b)
                     for b in range(len(prompts))]
        engine = self.engine
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, plist)]
        index = {rid: i for i, rid in enumerate(ids)}
        outs = [RequestOutput() for _ in ids]
        for o, sp in zip(outs, plist):
            o.logprobs = [] if sp.logprobs is not None else None
        left = len(ids)
        try:
            with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm or None) as bar:
                while left:
                    for ev in engine.step():
                        o = outs[index[ev.request_id]]
                        o.tokens.append(ev.token)
                        o.text += ev.text
                        o.finish_reason = ev.finish_reason
                        if ev.prompt_logprobs is not None:
                            o.prompt_logprobs = ev.prompt_logprobs
                        if o.logprobs is not None:
                            o.logprobs.append((ev.logprob, ev.top_logprobs))
                        if ev.finish_reason is not None:
                            left -= 1
                            bar.update(1)
        finally:
            for rid in ids:  # after an error or Ctrl-C, leave no request behind
                engine.abort(rid)
        return outs[0] if single else outs
