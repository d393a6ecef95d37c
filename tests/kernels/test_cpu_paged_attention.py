"""The C++ CPU paged-attention kernel (pallas_kernels/native/paged_attention.cc, what impl="cpu" runs
where it builds) against the dense float64 oracle and the pure-JAX reference, on ragged batches with the
model's head size: decode rows, fresh prefills longer than one query tile, chunks after cached context,
GQA groups, odd lengths, page boundaries, padding sequences and padding rows."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from pallas_kernels import cpu_paged_attention as K
from pallas_kernels import ragged_paged_attention
from rpa_cases import dense_attention, expected_cache, make_batch, random_seqs

AVAILABLE, WHY = K.kernel_status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"CPU paged-attention kernel unavailable: {WHY}")


def _run(b, impl, head_dim, **kw):
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=head_dim ** -0.5, impl=impl, **kw))
    out, cache = fn(*b.args())
    return np.asarray(out), np.asarray(cache)


def _check(b, head_dim, **kw):
    """The kernel matches the dense oracle and the reference; the cache holds exactly this step's K/V."""
    out, cache = _run(b, "cpu", head_dim, **kw)
    np.testing.assert_allclose(out, dense_attention(b, sm_scale=head_dim ** -0.5, **kw), atol=2e-5, rtol=2e-5)
    ref, _ = _run(b, "reference", head_dim, **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(cache, expected_cache(b))
    pad_from = int(b.cu_q_lens[int(b.num_seqs[0])])
    assert pad_from < out.shape[0] and not out[pad_from:].any()  # padding rows are zero
    return out


def test_kernel_is_what_cpu_runs():
    """impl="cpu" lowers to the FFI custom call (not the pure-JAX loops) for the model's shapes."""
    rng = np.random.default_rng(0)
    b = make_batch(rng, seqs=[(1, 20)], page_size=16, num_kv_heads=3, group=3, head_dim=64)
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.125, impl="cpu"))
    text = fn.lower(*b.args()).as_text()
    assert K.TARGET in text and "dot_general" not in text


@pytest.mark.parametrize("context", [1, 15, 16, 17, 300])
def test_decode_rows(context):
    """Batch-32-style decode: one row per sequence, contexts ending on, before and after page boundaries."""
    rng = np.random.default_rng(context)
    seqs = [(1, context + int(d)) for d in rng.integers(0, 3, size=6)]
    b = make_batch(rng, seqs=seqs, page_size=16, num_kv_heads=3, group=3, head_dim=64)
    _check(b, 64)


@pytest.mark.parametrize("q_len", [1, 31, 32, 33, 100])
def test_fresh_prefill_over_query_tiles(q_len):
    """A fresh prompt: causal masking inside the chunk, across query-tile edges (Q_TILE = 32)."""
    rng = np.random.default_rng(q_len)
    b = make_batch(rng, seqs=[(q_len, q_len)], page_size=16, num_kv_heads=3, group=3, head_dim=64)
    _check(b, 64)


@pytest.mark.parametrize("q_len,kv_len", [(40, 41), (7, 300), (33, 97), (64, 80)])
def test_chunk_after_cached_context(q_len, kv_len):
    """Chunked prefill: rows see all earlier cached context plus the chunk's causal part."""
    rng = np.random.default_rng(q_len * 1000 + kv_len)
    b = make_batch(rng, seqs=[(q_len, kv_len)], page_size=16, num_kv_heads=3, group=3, head_dim=64)
    _check(b, 64)


@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("num_kv_heads,group", [(3, 3), (1, 8), (2, 1), (4, 2)])
def test_mixed_ragged_batch(page_size, num_kv_heads, group):
    """Decode, prefill and chunked rows in one ragged batch with padding sequences and padding rows."""
    rng = np.random.default_rng(page_size * 10 + num_kv_heads * 3 + group)
    seqs = random_seqs(rng, n_decode=5, n_prefill=2, n_chunked=3, max_len=5 * page_size + 3)
    b = make_batch(rng, seqs=seqs, page_size=page_size, num_kv_heads=num_kv_heads, group=group, head_dim=64,
                   pad_seqs=3, pad_tokens=5)
    _check(b, 64)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_other_head_dims(head_dim):
    rng = np.random.default_rng(head_dim)
    seqs = random_seqs(rng, n_decode=3, n_prefill=1, n_chunked=2, max_len=70)
    b = make_batch(rng, seqs=seqs, page_size=16, num_kv_heads=2, group=2, head_dim=head_dim)
    _check(b, head_dim)


@pytest.mark.parametrize("sliding_window", [1, 5, 20, 40])
def test_sliding_window(sliding_window):
    rng = np.random.default_rng(sliding_window)
    seqs = random_seqs(rng, n_decode=3, n_prefill=1, n_chunked=2, max_len=90)
    b = make_batch(rng, seqs=seqs, page_size=16, num_kv_heads=2, group=3, head_dim=64)
    out = _check(b, 64, sliding_window=sliding_window)
    assert not np.allclose(out, dense_attention(b, sm_scale=64 ** -0.5), atol=1e-3)  # the window matters


def test_soft_cap_and_window():
    rng = np.random.default_rng(5)
    seqs = random_seqs(rng, n_decode=2, n_prefill=2, n_chunked=2, max_len=60)
    b = make_batch(rng, seqs=seqs, page_size=16, num_kv_heads=1, group=4, head_dim=64)
    b.q *= 4.0  # large scores, so the cap bites
    out = _check(b, 64, soft_cap=2.0, sliding_window=17)
    assert not np.allclose(out, dense_attention(b, sm_scale=0.125, sliding_window=17), atol=1e-3)


def test_no_real_rows():
    """num_seqs = 0 (an all-padding step): every output row is zero and the cache is unchanged."""
    rng = np.random.default_rng(9)
    b = make_batch(rng, seqs=[(3, 10)], page_size=16, num_kv_heads=3, group=3, head_dim=64)
    b.num_seqs = np.array([0], np.int32)
    out, cache = _run(b, "cpu", 64)
    assert not out.any()
    np.testing.assert_array_equal(cache, b.kv_cache)


def test_unbuildable_kernel_falls_back_with_a_warning(monkeypatch, caplog):
    """Where the kernel cannot be built, impl="cpu" logs why once and runs the pure-JAX path (same answer)."""
    monkeypatch.setattr(K, "kernel_status", lambda: (False, "no C++ compiler found (test)"))
    K.available_or_warn.cache_clear()
    try:
        rng = np.random.default_rng(4)
        b = make_batch(rng, seqs=[(1, 20), (5, 5)], page_size=16, num_kv_heads=3, group=3, head_dim=64)
        with caplog.at_level("WARNING"):
            fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.125, impl="cpu"))
            assert K.TARGET not in fn.lower(*b.args()).as_text()
        assert "paged-attention kernel is unavailable (no C++ compiler found (test))" in caplog.text
        out, cache = (np.asarray(x) for x in fn(*b.args()))
        np.testing.assert_allclose(out, dense_attention(b, sm_scale=0.125), atol=2e-5, rtol=2e-5)
        np.testing.assert_array_equal(cache, expected_cache(b))
    finally:
        K.available_or_warn.cache_clear()
