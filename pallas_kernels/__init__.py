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

Backends (backends.py holds the registry: each one's capabilities and availability probe):
- "reference" (reference.py): pure JAX, the oracle the others are tested against;
- "cpu" (cpu.py with the C++ FFI kernel native/paged_attention.cc, wrapped by cpu_paged_attention.py): where a
  call's shapes do not fit the kernel, or it did not build, the call runs the pure-JAX CPU code (one warning);
- "cpu_jax" (cpu.py): pure JAX laid out for XLA's CPU backend;
- "tpu" (tpu.py): the Pallas TPU kernel (pass `interpret=True` or a `pltpu.InterpretParams` to run it on CPU,
  as the tests do);
- "gpu" (gpu.py): the Pallas Triton kernel (`interpret=True` runs it on CPU), untested on a real GPU.
The shared pure-JAX pieces (token layout, K/V write, the two attention parts) live in common.py.

An engine resolves its backend once at start (`resolve_attention_backend`, with the model's needs) and passes
the name as `impl`. `impl="auto"` without that step picks by platform: tpu on TPU, cpu on CPU, the reference
elsewhere (never gpu yet).

The package imports nothing of the engine. `registered_ffi_targets()` and `source_root()` are what an
executable cache needs to key compiled steps on the kernels: the FFI targets this process registered (a
compiled step calls them by name) and the folder whose sources decide what the kernels trace to.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from pallas_kernels.backends import (BACKENDS, AttentionBackend, AttentionNeeds, Capabilities, backend_names,
                                     get_backend, platform_default, resolve_attention_backend)
from pallas_kernels.native import build as _build

__all__ = ["ragged_paged_attention", "resolve_attention_backend", "AttentionBackend", "AttentionNeeds",
           "Capabilities", "BACKENDS", "backend_names", "get_backend", "registered_ffi_targets", "source_root"]


def ragged_paged_attention(
    q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, *,
    sm_scale: float,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
    impl: str = "auto",
    interpret: Any = False,
):
    """The contract above, run by the backend named `impl` ("auto": by platform)."""
    if impl == "auto":
        import jax

        backend = platform_default(jax.default_backend())
    else:
        backend = get_backend(impl)
    return backend(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                   sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret)


def registered_ffi_targets() -> list[str]:
    """The XLA FFI targets this process registered (sorted): part of a compiled step's identity."""
    return sorted(_build.REGISTERED_TARGETS)


def source_root() -> str:
    """This package's folder: its Python and C++ sources decide what the kernels compile to."""
    return os.path.dirname(os.path.abspath(__file__))
