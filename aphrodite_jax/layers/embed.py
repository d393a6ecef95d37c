"""Token embedding; also serves as the tied LM head (logits = h @ E^T)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.layers.linear import init_param
from aphrodite_jax.layers.weights import WeightType


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs, vocab_axis: Optional[str] = "vocab"):
        self.weight = init_param(rngs, (vocab_size, dim), dtype, (vocab_axis, "embed"))  # [V, H]
        self.head = None  # a quantized copy of E^T (a weight type) for attend() once quantize_head ran

    def __call__(self, ids: jax.Array) -> jax.Array:  # i32[T] -> [T, H]
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:  # [N, H] -> f32[N, V]
        if self.head is not None:
            return self.head.matmul(h, out_dtype=jnp.float32)
        return jnp.einsum("nh,vh->nv", h, self.weight[...], preferred_element_type=jnp.float32)

    def load_hf(self, rel: str, value, session, full_name: str) -> None:
        if rel != "weight":
            raise KeyError(f"unexpected weight {full_name!r}")
        session.put(self.weight, value, full_name)  # HF [V, H], as stored

    def quantize_head(self, fmt: type[WeightType], backend: str) -> None:
        """The LM head (attend) is quantized; the fp32 table stays for lookups (a few rows per step)."""
        self.head = nnx.data(fmt.from_dense(np.asarray(self.weight.get_value(), np.float32).T, backend))  # W [H, V]
