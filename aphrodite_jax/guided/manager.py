"""GuidedDecoding: one per engine. Picks the backend of a request (with fallbacks), caches compiled guides
by (backend, guide) for the engine's tokenizer, builds each step's bitmask for the guided rows only, and
applies it on device.

Thread use: the server compiles guides off the event loop (`compile` from a worker thread) while the
engine thread steps; the cache is guarded by a lock and the backends are built once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np

from aphrodite_jax.guided.base import CompiledGuide, GuideBackend, GuideError, GuideState, bitmask_width
from aphrodite_jax.guided.params import GuidedDecodingParams

logger = logging.getLogger(__name__)

# Measured with benchmarks/guided_backends.py on SmolLM2 (see docs/guided.md): xgrammar compiles and
# fills masks faster than outlines-core, and is the only one here that does grammars.
DEFAULT_BACKEND = "xgrammar"
CACHE_SIZE = 256


def _backend_class(name: str):
    if name == "xgrammar":
        from aphrodite_jax.guided.xgrammar_backend import XGrammarBackend
        return XGrammarBackend
    if name == "outlines":
        from aphrodite_jax.guided.outlines_backend import OutlinesBackend
        return OutlinesBackend
    if name == "lm-format-enforcer":
        from aphrodite_jax.guided.lmfe_backend import LMFormatEnforcerBackend
        return LMFormatEnforcerBackend
    raise GuideError(f"Unknown guided decoding backend '{name}'", "guided_decoding_backend")


def resolve_backend(params: GuidedDecodingParams, default: str) -> str:
    """The backend that will compile this guide: the requested one, or a fallback that can (docs/decisions.md D33)."""
    name = params.backend or default
    kind = params.kind
    if params.whitespace_pattern is not None and kind in ("json", "json_object"):
        if params.backend not in (None, "outlines"):
            raise GuideError(f"guided_whitespace_pattern needs the outlines backend, not {params.backend}",
                             "guided_whitespace_pattern")
        return "outlines"
    if kind not in _backend_class(name).kinds:
        fallback = "xgrammar"
        logger.info("guided decoding: the %s backend cannot do a %s guide; using %s", name, kind, fallback)
        return fallback
    return name


class GuidedDecoding:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 default_backend: str = DEFAULT_BACKEND):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self.eos_token_ids = tuple(eos_token_ids)
        self.default_backend = default_backend
        self._backends: dict[str, GuideBackend] = {}
        self._cache: "OrderedDict[tuple, CompiledGuide]" = OrderedDict()
        self._lock = threading.Lock()
        self._compiled_apply = None

    # ------------------------------------------------------------------ host: compiling guides
    def backend(self, name: str) -> GuideBackend:
        with self._lock:
            b = self._backends.get(name)
            if b is None:
                if self.tokenizer is None:
                    raise GuideError("guided decoding needs a tokenizer, and this engine has none")
                t0 = time.perf_counter()
                b = _backend_class(name)(self.tokenizer, self.vocab_size, self.eos_token_ids)
                logger.info("guided decoding: %s backend ready in %.2f s", name, time.perf_counter() - t0)
                self._backends[name] = b
            return b

    def compile(self, params: GuidedDecodingParams) -> CompiledGuide:
        """The compiled guide (from the cache when seen before); GuideError for a bad guide."""
        name = resolve_backend(params, self.default_backend)
        key = (name, params.spec_key())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        kind = params.kind
        spec = {"json": params.schema, "choice": lambda: params.choice, "regex": lambda: params.regex,
                "grammar": lambda: params.grammar, "json_object": lambda: None}[kind]()
        if kind == "json":
            check_schema(spec)
        t0 = time.perf_counter()
        guide = self.backend(name).compile(kind, spec, params.whitespace_pattern)
        logger.debug("guided decoding: compiled a %s guide with %s in %.3f s", kind, name,
                     time.perf_counter() - t0)
        with self._lock:
            self._cache[key] = guide
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return guide

    def new_state(self, params: GuidedDecodingParams) -> GuideState:
        return self.compile(params).new_state()

    # ------------------------------------------------------------------ host: one step's mask
    def bitmask(self, states: Sequence[Optional[GuideState]], bucket: int) -> Optional[np.ndarray]:
        """int32[bucket, W] with each guided row's allowed tokens and all ones elsewhere; None when no
        row is guided (an unguided batch pays nothing)."""
        if all(s is None for s in states):
            return None
        mask = np.full((bucket, self.width), -1, dtype=np.int32)
        for row, s in enumerate(states):
            if s is not None:
                s.fill(mask, row)
        return mask

    # ------------------------------------------------------------------ device
    def apply(self, logits: Any, mask: Any) -> Any:
        from aphrodite_jax.guided.device import apply_token_bitmask

        return apply_token_bitmask(logits, mask)

    def warmup(self, sample_buckets: Sequence[int], device_put: Any) -> None:
        """Run the mask function once per sample bucket (the runner's) on arrays placed like the step's,
        so a guided step never compiles."""
        from aphrodite_jax.guided.device import apply_token_bitmask

        for b in sample_buckets:
            logits, mask = device_put((np.zeros((b, self.vocab_size), np.float32),
                                       np.full((b, self.width), -1, np.int32)))
            apply_token_bitmask(logits, mask).block_until_ready()


def check_schema(schema: Any) -> None:
    """Reject a schema that is not a valid JSON Schema (jsonschema's metaschema check) with a 400."""
    import jsonschema

    if not isinstance(schema, dict):
        raise GuideError("guided_json must be a JSON schema object", "guided_json")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise GuideError(f"Invalid guided_json schema at {where}: {exc.message}", "guided_json") from None
