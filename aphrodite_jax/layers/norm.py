"""RMSNorm, computed in fp32.

Llama/Qwen (HF): weight * normed.to(input_dtype). With `offset` (Gemma), the weight is stored as w and applied
as (1 + w), and HF computes the whole product in fp32 before casting back; both are followed here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.layers.linear import init_param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs, offset: bool = False):
        # A fresh (1 + w) norm starts at w = 0, the identity scale, as a plain one starts at w = 1.
        self.weight = init_param(rngs, (dim,), dtype, (None,), ones=not offset, zeros=offset)  # [dim]
        self.eps = float(eps)
        self.offset = bool(offset)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)

    def load_hf(self, rel: str, value, session, full_name: str) -> None:
        if rel != "weight":
            raise KeyError(f"unexpected weight {full_name!r}")
        session.put(self.weight, value, full_name)
