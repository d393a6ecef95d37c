"""The Pallas TPU kernel, run on CPU in TPU interpret mode, against the pure-JAX reference.

Shapes are tiny: the interpreter simulates every DMA and semaphore on the host.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import ragged_paged_attention
from pallas_kernels.tpu import ragged_paged_attention as tpu_rpa
from rpa_cases import dense_attention, expected_cache, make_batch, random_seqs

HEAD_DIM = 16
SCALE = HEAD_DIM ** -0.5


def _both(b, *, tpu_kw=None, **kw):
    ref = jax.jit(functools.partial(ragged_paged_attention, sm_scale=SCALE, impl="reference", **kw))
    tpu = jax.jit(functools.partial(tpu_rpa, sm_scale=SCALE, interpret=pltpu.InterpretParams(),
                                    **(tpu_kw or {}), **kw))
    (ro, rc), (to, tc) = ref(*b.args()), tpu(*b.args())
    return np.asarray(ro), np.asarray(rc), np.asarray(to), np.asarray(tc)


def _assert_same(b, **kw):
    ro, rc, to, tc = _both(b, **kw)
    np.testing.assert_allclose(to, ro, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(tc, rc)
    return to, tc


@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (1, 3), (2, 8)])
def test_mixed_batch_matches_reference(page_size, num_kv_heads, group):
    rng = np.random.default_rng(1000 + page_size * 100 + num_kv_heads * 10 + group)
    seqs = random_seqs(rng, n_decode=2, n_prefill=1, n_chunked=1, max_len=2 * page_size + 5)
    b = make_batch(rng, seqs=seqs, page_size=page_size, num_kv_heads=num_kv_heads, group=group,
                   head_dim=HEAD_DIM)
    _assert_same(b)


@pytest.mark.parametrize("queries_per_block,pages_per_block", [(1, 1), (4, 2), (16, 3)])
def test_block_sizes_do_not_change_the_answer(queries_per_block, pages_per_block):
    """Query blocks that end mid-sequence, page blocks past the table end, a lone-page block."""
    rng = np.random.default_rng(queries_per_block * 10 + pages_per_block)
    b = make_batch(rng, seqs=[(13, 13), (1, 21), (6, 30), (1, 1)], page_size=8, num_kv_heads=1, group=2,
                   head_dim=HEAD_DIM)
    _assert_same(b, tpu_kw=dict(queries_per_block=queries_per_block, pages_per_block=pages_per_block))


@pytest.mark.parametrize("sliding_window,soft_cap", [(6, None), (None, 2.0), (11, 3.0)])
def test_sliding_window_and_soft_cap(sliding_window, soft_cap):
    rng = np.random.default_rng(77 + (sliding_window or 0))
    seqs = random_seqs(rng, n_decode=2, n_prefill=1, n_chunked=1, max_len=40)
    b = make_batch(rng, seqs=seqs, page_size=8, num_kv_heads=2, group=2, head_dim=HEAD_DIM)
    b.q *= 3.0
    to, _ = _assert_same(b, sliding_window=sliding_window, soft_cap=soft_cap)
    # Independent check against the dense oracle too, and that the options change the answer.
    np.testing.assert_allclose(to, dense_attention(b, sm_scale=SCALE, sliding_window=sliding_window,
                                                   soft_cap=soft_cap), atol=1e-5, rtol=1e-5)
    assert not np.allclose(to, dense_attention(b, sm_scale=SCALE), atol=1e-3)


def test_cache_write_and_padding_through_dispatcher():
    """impl="tpu" with interpret passthrough; padded rows give zeros and write nothing."""
    rng = np.random.default_rng(9)
    b = make_batch(rng, seqs=[(5, 12), (1, 8), (3, 3)], page_size=8, num_kv_heads=2, group=3,
                   head_dim=HEAD_DIM, pad_seqs=2, pad_tokens=6)
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=SCALE, impl="tpu", interpret=True))
    out, cache = (np.asarray(x) for x in fn(*b.args()))
    np.testing.assert_array_equal(cache, expected_cache(b))
    n_real = int(b.cu_q_lens[int(b.num_seqs[0])])
    assert np.all(out[n_real:] == 0)
    np.testing.assert_allclose(out, dense_attention(b, sm_scale=SCALE), atol=1e-5, rtol=1e-5)


def test_no_races_with_two_cores():
    """The race detector of interpret mode, with the parallel KV-head axis split over two simulated cores."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # private: races_found flag

    rng = np.random.default_rng(21)
    b = make_batch(rng, seqs=[(9, 9), (1, 14), (4, 20)], page_size=8, num_kv_heads=2, group=3,
                   head_dim=HEAD_DIM)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    out, cache = tpu_rpa(*b.args(), sm_scale=SCALE, interpret=params)
    np.testing.assert_allclose(np.asarray(out), dense_attention(b, sm_scale=SCALE), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache), expected_cache(b))
    assert ipc.races is not None and not ipc.races.races_found
