"""The sampler registry: each sampler step is a pure JAX function over [B, V] logits with per-row params.

It starts from the built-in steps that builtin.py lists (`BUILTIN_STEPS`); nothing registers itself as
a side effect of an import. A researcher adds a sampler in one small file:

    @register_sampler("my_sampler", fields={"my_param": (0.0, np.float32)},
                      active=lambda p: p["my_param"] > 1e-5)
    def my_sampler(logits, p, md):   # logits f32[B, V], p: dict name -> [B] arrays
        return ...                    # f32[B, V]

and, when the sampler becomes a SamplingParams field, removes it from
`sampling_params.UNSUPPORTED_DEFAULTS`. The host fills `p[name]` from `getattr(params, name)` (or from
`host(params)` when given); padded rows get the field's "off" value.

Order: steps run in the default order (`DEFAULT_ORDER`, the order of builtin.py: docs/decisions.md D27);
a step whose name is not in it runs after the known ones, in registration order. Each row may reorder
this chain with `sampler_priority` (step names or Aphrodite's SamplerIDs; a research step is placed by
its name) or `temperature_last` (D3); the TAIL steps (mirostat, then the post-softmax skew) always run
last. Rows where a step is off are untouched (`jnp.where(active[:, None], new, old)`).

Cost of an unused step: `apply_samplers` wraps each step in `lax.cond(jnp.any(active), ...)`, so a
step that no row of the batch uses is a few [B]-sized reductions and a skipped branch, and a change of
parameter values (orders included) never recompiles. A runner that wants the step gone from the program
altogether can pass a static `only=frozenset(names)` (each distinct set then compiles once).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from aphrodite_jax.sampling.builtin import BUILTIN_STEPS, TAIL
from aphrodite_jax.sampling.step import SamplerStep, StepFn, sampler_step

__all__ = ["DEFAULT_ORDER", "TAIL", "SamplerStep", "register_sampler", "unregister_sampler",
           "registered_steps"]

# Aphrodite's SamplerID order for the chain, then the TAIL steps (docs/decisions.md D27).
DEFAULT_ORDER: tuple[str, ...] = tuple(s.name for s in BUILTIN_STEPS)

_REGISTRY: dict[str, SamplerStep] = {s.name: s for s in BUILTIN_STEPS}


def register_sampler(name: str, *, fields: dict[str, tuple[Any, Any]], active: Callable[[dict], Any],
                     host: Optional[Callable[[Any], dict[str, Any]]] = None) -> Callable[[StepFn], StepFn]:
    """Decorator: registers `fn` as the sampler step `name` (replacing one of the same name)."""

    def deco(fn: StepFn) -> StepFn:
        _REGISTRY[name] = sampler_step(name, fields=fields, active=active, host=host)(fn)
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


def chain_steps() -> list[SamplerStep]:
    """The reorderable steps (everything but TAIL) in default order."""
    return [s for s in registered_steps() if s.name not in TAIL]


def tail_steps() -> list[SamplerStep]:
    return [_REGISTRY[n] for n in TAIL if n in _REGISTRY]


def row_order(params: Any, chain: Optional[list[SamplerStep]] = None) -> np.ndarray:
    """i32[C]: per position, the index into `chain` of the step a request runs there.

    sampler_priority first (unlisted steps keep their default relative order after the listed ones),
    else temperature_last (temperature moves to just after XTC), else the default order."""
    chain = chain_steps() if chain is None else chain
    names = [s.name for s in chain]
    default = np.arange(len(chain), dtype=np.int32)
    priority = getattr(params, "sampler_priority", None)
    if priority:
        listed = [names.index(n) for n in priority if n in names]
        if len(listed) != len(priority):
            bad = [n for n in priority if n not in names]
            raise ValueError(f"Invalid sampler ID in priority list: {bad[0]!r}")
        return np.array(listed + [i for i in default if i not in listed], np.int32)
    if getattr(params, "temperature_last", False) and "temperature" in names:
        t = names.index("temperature")
        rest = [i for i in default if i != t]
        at = rest.index(names.index("xtc")) + 1 if "xtc" in names else len(rest)
        return np.array(rest[:at] + [t] + rest[at:], np.int32)
    return default


def verify_params(params: Any) -> None:
    """Checks what only the registry knows: research step names in sampler_priority and the
    extra_args fields. Raises ValueError (a 400 at the API)."""
    row_order(params)
    extra = getattr(params, "extra_args", None) or {}
    known = all_fields()
    for name, value in extra.items():
        if name not in known:
            raise ValueError(f"extra_args: {name!r} is not a field of any registered sampler")
        try:
            np.asarray(value, dtype=known[name][1]).item()
        except (TypeError, ValueError):
            raise ValueError(f"extra_args: {name!r} must be a number, got {value!r}") from None


def custom_field_names() -> set[str]:
    """Fields of registered steps that are not SamplingParams attributes (research samplers): the
    HTTP APIs accept them as top-level extra_body keys and pass them in `extra_args`."""
    from aphrodite_jax.sampling_params import SamplingParams

    attrs = set(SamplingParams.__dataclass_fields__)
    return {f for f in all_fields() if f not in attrs and f != "mirostat_mu"}


def move_research_fields(data: Any, declared: set[str]) -> Any:
    """For the HTTP request models: top-level keys that are research-sampler fields (and not fields
    the model declares itself) move into `extra_args`, so `extra="forbid"` still refuses typos."""
    if not isinstance(data, dict):
        return data
    found = {k: data[k] for k in custom_field_names() - declared if k in data}
    if not found:
        return data
    data = {k: v for k, v in data.items() if k not in found}
    extra = data.get("extra_args")
    data["extra_args"] = {**found, **(extra if isinstance(extra, dict) else {})}
    return data


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
    extra = getattr(params, "extra_args", None) or {}
    return {f: extra[f] if f in extra else getattr(params, f, step.fields[f][0]) for f in step.fields}


def active_step_names(p: dict[str, np.ndarray]) -> frozenset[str]:
    """Host-side: the names of the steps some row of a (numpy) batch turns on."""
    return frozenset(s.name for s in registered_steps() if bool(np.any(s.active(p))))


def _masked(step: SamplerStep, act: jax.Array, p: dict, md: Any) -> Callable[[jax.Array], jax.Array]:
    def run(lg):
        return jnp.where(act[:, None], step.fn(lg, p, md), lg)

    return run


def apply_samplers(logits: jax.Array, p: dict[str, jax.Array], md: Any,
                   only: Optional[frozenset[str]] = None) -> jax.Array:
    """Runs the registered steps over logits [B, V], each row in its own order (`md.order`).

    A loop over chain positions: at position j each step runs (masked) for the rows that put it
    there, behind a `lax.cond` on "any such row". A batch in the default order runs each step once;
    measured at B=32, V=49152 on CPU this loop costs no more than an unrolled default chain, so
    there is one program for every mix of orders. The TAIL steps follow, unrolled."""
    def use(step):
        return only is None or step.name in only

    chain = chain_steps()

    def position(j, lg):
        col = md.order[:, j]  # i32[B]: the step each row runs at position j
        for idx, step in enumerate(chain):
            if use(step):
                act = step.active(p) & (col == idx)
                lg = jax.lax.cond(jnp.any(act), _masked(step, act, p, md), lambda x: x, lg)
        return lg

    logits = jax.lax.fori_loop(0, len(chain), position, logits)
    for step in tail_steps():
        if use(step):
            act = step.active(p)
            logits = jax.lax.cond(jnp.any(act), _masked(step, act, p, md), lambda lg: lg, logits)
    return logits
