"""What a sampler step is: a pure JAX function over [B, V] logits plus its per-row fields.

`sampler_step` turns a function into a `SamplerStep` without registering it: the built-in steps are
collected by name in builtin.py, and the registry (registry.py) starts from that list. Research
samplers use `registry.register_sampler`, which builds the same value and registers it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax

from aphrodite_jax.sampling_params import SAMPLING_DEFAULTS

StepFn = Callable[[jax.Array, dict, Any], jax.Array]


@dataclass(frozen=True)
class SamplerStep:
    """One sampler: its per-row fields (name -> (off value, numpy dtype)) and functions."""

    name: str
    fn: StepFn  # (logits [B, V], params {name: [B]}, md) -> logits [B, V]
    fields: dict[str, tuple[Any, Any]]
    active: Callable[[dict], jax.Array]  # params -> bool[B]; works on numpy or jax arrays
    host: Optional[Callable[[Any], dict[str, Any]]] = None  # SamplingParams -> {field: value}


def with_off_values(fields: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """name -> (off value, dtype). A field given by its dtype alone is a SamplingParams field: its off value
    (what padded rows get) is the SamplingParams default, stated there once."""
    return {name: spec if isinstance(spec, tuple) else (SAMPLING_DEFAULTS[name], spec)
            for name, spec in fields.items()}


def sampler_step(name: str, *, fields: dict[str, Any], active: Callable[[dict], Any],
                 host: Optional[Callable[[Any], dict[str, Any]]] = None) -> Callable[[StepFn], SamplerStep]:
    """Decorator: the SamplerStep `name` running `fn` (registered by no one until listed). `fields`: name ->
    (off value, numpy dtype), or name -> dtype for a SamplingParams field (its default is the off value)."""

    def deco(fn: StepFn) -> SamplerStep:
        return SamplerStep(name, fn, with_off_values(fields), active, host)

    return deco
