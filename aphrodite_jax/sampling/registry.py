"""The sampler registry: each sampler step is a pure JAX function over [B, V] logits with per-row params.

A researcher adds a sampler in one small file:

    @register_sampler("my_sampler", fields={"my_param": (0.0, np.float32)},
                      active=lambda p: p["my_param"] > 1e-5)
    def my_sampler(logits, p, md):   # logits f32[B, V], p: dict name -> [B] arrays
        return ...                    # f32[B, V]

and, when the sampler becomes a SamplingParams field, removes it from
`sampling_params.UNSUPPORTED_DEFAULTS`. The host fills `p[name]` from `getattr(params, name)` (or from
`host(params)` when given); padded rows get the field's "off" value.

Order: steps run in the spec's default order (section 3.1, `DEFAULT_ORDER`); a step whose name is not
in it runs after the known ones, in registration order. Rows where a step is off are untouched
(`jnp.where(active[:, None], new, old)`).

Cost of an unused step: `apply_samplers` wraps each step in `lax.cond(jnp.any(active), ...)`, so a
step that no row of the batch uses is one [B]-sized reduction and a skipped branch, and a change of
parameter VALUES never recompiles. A runner that wants the step gone from the program altogether can
pass a static `only=frozenset(names)` (each distinct set then compiles once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# Spec section 3.1, step 5 (Aphrodite's SamplerID order). Names not implemented yet keep their slot.
DEFAULT_ORDER: tuple[str, ...] = (
    "dry", "penalties", "no_repeat_ngram", "temperature", "top_nsigma", "top_p_top_k", "top_a",
    "min_p", "tfs", "eta_cutoff", "epsilon_cutoff", "typical_p", "quadratic", "xtc",
    "skew",  # post-softmax (spec 3.1 step 6), after the chain
)

StepFn = Callable[[jax.Array, dict, Any], jax.Array]


@dataclass(frozen=True)
class SamplerStep:
    """One registered sampler: its per-row fields (name -> (off value, numpy dtype)) and functions."""

    name: str
    fn: StepFn  # (logits [B, V], params {name: [B]}, md) -> logits [B, V]
    fields: dict[str, tuple[Any, Any]]
    active: Callable[[dict], jax.Array]  # params -> bool[B]; works on numpy or jax arrays
    host: Optional[Callable[[Any], dict[str, Any]]] = None  # SamplingParams -> {field: value}


_REGISTRY: dict[str, SamplerStep] = {}


def register_sampler(name: str, *, fields: dict[str, tuple[Any, Any]], active: Callable[[dict], Any],
                     host: Optional[Callable[[Any], dict[str, Any]]] = None) -> Callable[[StepFn], StepFn]:
    """Decorator: registers `fn` as the sampler step `name` (replacing one of the same name)."""

    def deco(fn: StepFn) -> StepFn:
        _REGISTRY[name] = SamplerStep(name, fn, dict(fields), active, host)
        return fn

    return deco


def unregister_sampler(name: str) -> None:
    """Removes a step (tests and experiments)."""
    _REGISTRY.pop(name, None)


def registered_steps() -> list[SamplerStep]:
    """The registered steps in application order."""
    known = [_REGISTRY[n] for n in DEFAULT_ORDER if n in _REGISTRY]
    extra = [s for n, s in _REGISTRY.items() if n not in DEFAULT_ORDER]
    return known + extra


def all_fields() -> dict[str, tuple[Any, Any]]:
    """Every per-row field of every registered step: name -> (off value, dtype)."""
    out: dict[str, tuple[Any, Any]] = {}
    for s in registered_steps():
        out.update(s.fields)
    return out


def host_values(step: SamplerStep, params: Any) -> dict[str, Any]:
    """The values of `step`'s fields for one request."""
    if step.host is not None:
        return step.host(params)
    return {f: getattr(params, f) for f in step.fields}


def active_step_names(p: dict[str, np.ndarray]) -> frozenset[str]:
    """Host-side: the names of the steps some row of a (numpy) batch turns on."""
    return frozenset(s.name for s in registered_steps() if bool(np.any(s.active(p))))


def apply_samplers(logits: jax.Array, p: dict[str, jax.Array], md: Any,
                   only: Optional[frozenset[str]] = None) -> jax.Array:
    """Runs every registered step over logits [B, V] in order; see the module docstring for costs."""
    for step in registered_steps():
        if only is not None and step.name not in only:
            continue
        act = step.active(p)  # bool[B]

        def _run(lg, step=step, act=act):
            return jnp.where(act[:, None], step.fn(lg, p, md), lg)

        logits = jax.lax.cond(jnp.any(act), _run, lambda lg: lg, logits)
    return logits
