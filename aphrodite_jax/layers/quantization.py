"""`--quantization int8`: 8-bit block weights (w = d * q + m, q u8, per 32 inputs) behind the Linear interface.

Two executions of the same stored numbers:
- "cpu_kernel": the AVX-512 VNNI FFI kernel (pallas_kernels/native), which also quantizes the
  activations to int8 on the fly (blocks of 32 along K). The grid holds GGUF Q4_1 blocks exactly. Why: XLA's CPU backend runs int8 and bf16 dots
  several times slower than fp32, and at batch 1 the step is bound by reading fp32 weights.
- "xla": weight-only, y = x @ (d * q + m) dequantized inside the jitted step; the ordinary path on TPU/GPU
  (XLA fuses the dequantization into the matmul's operand there), and the tests' check on any backend.
`quantize_model` is the loader hook: it runs once after the fp32 weights are loaded and replaces the weights
of every Linear (qkv, o_proj, gate_up, down, an untied lm_head) and the tied embedding's LM head.
Storage per matrix (CPU kernel): a GGUF Q4_1 tensor as 4-bit nibbles with f16 scales, a Q8_0 tensor exactly
(q8 + 128, f16 scales), anything else on the asymmetric 8-bit grid with f32 scales.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.config import QUANTIZATIONS
from pallas_kernels import int8_matmul as kern

logger = logging.getLogger(__name__)

MODES = ("cpu_kernel", "xla")


class QuantArray(nnx.Variable):
    """Quantized weights or their scales: part of the model state (jit arguments), but not an nnx.Param,
    so the loaders' every-Param-loaded check and the dummy initialiser skip them."""


class Int8Weight(nnx.Module):
    """8-bit block weights for y = x @ W, W [K, N] (w = d * q + m per 32 along K); [..., K] -> [..., N]."""

    def __init__(self, w: np.ndarray, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown int8 mode {mode!r}; expected one of {MODES}")
        k, n = w.shape
        self.mode, self.k, self.n = mode, int(k), int(n)
        q8 = kern.q8_0_blocks(w)  # a GGUF Q8_0 tensor (the default model's tied LM head): exact, f16 scales
        q, d, m = q8 if q8 is not None else kern.quantize_blocks(w)  # u8 [Kp, N], f32 [nb, N] x2
        self.half = q8 is not None  # f16 scales
        self.w4 = mode == "cpu_kernel" and q8 is None and kern.on_4bit_grid(q)  # Q4_1: half the bytes, same numbers
        if mode == "cpu_kernel":
            if q8 is not None:
                packed, dm = kern.pack_blocks(q, d, m)
                dm = dm.astype(np.float16)  # exact: d8 is f16 and m = -128 d8
            elif self.w4:  # f16 scales too where they hold the weights exactly (Q4_1 stores them so)
                self.half = kern.half_scales_exact(w, q, d, m)
                packed, dm = kern.pack_blocks4(q, d, m, self.half)  # u8 [Np, Kp/2], f16/f32 [Np/16 * nb * 2 * 16]
            else:
                packed, dm = kern.pack_blocks(q, d, m)  # u8 [Np, Kp], f32 [Np/16 * nb * 2 * 16]
            self.q = QuantArray(jax.device_put(packed))
            self.dm = QuantArray(jax.device_put(dm))
        else:
            self.q = QuantArray(jax.device_put(q))
            self.dm = QuantArray(jax.device_put(np.stack([d, m])))  # [2, nb, N]

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        lead = x.shape[:-1]
        out_dtype = out_dtype or x.dtype
        x2 = x.reshape(-1, self.k)  # [M, K]
        if self.mode == "cpu_kernel":
            y = kern.int8_matmul(x2, self.q[...], self.dm[...], self.n, w4=self.w4)  # f32[M, N]
        else:
            dm = self.dm[...].astype(x2.dtype)  # [2, nb, N]
            nb = dm.shape[1]
            w = self.q[...].astype(x2.dtype).reshape(nb, kern.QB, self.n) * dm[0][:, None] + dm[1][:, None]
            w = w.reshape(nb * kern.QB, self.n)[:self.k]  # [K, N]
            y = jnp.einsum("mk,kn->mn", x2, w, preferred_element_type=jnp.float32)
        return y.astype(out_dtype).reshape(*lead, self.n)

    def silu_mul(self, gu: jax.Array) -> jax.Array:
        """(silu(gate) * up) @ W for gu [T, 2K] = gate | up -> [T, N]: the MLP's down projection; the CPU
        kernel computes the activation while quantizing it, so the [T, K] product is never written."""
        if self.mode == "cpu_kernel":
            y = kern.int8_matmul(gu.reshape(-1, 2 * self.k).astype(jnp.float32), self.q[...], self.dm[...], self.n,
                                 w4=self.w4, silu_mul=True)  # f32[T, N]
            return y.astype(gu.dtype)
        return self(jax.nn.silu(gu[:, :self.k]) * gu[:, self.k:])


def choose_mode() -> Optional[str]:
    """The int8 execution for this backend, or None (with a warning) where int8 would only be slower."""
    if jax.default_backend() != "cpu":
        return "xla"
    ok, why = kern.kernel_status()
    if ok:
        return "cpu_kernel"
    logger.warning("--quantization int8: the CPU int8 kernel is unavailable (%s); serving the fp32 weights "
                   "instead (XLA's own int8 dot is slower than fp32 on the CPU)", why)
    return None


def quantize_model(model, method: str, mode: Optional[str] = None) -> Optional[str]:
    """Replace the model's matmul weights by int8 in place; returns the mode used (None: left fp32)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization {method!r} is not supported; choose one of {QUANTIZATIONS}")
    if getattr(model, "mesh", None) is not None:
        raise ValueError("--quantization int8 with tensor or data parallelism is not supported yet")
    mode = mode or choose_mode()
    if mode is None:
        return None
    from aphrodite_jax.layers.embed import Embedding
    from aphrodite_jax.layers.linear import Linear

    t0 = time.perf_counter()
    count = 0
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, Linear) and node.quant is None:
            node.quantize_int8(mode)
            count += 1
    if getattr(model, "lm_head", "absent") is None and isinstance(getattr(model, "embed", None), Embedding):
        model.embed.quantize_head_int8(mode)  # tied embedding: only its attend (the LM head) goes int8
        count += 1
    mats = [node for _, node in nnx.iter_graph(model) if isinstance(node, Int8Weight)]
    logger.info("Quantized %d weight matrices to int8 (%s; %d of them on the 4-bit grid, stored as nibbles, %d "
                "with f16 scales) in %.1f s", count, mode, sum(x.w4 for x in mats), sum(x.half for x in mats),
                time.perf_counter() - t0)
    return mode
