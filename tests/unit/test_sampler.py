"""The on-device sampler against NumPy versions of their formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from aphrodite_jax.sampling.sampler import (make_sampling_metadata, apply_chain, prompt_logprobs,
                                            sample, seed_key_data)
from aphrodite_jax.sampling import process_logits
from aphrodite_jax.sampling_params import SamplingParams as SP

B, V = 8, 64
_process = jax.jit(apply_chain)  # one compiled program shared by the filter tests
WIDTHS = dict(bias_width=8, allowed_width=8, history_width=32, dry_width=8)  # one shape for all tests


def _md(rows, **kw):
    return make_sampling_metadata(rows, B, V, **{**WIDTHS, **kw})


def _logits(seed=0, scale=2.0):
    return np.random.default_rng(seed).normal(size=(B, V)).astype(np.float32) * scale


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x[np.isfinite(x)])
    z = np.log(np.sum(np.exp(x - m)))
    return x - m - z


# --- NumPy versions of the formulas (one row [V]) --------------------------------------------
def np_top_k(l, k):
    if k <= 0:
        return l
    kth = np.sort(l)[::-1][min(k, len(l)) - 1]
    return np.where(l >= kth, l, -np.inf)


def np_top_p(l, p):
    probs = np.exp(_log_softmax(l))
    order = np.argsort(probs)  # ascending
    remove = np.cumsum(probs[order]) <= 1 - p
    remove[-1] = False
    out = l.copy()
    out[order[remove]] = -np.inf
    return out


def np_min_p(l, m):
    probs = np.exp(_log_softmax(l))
    return np.where(probs < m * probs.max(), -np.inf, l)


def np_penalties(l, prompt, output, rep, freq, pres):
    l = l.astype(np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    l[seen] = np.where(l[seen] > 0, l[seen] / rep, l[seen] * rep)
    counts = np.bincount(np.asarray(output, int), minlength=len(l))
    return l - freq * counts - pres * (counts > 0)


def np_chain(l, sp, prompt=(), output=()):
    """Default order: penalties, temperature, top-k then top-p, min-p."""
    l = np_penalties(l, prompt, output, sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty)
    if not sp.is_greedy:
        l = l / sp.temperature
        l = np_top_p(np_top_k(l, sp.top_k), sp.top_p) if (sp.top_k > 0 or sp.top_p < 1) else l
        l = np_min_p(l, sp.min_p) if sp.min_p > 0 else l
    return l


def _assert_same_distribution(got, want):
    got_lp, want_lp = _log_softmax(got), _log_softmax(want)
    np.testing.assert_array_equal(np.isfinite(got_lp), np.isfinite(want_lp))
    fin = np.isfinite(want_lp)
    np.testing.assert_allclose(got_lp[fin], want_lp[fin], rtol=1e-4, atol=1e-4)


def via_api(rows, logits):
    """The research API `aphrodite_jax.sampling.process_logits` on (params, seed, idx[, prompt,
    output]) rows: the engine's chain over a [B, V] array."""
    params = [r[0] for r in rows]
    hist = [(list(r[3]) if len(r) > 3 else [], list(r[4]) if len(r) > 4 else []) for r in rows]
    return np.asarray(process_logits(logits[:len(rows)], params, hist, seeds=[r[1] for r in rows]))


def _check_rows(rows, logits):
    got = via_api(rows, logits)
    for i, r in enumerate(rows):
        _assert_same_distribution(got[i], np_chain(logits[i], r[0], *r[3:]))
    return got


# --- filters vs NumPy -----------------------------------------------------------------------
def test_temperature_rows():
    logits = _logits(1)
    rows = [(SP(temperature=t), 0, 0) for t in (1.0, 0.5, 2.0, 0.01, 1.3)] + [(SP.greedy(), 0, 0)]
    got = _check_rows(rows, logits)
    np.testing.assert_allclose(got[0], logits[0], rtol=1e-6)  # off row untouched


def test_top_k_top_p_rows():
    logits = _logits(2)
    rows = [(SP(top_k=k, top_p=p), 0, 0) for k, p in
            [(-1, 1.0), (5, 1.0), (1, 1.0), (-1, 0.9), (-1, 0.3), (10, 0.5), (100, 0.95), (3, 0.999)]]
    got = _check_rows(rows, logits)
    np.testing.assert_array_equal(got[0], logits[0])
    assert np.isfinite(got[1]).sum() == 5 and np.isfinite(got[2]).sum() == 1


