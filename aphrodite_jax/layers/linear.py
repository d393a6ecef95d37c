"""Dense layers with logical-axis annotations.

Weights are stored [in, out] (the JAX layout; HF/torch stores [out, in], the loaders transpose).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # weights of a freshly built (not loaded) model


def init_param(rngs: nnx.Rngs, shape, dtype, axes, *, std: float = INIT_STD, ones: bool = False,
               zeros: bool = False) -> nnx.Param:
    """An nnx.Param with a small-normal (or ones/zeros) value and its logical axes as metadata."""
    if ones:
        value = jnp.ones(shape, dtype)
    elif zeros:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ W (+ b); W [in, out] annotated (in_axis, out_axis)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs,
                 axes: tuple[Optional[str], Optional[str]] = (None, None)):
        self.weight = init_param(rngs, (in_features, out_features), dtype, axes)  # [in, out]
        self.bias = init_param(rngs, (out_features,), dtype, (axes[1],), zeros=True) if use_bias else None
        self.quant = None  # an Int8Weight once `quantize_int8` replaced the weight

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        y = x @ self.weight[...] if self.quant is None else self.quant(x)
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def project_f32(self, x: jax.Array) -> jax.Array:  # [N, in] -> f32[N, out] (the untied LM head)
        if self.quant is not None:
            return self.quant(x, out_dtype=jnp.float32)
        return jnp.einsum("nh,hv->nv", x, self.weight[...], preferred_element_type=jnp.float32)

    def quantize_int8(self, mode: str) -> None:
        """Swap the loaded weight for 8-bit blocks (aphrodite_jax/layers/quantization.py)."""
        from aphrodite_jax.layers.quantization import Int8Weight

        self.quant = nnx.data(Int8Weight(np.asarray(self.weight.get_value(), np.float32), mode))
        self.weight = None
