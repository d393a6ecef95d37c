"""The pure-JAX implementations (pallas_kernels/reference.py, the oracle, and pallas_kernels/cpu.py, what
impl="auto" runs on CPU) against a dense NumPy oracle on random ragged batches; every case runs on both."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention
from rpa_cases import dense_attention, expected_cache, make_batch, random_seqs

HEAD_DIM = 16


@pytest.fixture(params=["reference", "cpu"])
def impl(request):
    return request.param


def _run(b, impl, **kw):
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=HEAD_DIM ** -0.5, impl=impl, **kw))
    out, cache = fn(*b.args())
    return np.asarray(out), np.asarray(cache)


def _check(b, out, cache, **kw):
    want = dense_attention(b, sm_scale=HEAD_DIM ** -0.5, **kw)
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache, expected_cache(b))


@pytest.mark.parametrize("page_size", [8, 16, 32])
@pytest.mark.parametrize("num_kv_heads,group", [(2, 1), (1, 3), (2, 8)])
def test_mixed_batch_matches_dense(page_size, num_kv_heads, group, impl):
    rng = np.random.default_rng(page_size * 100 + num_kv_heads * 10 + group)
    seqs = random_seqs(rng, n_decode=3, n_prefill=2, n_chunked=2, max_len=3 * page_size)
    b = make_batch(rng, seqs=seqs, page_size=page_size, num_kv_heads=num_kv_heads, group=group,
                   head_dim=HEAD_DIM)
    out, cache = _run(b, impl)
    _check(b, out, cache)


@pytest.mark.parametrize("sliding_window", [1, 5, 20])
@pytest.mark.parametrize("page_size", [8, 16])
def test_sliding_window(sliding_window, page_size, impl):
    rng = np.random.default_rng(sliding_window * 7 + page_size)
    seqs = random_seqs(rng, n_decode=2, n_prefill=1, n_chunked=2, max_len=50)
    b = make_batch(rng, seqs=seqs, page_size=page_size, num_kv_heads=2, group=2, head_dim=HEAD_DIM)
    out, cache = _run(b, impl, sliding_window=sliding_window)
    _check(b, out, cache, sliding_window=sliding_window)
    # The window must matter for these lengths: the unwindowed answer differs.
    if sliding_window < 20:
        assert not np.allclose(out, dense_attention(b, sm_scale=HEAD_DIM ** -0.5), atol=1e-3)


def test_soft_cap_and_window_together(impl):
    rng = np.random.default_rng(3)
    seqs = random_seqs(rng, n_decode=2, n_prefill=2, n_chunked=1, max_len=40)
    b = make_batch(rng, seqs=seqs, page_size=16, num_kv_heads=1, group=4, head_dim=HEAD_DIM)
    b.q *= 4.0  # large scores, so the cap bites
    out, cache = _run(b, impl, soft_cap=2.0, sliding_window=9)
    _check(b, out, cache, soft_cap=2.0, sliding_window=9)
    assert not np.allclose(out, dense_attention(b, sm_scale=HEAD_DIM ** -0.5, sliding_window=9), atol=1e-3)


def test_kv_written_to_pages_and_padding_writes_nothing(impl):
    rng = np.random.default_rng(11)
    page_size = 8
    # A chunked row that starts mid-page and crosses a page boundary, a decode row at a page start.
    b = make_batch(rng, seqs=[(6, 11), (1, 9), (4, 4)], page_size=page_size, num_kv_heads=2, group=1,
                   head_dim=HEAD_DIM, pad_seqs=3, pad_tokens=5)
    _, cache = _run(b, impl)
    want = expected_cache(b)
    np.testing.assert_array_equal(cache, want)
    # Exactly the slots of the 11 real new tokens changed; padding rows wrote nothing.
    changed = np.any(cache != b.kv_cache, axis=(2, 3))  # [P, page_size]
    assert changed.sum() == 6 + 1 + 4
    # Spot-check one slot by hand: sequence 0's last token sits at position 10 -> page col 1, slot 2.
    page = b.page_indices[0, 1]
    np.testing.assert_array_equal(cache[page, 2, 0], b.k[5, 0])
    np.testing.assert_array_equal(cache[page, 2, 3], b.v[5, 1])


def test_padding_rows_are_zero_and_ignore_their_inputs(impl):
    rng = np.random.default_rng(5)
    b = make_batch(rng, seqs=[(3, 10), (1, 5)], page_size=8, num_kv_heads=1, group=2, head_dim=HEAD_DIM,
                   pad_tokens=4)
    out, _ = _run(b, impl)
    n_real = int(b.cu_q_lens[int(b.num_seqs[0])])
    assert np.all(out[n_real:] == 0)
    b.q[n_real:] = 1e4
    b.k[n_real:] = np.nan
    out2, cache2 = _run(b, impl)
    np.testing.assert_array_equal(out2, out)
    assert np.isfinite(cache2).all()


@pytest.mark.parametrize("sliding_window", [None, 37])
def test_cpu_long_steps_use_several_tiles_and_context_blocks(sliding_window):
    """T = 512 (four 128-row tiles) with decode rows first and contexts over several 128-token blocks,
    against the dense oracle and the reference implementation."""
    rng = np.random.default_rng(21)
    seqs = [(1, 300), (1, 7), (1, 129)] + [(180, 180), (150, 420), (60, 60)]
    used = sum(q for q, _ in seqs)
    b = make_batch(rng, seqs=seqs, page_size=16, num_kv_heads=3, group=3, head_dim=HEAD_DIM,
                   pad_tokens=512 - used)
    kw = {} if sliding_window is None else {"sliding_window": sliding_window}
    out, cache = _run(b, "cpu", **kw)
    _check(b, out, cache, **kw)
    ref = jax.jit(functools.partial(ragged_paged_attention, sm_scale=HEAD_DIM ** -0.5, impl="reference", **kw))
    np.testing.assert_allclose(out, np.asarray(ref(*b.args())[0]), atol=1e-5, rtol=1e-5)


def test_auto_picks_cpu_on_cpu():
    from pallas_kernels import cpu
    rng = np.random.default_rng(2)
    b = make_batch(rng, seqs=[(1, 40), (5, 5)], page_size=8, num_kv_heads=1, group=2, head_dim=HEAD_DIM)
    calls = []
    orig = cpu.ragged_paged_attention
    try:
        cpu.ragged_paged_attention = lambda *a, **k: calls.append(1) or orig(*a, **k)
        ragged_paged_attention(*b.args(), sm_scale=1.0)
    finally:
        cpu.ragged_paged_attention = orig
    assert calls == [1] and jax.default_backend() == "cpu"
