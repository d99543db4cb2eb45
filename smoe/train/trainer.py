"""The training loop, reusable by every objective (pretraining here; fine-tuning and preference training
plug in their own objective and batches).

    trainer = Trainer(model, TrainConfig(...), batches, objective=LMObjective(), evaluate=fn, tokenizer=tok)
    trainer.fit()

`batches` yields dicts of tensors (for LMObjective: tokens, targets; see smoe.train.losses) and, for exact
resume, has state_dict()/load_state_dict(). `objective(model, batch) -> (loss, metrics)`; `evaluate(model)
-> dict` of numbers run every eval_every steps. AdamW with weight decay on matrices only, linear warmup +
cosine decay, gradient clipping, gradient accumulation weighted by scored tokens, optional bf16 autocast.

An objective with router losses (LMObjective, DPOObjective) also takes `share=StepShare` and has
`routing(model, batch) -> router logits`: then the main loss is weighted by scored targets, the router
losses by routed tokens (`valid`), and with aux_scope='step' a no-grad pre-pass over the step's micro-batches
gives the step's expert load, so k micro-batches give exactly the loss and gradients of one batch of k.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from smoe.kernels.memory import keep_freed_memory
from smoe.train import checkpoint as ckpt
from smoe.train.logs import RunLog, bar_kwargs, fmt_line, measure_peak_flops, train_flops_per_token
from smoe.train.losses import IGNORE, ROUTER_METRICS, LMObjective, StepShare, imbalance, routed_tokens, slot_counts


@dataclass
class TrainConfig:
    """Optimizer, schedule, batch, losses, precision, logging and checkpoint settings of a run."""

    out_dir: str = "runs/train"
    data: str = ""  # a prepared data directory (smoe data prepare)
    seed: int = 0
    max_steps: int = 1000  # 0: as many as fit in max_minutes (measured after a few steps)
    max_minutes: float | None = None  # stop (with a checkpoint) when this much time has passed
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices (dim >= 2) only: never on norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    aux_coef: float = 0.01  # load-balancing loss (balanced router = 1.0)
    aux_scope: str = "step"  # 'step': aux over the whole optimizer step (a no-grad pre-pass when grad_accum > 1);
    #                          'micro': per micro-batch (Megatron-LM, transformers), no pre-pass
    z_coef: float = 0.001  # router z-loss
    capacity_factor: float | None = None  # None: dropless; else drop token-slots over capacity while training
    segment_mask: bool = False  # packed documents do not attend to each other
    autocast: str | None = None  # 'bf16' for bfloat16 autocast; None: float32
    moe_backend: str | None = None  # None: the device default
    log_every: int = 10
    eval_every: int = 200
    eval_tokens: int = 65536
    save_every: int = 200
    keep_last: int = 3
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True
    export: bool = True  # write out_dir/final (HF layout + tokenizer) at the end

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train setting {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train setting {name!r} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and not self.max_minutes:
            raise ValueError("train setting max_steps=0 (fit the time budget) needs max_minutes")
        if not self.lr > 0:
            raise ValueError(f"train setting 'lr' must be > 0, got {self.lr}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"train setting 'capacity_factor' must be > 0 or None, got {self.capacity_factor}")
        if self.aux_scope not in ("step", "micro"):
            raise ValueError(f"train setting 'aux_scope' must be 'step' (the load-balancing loss over the whole "
                             f"optimizer step) or 'micro' (per micro-batch), got {self.aux_scope!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"train setting 'autocast' must be bf16, fp16 or None, got {self.autocast!r}")


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not max_steps or max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: matrices (weight decay) and vectors such as norms (no decay).

    torch's fused kernel where every parameter is a CPU or CUDA float tensor (one pass per tensor: the medium
    preset's 190M parameters, 2 threads of a Xeon, 133 against 466 ms a step for foreach), else foreach."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **({"fused": True} if fused else {"foreach": True}))


def scored_tokens(batch: dict) -> float:
    """How much a micro-batch weighs in gradient accumulation: its scored targets (or 1)."""
    t = batch.get("targets") if isinstance(batch, dict) else None
    return float((t != IGNORE).sum()) if t is not None else 1.0


class Trainer:
    """Runs optimizer steps of `objective` over `batches`, logging, evaluating and checkpointing."""

    def __init__(self, model, cfg: TrainConfig, batches: Iterator[dict],
                 objective: Callable | None = None, evaluate: Callable | None = None, tokenizer=None,
                 batch_weight: Callable[[dict], float] = scored_tokens, run_info: dict | None = None,
                 callbacks: list[Callable] | None = None):
        cfg.validate()
        self.model, self.cfg, self.batches = model, cfg, batches
        self.objective = objective or LMObjective(cfg.aux_coef, cfg.z_coef)
        self.evaluate, self.tokenizer, self.batch_weight = evaluate, tokenizer, batch_weight
        self.routes = hasattr(self.objective, "routing")  # takes share= (see the module docstring)
        self.run_dir = Path(cfg.out_dir)
        self.run_info = run_info or {}
        self.callbacks = callbacks or []  # fn(trainer, record) after each logged step
        self.optimizer = make_optimizer(model, cfg)
        self.step = 0
        self.tokens_seen = 0
        self.max_steps: int | None = cfg.max_steps or None
        self.elapsed = 0.0  # training seconds before this process (resumed runs)
        self.history: dict = {"best_val_loss": None, "last_eval": None}
        self.resumed_from: Path | None = None
        if cfg.moe_backend is not None:
            model.set_moe_backend(cfg.moe_backend)
        self.seq_len = cfg.seq_len

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        data_state = self.batches.state_dict() if hasattr(self.batches, "state_dict") else None
        return {"max_steps": self.max_steps, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_now(),
                "lr": lr_at(self.step, self.cfg, self.max_steps), "schedule": {"step": self.step},
                "data": data_state, "model_config": self.model.config.to_dict(),
                "train_config": dataclasses.asdict(self.cfg), "history": self.history, "run_info": self.run_info}

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.state(),
                                    self.tokenizer, self.cfg.keep_last)

    def resume(self, path: str | Path | None = None) -> Path:
        """Continue from a checkpoint (default: the run's latest): weights, optimizer, RNG, schedule, data."""
        ckpt.clean_partial(self.run_dir)
        where = Path(path) if path else ckpt.latest_checkpoint(self.run_dir)
        if where is None:
            raise ckpt.ResumeError(f"nothing to resume: {self.run_dir / 'checkpoints'} holds no complete checkpoint")
        state = ckpt.load_checkpoint(where, self.model, self.optimizer)
        self.step = state["step"]
        self.max_steps = self.cfg.max_steps or state["max_steps"]  # an explicit max_steps extends the run
        self.tokens_seen = state["tokens_seen"]
        self.elapsed = state["elapsed_s"]
        self.history = state.get("history", self.history)
        if state.get("data") is not None:
            if not hasattr(self.batches, "load_state_dict"):
                raise ckpt.ResumeError(f"{where} holds a data position but these batches cannot be repositioned")
            self.batches.load_state_dict(state["data"])
        self.resumed_from = where
        return where

    # ------------------------------------------------------------------ the loop

    def elapsed_now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0)

    def _autocast(self):
        if self.cfg.autocast is None:
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.autocast == "bf16" else torch.float16
        return torch.autocast(self.model.device.type, dtype=dtype)

    def _set_capacity(self, factor: float | None) -> None:
        for layer in self.model.layers:
            layer.feed_forward.capacity_factor = factor
            layer.feed_forward.dropped = None

    @torch.no_grad()
    def step_load(self, micro: list[dict]) -> torch.Tensor:
        """(L, E) slot fractions f of the whole step's routing: a no-grad forward over its micro-batches with
        the training pass's settings (autocast, capacity). Draws no random numbers and no batches."""
        top_k = self.model.config.top_k
        counts_LE, n = 0.0, 0.0
        for b in micro:
            with self._autocast():
                router_logits = self.objective.routing(self.model, b)
            c_LE, k = slot_counts(router_logits, top_k, b.get("valid"))
            counts_LE, n = counts_LE + c_LE, n + k
        return counts_LE / (n.clamp_min(1.0) * top_k)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics as tensors/floats."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        micro = [{k: v.to(self.model.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        weights = [self.batch_weight(b) for b in micro]
        total = sum(weights) or 1.0
        acc: dict[str, torch.Tensor] = {}
        dropped, routed = 0, 0
        self.model.train()
        self._set_capacity(cfg.capacity_factor)
        shares: list[StepShare | None] = [None] * len(micro)
        if self.routes:
            n_routed = [routed_tokens(b) for b in micro]
            aux_coef = getattr(self.objective, "aux_coef", cfg.aux_coef)
            load_LE = self.step_load(micro) if (len(micro) > 1 and cfg.aux_scope == "step" and aux_coef) else None
            shares = [StepShare(w / total, n / (sum(n_routed) or 1), load_LE) for w, n in zip(weights, n_routed)]
        for b, w, share in zip(micro, weights, shares):
            with self._autocast():
                if share is None:
                    loss, metrics = self.objective(self.model, b)
                    loss = loss * (w / total)
                else:  # already the micro-batch's part of the step's loss
                    loss, metrics = self.objective(self.model, b, share=share)
            loss.backward()
            acc["loss"] = acc["loss"] + loss.detach() if "loss" in acc else loss.detach()
            for k, v in metrics.items():
                v = v * (share.routed if share is not None and k in ROUTER_METRICS else w / total)
                acc[k] = acc[k] + v if k in acc else v
            if cfg.capacity_factor is not None:
                dropped += sum(int(layer.feed_forward.dropped) for layer in self.model.layers)
                routed += b["tokens"].numel() * self.model.config.top_k * len(self.model.layers)
        self._set_capacity(None)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        n_tokens = sum(b["tokens"].numel() for b in micro if "tokens" in b)
        self.tokens_seen += n_tokens
        out = {**acc, "grad_norm": grad_norm.detach(), "lr": lr, "tokens": n_tokens}
        if cfg.capacity_factor is not None:
            out["dropped"], out["routed"] = dropped, routed
        return out

    def _eval(self, bar) -> dict | None:
        if hasattr(self, "peak_flops") and self.step > 0:  # on a shared machine the first measure can be low:
            dtype = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.autocast]
            self.peak_flops = max(self.peak_flops, measure_peak_flops(dtype, self.model.device, seconds=0.2))
        if self.evaluate is None:
            return None
        t = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), self._autocast():
            res = self.evaluate(self.model)
        self.model.train()
        rec = {"kind": "eval", "step": self.step, **res, "eval_s": time.perf_counter() - t}
        self.log.write(rec)
        self.history["last_eval"] = {k: v for k, v in rec.items() if not isinstance(v, list)}
        vl = res.get("val_loss")
        if vl is not None and (self.history["best_val_loss"] is None or vl < self.history["best_val_loss"]):
            self.history["best_val_loss"] = vl
        if vl is not None:
            bar.write(f"step {self.step:>6} | val loss {vl:.4f} | val ppl {math.exp(min(vl, 50)):.2f}"
                      + (f" | {res['val_bits_per_byte']:.3f} bits/byte" if "val_bits_per_byte" in res else ""))
        return rec

    def _plots(self) -> None:
        if self.cfg.plots:
            from smoe.train.plots import plot_run
            try:
                plot_run(self.run_dir)
            except Exception as e:  # a plot must never end a run
                print(f"(plots skipped: {e})")

    def fit(self) -> dict:
        """Train to max_steps (or the time budget); returns a summary. Ctrl-C saves a checkpoint first."""
        from tqdm import tqdm

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resumed_from is None and ckpt.latest_checkpoint(self.run_dir) is not None:
            raise ckpt.ResumeError(f"{self.run_dir} already holds checkpoints: resume it (--resume) or use "
                                   f"another output directory")
        torch.manual_seed(cfg.seed) if self.resumed_from is None else None
        if self.model.device.type == "cpu":  # every step re-makes the gradients: reuse their memory (no page faults)
            keep_freed_memory()
        self.log = RunLog(self.run_dir, self.step if self.resumed_from else None, cfg.tensorboard)
        dtype = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast]
        self.peak_flops = measure_peak_flops(dtype, self.model.device)
        flops_tok = train_flops_per_token(self.model.config, self.seq_len)
        self._t0 = time.perf_counter()
        budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None
        bar = tqdm(total=self.max_steps, initial=self.step, desc="training", unit="step",
                   disable=not cfg.progress, **bar_kwargs())
        bar.write(f"peak {self.peak_flops / 1e9:.1f} GFLOP/s ({dtype}) measured by a matmul; "
                  f"{flops_tok / 1e6:.1f} MFLOP per trained token")
        if self.step == 0:
            self._eval(bar)
        window: list[dict] = []
        t_window = 0.0  # seconds spent in the steps of the window (evaluation and saving excluded)
        calib_from: tuple[int, float] | None = None
        auto_steps = budget_s is not None and not cfg.max_steps  # steps = what fits the budget
        stop_reason = "max_steps"
        try:
            while self.max_steps is None or self.step < self.max_steps:
                if budget_s is not None and self.elapsed_now() >= budget_s:
                    stop_reason = "time budget"
                    break
                t_step = time.perf_counter()
                window.append(self.train_step())
                t_window += time.perf_counter() - t_step
                bar.update(1)
                if auto_steps:
                    calib_from = self._fit_budget(calib_from, budget_s, bar)
                if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                    rec = self._record(window, t_window, flops_tok)
                    window, t_window = [], 0.0
                    self.log.write(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}",
                                    tok_s=f"{rec['tokens_per_s']:,.0f}", mfu=f"{100 * rec['mfu']:.1f}%")
                    if cfg.progress:
                        bar.write(fmt_line(rec))
                    for cb in self.callbacks:
                        cb(self, rec)
                if self.step % cfg.eval_every == 0:
                    self._eval(bar)
                    self._plots()
                if self.step % cfg.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            bar.close()
            where = self.save()
            print(f"\ninterrupted at step {self.step}: checkpoint {where}; continue with --resume")
            self.log.close()
            raise
        if window:  # the steps since the last record (stopped by the time budget)
            self.log.write(self._record(window, t_window, flops_tok))
        bar.close()
        if self.step % cfg.eval_every != 0:
            self._eval(bar)
        where = self.save() if (ckpt.latest_checkpoint(self.run_dir) is None
                                or ckpt.read_state(ckpt.latest_checkpoint(self.run_dir))["step"] != self.step) \
            else ckpt.latest_checkpoint(self.run_dir)
        self._plots()
        self.log.close()
        final = None
        if cfg.export:
            from smoe.train.export import export_model
            final = export_model(self.model, self.run_dir / "final", self.tokenizer)
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed_now(),
                "checkpoint": str(where), "final": str(final) if final else None, "stop_reason": stop_reason,
                "history": self.history, "peak_flops": self.peak_flops}

    def _fit_budget(self, calib_from: tuple[int, float] | None, budget_s: float, bar) -> tuple[int, float] | None:
        """Set max_steps to what fits the time budget: first after 5 steps past warm-up, then re-estimated
        every log_every steps from the speed so far (evaluations and saves included) until 60% of the run,
        so the cosine schedule ends near the budget even when the machine's speed changes."""
        if calib_from is None:
            return (self.step, self.elapsed_now()) if self.step >= 2 else None
        done = self.step - calib_from[0]
        first = self.max_steps is None
        if (first and done >= 5) or (not first and self.step % self.cfg.log_every == 0
                                     and self.step < 0.6 * self.max_steps):
            per_step = (self.elapsed_now() - calib_from[1]) / done
            eval_s = (self.history["last_eval"] or {}).get("eval_s", 0.0)
            if self.step < self.cfg.eval_every:  # no periodic evaluation measured in per_step yet
                per_step += eval_s / self.cfg.eval_every
            left = budget_s - self.elapsed_now() - eval_s
            self.max_steps = max(self.step + 1, self.step + int(left / per_step))
            bar.total = self.max_steps
            if first:
                bar.write(f"{per_step:.2f} s/step measured: about {self.max_steps} steps fit the budget "
                          f"(re-estimated as training goes)")
        return calib_from

    def _record(self, window: list[dict], seconds: float, flops_tok: float) -> dict:
        """Average a window of step metrics into one log record."""
        n = len(window)
        mean = {k: float(sum(float(w[k]) for w in window) / n) for k in ("loss", "ce", "aux", "z", "grad_norm")
                if k in window[0]}
        mean.update({k: float(sum(float(w[k]) for w in window) / n) for k, v in window[0].items()  # objective's own
                     if k not in mean and torch.is_tensor(v) and v.dim() == 0})  # scalars, e.g. DPO rewards
        tokens = sum(w["tokens"] for w in window)
        tps = tokens / max(seconds, 1e-9)
        rec = {"kind": "train", "step": self.step, **mean, "lr": window[-1]["lr"], "tokens_per_s": tps,
               "mfu": tps * flops_tok / self.peak_flops, "tokens_seen": self.tokens_seen,
               "elapsed_s": self.elapsed_now()}
        if "load" in window[0]:
            load = sum(w["load"].float() for w in window) / n
            rec["load"] = [[round(x, 5) for x in row] for row in load.tolist()]
            rec["imbalance"] = [round(x, 4) for x in imbalance(load).tolist()]
        if "dropped" in window[0]:
            routed = sum(w["routed"] for w in window)
            rec["dropped"] = sum(w["dropped"] for w in window)
            rec["dropped_frac"] = rec["dropped"] / max(routed, 1)
        for k in ("loss", "ce", "aux", "z"):
            rec.setdefault(k, float("nan"))
        return rec
