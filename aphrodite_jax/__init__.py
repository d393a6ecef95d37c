"""aphrodite-jax: an Aphrodite-compatible LLM inference engine on JAX/XLA.

The public offline API is `LLM` and `SamplingParams`; `AsyncLLMEngine` drives the servers.
Imports are lazy so that `import aphrodite_jax.engine.scheduler` (pure Python) never pulls in JAX.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LLM": "aphrodite_jax.entrypoints",
    "SamplingParams": "aphrodite_jax.sampling_params",
    "AsyncLLMEngine": "aphrodite_jax.engine.async_engine",
    "LLMEngine": "aphrodite_jax.engine.llm_engine",
    "EngineConfig": "aphrodite_jax.config",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aphrodite_jax' has no attribute {name!r}")
