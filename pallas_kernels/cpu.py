"""Ragged paged attention for the CPU: the backends "cpu" (C++ kernel) and "cpu_jax" (pure JAX).

With use_kernel (backend "cpu"), where the kernel builds and fits (fp32 cache, head_dim 64/128/256), the whole
call is the C++ XLA FFI kernel native/paged_attention.cc (wrapped by cpu_paged_attention.py): it writes this
step's K/V in place and reads K/V pages in place through the page table (benchmarks/step_breakdown.py
--ab cpu_jax,cpu compares the two). Otherwise (or with use_kernel=False, backend "cpu_jax") it is the pure-JAX
code below, with the same contract and the same two parts as reference.py (the oracle the tests compare this
against; both parts live in common.py): this step's own tokens attend to each other in causal tiles, every
row attends to the context earlier steps cached, and the two merge by log-sum-exp. The in-step part (all of a
fresh prefill's attention) is laid out for XLA's CPU backend: tiles are heads-major,
[Hkv, G*C, D] x [Hkv, C, D] -> [Hkv, G*C, C], so both matmuls have their batch dimension leading and need no
transposes inside the loop (about 0.55x the reference's time for a 1024-token prefill,
benchmarks/step_breakdown.py --prefill 1024 --ab reference,cpu_jax). Steps of one tile (under 256 tokens:
decode batches) run the reference's in-step code unchanged: there the heads-major transposes cost more than
they save (1.2-1.5x the reference's attention time at decode 32). The cached-context part is the reference's
(per-row page gathers, 4 pages per iteration): the variants tried (a block-diagonal query over the interleaved
K/V bytes, an elementwise multiply-reduce, 8 pages per iteration) were not faster at decode batch 32
(measured with benchmarks/step_breakdown.py).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_paged_attention as paged_kernel
from pallas_kernels.common import (MASK_VALUE, context_and_merge, in_step_attention, online_update,
                                   token_layout, write_kv)

CONTEXT_PAGES_PER_BLOCK = 4  # cached-context pages per loop iteration (measured: 8 was slower at ctx 64)


def _kernel_fits(q, kv_cache, num_kv_heads: int) -> bool:
    """Whether this call can use the C++ kernel: its shapes fit and it built here (else one warning)."""
    if jax.default_backend() != "cpu":
        return False
    if not paged_kernel.supports(q.shape[2], q.shape[1], num_kv_heads, kv_cache.dtype):
        return False
    return paged_kernel.available_or_warn()


def _pick_tile(t: int) -> int:
    """Query/key tile rows: 128 for long steps (measured at T=1024: 64 about the same, 256 1.5x and 512
    3x slower, since a bigger tile computes more of the masked upper triangle); one tile otherwise."""
    return 128 if t % 128 == 0 and t >= 256 else t


def _in_step(qf, k, v, seq, pos, valid, cu_q_lens, sliding_window, soft_cap, chunk):
    """This step's rows against this step's K/V (same sequence, causal) in heads-major [C x C] tiles.

    qf [T, Hkv, G, D] (scaled) -> m, l [T, Hkv, G], acc [T, Hkv, G, D]."""
    t, hkv, g, d = qf.shape
    nq = t // chunk
    q_t = qf.reshape(nq, chunk, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(nq, hkv, g * chunk, d)
    k_t = k.astype(jnp.float32).reshape(nq, chunk, hkv, d).transpose(0, 2, 1, 3)  # [nq, Hkv, C, D]
    v_t = v.astype(jnp.float32).reshape(nq, chunk, hkv, d).transpose(0, 2, 1, 3)
    seq_t, pos_t, valid_t = (x.reshape(nq, chunk) for x in (seq, pos, valid))

    def q_tile(i):
        qb, sq, pq, vq = q_t[i], seq_t[i], pos_t[i], valid_t[i]
        first = jnp.where(vq[0], cu_q_lens[sq[0]] // chunk, i + 1)  # pure padding tile: no work

        def body(c):
            kc, m, l, acc = c
            s = jnp.einsum("hqd,hkd->hqk", qb, k_t[kc]).reshape(hkv, g, chunk, chunk)  # [Hkv, G, Cq, Ck]
            mask = (sq[:, None] == seq_t[kc][None, :]) & (pos_t[kc][None, :] <= pq[:, None])
            mask &= vq[:, None] & valid_t[kc][None, :]
            if sliding_window is not None:
                mask &= pos_t[kc][None, :] > pq[:, None] - sliding_window
            m, l, acc, p = online_update(m, l, acc, s, mask[None, None], None, soft_cap)
            acc = acc + jnp.einsum("hqk,hkd->hqd", p.reshape(hkv, g * chunk, chunk), v_t[kc]).reshape(
                hkv, g, chunk, d)
            return kc + 1, m, l, acc

        init = (first, jnp.full((hkv, g, chunk), MASK_VALUE, jnp.float32),
                jnp.zeros((hkv, g, chunk), jnp.float32), jnp.zeros((hkv, g, chunk, d), jnp.float32))
        _, m, l, acc = jax.lax.while_loop(lambda c: c[0] <= i, body, init)
        return m, l, acc

    m, l, acc = jax.lax.map(q_tile, jnp.arange(nq))  # [nq, Hkv, G, C(, D)]
    m = m.transpose(0, 3, 1, 2).reshape(t, hkv, g)
    l = l.transpose(0, 3, 1, 2).reshape(t, hkv, g)
    acc = acc.transpose(0, 3, 1, 2, 4).reshape(t, hkv, g, d)
    return m, l, acc


def ragged_paged_attention(
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
    use_kernel: bool = True,
):
    """use_kernel: run the C++ kernel when it is built and fits the shapes (else, or with False, pure JAX)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads

    if use_kernel and _kernel_fits(q, kv_cache, num_kv_heads):  # writes K/V and attends in one call
        out, kv_cache = paged_kernel.paged_attention(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens,
                                                     num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                                                     soft_cap=soft_cap)
        return out.astype(q.dtype), kv_cache  # [T, Hq, D]
    seq, pos, valid = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    kv_cache = write_kv(kv_cache, k, v, page_indices, seq, pos, valid)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    prev_len = jnp.where(valid, kv_lens[seq] - q_len, 0)  # [T] context written by earlier steps

    qf = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    chunk = _pick_tile(num_tokens)
    if chunk == num_tokens:  # decode-sized step, one tile: the reference's layout measured faster here
        m_a, l_a, acc_a = in_step_attention(qf, k, v, seq, pos, valid, cu_q_lens, sliding_window, soft_cap,
                                             num_tokens)
    else:
        m_a, l_a, acc_a = _in_step(qf, k, v, seq, pos, valid, cu_q_lens, sliding_window, soft_cap, chunk)
    out = context_and_merge(qf, (m_a, l_a, acc_a), kv_cache, page_indices, kv_lens, seq, pos, prev_len, valid,
                            sliding_window, soft_cap, CONTEXT_PAGES_PER_BLOCK)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype), kv_cache

