"""The pieces of ragged paged attention that several backends share (pure JAX).

`token_layout` maps each query row to its sequence and position; `write_kv` scatters this step's K/V into
the paged cache; `in_step_attention` (this step's own tokens, causal tiles) and `context_and_merge` (the
context earlier steps cached, merged with the in-step part by log-sum-exp) are the two halves of
reference.py's attention, which the pure-JAX CPU path (cpu.py) reuses; `online_update` is one
online-softmax step. The Pallas kernels (tpu.py, gpu.py) take `token_layout`, `write_kv` and `MASK_VALUE`.
"""
from __future__ import annotations

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


def online_update(carry_m, carry_l, carry_acc, s, mask, vb, soft_cap):
    """One online-softmax step: s [.., L] scores, mask [.., L], vb values [.., L, D]-compatible."""
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(carry_m, s.max(-1))
    p = jnp.exp(s - m_new[..., None]) * mask
    corr = jnp.exp(carry_m - m_new)
    return m_new, carry_l * corr + p.sum(-1), carry_acc * corr[..., None], p


def in_step_attention(qf, k, v, seq, pos, valid, cu_q_lens, sliding_window, soft_cap, chunk):
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
            m, l, acc, p = online_update(m, l, acc, s, mask[:, None, None, :], None, soft_cap)
            acc = acc + jnp.einsum("qhgk,khd->qhgd", p, v_t[kc])
            return kc + 1, m, l, acc

        init = (first, jnp.full((chunk, hkv, g), MASK_VALUE, jnp.float32),
                jnp.zeros((chunk, hkv, g), jnp.float32), jnp.zeros((chunk, hkv, g, d), jnp.float32))
        _, m, l, acc = jax.lax.while_loop(lambda c: c[0] <= i, body, init)
        return m, l, acc

    m, l, acc = jax.lax.map(q_tile, jnp.arange(nq))
    return m.reshape(t, hkv, g), l.reshape(t, hkv, g), acc.reshape(t, hkv, g, d)


def cached_context_attention(qf, kv_cache, page_indices, seq, pos, prev_len, valid, sliding_window,
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
        m, l, acc, p = online_update(m, l, acc, s, mask[:, None, None, :], None, soft_cap)
        acc = acc + jnp.einsum("thgl,tlhd->thgd", p, vb)
        return b + 1, m, l, acc

    init = (jnp.int32(0), jnp.full((t, hkv, g), MASK_VALUE, jnp.float32),
            jnp.zeros((t, hkv, g), jnp.float32), jnp.zeros((t, hkv, g, d), jnp.float32))
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, init)
    return m, l, acc


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
        parts.append(cached_context_attention(
            qf[lo:hi], kv_cache, page_indices, seq[lo:hi], pos[lo:hi], prev_len[lo:hi], valid[lo:hi],
            sliding_window, soft_cap, pages_per_block))
    m_b, l_b, acc_b = (jnp.concatenate(x) for x in zip(*parts))
    m = jnp.maximum(m_a, m_b)
    ca, cb = jnp.exp(m_a - m), jnp.exp(m_b - m)
    l = l_a * ca + l_b * cb
    acc = acc_a * ca[..., None] + acc_b * cb[..., None]
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return jnp.where(valid[:, None, None, None], out, 0.0)
