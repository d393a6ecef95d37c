"""`--quantization int8`: 8-bit block weights (w = d * q + m, q u8, per 32 inputs) as weight types.

Two backends execute the same stored numbers:
- "cpu_kernel": the AVX-512 VNNI FFI kernel (pallas_kernels/native), which also quantizes the activations to
  int8 on the fly (blocks of 32 along K). Why: XLA's CPU backend runs int8 and bf16 dots several times slower
  than fp32, and at batch 1 the step is bound by reading fp32 weights.
- "xla": weight-only, y = x @ (d * q + m) dequantized inside the jitted step; the ordinary path on TPU/GPU
  (XLA fuses the dequantization into the matmul's operand there), and the tests' check on any backend.

`Int8Blocks.from_dense` chooses the storage per matrix (for the CPU kernel): a GGUF Q8_0 tensor exactly
(q8 + 128, f16 scales), a GGUF Q4_1 tensor as `Int4Blocks` (4-bit nibbles, f16 scales where they hold the
weights exactly: half the bytes, the same numbers), anything else on the asymmetric 8-bit grid with f32 scales.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.layers.weights import QuantArray, WeightType
from pallas_kernels import int8_matmul as kern

logger = logging.getLogger(__name__)

BACKENDS = ("cpu_kernel", "xla")


class BlockWeight(nnx.Module, WeightType):
    """Block weights for y = x @ W, W [K, N] (w = d * q + m per 32 along K); [..., K] -> [..., N].

    q, dm: the stored numbers, in the kernel's packed layout (cpu_kernel) or as q u8 [Kp, N] with
    dm f32 [2, nb, N] (xla). half: the scales are f16-exact (stored as f16 by the CPU kernel layouts).
    """

    w4: bool = False  # the CPU kernel's 4-bit (nibble) layout

    def __init__(self, backend: str, k: int, n: int, q: np.ndarray, dm: np.ndarray, half: bool):
        if backend not in BACKENDS:
            raise ValueError(f"unknown int8 backend {backend!r}; expected one of {BACKENDS}")
        self.backend, self.k, self.n, self.half = backend, int(k), int(n), bool(half)
        self.q = QuantArray(jax.device_put(q))
        self.dm = QuantArray(jax.device_put(dm))

    @classmethod
    def choose_backend(cls) -> Optional[str]:
        """The int8 execution for this machine, or None (with a warning) where int8 would only be slower."""
        if jax.default_backend() != "cpu":
            return "xla"
        ok, why = kern.kernel_status()
        if ok:
            return "cpu_kernel"
        logger.warning("--quantization int8: the CPU int8 kernel is unavailable (%s); serving the fp32 weights "
                       "instead (XLA's own int8 dot is slower than fp32 on the CPU)", why)
        return None

    @classmethod
    def summary(cls, weights: list[WeightType], backend: str) -> str:
        mats = [w for w in weights if isinstance(w, BlockWeight)]
        return (f"{backend}; {sum(w.w4 for w in mats)} of them on the 4-bit grid, stored as nibbles, "
                f"{sum(w.half for w in mats)} with f16 scales")

    def matmul(self, x: jax.Array, out_dtype=None) -> jax.Array:
        lead = x.shape[:-1]
        out_dtype = out_dtype or x.dtype
        x2 = x.reshape(-1, self.k)  # [M, K]
        if self.backend == "cpu_kernel":
            y = kern.int8_matmul(x2, self.q[...], self.dm[...], self.n, w4=self.w4)  # f32[M, N]
        else:
            y = self._xla_matmul(x2)
        return y.astype(out_dtype).reshape(*lead, self.n)

    def _xla_matmul(self, x2: jax.Array) -> jax.Array:  # [M, K] -> f32[M, N]
        dm = self.dm[...].astype(x2.dtype)  # [2, nb, N]
        nb = dm.shape[1]
        w = self.q[...].astype(x2.dtype).reshape(nb, kern.QB, self.n) * dm[0][:, None] + dm[1][:, None]
        w = w.reshape(nb * kern.QB, self.n)[:self.k]  # [K, N]
        return jnp.einsum("mk,kn->mn", x2, w, preferred_element_type=jnp.float32)

    def fused_gate_matmul(self, gu: jax.Array, act: str) -> Optional[jax.Array]:
        """(silu(gate) * up) @ W for gu [T, 2K] = gate | up -> [T, N]: the MLP's down projection; the CPU
        kernel computes the activation while quantizing it, so the [T, K] product is never written.
        SiLU on the CPU kernel only (None elsewhere: XLA fuses the activation into its own matmul)."""
        if act != "silu" or self.backend != "cpu_kernel":
            return None
        y = kern.int8_matmul(gu.reshape(-1, 2 * self.k).astype(jnp.float32), self.q[...], self.dm[...], self.n,
                             w4=self.w4, silu_mul=True)  # f32[T, N]
        return y.astype(gu.dtype)


class Int8Blocks(BlockWeight):
    """8-bit blocks: f32 scales (the asymmetric grid) or f16 ones (a GGUF Q8_0 tensor, exact)."""

    name = "int8"

    @classmethod
    def from_dense(cls, w: np.ndarray, backend: str) -> BlockWeight:
        """The storage for one loaded f32 [K, N] matrix: Q8_0 exact, Q4_1 as Int4Blocks (CPU kernel), else
        the 8-bit grid."""
        w = np.asarray(w, np.float32)
        k, n = w.shape
        q8 = kern.q8_0_blocks(w)  # a GGUF Q8_0 tensor (the default model's tied LM head): exact, f16 scales
        q, d, m = q8 if q8 is not None else kern.quantize_blocks(w)  # u8 [Kp, N], f32 [nb, N] x2
        if backend == "cpu_kernel" and q8 is None and kern.on_4bit_grid(q):
            return Int4Blocks.from_blocks(w, q, d, m)
        if backend == "cpu_kernel":
            packed, dm = kern.pack_blocks(q, d, m)  # u8 [Np, Kp], f32 [Np/16 * nb * 2 * 16]
            if q8 is not None:
                dm = dm.astype(np.float16)  # exact: d8 is f16 and m = -128 d8
            return cls(backend, k, n, packed, dm, half=q8 is not None)
        return cls(backend, k, n, q, np.stack([d, m]), half=q8 is not None)  # u8 [Kp, N], f32 [2, nb, N]


class Int4Blocks(BlockWeight):
    """4-bit blocks (every block on 16 levels, as a GGUF Q4_1 tensor gives) in the CPU kernel's nibble layout,
    with f16 scales where they hold the weights exactly (Q4_1 stores them so), else f32."""

    name = "int8"  # the same --quantization format: chosen per matrix by Int8Blocks.from_dense
    w4 = True

    @classmethod
    def from_dense(cls, w: np.ndarray, backend: str) -> BlockWeight:
        if backend != "cpu_kernel":
            raise ValueError("4-bit blocks run on the CPU int8 kernel only; XLA stores them as 8-bit blocks")
        w = np.asarray(w, np.float32)
        q, d, m = kern.quantize_blocks(w)
        if not kern.on_4bit_grid(q):
            raise ValueError("the weights are not on the 4-bit grid (16 levels per block of 32)")
        return cls.from_blocks(w, q, d, m)

    @classmethod
    def from_blocks(cls, w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> "Int4Blocks":
        half = kern.half_scales_exact(w, q, d, m)
        packed, dm = kern.pack_blocks4(q, d, m, half)  # u8 [Np, Kp/2], f16/f32 [Np/16 * nb * 2 * 16]
        return cls("cpu_kernel", w.shape[0], w.shape[1], packed, dm, half=half)
