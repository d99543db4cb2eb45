"""The losses of sparse MoE training, defined once: token cross-entropy, the load-balancing auxiliary
loss and the router z-loss, plus per-layer expert load statistics and the language-model objective.

Legend: B batch, T tokens, V vocab, N = B*T routed tokens, E experts, K experts per token, L layers.

Load-balancing loss (Switch Transformer eq. 4, Mixtral's router): per layer
    aux = E * sum_e f_e * P_e,   f_e = (token-slots sent to e) / (N * K),   P_e = mean_n softmax(logits_n)_e
averaged over layers. A perfectly balanced router scores 1 (f_e = P_e = 1/E) whatever K is.
transformers' `load_balancing_loss_func` divides the counts by N instead of N * K, so the same router
scores K there: ours = theirs / K (per layer; theirs pools all layers' tokens into one count).

Router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits_n)^2, averaged over layers.

Gradient accumulation (StepShare): both router losses are means over the routed tokens of the optimizer
step, and aux is a product of two such means. A micro-batch j of n_j routed tokens (of N in the step) adds
n_j/N * (E * sum_e f_e * P^j_e) with f_e the whole step's slot fractions (a no-grad pre-pass counts them),
and n_j/N * z_j, so the micro-batches add up to the loss of one big batch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from smoe.model.attention import SelfAttention

IGNORE = -100  # target id that is not scored (padding, prompts in fine-tuning)


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over targets that are not IGNORE, computed in float32."""
    V = logits_BTV.shape[-1]
    n = (targets_BT != IGNORE).sum().clamp_min(1)  # no scored target: 0, not nan
    total = F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_BT.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total / n


def _token_weights(logits_NE: torch.Tensor, mask_N: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_N 1.0 for routed tokens and 0.0 for masked ones, their count n as a float tensor)."""
    N = logits_NE.shape[0]
    w_N = torch.ones(N, device=logits_NE.device) if mask_N is None else mask_N.reshape(-1).float()
    return w_N, w_N.sum()


def _slot_counts(logits_NE: torch.Tensor, top_k: int, w_N: torch.Tensor) -> torch.Tensor:
    """(E,) token-slots of the weighted tokens that each expert receives (the top-k of the logits)."""
    experts_NK = torch.topk(logits_NE, top_k, dim=-1).indices  # the choice smoe.model.transformer.route makes
    return torch.zeros(logits_NE.shape[-1], device=logits_NE.device).index_add_(
        0, experts_NK.reshape(-1), w_N.repeat_interleave(top_k))


def _layer_stats(logits_NE: torch.Tensor, top_k: int, mask_N: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_E slot fractions, P_E mean router probabilities) of one layer over the unmasked tokens."""
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    w_N, n = _token_weights(logits_NE, mask_N)
    n = n.clamp_min(1.0)
    f_E = _slot_counts(logits_NE, top_k, w_N) / (n * top_k)
    P_E = (probs_NE * w_N[:, None]).sum(0) / n
    return f_E, P_E


