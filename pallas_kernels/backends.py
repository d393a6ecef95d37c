"""The attention backends by name: what each one can serve, whether it runs here, and the engine's one choice.

Why a registry: the engine picks a backend once at start from its config (`attention_backend`) and the
model's needs, and hands the name to the attention layers as a static value; the traced step then calls that
backend directly. A backend that cannot serve the model is a clear error at start, naming what it lacks,
instead of a silent fallback or a failure inside a trace.

A backend is an entry function with the `ragged_paged_attention` contract (pallas_kernels/__init__.py),
named "module:function" and imported at its first call, so this module imports neither JAX nor any kernel
(the config and the CLI read the names from it). Adding one: a module with that function, and one entry in
`BACKENDS` below (docs/internals.md, "Adding an attention backend").
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pallas_kernels import cpu_paged_attention

logger = logging.getLogger(__name__)

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports. None means any value."""

    platforms: Optional[tuple[str, ...]]  # jax.default_backend() values it runs on
    cache_dtypes: tuple[str, ...]  # KV cache dtypes (NumPy names)
    head_dims: Optional[tuple[int, ...]] = None
    page_sizes: Optional[tuple[int, ...]] = None
    soft_cap: bool = True
    sliding_window: bool = True


@dataclass(frozen=True)
class AttentionNeeds:
    """What a model asks of its attention: its shapes, its cache and the options its layers use."""

    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    cache_dtype: str  # NumPy name, e.g. "float32"
    page_size: int
    soft_cap: bool = False  # some layer caps its attention scores
    sliding_window: bool = False  # some layer attends through a sliding window


def _ref(path: str) -> Any:
    """The object named "module:attribute", imported now (so a test's monkeypatch of it is seen)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    description: str  # for the start-up log line, "attention: cpu (C++ kernel)"
    entry: str  # "module:function" with the ragged_paged_attention contract
    caps: Capabilities
    options: tuple[tuple[str, Any], ...] = ()  # fixed keyword arguments of the entry function
    interpret: bool = False  # the entry takes `interpret` (a Pallas kernel run on CPU, as tests do)
    probe: Optional[str] = None  # "module:function" -> (ok, why not): builds and registers what it runs

    def lacks(self, platform: str, needs: AttentionNeeds) -> Optional[str]:
        """What this backend lacks for `needs` on `platform`, as a phrase, or None if it can serve them."""
        c = self.caps
        if c.platforms is not None and platform not in c.platforms:
            return f"platform {platform} not in {c.platforms}"
        if needs.cache_dtype not in c.cache_dtypes:
            return f"cache dtype {needs.cache_dtype} not in {c.cache_dtypes}"
        if c.head_dims is not None and needs.head_dim not in c.head_dims:
            return f"head_dim {needs.head_dim} not in {c.head_dims}"
        if needs.num_kv_heads < 1 or needs.num_q_heads % needs.num_kv_heads:
            return f"{needs.num_q_heads} query heads are not whole groups of {needs.num_kv_heads} KV heads"
        if c.page_sizes is not None and needs.page_size not in c.page_sizes:
            return f"page size {needs.page_size} not in {c.page_sizes}"
        if needs.soft_cap and not c.soft_cap:
            return "no attention soft cap"
        if needs.sliding_window and not c.sliding_window:
            return "no sliding window"
        return None

    def available(self) -> tuple[bool, str]:
        """(ok, why not) of the probe: a C++ backend builds and registers its kernel here, once per process."""
        return (True, "") if self.probe is None else _ref(self.probe)()

    def function(self) -> Callable:
        return _ref(self.entry)

    def __call__(self, q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                 sliding_window: Optional[int] = None, soft_cap: Optional[float] = None, interpret: Any = False):
        extra = dict(self.options)
        if self.interpret:
            extra["interpret"] = interpret
        return self.function()(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, **extra)


BACKENDS: dict[str, AttentionBackend] = {b.name: b for b in (
    AttentionBackend("reference", "pure-JAX reference", "pallas_kernels.reference:ref_ragged_paged_attention",
                     Capabilities(platforms=None, cache_dtypes=FLOAT_DTYPES)),
    AttentionBackend("cpu", "C++ kernel", "pallas_kernels.cpu:ragged_paged_attention",
                     Capabilities(("cpu",), ("float32",), head_dims=cpu_paged_attention.HEAD_DIMS),
                     options=(("use_kernel", True),), probe="pallas_kernels.cpu_paged_attention:kernel_status"),
    AttentionBackend("cpu_jax", "pure JAX laid out for the CPU", "pallas_kernels.cpu:ragged_paged_attention",
                     Capabilities(("cpu",), FLOAT_DTYPES), options=(("use_kernel", False),)),
    AttentionBackend("tpu", "Pallas TPU kernel", "pallas_kernels.tpu:ragged_paged_attention",
                     Capabilities(("tpu",), FLOAT_DTYPES), interpret=True),
    # Triton tiles are powers of two and want every dot dimension >= 16 on a real GPU (untested there).
    AttentionBackend("gpu", "Pallas Triton kernel", "pallas_kernels.gpu:ragged_paged_attention",
                     Capabilities(("gpu",), FLOAT_DTYPES, head_dims=(16, 32, 64, 128, 256), page_sizes=(16, 32)),
                     interpret=True),
)}

# What "auto" tries on each platform, in order; other platforms get the reference. "auto" never picks "gpu"
# yet: that kernel is untested on a real GPU.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"tpu": ("tpu",), "cpu": ("cpu", "cpu_jax")}
AUTO_DEFAULT = ("reference",)


def backend_names() -> tuple[str, ...]:
    """Every name `attention_backend` accepts: "auto" and the registered backends."""
    return ("auto", *BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(backend_names())}")
    return BACKENDS[name]


def platform_default(platform: str) -> AttentionBackend:
    """What "auto" runs on `platform` when nothing is known of the model (a direct kernel call): the first
    choice of AUTO_ORDER. A backend that then cannot serve a call falls back inside it (cpu -> pure JAX)."""
    return BACKENDS[AUTO_ORDER.get(platform, AUTO_DEFAULT)[0]]


def _unfit(backend: AttentionBackend, platform: str, needs: AttentionNeeds) -> Optional[str]:
    why = backend.lacks(platform, needs)
    if why is None:
        ok, not_ok = backend.available()
        if not ok:
            why = f"its kernel is unavailable ({not_ok})"
    return why


def resolve_attention_backend(name: str, platform: str, needs: AttentionNeeds) -> AttentionBackend:
    """The backend to serve a model with `needs` on `platform`, asked for by `name` ("auto" or a backend).

    The chosen backend's probe has run (a C++ kernel is built and registered), so a step loaded from the
    executable cache, which calls the kernel by name, finds it. An explicit name that cannot serve the model
    raises ValueError naming what it lacks; "auto" takes the first of AUTO_ORDER that can, with one warning
    saying why it passed over the ones before it."""
    if name != "auto":
        backend = get_backend(name)
        why = _unfit(backend, platform, needs)
        if why is not None:
            raise ValueError(f"attention backend {name!r} cannot serve this model: {why}")
        return backend
    passed: list[str] = []
    for candidate in AUTO_ORDER.get(platform, AUTO_DEFAULT):
        backend = BACKENDS[candidate]
        why = _unfit(backend, platform, needs)
        if why is None:
            if passed:
                logger.warning("attention: %s; using %s (%s), which is slower", "; ".join(passed), backend.name,
                               backend.description)
            return backend
        passed.append(f"{candidate} ({backend.description}) cannot serve this model: {why}")
    raise ValueError("no attention backend can serve this model: " + "; ".join(passed))
