"""smoe: Sparse Mixture-of-Experts language models of the Mixtral kind."""

from smoe.model import PRESETS, KVCache, ModelConfig, Transformer, get_preset

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "get_preset", "Transformer", "KVCache", "load_tokenizer", "generate",
           "stream", "SamplingParams", "LLM"]


def __getattr__(name: str):
    # tokenizer and generation pull in optional heavy imports; load them on first use
    if name == "load_tokenizer":
        from smoe.tokenizer import load_tokenizer
        return load_tokenizer
    if name in ("generate", "stream", "SamplingParams"):
        import smoe.generation as g
        return getattr(g, name)
    if name == "LLM":
        from smoe.engine import LLM
        return LLM
    raise AttributeError(f"module 'smoe' has no attribute {name!r}")