def test_min_p_rows():
    logits = _logits(3)
    rows = [(SP(min_p=m), 0, 0) for m in (0.0, 0.05, 0.2, 0.5, 1.0)]
    got = _check_rows(rows, logits)
    np.testing.assert_array_equal(got[0], logits[0])
    assert np.isfinite(got[4]).sum() == 1


def test_penalties_rows():
    logits = _logits(4)
    prompt, out = [1, 2, 3, 3, 40], [3, 7, 7, 7, 50]
    rows = [(SP(), 0, 0, prompt, out),
            (SP(repetition_penalty=1.5), 0, 0, prompt, out),
            (SP(frequency_penalty=0.7), 0, 0, prompt, out),
            (SP(presence_penalty=-1.2), 0, 0, prompt, out),
            (SP(repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.4), 0, 0, prompt, out),
            (SP(repetition_penalty=2.0, temperature=0.7, top_k=20), 0, 0, [5], [])]
    got = via_api(rows, logits)
    for i, r in enumerate(rows[:5]):  # penalties alone: compare raw values, not just the distribution
        want = np_penalties(logits[i], prompt, out, r[0].repetition_penalty, r[0].frequency_penalty,
                            r[0].presence_penalty)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    _assert_same_distribution(got[5], np_chain(logits[5], rows[5][0], [5], []))


def test_chain_of_all_filters():
    logits = _logits(5)
    rows = [(SP(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                frequency_penalty=0.2), 0, 0, [1, 2], [2, 9]),
            (SP(temperature=1.5, top_p=0.7, min_p=0.02), 0, 0)]
    _check_rows(rows, logits)


@pytest.mark.parametrize("v", (1000, 49152))
def test_core_samplers_at_real_vocab_sizes(v):
    """Temperature, top-k, top-p, min-p and the penalties through process_logits at vocab 1,000 and
    49,152, rows with different parameters and rows with each sampler off, vs NumPy."""
    rng = np.random.default_rng(v)
    logits = (rng.normal(size=(8, v)) * 3).astype(np.float32)
    prompt, out = [int(t) for t in rng.integers(0, v, 30)], [int(t) for t in rng.integers(0, v, 12)] * 2
    rows = [(SP(), 0, 0, prompt, out),
            (SP(temperature=0.6), 0, 0, prompt, out),
            (SP(top_k=40), 0, 0, prompt, out),
            (SP(top_p=0.8), 0, 0, prompt, out),
            (SP(min_p=0.1, temperature=1.4), 0, 0, prompt, out),
            (SP(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.5), 0, 0, prompt, out),
            (SP(temperature=0.9, top_k=500, top_p=0.95, min_p=0.01, repetition_penalty=1.1), 0, 0, prompt, out),
            (SP.greedy(presence_penalty=1.0), 0, 0, prompt, out)]
    got = via_api(rows, logits)
    np.testing.assert_array_equal(got[0], logits[0])
    for i, r in enumerate(rows):
        _assert_same_distribution(got[i], np_chain(logits[i], r[0], prompt, out))


def test_logit_bias_allowed_bans_min_tokens():
    logits = _logits(6)
    rows = [(SP(logit_bias={3: 100.0}), 0, 0),
            (SP(allowed_token_ids=[4, 9, 11]), 0, 0),
            (SP(custom_token_bans=[int(np.argmax(logits[2]))]), 0, 0),
            (SP(min_tokens=3, stop_token_ids=[5]), 0, 1, [], [0]),  # 1 output < 3: EOS and 5 banned
            (SP(min_tokens=1, stop_token_ids=[5]), 0, 1, [], [0])]  # 1 output >= 1: nothing banned
    md = _md(rows, eos_token_ids=[int(np.argmax(logits[3]))])
    got = np.asarray(_process(jnp.asarray(logits), jax.device_put(md)))
    np.testing.assert_allclose(got[0, 3], logits[0, 3] + 100.0, rtol=1e-6)
    assert sorted(np.flatnonzero(np.isfinite(got[1]))) == [4, 9, 11]
    assert got[2, np.argmax(logits[2])] == -np.inf and np.isfinite(got[2]).sum() == V - 1
    eos = int(np.argmax(logits[3]))
    assert got[3, eos] == -np.inf and got[3, 5] == -np.inf and np.isfinite(got[3]).sum() == V - 2
    np.testing.assert_array_equal(got[4], logits[4])
    out = sample(jnp.asarray(logits), jax.device_put(md), max_num_logprobs=4)
    assert int(out.token_ids[0]) == 3 and int(out.token_ids[1]) in (4, 9, 11)


