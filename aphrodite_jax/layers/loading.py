"""Loading HF tensors into layers: each layer maps its own HF names onto its (fused, sharded) parameters.

A module that holds weights offers `load_hf(name, value, session)` for the HF names relative to it (HF layout,
[out, in] for matmuls), and a module made of others offers `hf_children() -> {hf prefix: child}`. `load_tensor`
walks a full HF name down that tree, so no model keeps a name table of its own. A layer whose parameter fuses
several HF tensors (q/k/v -> qkv, gate/up -> gate_up) stages the parts in the session until all arrived.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import jax
from flax import nnx
from jax.sharding import Mesh

from aphrodite_jax.distributed.sharding import named_sharding


class LoadSession:
    """One `load_weights` call: places tensors on device, remembers what was set and what is still staged."""

    def __init__(self, mesh: Optional[Mesh]):
        self.mesh = mesh
        self.used: set[str] = set()
        self.done: set[int] = set()  # id() of every parameter set
        self._staged: dict[int, tuple[str, dict[str, np.ndarray]]] = {}

    def put(self, param: nnx.Param, value: np.ndarray, name: str) -> None:
        """Put one host tensor (already in the parameter's layout) straight into its sharded device array."""
        cur = param.get_value()
        if tuple(value.shape) != tuple(cur.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match the model's {tuple(cur.shape)}")
        host = np.ascontiguousarray(np.asarray(value).astype(cur.dtype))
        if self.mesh is not None:
            arr = jax.device_put(host, named_sharding(self.mesh, param.get_metadata()["logical_axes"]))
        else:
            arr = jax.device_put(host)
        param.set_value(arr)
        self.done.add(id(param))
        self.used.add(name)

    def stage(self, param: nnx.Param, part: str, value: np.ndarray, parts: tuple[str, ...],
              name: str) -> Optional[dict[str, np.ndarray]]:
        """Keep `part` of a fused parameter; returns every part once all of `parts` are in, else None."""
        _, got = self._staged.setdefault(id(param), (name, {}))
        got[part] = np.asarray(value)
        self.used.add(name)
        if set(got) != set(parts):
            return None
        del self._staged[id(param)]
        return got

    def finish(self, model: nnx.Module) -> set[str]:
        """Raise on a fused weight left incomplete or a parameter never set; returns the HF names used."""
        if self._staged:
            raise ValueError(f"incomplete fused weights: {sorted(label for label, _ in self._staged.values())}")
        missing = [p for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and id(v) not in self.done]
        if missing:
            raise ValueError(f"weights not provided for {['.'.join(map(str, p)) for p in missing][:8]} ...")
        return self.used


def load_tensor(module: Any, name: str, value: np.ndarray, session: LoadSession, *, _rest: str = "") -> None:
    """Route the HF tensor `name` (relative to `module`) to the module that owns it; KeyError if none does."""
    rest = _rest or name
    children = module.hf_children() if hasattr(module, "hf_children") else {}
    if children:
        parts = rest.split(".")
        for i in range(len(parts) - 1, 0, -1):
            child = children.get(".".join(parts[:i]))
            if child is not None:
                load_tensor(child, name, value, session, _rest=".".join(parts[i:]))
                return
    if not hasattr(module, "load_hf"):
        raise KeyError(f"unexpected weight {name!r}")
    module.load_hf(rest, value, session, full_name=name)


def load_linear(linear: Any, rel: str, value: np.ndarray, session: LoadSession, full_name: str) -> None:
    """An unfused HF linear: 'weight' [out, in] goes in transposed ([in, out]), 'bias' [out] as is."""
    if rel == "weight":
        session.put(linear.weight, np.asarray(value).T, full_name)
    elif rel == "bias" and linear.bias is not None:
        session.put(linear.bias, value, full_name)
    else:
        raise KeyError(f"unexpected weight {full_name!r}")


def load_fused(linear: Any, kind: str, part: str, value: np.ndarray, parts: tuple[str, ...], fuse: Any,
               session: LoadSession, full_name: str) -> None:
    """One HF part (`part`, one of `parts`) of a fused linear's 'weight' or 'bias': staged until every part is
    in, then `fuse(parts_by_name, kind)` gives the parameter's value in its own layout ([in, out] for weights)."""
    target = {"weight": linear.weight, "bias": linear.bias}.get(kind)
    if part not in parts or target is None:
        raise KeyError(f"unexpected weight {full_name!r}")
    got = session.stage(target, part, value, parts, full_name)
    if got is not None:
        session.put(target, fuse(got, kind), full_name)
