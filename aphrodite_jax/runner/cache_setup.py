"""The two compile caches' setup: JAX's persistent compilation cache, and the engine's part of the
executable cache's key (runner/exec_cache.py)."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax


def setup_compilation_cache(path: Optional[str]) -> None:
    """Point JAX's persistent compilation cache at `path` (None: leave it off)."""
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every variant, however quick: a warm start that misses the executable cache (new source) still skips
    # XLA's compile for each step whose lowered code did not change.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def file_identity(path: Optional[str]) -> Any:
    """(path, size, mtime) of a weight file, or of every file in a weight folder."""
    if not path or not os.path.exists(path):
        return path
    if os.path.isdir(path):
        return sorted(file_identity(os.path.join(path, f)) for f in os.listdir(path)
                      if os.path.isfile(os.path.join(path, f)))
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def cache_context(config: Any, loaded: Any, runner: Any) -> dict[str, Any]:
    """The engine's part of the executable-cache key: whatever the traced steps close over besides their
    arguments (the resolved engine config, the model config, shapes derived from them, the weight source)."""
    engine = config.to_dict()
    for k in ("compilation_cache_dir", "forbid_compile_after_warmup"):
        engine.pop(k, None)
    hf = loaded.hf_config.to_dict() if hasattr(loaded.hf_config, "to_dict") else repr(loaded.hf_config)
    return {"engine": engine, "hf_config": hf, "dtype": str(loaded.dtype), "max_model_len": runner.max_model_len,
            "vocab_size": runner.vocab_size, "model_class": type(loaded.model).__qualname__,
            "attention_backend": loaded.attention_backend,
            "kv_spec": repr(runner.kv_spec), "mesh": None if runner.mesh is None else repr(runner.mesh),
            "weights": (loaded.source_kind, file_identity(loaded.source_path))}
