"""Pure-JAX ragged paged attention: the CPU path and the oracle the Pallas kernels are tested against.

The batch is ragged: sequence i owns query rows cu_q_lens[i]:cu_q_lens[i+1], which are the *last*
q_len_i positions of a context of kv_lens[i] tokens. Decode rows (q_len 1), prefill rows and
chunked-prefill rows all take the same path. The new K/V of this step are first written into the
paged cache. Attention then runs in two parts merged by log-sum-exp, which keeps the CPU path fast:
the step's own tokens attend to each other in dense tiles over the step's K/V (a fresh prefill never
gathers from the cache), and every row attends to the context earlier steps cached, gathered from its
pages a few pages per loop iteration with an online softmax.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens: int):
    """Per query row: its sequence, its absolute position, and whether it is a real (non-pad) row."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)  # [T]
    valid = t < cu_q_lens[num_seqs[0]]
    seq = jnp.where(valid, jnp.minimum(seq, kv_lens.shape[0] - 1), 0)
    pos = kv_lens[seq] - (cu_q_lens[seq + 1] - t)  # [T]
    return seq, jnp.where(valid, pos, 0), valid


def write_kv(kv_cache, k, v, page_indices, seq, pos, valid):
    """Scatter this step's K/V rows into their pages; padded rows are dropped."""
    num_pages, page_size, _, head_dim = kv_cache.shape
    t, hkv, _ = k.shape
    kv = jnp.stack([k, v], axis=2).reshape(t, 2 * hkv, head_dim).astype(kv_cache.dtype)  # [T, 2Hkv, D]
    page = page_indices[seq, pos // page_size]
    page = jnp.where(valid, page, num_pages)  # out of range -> dropped
    return kv_cache.at[page, pos % page_size].set(kv, mode="drop")


def _online_update(carry_m, carry_l, carry_acc, s, mask, vb, soft_cap):
    """One online-softmax step: s [.., L] scores, mask [.., L], vb values [.., L, D]-compatible."""
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(carry_m, s.max(-1))
    p = jnp.exp(s - m_new[..., None]) * mask
    corr = jnp.exp(carry_m - m_new)
    return m_new, carry_l * corr + p.sum(-1), carry_acc * corr[..., None], p


def _in_step_attention(qf, k, v, seq, pos, valid, cu_q_lens, sliding_window, soft_cap, chunk):
    """Rows attend to this step's own new K/V (same sequence, causal), in [chunk x chunk] tiles.

    Query tile i only visits key tiles from the one holding its first sequence's first new token up
    to itself, so a long prefill costs about half of a dense T x T product and decode rows one tile.
    """
    t, hkv, g, d = qf.shape
    nq = t // chunk
    q_t = qf.reshape(nq, chunk, hkv, g, d)
    k_t = k.astype(jnp.float32).reshape(nq, chunk, hkv, d)
    v_t = v.astype(jnp.float32).reshape(nq, chunk, hkv, d)
    seq_t, pos_t, valid_t = (x.reshape(nq, chunk) for x in (seq, pos, valid))

    def q_tile(i):
        qb, sq, pq, vq = q_t[i], seq_t[i], pos_t[i], valid_t[i]
        first = jnp.where(vq[0], cu_q_lens[sq[0]] // chunk, i + 1)  # pure padding tile: no work

        def body(c):
            kc, m, l, acc = c
            s = jnp.einsum("qhgd,khd->qhgk", qb, k_t[kc])  # [C, Hkv, G, C]
            mask = (sq[:, None] == seq_t[kc][None, :]) & (pos_t[kc][None, :] <= pq[:, None])
            mask &= vq[:, None] & valid_t[kc][None, :]
            if sliding_window is not None:
                mask &= pos_t[kc][None, :] > pq[:, None] - sliding_window
            m, l, acc, p = _online_update(m, l, acc, s, mask[:, None, None, :], None, soft_cap)
            acc = acc + jnp.einsum("qhgk,khd->qhgd", p, v_t[kc])
            return kc + 1, m, l, acc

        init = (first, jnp.full((chunk, hkv, g), MASK_VALUE, jnp.float32),
                jnp.zeros((chunk, hkv, g), jnp.float32), jnp.zeros((chunk, hkv, g, d), jnp.float32))
        _, m, l, acc = jax.lax.while_loop(lambda c: c[0] <= i, body, init)
        return m, l, acc

    m, l, acc = jax.lax.map(q_tile, jnp.arange(nq))
    return m.reshape(t, hkv, g), l.reshape(t, hkv, g), acc.reshape(t, hkv, g, d)


def _cached_context_attention(qf, kv_cache, page_indices, seq, pos, prev_len, valid, sliding_window,
                              soft_cap, pages_per_block):
    """Rows attend to their sequence's context from earlier steps (positions < prev_len), read from
    the paged cache a few pages per loop iteration. A step of fresh prefills runs zero iterations."""
    t, hkv, g, d = qf.shape
    page_size = kv_cache.shape[1]
    pages_per_seq = page_indices.shape[1]
    n_blocks_max = -(-pages_per_seq // pages_per_block)
    pad = n_blocks_max * pages_per_block - pages_per_seq
    tok_table = jnp.pad(page_indices, ((0, 0), (0, pad)))[seq]  # [T, n_blocks_max * ppb]
    block_len = pages_per_block * page_size
    n_blocks = (jnp.max(jnp.where(valid, prev_len, 0)) + block_len - 1) // block_len

    def body(carry):
        b, m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tok_table, b * pages_per_block, pages_per_block, axis=1)
        kvb = kv_cache[pages].reshape(t, block_len, hkv, 2, d)
        kb = kvb[..., 0, :].astype(jnp.float32)  # [T, L, Hkv, D]
        vb = kvb[..., 1, :].astype(jnp.float32)
        s = jnp.einsum("thgd,tlhd->thgl", qf, kb)  # [T, Hkv, G, L]
        kpos = b * block_len + jnp.arange(block_len)  # [L]
        mask = kpos[None, :] < prev_len[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > (pos[:, None] - sliding_window)
        m, l, acc, p = _online_update(m, l, acc, s, mask[:, None, None, :], None, soft_cap)
        acc = acc + jnp.einsum("thgl,tlhd->thgd", p, vb)
        return b + 1, m, l, acc

    init = (jnp.int32(0), jnp.full((t, hkv, g), MASK_VALUE, jnp.float32),
            jnp.zeros((t, hkv, g), jnp.float32), jnp.zeros((t, hkv, g, d), jnp.float32))
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, init)
    return m, l, acc


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
    m_a, l_a, acc_a = _in_step_attention(qf, k, v, seq, pos, valid, cu_q_lens, sliding_window, soft_cap,
                                         chunk)
    out = context_and_merge(qf, (m_a, l_a, acc_a), kv_cache, page_indices, kv_lens, seq, pos, prev_len, valid,
                            sliding_window, soft_cap, pages_per_block)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype), kv_cache


def context_and_merge(qf, in_step, kv_cache, page_indices, kv_lens, seq, pos, prev_len, valid, sliding_window,
                      soft_cap, pages_per_block):
    """The cached-context part, merged with the in-step part `in_step` = (m, l, acc) by log-sum-exp.

    Earlier context runs in two row groups, so a fresh prefill never loops over a long decode context:
    the first min(T, S) rows (where the runner puts decode rows), then the rest; each group loops only as
    far as its own longest earlier context (zero iterations for fresh prefills). Returns out [T, Hkv, G, D]
    (zero on padding rows)."""
    num_tokens = qf.shape[0]
    m_a, l_a, acc_a = in_step
    split = min(num_tokens, kv_lens.shape[0])
    parts = []
    for lo, hi in ((0, split), (split, num_tokens)):
        if hi == lo:
            continue
        parts.append(_cached_context_attention(
            qf[lo:hi], kv_cache, page_indices, seq[lo:hi], pos[lo:hi], prev_len[lo:hi], valid[lo:hi],
            sliding_window, soft_cap, pages_per_block))
    m_b, l_b, acc_b = (jnp.concatenate(x) for x in zip(*parts))
    m = jnp.maximum(m_a, m_b)
    ca, cb = jnp.exp(m_a - m), jnp.exp(m_b - m)
    l = l_a * ca + l_b * cb
    acc = acc_a * ca[..., None] + acc_b * cb[..., None]
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return jnp.where(valid[:, None, None, None], out, 0.0)
