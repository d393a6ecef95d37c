"""Pallas GPU (Triton backend) ragged paged attention, same ABI and semantics as `reference.py`.

The K/V write is not part of the kernel here: this step's K/V are scattered into the cache by XLA
(`common.write_kv`, one scatter) before the kernel runs, and the kernel reads new and old tokens
alike from the pages.

Grid (sequence, kv_head), one Triton program each. A program walks its sequence's query rows in blocks of
`queries_per_block` tokens; the G query heads of the KV head are handled together as rows of one tile
(queries laid out [Hkv, T*Gp, D], Gp = G rounded up to a power of two because Triton tiles must be powers
of two; the pad heads are zeros and are dropped). For each query block it walks the visible pages (causal
end, sliding-window start) one page per step with an online softmax in fp32, and stores only the block's
real rows (masked store), so neighbouring sequences never clobber each other.

Runs on CPU with `interpret=True`. On a real GPU Triton wants every dot dimension >= 16, so use
page_size >= 16, head_dim >= 16 and queries_per_block * Gp >= 16 there; that path is untested here.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import MASK_VALUE, token_layout, write_kv


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _attention_kernel(kv_lens_ref, pages_ref, cu_q_ref, num_seqs_ref, q_ref, cache_ref, o_ref, *,
                      sm_scale: float, sliding_window: Optional[int], soft_cap: Optional[float],
                      group_pad: int, queries_per_block: int, pages_per_seq: int, page_size: int):
    s = pl.program_id(0)
    h = pl.program_id(1)
    bq = queries_per_block
    rows = bq * group_pad
    head_dim = q_ref.shape[-1]

    @pl.when(s < num_seqs_ref[0])
    def _seq():
        q0 = cu_q_ref[s]
        q_len = cu_q_ref[s + 1] - q0
        kv_len = kv_lens_ref[s]
        ctx = kv_len - q_len

        def q_block(c, carry):
            t0 = q0 + c * bq
            qf = q_ref[h, pl.ds(t0 * group_pad, rows), :].astype(jnp.float32) * sm_scale  # [rows, D]
            local = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group_pad  # token within block
            first = ctx + c * bq
            pos = jnp.minimum(first + local, kv_len - 1)  # [rows, 1]
            kv_end = jnp.minimum(first + bq, kv_len)
            kv_start = 0 if sliding_window is None else jnp.maximum(first - sliding_window + 1, 0)

            def kv_page(p, carry):
                m, l, acc = carry
                page = pages_ref[s * pages_per_seq + p]
                kb = cache_ref[page, :, 2 * h, :].astype(jnp.float32)  # [page_size, D]
                vb = cache_ref[page, :, 2 * h + 1, :].astype(jnp.float32)  # [page_size, D]
                sc = plgpu.dot(qf, kb, trans_b=True)  # [rows, page_size]
                if soft_cap is not None:
                    sc = soft_cap * jnp.tanh(sc / soft_cap)
                kpos = p * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
                mask = kpos <= pos
                if sliding_window is not None:
                    mask &= kpos > pos - sliding_window
                sc = jnp.where(mask, sc, MASK_VALUE)
                m_new = jnp.maximum(m, jnp.max(sc, axis=1, keepdims=True))  # [rows, 1]
                pr = jnp.where(mask, jnp.exp(sc - m_new), 0.0)
                corr = jnp.exp(m - m_new)
                l = l * corr + jnp.sum(pr, axis=1, keepdims=True)
                acc = acc * corr + plgpu.dot(pr, vb)  # [rows, D]
                return m_new, l, acc

            init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                    jnp.zeros((rows, head_dim), jnp.float32))
            _, l, acc = jax.lax.fori_loop(kv_start // page_size, pl.cdiv(kv_end, page_size), kv_page, init)
            out = (acc / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)
            real = jnp.broadcast_to(local < q_len - c * bq, (rows, head_dim))
            plgpu.store(o_ref.at[h, pl.ds(t0 * group_pad, rows), :], out, mask=real)
            return carry

        jax.lax.fori_loop(0, pl.cdiv(q_len, bq), q_block, 0)


def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, D]
    k: jax.Array,  # [T, Hkv, D]
    v: jax.Array,  # [T, Hkv, D]
    kv_cache: jax.Array,  # [P, page_size, 2*Hkv, D]
    kv_lens: jax.Array,  # i32[S]
    page_indices: jax.Array,  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[S+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: Optional[int] = None,
    soft_cap: Optional[float] = None,
    queries_per_block: Optional[int] = None,
    interpret: bool = False,
    num_warps: int = 4,
):
    """Same contract as `pallas_kernels.ragged_paged_attention`; returns (out [T, Hq, D], kv_cache)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    gp = _next_pow2(group)
    num_pages, page_size = kv_cache.shape[:2]
    num_seq_rows, pages_per_seq = page_indices.shape
    bq = queries_per_block or max(16 // gp, 1)
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = num_seqs.astype(jnp.int32).reshape(1)
    page_indices = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1)

    seq, pos, valid = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    kv_cache = write_kv(kv_cache, k, v, page_indices, seq, pos, valid)

    # [T, Hq, D] -> [Hkv, (T + bq) * Gp, D]; bq spare tokens so a block's load/store never leaves the array.
    qt = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qt = jnp.pad(qt, ((0, 0), (0, bq), (0, gp - group), (0, 0)))
    qt = qt.reshape(num_kv_heads, (num_tokens + bq) * gp, head_dim)
    kernel = functools.partial(
        _attention_kernel, sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
        group_pad=gp, queries_per_block=bq, pages_per_seq=pages_per_seq, page_size=page_size)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        grid=(num_seq_rows, num_kv_heads),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=bool(interpret),
    )(kv_lens, page_indices.reshape(-1), cu_q_lens, num_seqs, qt, kv_cache)

    out = out.reshape(num_kv_heads, num_tokens + bq, gp, head_dim)[:, :num_tokens, :group]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype), kv_cache
