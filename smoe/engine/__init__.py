"""Inference engine: paged KV cache, continuous batching with chunked prefill and preemption.

Entry points: `LLM(model).generate(prompts, params)` offline; `Engine` for step-by-step use;
`AsyncEngine` drives an Engine from a background thread for servers.
"""

from smoe.engine.async_engine import AsyncEngine
from smoe.engine.engine import Engine, EngineConfig, StepOutput
from smoe.engine.kv import BlockPool, parse_bytes
from smoe.engine.llm import LLM, RequestOutput

__all__ = ["LLM", "RequestOutput", "Engine", "EngineConfig", "StepOutput", "AsyncEngine", "BlockPool", "parse_bytes"]
