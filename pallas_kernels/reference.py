"""Pure-JAX ragged paged attention: the backend "reference", the oracle every other backend is tested against.

The batch is ragged: sequence i owns query rows cu_q_lens[i]:cu_q_lens[i+1], which are the *last*
q_len_i positions of a context of kv_lens[i] tokens. Decode rows (q_len 1), prefill rows and
chunked-prefill rows all take the same path. The new K/V of this step are first written into the
paged cache. Attention then runs in two parts merged by log-sum-exp (common.py holds both): the step's own
tokens attend to each other in dense tiles over the step's K/V (a fresh prefill never gathers from the
cache), and every row attends to the context earlier steps cached, gathered from its pages a few pages per
loop iteration with an online softmax.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.common import context_and_merge, in_step_attention, token_layout, write_kv


def ref_ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    kv_cache: jax.Array,  # [P, page_size, 2*Hkv, D], K/V interleaved on axis 2
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[S+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
    pages_per_block: int = 4,
    q_chunk: int = 128,
):
    """Attention in two parts merged by their log-sum-exp: this step's own tokens (dense tiles over the
    step's K/V, no gathers) and the context cached by earlier steps (paged gathers per row)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads

    seq, pos, valid = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    kv_cache = write_kv(kv_cache, k, v, page_indices, seq, pos, valid)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    prev_len = jnp.where(valid, kv_lens[seq] - q_len, 0)  # [T] context written by earlier steps

    qf = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    chunk = q_chunk if num_tokens % q_chunk == 0 else num_tokens
    m_a, l_a, acc_a = in_step_attention(qf, k, v, seq, pos, valid, cu_q_lens, sliding_window, soft_cap,
                                         chunk)
    out = context_and_merge(qf, (m_a, l_a, acc_a), kv_cache, page_indices, kv_lens, seq, pos, prev_len, valid,
                            sliding_window, soft_cap, pages_per_block)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype), kv_cache