# --- selection and logprobs ------------------------------------------------------------------
def test_top_k_1_equals_greedy_and_greedy_rows():
    logits = _logits(7)
    rows = [(SP(temperature=1.7, top_k=1, seed=s), s, s) for s in range(4)] + \
           [(SP.greedy(), 11, 0), (SP.greedy(repetition_penalty=3.0), 0, 0, [int(np.argmax(logits[5]))], [])]
    md = jax.device_put(_md(rows))
    out = sample(jnp.asarray(logits), md, max_num_logprobs=4)
    np.testing.assert_array_equal(np.asarray(out.token_ids[:5]), np.argmax(logits[:5], axis=-1))
    want5 = np.argmax(np_chain(logits[5], rows[5][0], *rows[5][3:]))
    assert int(out.token_ids[5]) == want5 != int(np.argmax(logits[5]))
    # all_greedy (a separate program) agrees on greedy rows
    g = sample(jnp.asarray(logits), md, max_num_logprobs=4, all_greedy=True)
    np.testing.assert_array_equal(np.asarray(g.token_ids[4:6]), np.asarray(out.token_ids[4:6]))


def test_returned_logprobs_are_processed_distribution():
    logits = _logits(8)
    rows = [(SP(temperature=0.6, top_k=8, seed=5), 5, 3), (SP.greedy(), 0, 0), (SP(min_p=0.3, seed=1), 1, 0)]
    out = sample(jnp.asarray(logits), jax.device_put(_md(rows)), max_num_logprobs=4)
    for i, r in enumerate(rows):
        want = _log_softmax(np_chain(logits[i], r[0]))
        t = int(out.token_ids[i])
        assert np.isfinite(want[t])
        np.testing.assert_allclose(float(out.logprobs[i]), want[t], rtol=1e-4, atol=1e-4)
        assert int(out.ranks[i]) == 1 + int(np.sum(want > want[t] + 1e-6))
        order = np.argsort(-want)[:4]
        np.testing.assert_array_equal(np.asarray(out.topk_ids[i]), order)
        np.testing.assert_allclose(np.asarray(out.topk_logprobs[i]), np.maximum(want[order], -9999.0),
                                   rtol=1e-4, atol=1e-4)
    assert float(np.min(out.topk_logprobs)) >= -9999.0  # truncated tokens are clamped, never -inf


def test_seeded_draws_reproduce_and_ignore_other_rows():
    logits = _logits(9, scale=0.5)
    row = SP(temperature=1.0, seed=77)
    a_rows = [(row, 77, i) for i in range(4)] + [(SP(seed=1), 1, 0)]
    b_rows = [(SP(temperature=0.3, top_p=0.5, seed=2), 2, 9), (SP.greedy(), 0, 0)] + [(row, 77, i) for i in range(4)]
    la = logits.copy()
    lb = np.concatenate([_logits(10)[:2], np.repeat(logits[:1], 4, 0), _logits(11)[:2]])
    la[:4] = logits[0]
    ta = np.asarray(sample(jnp.asarray(la), jax.device_put(_md(a_rows))).token_ids)
    tb = np.asarray(sample(jnp.asarray(lb), jax.device_put(_md(b_rows))).token_ids)
    np.testing.assert_array_equal(ta[:4], tb[2:6])
    ta2 = np.asarray(sample(jnp.asarray(la), jax.device_put(_md(a_rows))).token_ids)
    np.testing.assert_array_equal(ta, ta2)
    many = [(row, 77, i) for i in range(B)]
    drawn = np.asarray(sample(jnp.asarray(np.repeat(logits[:1], B, 0)), jax.device_put(_md(many))).token_ids)
    assert len(set(drawn.tolist())) > 1  # the output index changes the draw


def test_seed_key_data_matches_prng_key():
    for seed in (0, 1, 12345, 2**31 - 1):
        np.testing.assert_array_equal(seed_key_data(seed), np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))))


@pytest.mark.parametrize("sp", [SP(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02, seed=3),
                                SP(temperature=1.3, repetition_penalty=1.3, seed=4)])
