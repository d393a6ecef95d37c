"""Attention kernels behind one interface for every backend.

`ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
sliding_window=None, soft_cap=None)` -> `(out [T, Hq, D], kv_cache)` serves prefill, chunked prefill and
decode in one ragged batch, and writes this step's K/V into the cache as part of the call.

Layout and conventions (shared by every implementation):
- q [T, Hq, D]; k, v [T, Hkv, D]: the new tokens of this step, concatenated over sequences, padded to T.
- kv_cache [num_pages, page_size, 2*Hkv, D]: K and V interleaved on axis 2 (k0, v0, k1, v1, ...), so a
  shard of whole KV heads is a contiguous slice when the cache is split over the 'model' mesh axis.
- kv_lens i32[S]: context length of each sequence *including* this step's tokens.
- page_indices i32[S, pages_per_seq]: each sequence's page table.
- cu_q_lens i32[S+1]: cumulative query lengths; rows past num_seqs repeat the last value.
- num_seqs i32[1]: how many of the S rows are real. Query rows at or past cu_q_lens[num_seqs] are padding:
  their output is zero and their K/V is not written.
- sliding_window W: a row at position p sees keys p-W+1 .. p (HF Mistral's definition).

`impl="auto"` picks the Pallas TPU kernel on TPU, `cpu.py` on CPU (the C++ FFI kernel
pallas_kernels/native/paged_attention.cc where it builds and fits, else pure JAX laid out for XLA's CPU
backend; `impl="cpu_jax"` forces that pure-JAX path), and the pure-JAX reference elsewhere; `impl="reference"` is the oracle the others are tested against; `impl="tpu"` forces the
TPU kernel (pass `interpret=True` or a `pltpu.InterpretParams` to run it on CPU, as the tests do);
`impl="gpu"` the Pallas Triton kernel (`interpret=True` runs it on CPU). "auto" never picks "gpu" yet: it is
untested on a real GPU.
"""
from __future__ import annotations

from typing import Any, Optional

import jax

from pallas_kernels.reference import ref_ragged_paged_attention

__all__ = ["ragged_paged_attention", "ref_ragged_paged_attention"]


def ragged_paged_attention(
    q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, *,
    sm_scale: float,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
    impl: str = "auto",
    interpret: Any = False,
):
    if impl == "auto":
        backend = jax.default_backend()
        impl = "tpu" if backend == "tpu" else "cpu" if backend == "cpu" else "reference"
    if impl == "reference":
        return ref_ragged_paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
                                          sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if impl in ("cpu", "cpu_jax"):
        from pallas_kernels.cpu import ragged_paged_attention as cpu_rpa
        return cpu_rpa(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
                       sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                       use_kernel=impl == "cpu")
    if impl == "tpu":
        from pallas_kernels.tpu import ragged_paged_attention as tpu_rpa
        return tpu_rpa(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
                       sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                       interpret=interpret)
    if impl == "gpu":
        from pallas_kernels.gpu import ragged_paged_attention as gpu_rpa
        return gpu_rpa(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
                       sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                       interpret=bool(interpret))
    raise ValueError(f"unknown attention impl {impl!r}")
