"""Direct Preference Optimization (Rafailov et al. 2023) on the pretraining Trainer, with the router losses kept.

Data: JSONL of {"prompt": str | [messages ending with a user turn], "chosen": str, "rejected": str}. The
prompt is rendered with the tokenizer's chat format (`encode_chat`, ready for the assistant's reply) and
each response is what the format appends for that reply (its tokens and EOS): the log-probability of a
sequence is summed over the response tokens only, never the prompt's.

Loss per pair, h = (logp_c - ref_c) - (logp_r - ref_r):
    sigmoid (DPO):          -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                            (eps = label_smoothing > 0: conservative DPO, cDPO)
    ipo (Azar et al. 2023): (h - 1 / (2 beta))^2 with log-probs averaged over response tokens (TRL's choice)
plus aux_coef * load balancing + z_coef * router z-loss over the policy's real (chosen and rejected) tokens,
and optionally nll_coef * the chosen responses' per-token NLL (RPO, Pang et al. 2024; TRL's rpo_alpha), which
keeps DPO from lowering the likelihood of the good answers along with the bad.
Rewards: beta (logp - ref) of chosen and rejected; margin = their difference; accuracy = P(margin > 0)
(0 at the start, where policy = reference); logp_accuracy = P(logp_c > logp_r), comparable before/after.

The reference model is the starting checkpoint, frozen: by default its log-probs are computed once
before training (eval mode, no gradients) and kept in the run directory (reference_logps.safetensors), so
no second model is held during training and a resumed run uses the same ones. With ref="live" a frozen
copy (or, with LoRA, the same weights with the adapters off) scores every batch instead.

    smoe dpo --model SFT_MODEL --data pairs.jsonl --beta 0.1 --out runs/dpo
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smoe.checkpoint.files import atomic_path, write_json
from smoe.tokenizer import ChatFormatError, Tokenizer, check_messages
from smoe.train.checkpoint import ResumeError, latest_checkpoint
from smoe.train.losses import IGNORE, StepShare, expert_load, load_balancing_loss, router_z_loss, step_loss
from smoe.train.sft import SFTDataError, before_after, exact_match, finish, load_for_training, read_jsonl, split_heldout
from smoe.train.trainer import TrainConfig, Trainer

REF_FILE = "reference_logps.safetensors"
# DPO defaults (batch_size counts pairs); lr: 5e-6 full, 5e-5 LoRA
DPO_LORA_LR = 5e-5  # the default learning rate with LoRA
DPO_TRAIN = TrainConfig(out_dir="runs/dpo", lr=5e-6, warmup_steps=10, max_steps=0, eval_every=50, save_every=100,
                        batch_size=8, weight_decay=0.0)
LOSS_TYPES = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------- the loss

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (P,) and the implicit rewards beta * (logp - ref) of chosen and rejected (detached).

    All inputs are (P,) sequence log-probs (for ipo: averaged per response token).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; choose among {', '.join(LOSS_TYPES)}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def sequence_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """(B,) sum over scored positions of log p(target), in float32; IGNORE positions contribute nothing."""
    B, T, V = logits_BTV.shape
    nll = F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_BT.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return -nll.view(B, T).sum(-1)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = chosen_rewards - rejected_rewards
    return {"rewards_chosen": chosen_rewards.mean(), "rewards_rejected": rejected_rewards.mean(),
            "reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}


@torch.no_grad()
def score(model, batch: dict) -> torch.Tensor:
    """(2P,) response log-probs of a pair batch (no gradients)."""
    return sequence_logprobs(model(batch["tokens"]), batch["targets"])


@dataclass
class DPOObjective:
    """The DPO (or IPO) loss of a pair batch plus the router losses; the Trainer's pluggable objective.

    A batch holds tokens, targets (IGNORE except response tokens), valid (2P, T): the P chosen sequences
    then the P rejected ones, right-padded; and ref_logps (2P,) unless `reference` scores them live
    (a frozen model, or a callable model -> context manager under which the model is the reference).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    aux_coef: float = 0.01
    z_coef: float = 0.001
    reference: object | None = None
    nll_coef: float = 0.0

    def reference_logps(self, model, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.reference is None:
            raise ValueError("DPO: the batch has no ref_logps and no reference model was given")
        if isinstance(self.reference, torch.nn.Module):
            return score(self.reference, batch)
        with self.reference(model):  # e.g. smoe.train.lora.lora_disabled
            return score(model, batch)

    def routing(self, model, batch: dict) -> list[torch.Tensor]:
        """The policy's router logits per layer of the forward pass __call__ makes (the Trainer's pre-pass)."""
        return model(batch["tokens"], return_router_logits=True, last_only=True)[1]

    def __call__(self, model, batch: dict, share: StepShare | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, targets, valid = batch["tokens"], batch["targets"], batch["valid"]
        P = tokens.shape[0] // 2
        ref = self.reference_logps(model, batch).float()
        logits, router_logits = model(tokens, return_router_logits=True)  # right padding: causal is enough
        logps = sequence_logprobs(logits, targets)
        n_resp = (targets != IGNORE).sum(-1).clamp_min(1)
        if self.loss_type == "ipo":
            logps, ref = logps / n_resp, ref / n_resp
        losses, chosen_r, rejected_r = dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], self.beta,
                                                self.label_smoothing, self.loss_type)
        top_k = model.config.top_k
        aux = load_balancing_loss(router_logits, top_k, valid, share.load_LE if share is not None else None)
        z = router_z_loss(router_logits, valid)
        dpo = losses.mean()
        chosen_nll = -(logps[:P] * (n_resp[:P] if self.loss_type == "ipo" else 1)).sum() / n_resp[:P].sum()
        main = dpo + (self.nll_coef * chosen_nll if self.nll_coef else 0.0)
        loss = step_loss(main, self.aux_coef * aux + self.z_coef * z, share)
        metrics = {"dpo": dpo.detach(), "ce": chosen_nll.detach(), "aux": aux.detach(), "z": z.detach(),
                   **reward_metrics(chosen_r, rejected_r),
                   "logp_accuracy": (logps[:P] > logps[P:]).float().mean().detach(),
                   "load": expert_load(router_logits, top_k, valid)}
        return loss, metrics


