"""Validation: loss, perplexity and bits per byte on fixed held-out windows, expert load, unigram baseline."""

from __future__ import annotations

import math

import numpy as np
import torch

from smoe.model.attention import SelfAttention
from smoe.train.losses import expert_load, imbalance


class LMEval:
    """Scores a model on fixed windows (M, T+1) of held-out tokens; the same windows every call.

    With a tokenizer, bits per byte are counted on the decoded text of the scored targets (comparable
    across tokenizers); with unigram log-probabilities, the unigram baseline on the same targets.
    """

    def __init__(self, windows: np.ndarray, batch_size: int = 16, tokenizer=None,
                 unigram_logprobs: np.ndarray | None = None, segments: np.ndarray | None = None):
        self.windows = torch.from_numpy(np.asarray(windows, dtype=np.int64))
        self.segments = None if segments is None else torch.from_numpy(np.asarray(segments, dtype=np.int64))
        self.batch_size = batch_size
        targets = self.windows[:, 1:]
        self.n_tokens = targets.numel()
        self.n_bytes = None
        if tokenizer is not None:
            self.n_bytes = sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in targets)
        self.unigram_loss = None
        if unigram_logprobs is not None:
            self.unigram_loss = float(-np.asarray(unigram_logprobs)[targets.numpy()].mean())

    @torch.no_grad()
    def __call__(self, model) -> dict:
        total, load_sum, n_batches = 0.0, None, 0
        k = model.config.top_k
        for i in range(0, len(self.windows), self.batch_size):
            w = self.windows[i:i + self.batch_size].to(model.device)
            tokens, targets = w[:, :-1], w[:, 1:]
            attn = None
            if self.segments is not None:
                seg = self.segments[i:i + self.batch_size].to(model.device)
                pos = torch.arange(tokens.shape[1], device=model.device).expand(tokens.shape)
                attn = SelfAttention(pos, window=model.config.sliding_window, segments=seg)
            logits, rl = model(tokens, attn=attn, return_router_logits=True)
            lp = torch.log_softmax(logits.float(), dim=-1)
            total += float(-lp.gather(-1, targets[..., None]).sum())
            load = expert_load(rl, k) * targets.numel()
            load_sum = load if load_sum is None else load_sum + load
            n_batches += 1
        loss = total / self.n_tokens
        load = load_sum / self.n_tokens
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": self.n_tokens,
               "val_load": [[round(x, 5) for x in row] for row in load.tolist()],
               "val_imbalance": [round(x, 4) for x in imbalance(load).tolist()]}
        if self.n_bytes:
            out["val_bits_per_byte"] = total / math.log(2) / self.n_bytes
        if self.unigram_loss is not None:
            out["unigram_loss"] = self.unigram_loss
            out["unigram_ppl"] = math.exp(self.unigram_loss)
            if self.n_bytes:
                out["unigram_bits_per_byte"] = self.unigram_loss * self.n_tokens / math.log(2) / self.n_bytes
        return out
