"""OpenAI-compatible HTTP server over the engine: `serve(model_dir, host, port, ...)` (`smoe serve`)."""

from __future__ import annotations

import logging

from smoe.serve.app import ServerOptions, build_app

__all__ = ["serve", "build_app", "ServerOptions"]

log = logging.getLogger("smoe.serve")


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          max_queue: int | None = None, served_model_name: str | None = None, dtype: str | None = None,
          device: str | None = None, backend: str | None = None, engine_config=None, drain_timeout: float = 30.0,
          access_log: bool = False, log_level: str = "info", engine_process: bool = True) -> None:
    """Load a checkpoint and serve it until SIGINT/SIGTERM, which stop new requests and let running
    ones finish (for at most drain_timeout seconds). The engine runs in a process of its own
    (smoe.engine.process), or with engine_process=False on a thread of the server's process."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine_process:
        from smoe.engine.process import EngineProcess
        engine = EngineProcess(model, dtype=dtype, device=device, backend=backend, config=engine_config)
        where = f"{engine.info['dtype']}, {engine.info['device']} (engine process)"
    else:
        from smoe.engine.async_engine import AsyncEngine
        engine = AsyncEngine.from_pretrained(model, dtype=dtype, device=device, backend=backend, config=engine_config)
        where = f"{engine.engine.model.dtype}, {engine.engine.model.device} (engine thread)"
    e = engine.engine
    cfg = e.model.config
    log.info("model %s: %s layers, %s experts (top %s), %s, context %s", model, cfg.n_layers, cfg.n_experts,
             cfg.top_k, where, cfg.max_seq_len)
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens); up to %d sequences, %d tokens per step",
             e.pool.n_blocks, e.pool.block_size, e.pool.n_blocks * e.pool.block_size * e.kv_bytes_per_token() / 2**20,
             e.pool.n_blocks * e.pool.block_size, e.config.max_num_seqs, e.config.max_num_batched_tokens)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = build_app(engine, ServerOptions(served_model_name or model, api_key=api_key, max_queue=max_queue))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=drain_timeout)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # refuse new requests at once; running ones drain
            app.state.draining = True
            super().handle_exit(sig, frame)

    Server(config).run()
