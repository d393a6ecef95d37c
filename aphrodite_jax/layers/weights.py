"""Weight storage types: what a matmul layer (Linear, the tied LM head, later the MoE experts) multiplies by.

A weight type holds one matrix W [K, N] in some storage format and names its own matmul per backend. The
layers only ever call the interface below, so a new format (GPTQ, AWQ, fp8) is one new subclass plus one
line in the format registry (aphrodite_jax/layers/quantization.py); docs/internals.md, "Adding a weight type".

- `name`: the `--quantization` value that builds the type ("dense" for the unquantized weight).
- `from_dense(w, backend)`: build from the loaded f32 [K, N] matrix for a backend that `choose_backend()`
  returned (e.g. "cpu_kernel" or "xla"); a format may return a subclass per matrix (int8 stores a Q4_1
  tensor as 4-bit blocks).
- `matmul(x, out_dtype=None)`: [..., K] -> [..., N], in x's dtype unless out_dtype is given.
- `fused_gate_matmul(gu, act)`: the epilogue capability, (act(gate) * up) @ W for gu = gate | up [T, 2K]
  computed inside the matmul, or None where the type does not offer it for `act` (the caller then runs the
  activation and `matmul`).
"""
from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx


class QuantArray(nnx.Variable):
    """Quantized weights or their scales: part of the model state (jit arguments), but not an nnx.Param,
    so the loaders' every-Param-loaded check and the dummy initialiser skip them."""


class WeightType:
    """The interface every weight storage type offers (see the module docstring)."""

    name: ClassVar[str] = ""

    @classmethod
    def choose_backend(cls) -> Optional[str]:
        """The backend this format runs with on this machine, or None (logged) where it should not be used."""
        return "xla"

    @classmethod
    def from_dense(cls, w: np.ndarray, backend: str) -> "WeightType":
        raise NotImplementedError

    @classmethod
    def summary(cls, weights: list["WeightType"], backend: str) -> str:
        """What the start-up log says about the matrices quantization made (in brackets after the count)."""
        return backend

    def matmul(self, x: jax.Array, out_dtype=None) -> jax.Array:
        raise NotImplementedError

    def fused_gate_matmul(self, gu: jax.Array, act: str) -> Optional[jax.Array]:
        return None


class DenseWeight(WeightType):
    """The unquantized weight: a view over the loaded nnx.Param [K, N] (Linear keeps the Param itself, so the
    loaders fill it by name); the matmul is XLA's dot on every backend."""

    name = "dense"

    def __init__(self, param: nnx.Param):
        self.param = param

    @classmethod
    def from_dense(cls, w: np.ndarray, backend: str = "xla") -> "DenseWeight":
        return cls(nnx.Param(jnp.asarray(w)))

    def matmul(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., K] -> [..., N]
        if out_dtype is None:
            return x @ self.param[...]
        return jnp.einsum("...k,kn->...n", x, self.param[...], preferred_element_type=out_dtype)