def test_draw_frequencies_match_processed_probabilities(sp):
    n = 20000
    logits = _logits(12, scale=1.0)
    rows = [(sp, sp.seed, 0, [1, 2, 3], [4, 4])]
    md = jax.device_put(_md(rows))
    lg = jnp.asarray(logits)

    @jax.jit
    def draws(idx):  # [n] output indices -> [n] tokens of row 0
        return jax.vmap(lambda i: sample(lg, md.replace(output_index=md.output_index.at[0].set(i))).token_ids[0])(idx)

    tokens = np.asarray(draws(jnp.arange(n, dtype=jnp.int32)))
    probs = np.exp(_log_softmax(np_chain(logits[0], sp, [1, 2, 3], [4, 4])))
    counts = np.bincount(tokens, minlength=V)
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    expected = probs[keep] * n
    assert expected.min() > 1.0 or keep.sum() > 1
    _, pval = stats.chisquare(counts[keep], expected)
    assert pval > 0.001


def test_parameter_values_do_not_recompile():
    logits = jnp.asarray(_logits(13))
    sample(logits, jax.device_put(_md([(SP(temperature=0.5, seed=1), 1, 0)])), max_num_logprobs=4)
    size = sample._cache_size()
    for sp in (SP(temperature=0.9, top_k=3, seed=2), SP(min_p=0.4, presence_penalty=1.0, seed=9),
               SP.greedy(logit_bias={1: 5.0})):
        sample(logits, jax.device_put(_md([(sp, 5, 3, [1], [2])])), max_num_logprobs=4)
    assert sample._cache_size() == size


def test_prompt_logprobs_vs_numpy():
    logits = _logits(14)
    nxt = np.arange(B, dtype=np.int32) * 3
    out = prompt_logprobs(jnp.asarray(logits), jnp.asarray(nxt), num_logprobs=3)
    for i in range(B):
        want = _log_softmax(logits[i])
        np.testing.assert_allclose(float(out.logprobs[i]), want[nxt[i]], rtol=1e-5, atol=1e-5)
        assert int(out.ranks[i]) == 1 + int(np.sum(want > want[nxt[i]]))
        np.testing.assert_array_equal(np.asarray(out.topk_ids[i]), np.argsort(-want)[:3])


def test_top_k_ties_survive():
    logits = np.full((B, V), -5.0, np.float32)
    logits[:, :3] = 2.0
    rows = [(SP(top_k=2), 0, 0), (SP(top_k=2, top_p=0.1), 0, 0)]
    got = np.asarray(_process(jnp.asarray(logits), jax.device_put(_md(rows))))
    assert np.isfinite(got[0]).sum() == 3 and np.isfinite(got[1]).sum() == 3


def test_registry_adds_a_step_only_for_active_rows():
    from aphrodite_jax.sampling.registry import register_sampler, registered_steps, unregister_sampler

    @register_sampler("test_shift", fields={"test_shift": (0.0, np.float32)},
                      active=lambda p: p["test_shift"] != 0.0,
                      host=lambda sp: {"test_shift": 3.0 if sp.seed == 42 else 0.0})
    def _shift(logits, p, md):  # adds a per-row constant to token 0
        return logits.at[:, 0].add(p["test_shift"])

    try:
        assert registered_steps()[-1].name == "test_shift"
        logits = _logits(15)
        rows = [(SP(seed=42), 42, 0), (SP(seed=1), 1, 0)]
        md = _md(rows)
        np.testing.assert_array_equal(md.params["test_shift"][:2], [3.0, 0.0])
        got = np.asarray(jax.jit(apply_chain)(jnp.asarray(logits), jax.device_put(md)))
        np.testing.assert_allclose(got[0, 0], logits[0, 0] + 3.0, rtol=1e-6)
        np.testing.assert_array_equal(got[1:], logits[1:])
    finally:
        unregister_sampler("test_shift")
    assert "test_shift" not in [s.name for s in registered_steps()]


@pytest.mark.parametrize("v", (1000, 49152))
def test_top_k_top_p_on_peaky_rows_vs_numpy(v):
    """Top-k / top-p on peaky rows whose kept sets are small (the usual serving case), at real vocab
    sizes; the check below confirms the cutoffs fall inside the top 256 tokens."""
    rng = np.random.default_rng(v + 5)
    logits = (rng.normal(size=(6, v)) * 6).astype(np.float32)  # peaky: the top 256 hold most mass
    rows = [(SP(), 0, 0), (SP(top_k=40), 0, 0), (SP(top_p=0.8), 0, 0), (SP(top_k=200, top_p=0.5), 0, 0),
            (SP(top_k=1), 0, 0), (SP(top_p=0.95, temperature=1.2), 0, 0)]
    for i, (sp, _, _) in enumerate(rows):
        l = logits[i].astype(np.float64) / (sp.temperature if sp.temperature > 0 else 1.0)
        top = np.sort(l)[::-1][:256]
        if sp.top_k > 0:
            top = top[:sp.top_k]
        if sp.top_p < 1:
            pr = np.exp(top - np.logaddexp.reduce(l if sp.top_k <= 0 else top))
            assert np.cumsum(pr)[-1] >= sp.top_p and np.argmax(np.cumsum(pr) >= sp.top_p) < len(top) - 1
    got = via_api(rows, logits)
    np.testing.assert_array_equal(got[0], logits[0])
    for i, r in enumerate(rows):
        _assert_same_distribution(got[i], np_chain(logits[i], r[0]))
    assert np.isfinite(got[1]).sum() == 40 and np.isfinite(got[4]).sum() == 1


