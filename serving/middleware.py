"""The server's operating surface around the OpenAI routes: metrics instrumentation, the
Kobold API, the admin status route, the playground page, API keys, CORS, `--root-path` and
`--middleware`. `build_app` calls `instrument` first (so every route's engine calls are measured)
and `install_surface` last.

Middleware order, outermost first: user middleware, CORS, auth, then the app's own (body limit).
CORS sits outside auth so a 401 still carries CORS headers and preflights never need a key.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from serving.auth import AuthMiddleware
from serving.config import ServingConfig
from serving.metrics import InstrumentedEngine, ServerMetrics, install_metrics

STATIC_DIR = Path(__file__).parent / "static"
logger = logging.getLogger("aphrodite_jax.serving")


def instrument(engine: Any, config: ServingConfig) -> InstrumentedEngine:
    from serving.openai.serving_engine import served_names

    return InstrumentedEngine(engine, ServerMetrics(engine, served_names(engine, config)[0]))


def import_middleware(path: str) -> Any:
    """`package.module.name` (or `package.module:name`) -> the object, with a clear error if absent."""
    module_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"--middleware {path!r}: expected an import path like package.module.name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--middleware {path!r}: cannot import {module_name}: {exc}") from None
    if not hasattr(module, attr):
        raise ValueError(f"--middleware {path!r}: {module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def _public_config(config: Any) -> dict:
    """A config as JSON-able dict, with the keys masked."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    if "api_keys" in data:
        data["api_keys"] = ["***"] * len(data["api_keys"])
    if data.get("admin_key"):
        data["admin_key"] = "***"

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)

    return clean(data)


def install_admin(app: FastAPI, engine: Any, config: ServingConfig) -> None:
    @app.get("/v1/admin/status", tags=["admin"])
    async def admin_status():
        """Requests in flight, KV usage and the configuration (admin key required)."""
        snap = await asyncio.to_thread(engine.snapshot)  # between two steps, off the event loop
        requests = [{"request_id": r.request_id, "state": r.state, "prompt_tokens": r.prompt_tokens,
                     "output_tokens": r.output_tokens} for r in snap.requests]
        return {"requests": requests,
                "num_requests": {"running": snap.num_running, "waiting": snap.num_waiting,
                                 "swapped": snap.num_swapped},
                "kv_cache": {"gpu_usage": snap.gpu_cache_usage, "cpu_usage": snap.cpu_cache_usage,
                             "num_gpu_blocks": snap.num_gpu_blocks, "num_cpu_blocks": snap.num_cpu_blocks},
                "engine_config": _public_config(engine.resolved_config),
                "serving_config": _public_config(config)}


def install_playground(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def install_surface(app: FastAPI, engine: Any, config: ServingConfig) -> None:
    from serving.kobold.api import install_kobold

    install_metrics(app, engine.metrics if isinstance(engine, InstrumentedEngine) else
                    ServerMetrics(engine, app.state.served_model_names[0]))
    install_kobold(app, engine, config)
    install_admin(app, engine, config)
    install_playground(app)
    if config.root_path:
        app.root_path = config.root_path
    if config.admin_key is None:
        logger.info("no admin key (--admin-key / APHRODITE_ADMIN_KEY): admin routes answer 403")
    app.add_middleware(AuthMiddleware, api_keys=config.api_keys, admin_key=config.admin_key)
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins,
                       allow_credentials=config.allow_credentials, allow_methods=config.allowed_methods,
                       allow_headers=config.allowed_headers)
    for path in config.middleware:
        obj = import_middleware(path)
        if inspect.isclass(obj):
            app.add_middleware(obj)
        elif inspect.iscoroutinefunction(obj):
            app.middleware("http")(obj)
        else:
            raise ValueError(f"--middleware {path!r}: expected a class (ASGI middleware) or an async "
                             f"function (request, call_next), got {type(obj).__name__}")
