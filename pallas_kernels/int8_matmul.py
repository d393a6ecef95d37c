"""int8 weight x on-the-fly int8 activation matmul for the CPU (AVX-512 VNNI), through XLA FFI.

`quantize_blocks(w)` -> u8 q [Kp, N] and f32 d, m [Kp/32, N] (w ~ d * q + m per block of 32 along K).
`pack_blocks(q, d, m)` -> the kernel's layout (see native/int8_matmul.cc); `on_4bit_grid(q)` and `pack_blocks4`
the 4-bit layout for a matrix whose every block has 16 levels (GGUF Q4_1: half the bytes, the same numbers).
`int8_matmul(x, packed, dm, n)` is y = x @ w with x quantized per token to int8 in blocks of 32 along K.
`reference_int8_matmul` is the same arithmetic in NumPy, for tests. `kernel_status()` builds and registers the
kernel once per process and says whether it can run here (it needs a C++ compiler and a CPU with AVX-512 VNNI).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

TARGET = "aphrodite_int8_matmul"
QB = 32  # activation block along K; must match int8_matmul.cc
NGROUP = 16  # outputs per 64-byte weight load
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
CXX_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma")
SOURCE = Path(__file__).with_name("native") / "int8_matmul.cc"


@functools.lru_cache(maxsize=1)
def kernel_status() -> tuple[bool, str]:
    """(available, why not): builds the kernel at first call and registers it with XLA."""
    from pallas_kernels.native.build import build_and_register

    return build_and_register(SOURCE, CXX_FLAGS, REQUIRED_CPU_FLAGS, "AjInt8Matmul", TARGET)


def quantize_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w f32 [K, N] -> (q u8[Kp, N], d f32[Kp/QB, N], m f32[Kp/QB, N]) with w ~ d * q + m per block of
    QB along K (asymmetric: m = the block's min, d = its range / 255). K is zero-padded to Kp; a GGUF
    Q4_1 block (16 levels d4 * i + m4) lands exactly on q = 17 * i."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    kp = -(-k // QB) * QB
    wp = np.zeros((kp, n), np.float32)
    wp[:k] = w
    blocks = wp.reshape(kp // QB, QB, n)  # [nb, QB, N]
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)  # [nb, N]
    d = ((hi - lo) / np.float32(255.0)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[:, None]) * inv[:, None]), 0, 255).astype(np.uint8)
    return q.reshape(kp, n), d, lo.astype(np.float32)


def q8_0_blocks(w: np.ndarray) -> "tuple[np.ndarray, np.ndarray, np.ndarray] | None":
    """w f32 [K, N] -> (q, d, m) as quantize_blocks gives, but exact for a GGUF Q8_0 tensor (w = d8 * q8 per
    block of 32, d8 f16, q8 in -127..127): q = q8 + 128, d = d8, m = -128 d8 (both f16-exact, so the scales
    can be stored as f16). None where w is not such a tensor (then quantize_blocks' grid approximates it)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    if k % QB:
        return None
    blocks = w.reshape(k // QB, QB, n)
    d8 = (np.abs(blocks).max(axis=1) / np.float32(127.0)).astype(np.float16).astype(np.float32)  # [nb, N]
    if not np.all(np.isfinite(d8)):
        return None
    q8 = np.rint(blocks / np.where(d8 > 0, d8, 1)[:, None])
    if np.abs(q8).max(initial=0) > 127 or not np.array_equal(q8 * d8[:, None], blocks):
        return None
    q = (q8 + 128).astype(np.uint8).reshape(k, n)
    return q, d8, (np.float32(-128.0) * d8).astype(np.float32)


def dequantize_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray, k: int) -> np.ndarray:
    """The f32 [K, N] weights the blocks stand for."""
    nb, n = d.shape
    w = q.reshape(nb, QB, n).astype(np.float32) * d[:, None] + m[:, None]
    return w.reshape(nb * QB, n)[:k]


def pack_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q u8[Kp, N], d, m f32[Kp/QB, N]) -> the kernel's layout: (u8[Np, Kp] bytes ordered
    [Np/16, Kp/4, 16, 4], f32[Np/16, Kp/QB, 2, 16]); padded outputs get q = d = m = 0."""
    kp, n = q.shape
    np_ = -(-n // NGROUP) * NGROUP
    nb = kp // QB
    full = np.zeros((kp, np_), np.uint8)
    full[:, :n] = q
    u = full.reshape(kp // 4, 4, np_ // NGROUP, NGROUP).transpose(2, 0, 3, 1)  # [Np/16, Kp/4, 16, 4]
    dm = np.zeros((2, nb, np_), np.float32)
    dm[0, :, :n], dm[1, :, :n] = d, m
    dm = dm.reshape(2, nb, np_ // NGROUP, NGROUP).transpose(2, 1, 0, 3)  # [Np/16, nb, 2, 16]
    return np.ascontiguousarray(u).reshape(np_, kp), np.ascontiguousarray(dm).reshape(-1)


def on_4bit_grid(q: np.ndarray) -> bool:
    """Whether every q is a multiple of 17 (16 levels per block, as a GGUF Q4_1 block gives)."""
    return bool(np.all(q % 17 == 0))


def pack_blocks4(q: np.ndarray, d: np.ndarray, m: np.ndarray, half: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """pack_blocks for q on the 4-bit grid (on_4bit_grid): i = q / 17 in nibbles, u8[Np, Kp/2] bytes ordered
    [Np/16, Kp/8, 16, 4] (low nibble: k4 step 2 s, high: 2 s + 1), and d scaled by 17 in dm (f16 if half)."""
    kp, n = q.shape
    i = (q // 17).astype(np.uint8)
    u8, dm = pack_blocks(i, d * np.float32(17.0), m)  # [Np, Kp] as [Np/16, Kp/4, 16, 4]
    np_ = u8.shape[0]
    u = u8.reshape(np_ // NGROUP, kp // 8, 2, NGROUP * 4)  # k4 = 2 s + h
    nibbles = u[:, :, 0] | (u[:, :, 1] << 4)  # [Np/16, Kp/8, 64]
    return np.ascontiguousarray(nibbles).reshape(np_, kp // 2), dm.astype(np.float16) if half else dm


def half_scales_exact(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> bool:
    """Whether 4-bit blocks (on_4bit_grid) with f16 scales (17 d, m) give back w exactly, as they do for a
    GGUF Q4_1 tensor (stored with f16 d and m): then pack_blocks4(..., half=True) loses nothing."""
    d16 = (d * np.float32(17.0)).astype(np.float16).astype(np.float32)  # [nb, N]
    m16 = m.astype(np.float16).astype(np.float32)
    back = dequantize_blocks(q // 17, d16, m16, w.shape[0])  # [K, N]
    return bool(np.array_equal(back, np.asarray(w, np.float32)))


def int8_matmul(x, packed, dm, n: int, residual: bool = True, w4: bool = False, silu_mul: bool = False):
    """x f32[M, K] @ (8-bit block weights) -> f32[M, n] through the FFI kernel (call kernel_status() first).
    residual: activations as two int8 planes (q + q2/254, ~15 bits): greedy output stays with fp32's
    far more often, for about twice the integer work (free at batch 1, where weight reads dominate).
    w4: `packed` is pack_blocks4's 4-bit layout. dm may be f32 or f16.
    silu_mul: x is f32[M, 2K], gate | up, and the product is silu(gate) * up @ W, the activation computed while
    it is quantized (the MLP's down projection without its [M, K] intermediate)."""
    import jax
    import jax.numpy as jnp

    m = x.shape[0]
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))(
        x.astype(jnp.float32), packed, dm, residual=np.int32(1 if residual else 0), w4=np.int32(1 if w4 else 0),
        silu_mul=np.int32(1 if silu_mul else 0))


def silu_mul_reference(gu: np.ndarray) -> np.ndarray:
    """The kernel's silu_mul prologue in NumPy: gu f32[M, 2K] -> g / (1 + e^-g) * u, f32[M, K]."""
    gu = np.asarray(gu, np.float32)
    k = gu.shape[1] // 2
    g, u = gu[:, :k], gu[:, k:]
    with np.errstate(over="ignore"):
        return (g / (np.float32(1.0) + np.exp(-g))) * u


def quantize_activations(x: np.ndarray, kp: int, residual: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activation quantization: x f32[M, K] -> (q i32[M, Kp], scale f32[M, Kp/QB]), x ~ q * scale
    per block; residual: q = 254 q1 + q2 with q2 the rounded residual, and scale / 254."""
    m, k = x.shape
    xp = np.zeros((m, kp), np.float32)
    xp[:, :k] = x
    blocks = xp.reshape(m, kp // QB, QB)
    amax = np.abs(blocks).max(axis=-1)  # [M, nb]
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    scaled = blocks * inv[..., None]
    q = np.rint(scaled).astype(np.int32)  # round half to even, like vcvtps2dq
    scale = (amax / np.float32(127.0)).astype(np.float32)
    if residual:
        q2 = np.clip(np.rint((scaled - q) * np.float32(254.0)), -128, 127).astype(np.int32)
        q = 254 * q + q2
        scale = (scale / np.float32(254.0)).astype(np.float32)
    return q.reshape(m, kp), scale


def reference_int8_matmul(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray,
                          residual: bool = True) -> np.ndarray:
    """NumPy model of the kernel (q, d, m from quantize_blocks): per block, sx * (d * q.qx + m * sum qx)."""
    kp, n = q.shape
    xq, xs = quantize_activations(np.asarray(x, np.float32), kp, residual)  # [M, Kp], [M, nb]
    rows, nb = xs.shape
    xb = xq.reshape(rows, nb, QB).astype(np.int64)
    dots = np.einsum("mbk,bkn->mbn", xb, q.reshape(nb, QB, n).astype(np.int64)).astype(np.float64)
    xsum = xb.sum(axis=-1).astype(np.float64)  # [M, nb]
    per_block = dots * d[None].astype(np.float64) + xsum[..., None] * m[None].astype(np.float64)
    return np.einsum("mbn,mb->mn", per_block, xs.astype(np.float64)).astype(np.float32)