def test_fast_argmax_matches_argmax_with_ties_and_masks():
    from aphrodite_jax.sampling.sampler import max_and_argmax

    fast_argmax = lambda a: max_and_argmax(a)[1]  # noqa: E731
    x = np.random.default_rng(3).normal(size=(6, 49152)).astype(np.float32)
    x[1, [7, 900, 40000]] = 9.0  # ties: the first index wins
    x[2] = -np.inf  # every token banned
    x[3, :] = np.float32(-1.0)
    x[4, 49151] = 50.0  # the last id
    x[5, [127, 128]] = 7.0  # a tie across the block edge (blocks of 128)
    np.testing.assert_array_equal(np.asarray(jax.jit(fast_argmax)(x)), np.argmax(x, axis=-1))
    # A vocabulary off the block grid (padded with -inf), and a NaN row: some id in range (the CPU max
    # reduce may skip NaNs, so which one is the backend's).
    y = np.random.default_rng(4).normal(size=(4, 1000)).astype(np.float32)
    y[1, 999] = 9.0
    y[2] = -np.inf
    y[3, 17] = np.nan
    got = np.asarray(jax.jit(fast_argmax)(y))
    np.testing.assert_array_equal(got[:3], np.argmax(y[:3], axis=-1))
    assert 0 <= got[3] < 1000


def test_greedy_fast_path_logprob_and_rank_vs_full_path():
    logits = _logits(12)
    logits[2, [3, 9]] = 20.0  # a tie at the top
    rows = [(SP.greedy(), 0, 0), (SP.greedy(logit_bias={5: 30.0}), 0, 0), (SP.greedy(), 0, 0)]
    md = jax.device_put(_md(rows))
    fast = sample(jnp.asarray(logits), md, max_num_logprobs=0, all_greedy=True)
    full = sample(jnp.asarray(logits), md, max_num_logprobs=4, all_greedy=True)
    np.testing.assert_array_equal(np.asarray(fast.token_ids), np.asarray(full.token_ids))
    assert int(fast.token_ids[1]) == 5 and int(fast.token_ids[2]) == 3
    np.testing.assert_allclose(np.asarray(fast.logprobs), np.asarray(full.logprobs), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fast.ranks), np.asarray(full.ranks))
    biased = logits[:3].copy()
    biased[1, 5] += 30.0
    want = [_log_softmax(biased[i])[int(fast.token_ids[i])] for i in range(3)]
    np.testing.assert_allclose(np.asarray(fast.logprobs)[:3], want, rtol=1e-4, atol=1e-4)


def test_blocked_draw_is_the_inverse_cdf_and_skips_zero_probability_ids():
    from aphrodite_jax.sampling.sampler import _blocked_draw
    rng = np.random.default_rng(4)
    p = rng.random((64, 1000)).astype(np.float32) ** 4
    p[:, rng.random(1000) < 0.5] = 0.0  # many zero-probability ids, some whole blocks
    p[:, 384:512] = 0.0
    unif = rng.random(64).astype(np.float32)
    unif[:4] = [0.0, 0.999999, 0.5, 1e-7]
    got = np.asarray(jax.jit(_blocked_draw)(jnp.asarray(p), jnp.asarray(unif)))
    cdf = np.cumsum(p.astype(np.float64), axis=-1)
    u = (1.0 - unif.astype(np.float64)) * cdf[:, -1]
    want = np.argmax(cdf >= u[:, None] * (1 - 1e-6), axis=-1)
    assert np.all(p[np.arange(64), got] > 0)
    # float32 sums differ from float64 ones by rounding: allow a neighbouring nonzero id at a boundary
    assert np.mean(got == want) > 0.9
    assert np.all(np.abs(cdf[np.arange(64), got] - u) <= 1e-3 * cdf[:, -1] + p[np.arange(64), got])
