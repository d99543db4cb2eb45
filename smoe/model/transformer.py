"""The Mixtral-architecture sparse MoE transformer, in one file.

Shapes: B batch, T tokens in this step, D dim, H heads, Hkv KV heads, hd head dim, V vocab,
E experts, K experts per token, N = B*T tokens.

Attention is handed an `attn` object per forward (see smoe.model.attention): it owns positions,
masks and any KV cache, so the same layer math serves training, generation and a batching engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoe.kernels import (
    FUSED_NORM_MAX_DIM,
    ROUTE_MAX_TOKENS,
    default_backend,
    fused_op,
    fused_ops_apply,
    moe_experts,
    native,
)
from smoe.kernels.linear import Linear
from smoe.model.attention import Attend, SelfAttention
from smoe.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops_apply(x, self.weight) and x.shape[-1] <= FUSED_NORM_MAX_DIM:  # CUDA inference: one launch
            out = fused_op("rms_norm", x, self.weight, self.eps)
            if out is not None:
                return out
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions_BT: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles at these positions: each (B, 1, T, hd), halves repeated."""
    freqs = positions_BT.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x (B, h, T, hd): the Hugging Face (rotate-half) layout."""
    if fused_ops_apply(x, cos, sin):  # CUDA inference: one launch
        out = fused_op("apply_rope", x, cos, sin)
        if out is not None:
            return out
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attend, layer: int
                ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attn(layer, q, k, v)  # (B, H, T, hd)
        return self.wo(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def route(x_ND: torch.Tensor, gate_weight_ED: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router: float32 logits, top-k experts, softmax over the k chosen logits.

    Returns (weights_NK float32, experts_NK, logits_NE float32). Softmax over the chosen k equals
    softmax over all E, top-k, renormalise.
    """
    if x_ND.shape[0] <= ROUTE_MAX_TOKENS and top_k <= gate_weight_ED.shape[0] and fused_ops_apply(x_ND, gate_weight_ED):
        out = fused_op("route", x_ND, gate_weight_ED, top_k)  # CUDA inference: one launch
        if out is not None:
            return out
    if top_k <= gate_weight_ED.shape[0] and native.route_serves(x_ND, gate_weight_ED) and not (
            torch.is_grad_enabled() and (x_ND.requires_grad or gate_weight_ED.requires_grad)):
        return native.route(x_ND, gate_weight_ED, top_k)  # CPU inference: one op for the 6-8 below
    logits_NE = F.linear(x_ND.float(), gate_weight_ED.float())
    top_logits_NK, experts_NK = _top_k(logits_NE, top_k)
    return torch.softmax(top_logits_NK, dim=-1), experts_NK, logits_NE


