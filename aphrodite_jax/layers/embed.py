"""Token embedding; also serves as the tied LM head (logits = h @ E^T)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.layers.linear import init_param


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs, vocab_axis: Optional[str] = "vocab"):
        self.weight = init_param(rngs, (vocab_size, dim), dtype, (vocab_axis, "embed"))  # [V, H]

    def __call__(self, ids: jax.Array) -> jax.Array:  # i32[T] -> [T, H]
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:  # [N, H] -> f32[N, V]
        return jnp.einsum("nh,vh->nv", h, self.weight[...], preferred_element_type=jnp.float32)
