"""The model: config, layers, transformer."""

from smoe.model.attention import KVCache, SelfAttention
from smoe.model.config import PRESETS, ModelConfig, get_preset
from smoe.model.transformer import Transformer, route

__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "KVCache", "SelfAttention", "route"]