def _top_k(logits_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over the experts; in a compiled graph as k max-reductions, which inductor fuses with the
    router (its topk is a library call: 5-50 us per layer in a CPU decode step, its code being cold)."""
    if not torch.compiler.is_compiling():
        return torch.topk(logits_NE, k, dim=-1)
    values, indices = [], []
    for _ in range(k):
        v_N1, i_N1 = logits_NE.max(-1, keepdim=True)  # the first of equal maxima
        values.append(v_N1)
        indices.append(i_N1)
        logits_NE = logits_NE.scatter(-1, i_N1, float("-inf"))
    return torch.cat(values, -1), torch.cat(indices, -1)


def drop_over_capacity(experts_NK: torch.Tensor, weights_NK: torch.Tensor, n_experts: int, capacity_factor: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights of token-slots beyond each expert's capacity ceil(cf * N * K / E).

    Slots are served first choices first, then in token order (GShard/Switch). Returns
    (weights_NK, number of dropped token-slots as a 0-d tensor).
    """
    N, K = experts_NK.shape
    capacity = math.ceil(capacity_factor * N * K / n_experts)
    onehot_SE = F.one_hot(experts_NK.t().reshape(-1), n_experts)  # k-major: every first choice, then seconds
    rank_S = (onehot_SE.cumsum(0) * onehot_SE).sum(-1) - 1  # place of each slot in its expert's queue
    keep_NK = (rank_S < capacity).view(K, N).t()
    return weights_NK * keep_NK, (~keep_NK).sum()


class MoE(nn.Module):
    """Sparse MoE feed-forward: a bias-free router over n_experts SwiGLU experts, top_k run per token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.backend: str | None = None  # None: the fastest for the device
        self.capacity_factor: float | None = None  # None: dropless; else drop slots over capacity (training)
        self.dropped: torch.Tensor | None = None  # token-slots dropped in the last forward (with a capacity)
        self.adapter: nn.Module | None = None  # optional (w1, w2, w3) -> weights used instead (LoRA, smoe.train.lora)
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(cfg.n_experts, cfg.hidden_dim, cfg.dim))  # (E, H, D)
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.hidden_dim))  # (E, D, H)
        self.w3 = nn.Parameter(torch.empty(cfg.n_experts, cfg.hidden_dim, cfg.dim))  # (E, H, D)

    def forward(self, x: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (out (B, T, D), router logits (B*T, E) in float32)."""
        B, T, D = x.shape
        x_ND = x.reshape(B * T, D)
        weights_NK, experts_NK, logits_NE = route(x_ND, self.gate.weight, top_k or self.top_k)
        if self.capacity_factor is not None:
            weights_NK, self.dropped = drop_over_capacity(experts_NK, weights_NK, self.gate.weight.shape[0],
                                                          self.capacity_factor)
        backend = self.backend or default_backend(x.device)
        w1, w2, w3 = (self.w1, self.w2, self.w3) if self.adapter is None else self.adapter(self.w1, self.w2, self.w3)
        out_ND = moe_experts(x_ND, w1, w2, w3, experts_NK, weights_NK.to(x.dtype), backend)
        return out_ND.view(B, T, D), logits_NE


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attend, layer: int,
                top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.attention(self.attention_norm(x), cos, sin, attn, layer)
        ff, router_logits = self.feed_forward(self.ffn_norm(h), top_k)
        return h + ff, router_logits


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        if not self.output.weight.is_meta:
            self.reset_rope(self.output.weight.device)
            self.init_weights()

    def reset_rope(self, device: torch.device | str) -> None:
        """(Re)compute the rotary inverse frequencies (after building on the meta device)."""
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.inv_freq = inv_freq.float().to(device)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Normal(0, std) matrices and embeddings, unit norms (the transformers Mixtral init)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for p in self.parameters():
            with torch.no_grad():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    def set_moe_backend(self, name: str | None) -> None:
        """Choose the MoE compute backend by name for every layer (None: the device default)."""
        if name is not None:
            from smoe.kernels import get_backend
            get_backend(name)
        for layer in self.layers:
            layer.feed_forward.backend = name

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, attn: Attend | None = None,
                *, top_k: int | None = None, return_router_logits: bool = False, last_only: bool = False,
                logits_at: torch.Tensor | None = None):
        """tokens (B, T) -> logits (B, T, V) float-like in the model dtype.

        positions (B, T) default to 0..T-1; attn defaults to causal self-attention over `tokens`
        (with the config's sliding window). top_k overrides the experts per token for this call.
        With return_router_logits, returns (logits, [router logits (B*T, E) per layer]).
        With last_only, logits are computed for the last position only: (B, 1, V); with logits_at
        (a LongTensor of positions along T), only at those: (B, len(logits_at), V).
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if attn is None:
            attn = SelfAttention(positions, window=self.config.sliding_window)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        cos, sin = rope_cos_sin(positions, self.inv_freq, h.dtype)
        router_logits = []
        for i, layer in enumerate(self.layers):
            h, rl = layer(h, cos, sin, attn, i, top_k)
            router_logits.append(rl)
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[:, logits_at]
        logits = self.output(self.norm(h))  # (B, T, V)
        return (logits, router_logits) if return_router_logits else logits

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
                        ) -> Transformer:
        """Load a checkpoint directory (Hugging Face or Mistral consolidated layout)."""
        from smoe.checkpoint import load_model
        return load_model(path, dtype=dtype, device=device)

    def save_pretrained(self, path, format: str = "hf", max_shard_size: int | str = "5GB") -> None:
        """Write this model to a directory in the 'hf' or 'consolidated' layout."""
        from smoe.checkpoint import save_model
        save_model(self, path, format=format, max_shard_size=max_shard_size)

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype
