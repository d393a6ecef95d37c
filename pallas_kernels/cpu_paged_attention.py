"""Ragged paged attention as a C++ XLA FFI kernel for the CPU (AVX-512), reading K/V pages in place.

`paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, ...)` -> (out [T, Hq, D],
kv_cache): the ragged_paged_attention contract of pallas_kernels, this step's K/V written in place; the backend
"cpu" (cpu.py) calls it. `kernel_status()` builds and registers the kernel once per process and says whether
it can run here (the backend's availability probe); `supports(...)` says whether a given call's shapes and
dtypes fit it. Why a kernel: see native/paged_attention.cc.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Optional

import numpy as np

logger = logging.getLogger(__name__)

TARGET = "aphrodite_paged_attention"
REQUIRED_CPU_FLAGS = ("avx512f", "avx512dq")
CXX_FLAGS = ("-mavx512f", "-mavx512dq", "-mfma")
SOURCE = Path(__file__).with_name("native") / "paged_attention.cc"
HEAD_DIMS = (64, 128, 256)  # the head sizes the kernel is instantiated for
Q_TILE = 32  # query rows per work item: K/V blocks are read once per tile (and per KV head)


@functools.lru_cache(maxsize=1)
def kernel_status() -> tuple[bool, str]:
    """(available, why not): builds the kernel at first call and registers it with XLA."""
    from pallas_kernels.native.build import build_and_register

    return build_and_register(SOURCE, CXX_FLAGS, REQUIRED_CPU_FLAGS, "AjPagedAttention", TARGET)


def supports(head_dim: int, num_q_heads: int, num_kv_heads: int, cache_dtype) -> bool:
    """Whether a call of these shapes can run on the kernel (fp32 cache, D in HEAD_DIMS, whole GQA groups)."""
    return (head_dim in HEAD_DIMS and num_q_heads % num_kv_heads == 0
            and np.dtype(cache_dtype) == np.float32)


@functools.lru_cache(maxsize=1)
def available_or_warn() -> bool:
    """kernel_status() with one logged warning when the pure-JAX path must be used instead."""
    ok, why = kernel_status()
    if not ok:
        logger.warning("The CPU paged-attention kernel is unavailable (%s); using the slower pure-JAX "
                       "attention (pallas_kernels/cpu.py)", why)
    return ok


def paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                    sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
                    q_tile: int = Q_TILE):
    """q [T, Hq, D], k/v [T, Hkv, D], kv_cache f32[P, page, 2*Hkv, D] -> (out f32[T, Hq, D], kv_cache with
    this step's K/V written), the pallas_kernels contract (call kernel_status() first). The cache is updated
    in place (aliased; donate it, or XLA copies it first). Padding rows come back zero."""
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32
    return jax.ffi.ffi_call(
        TARGET, (jax.ShapeDtypeStruct(q.shape, f32), jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype)),
        input_output_aliases={3: 1})(
        q.astype(f32), k.astype(f32), v.astype(f32), kv_cache, kv_lens.astype(jnp.int32),
        page_indices.astype(jnp.int32), cu_q_lens.astype(jnp.int32), num_seqs.astype(jnp.int32),
        sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
        sliding_window=np.int32(sliding_window or 0), q_tile=np.int32(q_tile))