# ----------------------------------------------------------------------------- data

@dataclass
class PairStats:
    pairs: int = 0
    used: int = 0
    truncated: int = 0  # a response cut to fit seq_len
    skipped_too_long: int = 0  # the prompt alone leaves no room for a response

    def line(self) -> str:
        return (f"{self.used}/{self.pairs} pairs used ({self.truncated} with a response truncated, "
                f"{self.skipped_too_long} with a prompt too long skipped)")


def _prompt_messages(prompt, where: str) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(msgs, list):
        raise SFTDataError(f"{where}: 'prompt' must be a string or a list of messages")
    try:
        check_messages(msgs, allow_last_assistant=False)
    except ChatFormatError as e:
        raise SFTDataError(f"{where}: prompt: {e}") from None
    return msgs


def read_pairs(path: str | Path) -> list[dict]:
    """Validated preference pairs {"prompt": messages, "chosen": str, "rejected": str} of a JSONL file."""
    pairs = []
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise SFTDataError(f"{where}: missing {', '.join(missing)} (expected prompt, chosen, rejected)")
        for k in ("chosen", "rejected"):
            if not isinstance(obj[k], str):
                raise SFTDataError(f"{where}: '{k}' must be a string")
        pairs.append({"prompt": _prompt_messages(obj["prompt"], where), "chosen": obj["chosen"],
                      "rejected": obj["rejected"]})
    return pairs


def encode_response(tok: Tokenizer, prompt: list[dict], response: str, prompt_ids: list[int] | None = None
                    ) -> list[int]:
    """The ids the chat format appends to the prompt for this assistant reply (ending with EOS)."""
    p = tok.encode_chat(prompt) if prompt_ids is None else prompt_ids
    full = tok.encode_chat(prompt + [{"role": "assistant", "content": response}])
    if full[:len(p)] != p:
        raise ChatFormatError("the chat format does not extend the prompt with the reply")
    return full[len(p):]


def tokenize_pairs(tok: Tokenizer, pairs: list[dict], seq_len: int) -> tuple[list[tuple], PairStats]:
    """[(chosen ids, chosen targets, rejected ids, rejected targets)] with targets on response tokens only
    (a prompt is a string or a list of messages)."""
    stats = PairStats(pairs=len(pairs))
    out = []
    for n, pair in enumerate(pairs):
        prompt = _prompt_messages(pair["prompt"], f"pair {n}")
        p = tok.encode_chat(prompt)
        if len(p) >= seq_len:
            stats.skipped_too_long += 1
            continue
        seqs = []
        cut = False
        for k in ("chosen", "rejected"):
            resp = encode_response(tok, prompt, pair[k], p)
            ids = (p + resp)[:seq_len]
            cut |= len(p) + len(resp) > seq_len
            a = np.asarray(ids, dtype=np.int64)
            targets = np.full(len(ids), IGNORE, dtype=np.int64)
            targets[len(p) - 1:-1] = a[len(p):]  # position t predicts token t + 1: the response tokens
            seqs += [a, targets]
        stats.truncated += cut
        stats.used += 1
        out.append(tuple(seqs))
    return out, stats


def collate_pairs(examples: list[tuple], idx: list[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """tokens, targets, valid (2P, T): chosen rows then rejected rows, right-padded to the longest."""
    seqs = [examples[i][0:2] for i in idx] + [examples[i][2:4] for i in idx]
    T = max(len(s[0]) for s in seqs)
    tokens = np.full((len(seqs), T), pad_id, dtype=np.int64)
    targets = np.full((len(seqs), T), IGNORE, dtype=np.int64)
    valid = np.zeros((len(seqs), T), dtype=bool)
    for b, (ids, tg) in enumerate(seqs):
        tokens[b, :len(ids)], targets[b, :len(ids)], valid[b, :len(ids)] = ids, tg, True
    return {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets), "valid": torch.from_numpy(valid)}


class PairBatches:
    """Endless batches of pairs in a seeded order per epoch, carrying precomputed reference log-probs
    when given ((N, 2): chosen, rejected). state_dict() / load_state_dict() give exact resume."""

    def __init__(self, examples: list[tuple], batch_size: int, seed: int = 0, pad_id: int = 0,
                 ref_logps: torch.Tensor | None = None):
        if not examples:
            raise SFTDataError("no usable preference pairs to train on")
        self.examples, self.batch_size, self.seed, self.pad_id, self.ref = examples, batch_size, seed, pad_id, ref_logps
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _plan(self) -> None:
        self._order = list(range(len(self.examples)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(self._order)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx = []
        for _ in range(self.batch_size):
            if self._order is None:
                self._plan()
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._plan()
            idx.append(self._order[self.index])
            self.index += 1
        batch = collate_pairs(self.examples, idx, self.pad_id)
        if self.ref is not None:
            batch["ref_logps"] = torch.cat([self.ref[idx, 0], self.ref[idx, 1]])
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_pairs": len(self.examples),
                "n_tokens": int(sum(len(e[0]) + len(e[2]) for e in self.examples))}

    def load_state_dict(self, state: dict) -> None:
        for k in ("n_pairs", "n_tokens"):
            if state.get(k) != self.state_dict()[k]:
                raise SFTDataError(f"cannot resume the data position: {k} was {state.get(k)}, now "
                                   f"{self.state_dict()[k]} (different data or seq_len)")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._plan()


@torch.no_grad()
def reference_logps(model, examples: list[tuple], batch_size: int = 16, pad_id: int = 0,
                    progress: bool = False, context=None) -> torch.Tensor:
    """(N, 2) response log-probs (chosen, rejected) of every pair under `model`, in eval mode."""
    from tqdm import tqdm

    from smoe.train.logs import bar_kwargs
    was_training = model.training
    model.eval()
    out = []
    with context(model) if context is not None else nullcontext():
        for i in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", unit="batch",
                      disable=not progress, **bar_kwargs()):
            idx = list(range(i, min(i + batch_size, len(examples))))
            b = {k: v.to(model.device) for k, v in collate_pairs(examples, idx, pad_id).items()}
            lp = score(model, b).float().cpu()
            out.append(torch.stack([lp[:len(idx)], lp[len(idx):]], dim=1))
    model.train(was_training)
    return torch.cat(out)


# ----------------------------------------------------------------------------- evaluation

class DPOEval:
    """Held-out pairs: DPO loss, rewards, margin and reward accuracy against the precomputed reference,
    plus the chosen responses' per-token loss (the SFT objective, to see it is not wrecked)."""

    def __init__(self, examples: list[tuple], ref_logps: torch.Tensor, objective: DPOObjective,
                 batch_size: int = 16, pad_id: int = 0, progress: bool = True,
                 exact_match: list[tuple[list[dict], str]] | None = None, tokenizer: Tokenizer | None = None,
                 max_new_tokens: int = 64):
        self.batches = []
        for i in range(0, len(examples), batch_size):
            idx = list(range(i, min(i + batch_size, len(examples))))
            b = collate_pairs(examples, idx, pad_id)
            b["ref_logps"] = torch.cat([ref_logps[idx, 0], ref_logps[idx, 1]])
            self.batches.append(b)
        self.objective = dataclasses.replace(objective, reference=None)
        self.progress = progress
        self.exact_match, self.tokenizer, self.max_new_tokens = exact_match or [], tokenizer, max_new_tokens

    @torch.no_grad()
    def __call__(self, model) -> dict:
        sums: dict[str, float] = {}
        n = 0
        for b in self.batches:
            b = {k: v.to(model.device) for k, v in b.items()}
            P = b["tokens"].shape[0] // 2
            _, m = self.objective(model, b)
            for k in ("dpo", "ce", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
                      "logp_accuracy"):
                sums[k] = sums.get(k, 0.0) + float(m[k]) * P
            n += P
        out = {f"val_{k}": v / n for k, v in sums.items()}
        if self.exact_match:  # greedy replies equal to the chosen response: is the SFT skill kept?
            out["val_exact_match"] = exact_match(model, self.tokenizer, self.exact_match, self.max_new_tokens)
        if self.progress:
            from tqdm import tqdm
            tqdm.write(f"held-out pairs: dpo loss {out['val_dpo']:.4f} | reward accuracy "
                       f"{out['val_reward_accuracy']:.3f} | margin {out['val_reward_margin']:.3f} | chosen "
                       f"{out['val_rewards_chosen']:.3f} rejected {out['val_rewards_rejected']:.3f} | "
                       f"logp(chosen) > logp(rejected) {out['val_logp_accuracy']:.3f} | chosen ce {out['val_ce']:.4f}"
                       + (f" | exact match {out['val_exact_match']:.3f}" if self.exact_match else ""))
        return out


def log_line(trainer, rec: dict) -> None:
    """A console line of the DPO metrics of a train record (a Trainer callback)."""
    if trainer.cfg.progress and "reward_accuracy" in rec:
        from tqdm import tqdm
        tqdm.write(f"step {rec['step']:>6} | dpo {rec['dpo']:.4f} | rewards chosen {rec['rewards_chosen']:.3f} "
                   f"rejected {rec['rewards_rejected']:.3f} | margin {rec['reward_margin']:.3f} | "
                   f"accuracy {rec['reward_accuracy']:.3f}")


# ----------------------------------------------------------------------------- the run

@dataclass
class DPOConfig:
    """Model (the SFT checkpoint, also the reference), pairs, held-out split, DPO settings, LoRA, TrainConfig."""

    model: str = ""
    data: str = ""
    val_data: str | None = None
    val_fraction: float = 0.05
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    nll_coef: float = 0.0  # + nll_coef * NLL of the chosen responses (RPO)
    seq_len: int | None = None  # tokens per sequence at most, sets train.seq_len (None: the model's context, <= 2048)
    ref: str = "precompute"  # or "live": a frozen reference scores every batch
    epochs: float = 1.0
    exact_match: int = 0  # held-out prompts whose greedy reply is compared with the chosen one (0: none)
    max_new_tokens: int = 64
    dtype: str | None = None
    tokenizer: str | None = None
    lora: object | None = None  # a smoe.train.lora.LoRAConfig
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(DPO_TRAIN))

    def validate(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"DPO beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {self.loss_type!r}; choose among {', '.join(LOSS_TYPES)}")
        if self.ref not in ("precompute", "live"):
            raise ValueError(f"ref must be 'precompute' or 'live', got {self.ref!r}")
        if self.nll_coef < 0:
            raise ValueError(f"nll_coef must be >= 0, got {self.nll_coef}")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid (DPO) loss, not to ipo")


