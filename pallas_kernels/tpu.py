"""Pallas TPU ragged paged attention (same ABI and semantics as `reference.py`).

One call = two `pallas_call`s, run one after the other inside the same jit:

1. `write_kv_pallas`: scatters this step's K/V rows into their cache slots, one small HBM->HBM DMA per
   real token (the cache is aliased in place; padding tokens issue no DMA). The attention kernel then
   reads new and old tokens the same way, from the pages.
2. `_attention_pallas`: grid (kv_head, sequence). For one KV head all G = Hq/Hkv query heads of that
   group are handled together: queries live as [Hkv, T*G, D] (token-major, G rows per token), so a block
   of `queries_per_block` tokens is one contiguous [bq*G, D] tile and one matmul serves the whole group.
   Each sequence's query rows are walked in blocks; for each block the kernel walks the KV pages it can
   see (causal end, sliding-window start) `pages_per_block` pages at a time, DMA-ing K and V of that
   head from HBM into VMEM with the next block prefetched into the other half of a double buffer, and
   keeps an online softmax (running max m, sum l, accumulator acc) in fp32.

Scalars (kv_lens, the flattened page table, cu_q_lens, num_seqs) reach SMEM through
`PrefetchScalarGridSpec`. The last query block of a sequence may run past its end: those extra rows are
computed and written too, but the sequence axis is sequential ("arbitrary"), so the next sequence
overwrites them afterwards, and the output carries `queries_per_block` spare rows at its end so nothing
writes out of bounds; the wrapper zeroes padding rows. Only the KV-head axis is "parallel".

On CPU run it with `interpret=pltpu.InterpretParams()` (or `interpret=True`, which means the same).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MASK_VALUE, token_layout


def _interpret_arg(interpret: Any):
    """True -> TPU interpret mode (simulated HBM/VMEM/DMA on CPU); False/None -> compile with Mosaic."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


# --------------------------------------------------------------------------------------- KV cache write
def _write_kv_kernel(slots_ref, kv_hbm, cache_in_hbm, cache_hbm, sem, *, page_size: int):
    del cache_in_hbm  # aliased with cache_hbm

    def copy(t):
        slot = slots_ref[t]
        return pltpu.make_async_copy(kv_hbm.at[pl.ds(t, 1)],  # [1, 2Hkv, D]
                                     cache_hbm.at[slot // page_size, pl.ds(slot % page_size, 1)], sem)

    num_tokens = kv_hbm.shape[0]

    @pl.loop(0, num_tokens)
    def _start(t):
        @pl.when(slots_ref[t] >= 0)
        def _():
            copy(t).start()

    @pl.loop(0, num_tokens)
    def _wait(t):
        @pl.when(slots_ref[t] >= 0)
        def _():
            copy(t).wait()


def write_kv_pallas(kv_cache, k, v, slots, *, interpret: Any = False):
    """Write k/v [T, Hkv, D] into kv_cache [P, page_size, 2Hkv, D] at flat slots i32[T]
    (page * page_size + offset; negative = skip). Returns the updated cache (aliased in place)."""
    num_tokens, hkv, head_dim = k.shape
    page_size = kv_cache.shape[1]
    kv = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * hkv, head_dim).astype(kv_cache.dtype)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_write_kv_kernel, page_size=page_size),
        out_shape=jax.ShapeDtypeStruct(kv_cache.shape, kv_cache.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(1,), in_specs=[any_spec, any_spec], out_specs=any_spec,
            scratch_shapes=[pltpu.SemaphoreType.DMA(())]),
        input_output_aliases={2: 0},  # operand index counts the scalar-prefetch arg
        interpret=_interpret_arg(interpret),
    )(slots, kv, kv_cache)


