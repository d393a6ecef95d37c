"""Pure-JAX ragged paged attention: the CPU path and the oracle the Pallas kernels are tested against.

The batch is ragged: sequence i owns query rows cu_q_lens[i]:cu_q_lens[i+1], which are the *last*
q_len_i positions of a context of kv_lens[i] tokens. Decode rows (q_len 1), prefill rows and
chunked-prefill rows all take the same path. The new K/V of this step are first written into the
paged cache, then every query row attends causally (optionally within a sliding window) to its own
sequence's pages, a few pages per loop iteration with an online softmax so memory stays bounded.
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
):
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    page_size = kv_cache.shape[1]
    pages_per_seq = page_indices.shape[1]

    seq, pos, valid = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    kv_cache = write_kv(kv_cache, k, v, page_indices, seq, pos, valid)

    # Pad the page table so a block of pages never reads past its end.
    n_blocks_max = -(-pages_per_seq // pages_per_block)
    pad = n_blocks_max * pages_per_block - pages_per_seq
    table = jnp.pad(page_indices, ((0, 0), (0, pad)))  # [S, n_blocks_max * ppb]
    tok_table = table[seq]  # [T, n_blocks_max * ppb]

    qf = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    block_len = pages_per_block * page_size
    real_lens = jnp.where(jnp.arange(kv_lens.shape[0]) < num_seqs[0], kv_lens, 0)
    n_blocks = (jnp.max(real_lens) + block_len - 1) // block_len
    tok_len = jnp.where(valid, pos + 1, 0)  # causal: keys 0..pos

    def body(carry):
        b, m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tok_table, b * pages_per_block, pages_per_block, axis=1)
        kvb = kv_cache[pages].reshape(num_tokens, block_len, num_kv_heads, 2, head_dim)
        kb = kvb[..., 0, :].astype(jnp.float32)  # [T, L, Hkv, D]
        vb = kvb[..., 1, :].astype(jnp.float32)
        s = jnp.einsum("thgd,tlhd->thgl", qf, kb)  # [T, Hkv, G, L]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kpos = b * block_len + jnp.arange(block_len)  # [L]
        mask = kpos[None, :] < tok_len[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > (pos[:, None] - sliding_window)
        s = jnp.where(mask[:, None, None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None]) * mask[:, None, None, :]
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("thgl,tlhd->thgd", p, vb)
        return b + 1, m_new, l, acc

    init = (
        jnp.int32(0),
        jnp.full((num_tokens, num_kv_heads, group), MASK_VALUE, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype), kv_cache
