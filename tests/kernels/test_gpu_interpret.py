"""The Pallas GPU (Triton backend) kernel, run on CPU with interpret=True, against the reference."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention
from rpa_cases import dense_attention, expected_cache, make_batch, random_seqs

HEAD_DIM = 16
SCALE = HEAD_DIM ** -0.5


def _run(b, impl, **kw):
    interp = {"interpret": True} if impl == "gpu" else {}
    fn = jax.jit(functools.partial(ragged_paged_attention, sm_scale=SCALE, impl=impl, **interp, **kw))
    return tuple(np.asarray(x) for x in fn(*b.args()))


@pytest.mark.parametrize("page_size,num_kv_heads,group", [(8, 2, 1), (16, 1, 3), (32, 2, 8), (16, 3, 2)])
def test_mixed_batch_matches_reference(page_size, num_kv_heads, group):
    rng = np.random.default_rng(2000 + page_size * 100 + num_kv_heads * 10 + group)
    seqs = random_seqs(rng, n_decode=2, n_prefill=1, n_chunked=1, max_len=2 * page_size + 5)
    b = make_batch(rng, seqs=seqs, page_size=page_size, num_kv_heads=num_kv_heads, group=group,
                   head_dim=HEAD_DIM)
    ro, rc = _run(b, "reference")
    go, gc = _run(b, "gpu")
    np.testing.assert_allclose(go, ro, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(gc, expected_cache(b))
    n_real = int(b.cu_q_lens[int(b.num_seqs[0])])
    assert np.all(go[n_real:] == 0)


@pytest.mark.parametrize("sliding_window,soft_cap", [(6, None), (11, 3.0)])
def test_sliding_window_and_soft_cap(sliding_window, soft_cap):
    rng = np.random.default_rng(88 + sliding_window)
    seqs = random_seqs(rng, n_decode=2, n_prefill=1, n_chunked=1, max_len=40)
    b = make_batch(rng, seqs=seqs, page_size=8, num_kv_heads=1, group=3, head_dim=HEAD_DIM)
    b.q *= 3.0
    go, _ = _run(b, "gpu", sliding_window=sliding_window, soft_cap=soft_cap)
    want = dense_attention(b, sm_scale=SCALE, sliding_window=sliding_window, soft_cap=soft_cap)
    np.testing.assert_allclose(go, want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(go, dense_attention(b, sm_scale=SCALE), atol=1e-3)
