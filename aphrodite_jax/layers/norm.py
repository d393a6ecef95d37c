"""RMSNorm, computed in fp32 and cast back (HF Llama/Qwen: weight * normed.to(input_dtype))."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.layers.linear import init_param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
        self.weight = init_param(rngs, (dim,), dtype, (None,), ones=True)  # [dim]
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)