@torch.no_grad()
def slot_counts(router_logits: list[torch.Tensor], top_k: int, mask_N: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """((L, E) token-slots each expert receives per layer, n routed tokens): summed over the micro-batches
    of a step, counts / (n * K) are the step's slot fractions f (see load_balancing_loss's load_LE)."""
    w_N, n = _token_weights(router_logits[0], mask_N)
    return torch.stack([_slot_counts(lg, top_k, w_N) for lg in router_logits]), n


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mask_N: torch.Tensor | None = None,
                        load_LE: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss E * sum_e f_e * P_e, averaged over layers; 1 when balanced.

    router_logits: one (N, E) tensor per layer; mask_N (optional) marks real tokens (False: padding).
    load_LE (optional): the slot fractions f to use instead of this batch's own, e.g. those of the whole
    optimizer step when this batch is one of its micro-batches. Gradients flow through P_e only.
    """
    losses = []
    for i, logits_NE in enumerate(router_logits):
        f_E, P_E = _layer_stats(logits_NE, top_k, mask_N)
        f_E = f_E if load_LE is None else load_LE[i].to(P_E)
        losses.append(logits_NE.shape[-1] * (f_E.detach() * P_E).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits: list[torch.Tensor], mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over layers."""
    losses = []
    for logits_NE in router_logits:
        z_N = torch.logsumexp(logits_NE.float(), dim=-1).square()
        if mask_N is None:
            losses.append(z_N.mean())
        else:
            w_N = mask_N.reshape(-1).float()
            losses.append((z_N * w_N).sum() / w_N.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


@torch.no_grad()
def expert_load(router_logits: list[torch.Tensor], top_k: int, mask_N: torch.Tensor | None = None) -> torch.Tensor:
    """(L, E) fraction of token-slots each expert received in each layer (rows sum to 1)."""
    return torch.stack([_layer_stats(lg, top_k, mask_N)[0] for lg in router_logits])


def imbalance(load_LE: torch.Tensor) -> torch.Tensor:
    """(L,) max/mean expert load per layer: 1.0 is perfect balance, E means one expert takes all."""
    return load_LE.max(dim=-1).values * load_LE.shape[-1]


ROUTER_METRICS = ("aux", "z", "load")  # means over routed tokens: a step's value weighs micro-batches by n_j / N


def routed_tokens(batch: dict) -> int:
    """How many tokens of a batch the router losses count: `valid` ones (all `tokens` when there is no mask)."""
    valid = batch.get("valid")
    return int(valid.sum()) if valid is not None else batch["tokens"].numel()


@dataclass
class StepShare:
    """A micro-batch's part of its optimizer step, so that its loss is its exact contribution to the step's.

    weight: its share of the main loss (w_j / W, e.g. scored targets); routed: its share of the step's routed
    tokens (n_j / N), the weight of the router losses; load_LE: the step's (L, E) slot fractions f for the
    load-balancing loss (aux_scope='step'), or None for the micro-batch's own (aux_scope='micro').
    """

    weight: float = 1.0
    routed: float = 1.0
    load_LE: torch.Tensor | None = None


def step_loss(main: torch.Tensor, router: torch.Tensor, share: StepShare | None) -> torch.Tensor:
    """main + router terms of a batch, or with a StepShare its micro-batch's weighted part of the step's loss."""
    return main + router if share is None else share.weight * main + share.routed * router


def lm_forward(model, batch: dict, last_only: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, router logits per layer) of an LM batch: packed segments and padding attend as they should."""
    tokens, valid, segments = batch["tokens"], batch.get("valid"), batch.get("segments")
    attn = None
    if valid is not None or segments is not None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        attn = SelfAttention(positions, valid=valid, window=model.config.sliding_window, segments=segments)
    return model(tokens, attn=attn, return_router_logits=True, last_only=last_only)


@dataclass
class LMObjective:
    """Next-token language modelling: cross-entropy + aux_coef * load balancing + z_coef * router z-loss.

    A batch is a dict with tokens (B, T) and targets (B, T) (IGNORE where not scored), optionally
    segments (B, T) document ids of packed sequences (they do not attend to each other) and valid (B, T)
    (False: padding, left out of the router losses). Returns (loss, metrics of detached tensors); with a
    StepShare (the Trainer under gradient accumulation) the loss is the micro-batch's part of the step's.
    """

    aux_coef: float = 0.01
    z_coef: float = 0.001

    def routing(self, model, batch: dict) -> list[torch.Tensor]:
        """The router logits per layer of the forward pass __call__ makes (for the Trainer's pre-pass)."""
        return lm_forward(model, batch, last_only=True)[1]

    def __call__(self, model, batch: dict, share: StepShare | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        valid = batch.get("valid")
        logits, router_logits = lm_forward(model, batch)
        ce = cross_entropy(logits, batch["targets"])
        top_k = model.config.top_k
        aux = load_balancing_loss(router_logits, top_k, valid, share.load_LE if share is not None else None)
        z = router_z_loss(router_logits, valid)
        loss = step_loss(ce, self.aux_coef * aux + self.z_coef * z, share)
        metrics = {"ce": ce.detach(), "aux": aux.detach(), "z": z.detach(),
                   "load": expert_load(router_logits, top_k, valid)}
        return loss, metrics
