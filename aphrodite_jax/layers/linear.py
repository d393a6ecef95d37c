"""Dense layers with logical-axis annotations.

Weights are stored [in, out] (the JAX layout; HF/torch stores [out, in], the loaders transpose).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.layers.adapter import AdapterDelta
from aphrodite_jax.layers.weights import DenseWeight, WeightType

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
    """y = x @ W (+ b) (+ a per-token adapter delta); W [in, out] annotated (in_axis, out_axis).

    `weight` is the loaded nnx.Param [in, out] until `quantize` replaces it by a quantized weight type
    (aphrodite_jax/layers/weights.py); the math goes through `storage`, so it does not care which."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs,
                 axes: tuple[Optional[str], Optional[str]] = (None, None)):
        self.weight = init_param(rngs, (in_features, out_features), dtype, axes)  # [in, out]
        self.bias = init_param(rngs, (out_features,), dtype, (axes[1],), zeros=True) if use_bias else None

    @property
    def storage(self) -> WeightType:
        """The weight as a weight type: the quantized one, or a dense view over the loaded Param."""
        return self.weight if isinstance(self.weight, WeightType) else DenseWeight(self.weight)

    def __call__(self, x: jax.Array, adapter: Optional[AdapterDelta] = None) -> jax.Array:  # [..., in] -> [..., out]
        y = self.storage.matmul(x)
        if self.bias is not None:
            y = y + self.bias[...]
        if adapter is not None:
            y = y + adapter.delta(x).astype(y.dtype)
        return y

    def fused_gate_matmul(self, gu: jax.Array, act: str) -> Optional[jax.Array]:
        """(act(gate) * up) @ W (+ b) for gu [T, 2 in] = gate | up, with the activation computed inside the
        weight type's matmul; None where the type does not offer that epilogue (then run act and __call__)."""
        y = self.storage.fused_gate_matmul(gu, act)  # [T, out] or None
        if y is not None and self.bias is not None:
            y = y + self.bias[...]
        return y

    def project_f32(self, x: jax.Array) -> jax.Array:  # [N, in] -> f32[N, out] (the untied LM head)
        return self.storage.matmul(x, out_dtype=jnp.float32)

    def quantize(self, fmt: type[WeightType], backend: str) -> bool:
        """Swap the loaded weight for `fmt`'s storage (aphrodite_jax/layers/quantization.py); False where it
        was quantized already."""
        if isinstance(self.weight, WeightType):
            return False
        self.weight = nnx.data(fmt.from_dense(np.asarray(self.weight.get_value(), np.float32), backend))
        return True
