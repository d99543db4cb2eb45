"""The lm-evaluation-harness model `smoe`: a smoe checkpoint scored and sampled in-process.

Importing this module registers the model with lm-eval (`lm_eval.api.registry`). It mirrors the
`hf` model (HFLM) wherever lm-eval leaves a choice to the model, so scores agree with HFLM on the
same checkpoint: the tokenizer's default BOS for contexts, BOS as the prefix of an empty context,
left truncation to max_length, (logprob, is_greedy) per request. One deliberate difference:
loglikelihood_rolling never scores a BOS after the prefix BOS (HFLM does when its tokenizer adds
BOS, lm-eval issue #3333); it equals HFLM with add_bos_token=False.
Generation goes through smoe's generation code: the engine (smoe.engine.LLM, default on CUDA) or
smoe.generate on left-padded batches (default on CPU).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from smoe.generation import SamplingParams
from smoe.tokenizer import Tokenizer, load_tokenizer


def _as_bool(v) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def special_token_text(tok: Tokenizer, token_id: int) -> str | None:
    """The text of a special token (e.g. '<s>'), for recognising prompts that already start with it."""
    for get in (lambda: tok.tok.id_to_token(token_id), lambda: tok.raw.id_to_piece(token_id)):
        try:
            s = get()
        except Exception:
            continue
        if s:
            return s
    return None


@register_model("smoe")
class SmoeLM(TemplateLM):
    """smoe Transformer + tokenizer behind lm-eval's loglikelihood / loglikelihood_rolling / generate_until.

    model_args: pretrained=DIR (or a Transformer), tokenizer (dir/file/name; default: the checkpoint's),
    dtype, device, batch_size (int or 'auto'), max_batch_tokens (padded tokens per scoring batch),
    max_length (default: the model's max_seq_len), max_gen_toks (default 256), add_bos_token (default:
    BOS, as the Mixtral tokenizer), prefix_token_id (default BOS), seed (for sampled generation),
    moe_top_k (experts per token), backend (MoE backend), generator ('engine': smoe.engine.LLM,
    continuous batching; 'loop': smoe.generate on batches of batch_size; default engine on CUDA),
    engine_kv_memory (the engine's KV pool, e.g. '8GiB'; default: the engine's).
    """

    def __init__(self, pretrained=None, tokenizer=None, dtype: str | None = None, device: str | None = None,
                 batch_size: int | str = 8, max_batch_size: int | None = None, max_batch_tokens: int = 8192,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, seed: int = 1234, moe_top_k: int | None = None,
                 backend: str | None = None, generator: str | None = None, engine_kv_memory: str | None = None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"smoe model: unknown model_args {sorted(unknown)}; known: pretrained, tokenizer, dtype, "
                             f"device, batch_size, max_batch_tokens, max_length, max_gen_toks, add_bos_token, "
                             f"prefix_token_id, seed, moe_top_k, backend, generator, engine_kv_memory")
        if pretrained is None:
            raise ValueError("smoe model: model_args needs pretrained=CHECKPOINT_DIR")
        from smoe.model.transformer import Transformer
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        if isinstance(pretrained, Transformer):
            self.model = pretrained.eval()
            self.pretrained = "<in-memory Transformer>"
        else:
            path = Path(pretrained)
            if not path.is_dir():
                raise FileNotFoundError(f"smoe model: no checkpoint directory at {pretrained}")
            self.model = Transformer.from_pretrained(path, dtype=dtype, device=device)
            self.pretrained = str(path)
        if backend:
            self.model.set_moe_backend(backend)
        if tokenizer is None:
            if isinstance(pretrained, Transformer):
                raise ValueError("smoe model: pass tokenizer= with an in-memory Transformer")
            tokenizer = pretrained
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        self._device = self.model.device
        bs = str(batch_size if batch_size is not None else 8)
        self.batch_size = int(max_batch_size or 64) if bs.startswith("auto") else int(bs)
        if self.batch_size < 1:
            raise ValueError(f"smoe model: batch_size must be >= 1, got {batch_size!r}")
        self.max_batch_tokens = int(max_batch_tokens)
        self._max_length = int(max_length) if max_length else self.model.config.max_seq_len
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.seed = int(seed)
        self.moe_top_k = None if moe_top_k is None else int(moe_top_k)
        # the engine batches continuously (GPU); on CPU the lock-step loop is faster for lm-eval's long
        # few-shot prompts (16 x 1800-token prompts, 16 new tokens: loop 3.7 s, engine 7.8 s)
        if generator is None:
            generator = "engine" if self.model.device.type == "cuda" and _engine_available() else "loop"
        self.generator = generator
        if self.generator not in ("engine", "loop"):
            raise ValueError(f"smoe model: generator must be 'engine' or 'loop', got {generator!r}")
        self._llm = None
        self.engine_kv_memory = engine_kv_memory
        self._bos_text = special_token_text(self.tokenizer, self.tokenizer.bos_id)

    # ----------------------------------------------------------------- properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", "smoe")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError("smoe model: chat templates are not supported in lm-eval runs; the Mixtral "
                                  "paper's suite scores the base model without one")

    def get_model_info(self) -> dict:
        total, active = self.model.config.num_params()
        return {"model_num_parameters": total, "model_active_parameters": active, "model_dtype": str(self.model.dtype),
                "model_path": self.pretrained, "generator": self.generator}

    # ----------------------------------------------------------------- tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Ids of a string; BOS as the tokenizer adds it by default (HFLM's rule), none when the string
        already starts with the BOS text."""
        if add_special_tokens is None:
            add = True if self.add_bos_token is None else self.add_bos_token
            if self._bos_text and string.startswith(self._bos_text):
                add = False
        else:
            add = add_special_tokens
        ids = self.tokenizer.encode(string, bos=add)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ----------------------------------------------------------------- scoring
    def _batches(self, order: list[int], lengths: list[int]):
        """Consecutive index batches (longest first) within batch_size and max_batch_tokens."""
        batch: list[int] = []
        for i in order:
            width = lengths[batch[0]] if batch else lengths[i]
            if batch and (len(batch) >= self.batch_size or width * (len(batch) + 1) > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding reproduces it) per request."""
        # identical token sequences are scored once
        unique: dict[tuple[tuple[int, ...], int], int] = {}
        where = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("smoe model: a loglikelihood request needs a non-empty context and continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"smoe model: continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            whole = (ctx + cont)[-(self.max_length + 1):]
            key = (tuple(whole), len(cont))
            where.append(unique.setdefault(key, len(unique)))
        keys = list(unique)
        lengths = [len(k[0]) - 1 for k in keys]
        order = sorted(range(len(keys)), key=lambda i: -lengths[i])
        answers: list[tuple[float, bool] | None] = [None] * len(keys)
        device = self.model.device
        with tqdm(total=len(keys), disable=disable_tqdm, desc="smoe loglikelihood") as bar:
            for batch in self._batches(order, lengths):
                T = lengths[batch[0]]
                tokens_BT = torch.zeros(len(batch), T, dtype=torch.long)
                for b, i in enumerate(batch):  # right padding: real tokens never attend to it
                    tokens_BT[b, :lengths[i]] = torch.tensor(keys[i][0][:-1])
                logits_BTV = self.model(tokens_BT.to(device), top_k=self.moe_top_k)
                for b, i in enumerate(batch):
                    whole, n = keys[i]
                    L = lengths[i]
                    logp_nV = F.log_softmax(logits_BTV[b, L - n:L].float(), dim=-1)
                    cont_n = torch.tensor(whole[-n:], device=logp_nV.device)
                    lp = float(logp_nV.gather(-1, cont_n[:, None]).sum())
                    answers[i] = (lp, bool((logp_nV.argmax(-1) == cont_n).all()))
                bar.update(len(batch))
        out = [answers[w] for w in where]
        for (key, _, _), ans in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings, in disjoint windows of max_length conditioned on the prefix token."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            (string,) = req.args
            tokens = self.tok_encode(string, add_special_tokens=False)
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, scores):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----------------------------------------------------------------- generation
    def _sampling_params(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = [s for s in kw.pop("until") or [] if isinstance(s, str) and s]
        eos_text = special_token_text(self.tokenizer, self.eot_token_id)
        until = [s for s in until if s != eos_text]  # EOS ends generation by id
        max_new = int(kw.pop("max_gen_toks"))
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0) if sample else 0.0
        if sample and temperature == 0.0:
            temperature = 1.0
        params = SamplingParams(max_tokens=max_new, temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
                                top_p=float(kw.pop("top_p", 1.0) or 1.0), stop=until, moe_top_k=self.moe_top_k)
        return params, until

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[str]:
        if self.generator == "engine":
            if self._llm is None:
                from smoe.engine import LLM
                self._llm = LLM(self.model, self.tokenizer, max_num_batched_tokens=max(self.max_batch_tokens, 2048),
                                kv_cache_memory=self.engine_kv_memory)
            return [o.text for o in self._llm.generate(prompts, params, use_tqdm=False)]
        from smoe.generation import generate
        return [c.text for c in generate(self.model, prompts, params[0], self.tokenizer)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations until a stop string, EOS or max_gen_toks; seeded per request when sampling."""
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="smoe generate_until") as bar:
            for members in groups.values():
                params, until = self._sampling_params(requests[members[0]].args[1])
                max_ctx = self.max_length - params.max_tokens
                if max_ctx < 1:
                    raise ValueError(f"smoe model: max_gen_toks {params.max_tokens} leaves no room for a prompt in "
                                     f"max_length {self.max_length}")
                prompts = {n: self.tok_encode(requests[n].args[0], left_truncate_len=max_ctx) for n in members}
                order = sorted(members, key=lambda n: -len(prompts[n]))
                step = len(order) if self.generator == "engine" else self.batch_size
                for s in range(0, len(order), step):
                    chunk = order[s:s + step]
                    # request n gets seed + n: repeats of one prompt differ, reruns repeat
                    plist = [dataclasses.replace(params, seed=self.seed + n) for n in chunk]
                    if self.generator == "loop":  # smoe.generate seeds row b with seed + b
                        plist = [dataclasses.replace(params, seed=self.seed + chunk[0])]
                    texts = self._generate([prompts[n] for n in chunk], plist)
                    for n, text in zip(chunk, texts):
                        text = postprocess_generated_text(text, until, None)
                        out[n] = text
                        self.cache_hook.add_partial("generate_until", requests[n].args, text)
                    bar.update(len(chunk))
        return out


def _engine_available() -> bool:
    try:
        from smoe.engine import LLM  # noqa: F401
    except Exception:
        return False
    return True
