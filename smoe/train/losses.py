"""The losses of sparse MoE training, defined once: token cross-entropy, the load-balancing auxiliary
loss and the router z-loss, plus per-layer expert load statistics and the language-model objective.

Legend: B batch, T tokens, V vocab, N = B*T routed tokens, E experts, K experts per token, L layers.

Load-balancing loss (Switch Transformer eq. 4, Mixtral's router): per layer
    aux = E * sum_e f_e * P_e,   f_e = (token-slots sent to e) / (N * K),   P_e = mean_n softmax(logits_n)_e
averaged over layers. A perfectly balanced router scores 1 (f_e = P_e = 1/E) whatever K is.
transformers' `load_balancing_loss_func` divides the counts by N instead of N * K, so the same router
scores K there: ours = theirs / K (per layer; theirs pools all layers' tokens into one count).

Router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(logits_n)^2, averaged over layers.
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


def _layer_stats(logits_NE: torch.Tensor, top_k: int, mask_N: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_E slot fractions, P_E mean router probabilities) of one layer over the unmasked tokens."""
    N, E = logits_NE.shape
    probs_NE = torch.softmax(logits_NE.float(), dim=-1)
    experts_NK = torch.topk(logits_NE, top_k, dim=-1).indices  # the choice smoe.model.transformer.route makes
    w_N = torch.ones(N, device=logits_NE.device) if mask_N is None else mask_N.reshape(-1).float()
    n = w_N.sum().clamp_min(1.0)
    counts_E = torch.zeros(E, device=logits_NE.device).index_add_(0, experts_NK.reshape(-1),
                                                                   w_N.repeat_interleave(top_k))
    f_E = counts_E / (n * top_k)
    P_E = (probs_NE * w_N[:, None]).sum(0) / n
    return f_E, P_E


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, mask_N: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss E * sum_e f_e * P_e, averaged over layers; 1 when balanced.

    router_logits: one (N, E) tensor per layer; mask_N (optional) marks real tokens (False: padding).
    Gradients flow through P_e only (f_e counts are not differentiable).
    """
    losses = []
    for logits_NE in router_logits:
        f_E, P_E = _layer_stats(logits_NE, top_k, mask_N)
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


@dataclass
class LMObjective:
    """Next-token language modelling: cross-entropy + aux_coef * load balancing + z_coef * router z-loss.

    A batch is a dict with tokens (B, T) and targets (B, T) (IGNORE where not scored), optionally
    segments (B, T) document ids of packed sequences (they do not attend to each other) and valid (B, T)
    (False: padding, left out of the router losses). Returns (loss, metrics of detached tensors).
    """

    aux_coef: float = 0.01
    z_coef: float = 0.001

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, targets = batch["tokens"], batch["targets"]
        valid, segments = batch.get("valid"), batch.get("segments")
        attn = None
        if valid is not None or segments is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
            attn = SelfAttention(positions, valid=valid, window=model.config.sliding_window, segments=segments)
        logits, router_logits = model(tokens, attn=attn, return_router_logits=True)
        ce = cross_entropy(logits, targets)
        top_k = model.config.top_k
        aux = load_balancing_loss(router_logits, top_k, valid)
        z = router_z_loss(router_logits, valid)
        loss = ce + self.aux_coef * aux + self.z_coef * z
        metrics = {"ce": ce.detach(), "aux": aux.detach(), "z": z.detach(),
                   "load": expert_load(router_logits, top_k, valid)}
        return loss, metrics
