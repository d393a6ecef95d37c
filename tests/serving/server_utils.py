"""A real server for end-to-end tests: uvicorn on a free localhost port in a background thread.

`start_server(llm_engine=None, serving_config=None, **engine_kw)` wraps an LLMEngine (the suite's shared
one, or a new one built with the common shapes) in an AsyncLLMEngine, builds the app and serves it.
The handle gives the base URL, the AsyncLLMEngine, and `run(coro)` to await engine calls on the
server's own event loop. `stop()` shuts the server and the engine thread down (not the LLMEngine).
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

ENGINE_KW = dict(max_model_len=2048, max_num_seqs=32, num_gpu_blocks_override=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    base_url: str  # http://127.0.0.1:PORT
    engine: Any  # the AsyncLLMEngine
    app: Any
    server: Any
    thread: threading.Thread
    loop: Optional[asyncio.AbstractEventLoop] = None
    owns_engine: bool = True

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def run(self, coro, timeout: float = 600):
        """Run a coroutine on the server's loop (engine streams belong to the loop that made them)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def free_blocks(self) -> int:
        return self.engine.engine.scheduler.block_manager.num_free_gpu_blocks

    def total_blocks(self) -> int:
        return self.engine.engine.runner.num_gpu_blocks

    def wait_idle(self, timeout: float = 120) -> bool:
        """Wait until the engine has no request and every page is free (True) or the timeout passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            eng = self.engine.engine
            if not eng.has_unfinished_requests() and not eng.requests and self.free_blocks() == self.total_blocks():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.owns_engine:
            self.engine.shutdown()


def start_server(llm_engine: Any = None, serving_config: Any = None, async_engine: Any = None,
                 **engine_kw) -> ServerHandle:
    """Serve `async_engine` (shared, left running at stop), else a new AsyncLLMEngine over `llm_engine`
    (else over a new LLMEngine with the suite's common shapes)."""
    import uvicorn

    from aphrodite_jax.engine.async_engine import AsyncLLMEngine
    from serving.config import ServingConfig
    from serving.openai.api_server import build_app

    if async_engine is None and llm_engine is None:
        from aphrodite_jax.config import EngineConfig
        from aphrodite_jax.engine.llm_engine import LLMEngine

        llm_engine = LLMEngine(EngineConfig.from_kwargs(**{**ENGINE_KW, **engine_kw}))
    owns = async_engine is None
    engine = AsyncLLMEngine(llm_engine) if owns else async_engine
    config = serving_config or ServingConfig()
    app = build_app(engine, config)
    port = free_port()
    from serving.cli import uvicorn_ssl_kwargs

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", timeout_keep_alive=30, **uvicorn_ssl_kwargs(config)))
    holder: dict = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        holder["loop"] = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=serve, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            if owns:
                engine.shutdown()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    scheme = "https" if config.ssl_certfile else "http"
    return ServerHandle(f"{scheme}://127.0.0.1:{port}", engine, app, server, thread, holder["loop"], owns)
