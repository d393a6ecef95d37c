"""Per-token low-rank adapter deltas (the seam LoRA fills): y = x @ W + scale * (x @ A[i]) @ B[i].

A batch mixes requests with different adapters, so each token carries the index of its adapter (or NO_ADAPTER,
which leaves its row unchanged). The stacked matrices hold every loaded adapter; `Linear(x, adapter=...)`
adds the delta, and `adapter=None` traces nothing extra.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp

NO_ADAPTER = -1  # the index of a token without an adapter (any negative index means the same)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterDelta:
    """idx i32[T]: each token's adapter (negative: none); a [n_adapters, in, r] and b [n_adapters, r, out]:
    the stacked low-rank factors; scale: one factor for all adapters or f32[n_adapters] (LoRA's alpha / r)."""

    idx: jax.Array  # i32[T]
    a: jax.Array  # [n_adapters, in, r]
    b: jax.Array  # [n_adapters, r, out]
    scale: Union[float, jax.Array] = 1.0  # scalar or [n_adapters]

    def delta(self, x: jax.Array) -> jax.Array:
        """x [..., in] with T = prod(lead) rows -> the delta [..., out] (zero on tokens without an adapter)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        has = self.idx >= 0  # [T]
        safe = jnp.where(has, self.idx, 0)  # [T]
        xa = jnp.einsum("ti,tir->tr", x2, self.a[safe])  # [T, r]
        d = jnp.einsum("tr,tro->to", xa, self.b[safe])  # [T, out]
        scale = jnp.asarray(self.scale, d.dtype)
        if scale.ndim:
            scale = scale[safe][:, None]  # [T, 1]
        d = jnp.where(has[:, None], d * scale, jnp.zeros((), d.dtype))  # [T, out]
        return d.reshape(*lead, d.shape[-1])