def _save_ref(run_dir: Path, refs: dict[str, torch.Tensor | None]) -> None:
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in refs.items() if v is not None}
    if tensors:
        with atomic_path(run_dir / REF_FILE) as tmp:
            save_file(tensors, str(tmp))


def _load_ref(run_dir: Path, sizes: dict[str, int]) -> dict[str, torch.Tensor | None]:
    """The saved reference log-probs of the splits with sizes[split] > 0 (checked against the data)."""
    from safetensors.torch import load_file
    if not any(sizes.values()):
        return {k: None for k in sizes}
    f = run_dir / REF_FILE
    if not f.exists():
        raise ValueError(f"cannot resume: {f} (the reference log-probs) is missing")
    t = load_file(str(f))
    for k, n in sizes.items():
        if n and (k not in t or t[k].shape[0] != n):
            raise ValueError(f"cannot resume: {f} does not match the {k} pairs (different data or seq_len)")
    return {k: t[k] if n else None for k, n in sizes.items()}


def build_dpo(cfg: DPOConfig, resume: bool = False, callbacks: list[Callable] | None = None
              ) -> tuple[Trainer, dict]:
    """The Trainer for a DPO run (policy = the model, reference = its frozen start) and a data summary."""
    from smoe.train.lora import apply_lora, lora_disabled
    from smoe.train.sft import steps_for_epochs, with_seq_len
    cfg.validate()
    t = cfg.train
    if not cfg.model or not cfg.data:
        raise ValueError("dpo needs a model (--model) and preference pairs (--data)")
    model, tok = load_for_training(cfg.model, cfg.dtype, cfg.tokenizer)
    t = with_seq_len(t, cfg.seq_len, model.config.max_seq_len)
    pairs = read_pairs(cfg.data)
    if cfg.val_data:
        train_pairs, val_pairs = pairs, read_pairs(cfg.val_data)
    else:
        train_pairs, val_pairs = split_heldout(pairs, cfg.val_fraction, t.seed)
    train_ex, stats = tokenize_pairs(tok, train_pairs, t.seq_len)
    val_ex, val_stats = tokenize_pairs(tok, val_pairs, t.seq_len) if val_pairs else ([], None)
    run_dir = Path(t.out_dir)
    reference = None
    if resume:
        refs = _load_ref(run_dir, {"train": len(train_ex) if cfg.ref == "precompute" else 0, "val": len(val_ex)})
        train_ref, val_ref = refs["train"], refs["val"]
    else:  # the starting model is the reference: score everything once (needed for evaluation in any case)
        if latest_checkpoint(run_dir) is not None:
            raise ResumeError(f"{run_dir} already holds checkpoints: resume it (--resume) or use another output "
                              f"directory")
        train_ref = reference_logps(model, train_ex, t.batch_size, tok.eos_id, t.progress) \
            if cfg.ref == "precompute" else None
        val_ref = reference_logps(model, val_ex, t.batch_size, tok.eos_id) if val_ex else None
        run_dir.mkdir(parents=True, exist_ok=True)
        _save_ref(run_dir, {"train": train_ref, "val": val_ref})
    if cfg.ref == "live":
        if cfg.lora is not None:
            reference = lora_disabled
        else:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, seed=t.seed)
    objective = DPOObjective(cfg.beta, cfg.label_smoothing, cfg.loss_type, t.aux_coef, t.z_coef, reference,
                             cfg.nll_coef)
    batches = PairBatches(train_ex, t.batch_size, t.seed, tok.eos_id, train_ref)
    t = steps_for_epochs(t, cfg.epochs, len(train_ex))
    em = [(p["prompt"], p["chosen"]) for p in val_pairs[:cfg.exact_match]] if cfg.exact_match else None
    evaluate = DPOEval(val_ex, val_ref, objective, t.batch_size, tok.eos_id, t.progress, em, tok,
                       cfg.max_new_tokens) if val_ex else None
    info = {"kind": "dpo", "reference_model": str(Path(cfg.model).resolve()), "data": str(Path(cfg.data).resolve()),
            "train_pairs": dataclasses.asdict(stats), "val_pairs": dataclasses.asdict(val_stats) if val_stats else None,
            "beta": cfg.beta, "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing, "ref": cfg.ref,
            "nll_coef": cfg.nll_coef,
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora is not None else None}
    trainer = Trainer(model, dataclasses.replace(t, export=False), batches, objective, evaluate, tok,
                      batch_weight=lambda b: b["tokens"].shape[0] / 2, run_info=info,
                      callbacks=[log_line, *(callbacks or [])])
    return trainer, {"train": stats, "val": val_stats, "export": t.export}


def run_dpo(cfg: DPOConfig, resume: bool = False, callbacks: list[Callable] | None = None) -> dict:
    """Preference-train (or resume) to the end; save adapters (LoRA) and export the model with its tokenizer."""
    trainer, data = build_dpo(cfg, resume, callbacks)
    run_dir = Path(trainer.cfg.out_dir)
    print(f"train pairs: {data['train'].line()}")
    if data["val"] is not None:
        print(f"held-out pairs: {data['val'].line()}")
    if resume:
        print(f"resuming from {trainer.resume()} (step {trainer.step})")
    write_json(run_dir / "dpo_config.json", json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    print(f"DPO ({cfg.loss_type}, beta {cfg.beta}, reference {cfg.ref}) for {trainer.max_steps} steps; "
          f"run directory {run_dir}")
    summary = trainer.fit()
    summary["final"] = finish(trainer, trainer.tokenizer, run_dir, data["export"])
    print(before_after(run_dir, ["val_reward_accuracy", "val_reward_margin", "val_logp_accuracy", "val_ce",
                                 "val_exact_match"]))
    if summary["final"]:
        print(f"preference-tuned model (HF layout + tokenizer): {summary['final']}")
    return summary