# ------------------------------------------------------------------------------------------- attention
def _attention_kernel(
    kv_lens_ref, pages_ref, cu_q_ref, num_seqs_ref,  # SMEM scalars
    q_hbm,  # [Hkv, Tp*G, D]
    cache_hbm,  # [P, page_size, 2Hkv, D]
    o_hbm,  # [Hkv, Tp*G, D]
    q_buf,  # VMEM [bq*G, D]
    k_buf, v_buf,  # VMEM [2, ppb, page_size, D]
    o_buf,  # VMEM [bq*G, D]
    sems,  # DMA [4]: q, out, kv slot 0, kv slot 1
    *, sm_scale: float, sliding_window: Optional[int], soft_cap: Optional[float], group: int,
    queries_per_block: int, pages_per_block: int, pages_per_seq: int,
):
    h = pl.program_id(0)
    s = pl.program_id(1)
    bq, ppb = queries_per_block, pages_per_block
    rows = bq * group
    _, page_size, head_dim = k_buf.shape[1:]
    block_len = ppb * page_size

    def kv_copies(seq, b, slot):
        """The 2*ppb DMAs of KV block b (K and V of head h for ppb pages) into buffer half `slot`."""
        out = []
        for i in range(ppb):
            col = jnp.minimum(b * ppb + i, pages_per_seq - 1)  # past the table end: any real page, masked
            page = pages_ref[seq * pages_per_seq + col]
            out.append(pltpu.make_async_copy(cache_hbm.at[page, :, 2 * h, :], k_buf.at[slot, i],
                                             sems.at[2 + slot]))
            out.append(pltpu.make_async_copy(cache_hbm.at[page, :, 2 * h + 1, :], v_buf.at[slot, i],
                                             sems.at[2 + slot]))
        return out

    @pl.when(s < num_seqs_ref[0])
    def _seq():
        q0 = cu_q_ref[s]
        q_len = cu_q_ref[s + 1] - q0
        kv_len = kv_lens_ref[s]
        ctx = kv_len - q_len  # tokens already in the cache before this step

        @pl.loop(0, pl.cdiv(q_len, bq))
        def _q_block(c):
            t0 = q0 + c * bq
            q_copy = pltpu.make_async_copy(q_hbm.at[h, pl.ds(t0 * group, rows)], q_buf, sems.at[0])
            q_copy.start()
            first = ctx + c * bq  # position of the block's first row
            kv_end = jnp.minimum(first + bq, kv_len)  # causal: keys < last position + 1
            kv_start = 0 if sliding_window is None else jnp.maximum(first - sliding_window + 1, 0)
            b_start = kv_start // block_len
            b_end = pl.cdiv(kv_end, block_len)
            for cp in kv_copies(s, b_start, b_start % 2):
                cp.start()
            q_copy.wait()
            qf = q_buf[...].astype(jnp.float32) * sm_scale  # [rows, D]
            local = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
            pos = jnp.minimum(first + local, kv_len - 1)  # [rows, 1]; rows past the sequence: harmless

            def kv_block(b, carry):
                m, l, acc = carry
                slot = b % 2

                @pl.when(b + 1 < b_end)
                def _prefetch():
                    for cp in kv_copies(s, b + 1, 1 - slot):
                        cp.start()

                for cp in kv_copies(s, b, slot):
                    cp.wait()
                kb = k_buf[slot].reshape(block_len, head_dim).astype(jnp.float32)  # [L, D]
                vb = v_buf[slot].reshape(block_len, head_dim).astype(jnp.float32)  # [L, D]
                sc = jax.lax.dot_general(qf, kb, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)  # [rows, L]
                if soft_cap is not None:
                    sc = soft_cap * jnp.tanh(sc / soft_cap)
                kpos = b * block_len + jax.lax.broadcasted_iota(jnp.int32, (1, block_len), 1)  # [1, L]
                mask = kpos <= pos
                if sliding_window is not None:
                    mask &= kpos > pos - sliding_window
                sc = jnp.where(mask, sc, MASK_VALUE)
                m_new = jnp.maximum(m, sc.max(axis=1, keepdims=True))  # [rows, 1]
                p = jnp.where(mask, jnp.exp(sc - m_new), 0.0)  # [rows, L]
                corr = jnp.exp(m - m_new)
                l = l * corr + p.sum(axis=1, keepdims=True)
                acc = acc * corr + jnp.dot(p, vb, preferred_element_type=jnp.float32)  # [rows, D]
                return m_new, l, acc

            init = (jnp.full((rows, 1), MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                    jnp.zeros((rows, head_dim), jnp.float32))
            _, l, acc = jax.lax.fori_loop(b_start, b_end, kv_block, init)
            o_buf[...] = (acc / jnp.maximum(l, 1e-30)).astype(o_buf.dtype)
            o_copy = pltpu.make_async_copy(o_buf, o_hbm.at[h, pl.ds(t0 * group, rows)], sems.at[1])
            o_copy.start()
            o_copy.wait()


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
    queries_per_block: int = 8,
    pages_per_block: int = 4,
    interpret: Any = False,
):
    """Same contract as `pallas_kernels.ragged_paged_attention`; returns (out [T, Hq, D], kv_cache)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    num_pages, page_size = kv_cache.shape[:2]
    num_seq_rows, pages_per_seq = page_indices.shape
    bq = queries_per_block
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = num_seqs.astype(jnp.int32).reshape(1)
    page_indices = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1)

    seq, pos, valid = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    slots = page_indices[seq, pos // page_size] * page_size + pos % page_size
    slots = jnp.where(valid, slots, -1).astype(jnp.int32)  # [T]
    kv_cache = write_kv_pallas(kv_cache, k, v, slots, interpret=interpret)

    # [T, Hq, D] -> [Hkv, (T + bq) * G, D]: a KV head's query group is contiguous, bq spare tokens at the end.
    qt = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    qt = jnp.pad(qt, ((0, 0), (0, bq), (0, 0), (0, 0))).reshape(num_kv_heads, (num_tokens + bq) * group,
                                                                  head_dim)
    kernel = functools.partial(
        _attention_kernel, sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
        group=group, queries_per_block=bq, pages_per_block=pages_per_block, pages_per_seq=pages_per_seq)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(num_kv_heads, num_seq_rows),
            in_specs=[any_spec, any_spec], out_specs=any_spec,
            scratch_shapes=[
                pltpu.VMEM((bq * group, head_dim), q.dtype),
                pltpu.VMEM((2, pages_per_block, page_size, head_dim), kv_cache.dtype),
                pltpu.VMEM((2, pages_per_block, page_size, head_dim), kv_cache.dtype),
                pltpu.VMEM((bq * group, head_dim), q.dtype),
                pltpu.SemaphoreType.DMA((4,)),
            ]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
    )(kv_lens, page_indices.reshape(-1), cu_q_lens, num_seqs, qt, kv_cache)

    out = out.reshape(num_kv_heads, num_tokens + bq, group, head_dim)[:, :num_tokens]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_q_heads, head_dim)
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype), kv_cache
