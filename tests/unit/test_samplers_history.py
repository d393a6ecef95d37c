"""DRY, no-repeat-ngram, Mirostat v2, token_ban_ranges and per-request order, through the research
API `process_logits`, against plain NumPy versions of their definitions."""
import math
import zlib

import numpy as np
import pytest

from aphrodite_jax.sampling import process_logits
from aphrodite_jax.sampling.filters_history import mirostat_update
from aphrodite_jax.sampling.registry import register_sampler, unregister_sampler
from aphrodite_jax.sampling_params import SamplingParams as SP

VOCABS = (1000, 49152)


def _logits(b, v, seed, scale=3.0):
    return (np.random.default_rng(seed).normal(size=(b, v)) * scale).astype(np.float32)


def _lsm(x):
    x = np.asarray(x, np.float64)
    fin = np.isfinite(x)
    m = np.max(x[fin])
    return x - m - np.log(np.sum(np.exp(x[fin] - m)))


# --- NumPy references (one row, float64) -------------------------------------------------------
def np_no_repeat_ngram(l, x, n):
    """HF: ban t when (last n-1 tokens, t) already occurs in x."""
    if n <= 0 or len(x) < n:
        return l
    g = tuple(x[len(x) - n + 1:]) if n > 1 else ()
    banned = {x[i + n - 1] for i in range(len(x) - n + 1) if tuple(x[i:i + n - 1]) == g}
    out = l.copy()
    out[sorted(banned)] = -np.inf
    return out


def np_dry(l, x, mult, base, allowed, breakers, rng=0, max_ngram=12, max_occ=8, early=8):
    """DRY as defined, literally, with docs/decisions.md D5 (penalise len_t >= allowed_length only)."""
    if rng > 0:
        x = x[-rng:]
    if len(x) < 2 or x[-1] in breakers:
        return l
    last = len(x) - 1
    occ = [i for i in range(last) if x[i] == x[last]][-max_occ:] if max_occ > 0 else []
    lens = {}
    for i in reversed(occ):
        m = 0
        while (m + 1 <= min(i, max_ngram) and x[i - m - 1] == x[last - m - 1]
               and x[i - m - 1] not in breakers):
            m += 1
        if m > 0:
            t = x[i + 1]
            lens[t] = max(lens.get(t, 0), m + 1)
        if m + 1 >= early:
            break
    out = l.copy()
    for t, n in lens.items():
        if n >= allowed:
            out[t] -= mult * base ** (n - allowed)
    return out


def np_mirostat(l, mu):
    s = -_lsm(l) / math.log(2.0)
    return np.where((s > mu) & (l < l.max()), -np.inf, l)


def _same_values(got, want, atol=1e-4):
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-5, atol=atol)


def _repetitive_history(rng, length, vocab_small=12):
    """Token ids drawn from a small alphabet, with a repeated phrase, so n-grams and DRY matches occur."""
    phrase = list(rng.integers(0, vocab_small, 6))
    x = list(rng.integers(0, vocab_small, length // 2)) + phrase + list(rng.integers(0, vocab_small, 5)) + phrase[:4]
    return [int(t) for t in x]


@pytest.mark.parametrize("v", VOCABS)
def test_no_repeat_ngram_rows_vs_numpy(v):
    rng = np.random.default_rng(v)
    sizes = [0, 1, 2, 3, 4, 5]
    hists = [_repetitive_history(rng, 40 + 7 * i) for i in range(len(sizes))]
    logits = _logits(len(sizes), v, seed=1)
    # rows: prompt/output split differently; the n-gram check covers both (docs/decisions.md D4)
    got = np.asarray(process_logits(logits, [SP(no_repeat_ngram_size=n) for n in sizes],
                                    [(h[:10], h[10:]) for h in hists]))
    np.testing.assert_array_equal(got[0], logits[0])  # off row untouched
    for i, n in enumerate(sizes[1:], 1):
        _same_values(got[i], np_no_repeat_ngram(logits[i].astype(np.float64), hists[i], n))
    assert np.isinf(got[2]).sum() >= 1 and np.isinf(got[1]).sum() == len(set(hists[1]))


@pytest.mark.parametrize("v", VOCABS)
def test_dry_rows_vs_numpy(v):
    rng = np.random.default_rng(v + 1)
    breakers = [3, 7]
    kws = [None,
           dict(dry_multiplier=0.8),
           dict(dry_multiplier=1.5, dry_base=2.0, dry_allowed_length=1),
           dict(dry_multiplier=0.8, dry_allowed_length=3, dry_range=30),
           dict(dry_multiplier=0.5, dry_max_occurrences=2, dry_early_exit_match_len=3),
           dict(dry_multiplier=0.8, dry_max_ngram=2),
           dict(dry_multiplier=0.8, dry_sequence_breaker_ids=breakers)]
    hists = [_repetitive_history(rng, 50 + 3 * i, vocab_small=8) for i in range(len(kws))]
    hists[1] = [1, 2, 4, 5, 9, 1, 2, 4, 5, 6, 11, 1, 2, 4, 5]  # 9 (and 6) follow a 4-token match
    logits = _logits(len(kws), v, seed=2)
    params = [SP(**(kw or {})) for kw in kws]
    got = np.asarray(process_logits(logits, params, [(h[:20], h[20:]) for h in hists]))
    np.testing.assert_array_equal(got[0], logits[0])
    changed = 0
    for i, kw in enumerate(kws[1:], 1):
        sp = params[i]
        want = np_dry(logits[i].astype(np.float64), hists[i], sp.dry_multiplier, sp.dry_base,
                      sp.dry_allowed_length, set(sp.dry_sequence_breaker_ids), sp.dry_range,
                      sp.dry_max_ngram, sp.dry_max_occurrences, sp.dry_early_exit_match_len)
        _same_values(got[i], want)
        changed += not np.allclose(got[i], logits[i])
    assert changed >= 4
    assert got[1][9] == pytest.approx(logits[1][9] - 0.8 * 1.75 ** (4 - 2), abs=1e-4)


def test_dry_skips_when_last_token_is_a_breaker():
    logits = _logits(1, 1000, seed=3)
    h = [1, 2, 4, 5, 1, 2, 4, 5]
    got = np.asarray(process_logits(logits, [SP(dry_multiplier=1.0, dry_sequence_breaker_ids=[5])], [h]))
    np.testing.assert_array_equal(got, logits)
    got = np.asarray(process_logits(logits, [SP(dry_multiplier=1.0)], [h]))
    assert got[0][1] < logits[0][1]  # without the breaker, the token after the match is penalised


def test_token_ban_ranges_follow_output_length_and_replace_custom_bans():
    v = 1000
    logits = _logits(4, v, seed=4)
    ranges = [([10, 11], 0, 2), ([20], 3, 1)]
    params = [SP(token_ban_ranges=ranges, custom_token_bans=[30])] * 4
    outs = [[], [5], [5, 6, 7], [5, 6, 7, 8]]  # output lengths 0, 1, 3, 4
    got = np.asarray(process_logits(logits, params, outs))
    banned = [set(np.flatnonzero(np.isinf(g))) for g in got]
    assert banned == [{10, 11}, {10, 11}, {20}, set()]  # custom_token_bans ignored (docs/decisions.md D27)
    only_custom = np.asarray(process_logits(logits[:1], [SP(custom_token_bans=[30])], [[]]))
    assert set(np.flatnonzero(np.isinf(only_custom[0]))) == {30}


@pytest.mark.parametrize("v", VOCABS)
def test_mirostat_rows_vs_numpy(v):
    logits = _logits(4, v, seed=5, scale=4.0)
    params = [SP(), SP(mirostat_mode=2, mirostat_tau=3.0, mirostat_eta=0.1),
              SP(mirostat_mode=2, mirostat_tau=5.0, mirostat_eta=0.1), SP(mirostat_mode=2, mirostat_tau=1.0)]
    mus = [None, None, 4.0, None]  # None: the initial state 2 * tau
    got = np.asarray(process_logits(logits, params, mirostat_mu=mus))
    np.testing.assert_array_equal(got[0], logits[0])
    for i, mu in [(1, 6.0), (2, 4.0), (3, 2.0)]:
        _same_values(got[i], np_mirostat(logits[i].astype(np.float64), mu))
        assert 1 <= np.isfinite(got[i]).sum() < v
    # the state update: mu - eta * (surprise - tau), surprise in bits
    assert mirostat_update(6.0, math.log(0.25), 3.0, 0.1) == pytest.approx(6.0 - 0.1 * (2.0 - 3.0))


def np_min_p(l, m):
    p = np.exp(_lsm(l))
    return np.where(p < m * p.max(), -np.inf, l)


def np_top_k(l, k):
    kth = np.sort(l)[::-1][k - 1]
    return np.where(l >= kth, l, -np.inf)


def test_each_row_gets_its_own_order():
    """temperature then min_p (default), min_p then temperature (temperature_last), and a
    sampler_priority that puts top_k before penalties, all in one batch."""
    v = 1000
    base = _logits(1, v, seed=6, scale=1.0)[0]
    logits = np.stack([base] * 4)
    hist = [([int(t) for t in np.argsort(base)[-3:]], [])] * 4  # the 3 most likely tokens were seen
    default = SP(temperature=0.5, min_p=0.1)
    last = SP(temperature=0.5, min_p=0.1, temperature_last=True)
    prio = [0, 6, 7, 8, 5, 9, 1, 2, 3, 10, 11, 4, 12, 13]  # TOP_P_TOP_K first, PENALTIES second
    custom = SP(temperature=2.0, top_k=5, repetition_penalty=3.0, sampler_priority=prio)
    by_name = SP(temperature=2.0, top_k=5, repetition_penalty=3.0,
                 sampler_priority=["top_p_top_k", "Penalties", "dry", "no_repeat_ngram", "temperature",
                                   "top_nsigma", "top_a", "min_p", "tfs", "eta_cutoff", "epsilon_cutoff",
                                   "typical_p", "quadratic", "xtc"])
    got = np.asarray(process_logits(logits, [default, last, custom, by_name], hist))
    l = base.astype(np.float64)
    want0 = np_min_p(l / 0.5, 0.1)  # temperature sharpens first: fewer survive
    want1 = np_min_p(l, 0.1) / 0.5
    np.testing.assert_array_equal(np.isfinite(got[0]), np.isfinite(want0))
    np.testing.assert_array_equal(np.isfinite(got[1]), np.isfinite(want1))
    assert np.isfinite(got[1]).sum() > np.isfinite(got[0]).sum()  # the orders really differ
    seen = sorted(set(hist[0][0]))
    rep = l.copy()
    rep[seen] = np.where(rep[seen] > 0, rep[seen] / 3.0, rep[seen] * 3.0)
    want2 = np_top_k(l, 5)  # top-k on the raw logits, then the penalty, then temperature
    want2 = np.where(np.isfinite(want2), rep, -np.inf) / 2.0
    fin = np.isfinite(want2)
    np.testing.assert_array_equal(np.isfinite(got[2]), fin)
    np.testing.assert_allclose(_lsm(got[2])[fin], _lsm(want2)[fin], atol=1e-4)
    np.testing.assert_array_equal(got[3], got[2])  # names and ids mean the same order
    default_top_k = np.asarray(process_logits(logits[:1], [SP(temperature=2.0, top_k=5, repetition_penalty=3.0)],
                                              hist[:1]))
    assert not np.array_equal(np.isfinite(default_top_k[0]), np.isfinite(got[2]))


def test_sampler_priority_validation():
    with pytest.raises(ValueError, match=r"Missing required samplers in priority list: \['TOP_A'"):
        SP(sampler_priority=[0] + list(range(2, 14)))
    with pytest.raises(ValueError, match="Invalid sampler ID in priority list: 14"):
        SP(sampler_priority=list(range(15)))
    with pytest.raises(ValueError, match="must be a list"):
        SP(sampler_priority="0,1")
    sp = SP(sampler_priority=list(range(14)) + [3], temperature_last=True)  # duplicates accepted
    assert sp.sampler_priority[0] == "top_p_top_k" and len(sp.sampler_priority) == 14
    with pytest.raises(ValueError, match="Invalid sampler ID in priority list: 'no_such_sampler'"):
        process_logits(np.zeros((1, 10), np.float32),
                       [SP(sampler_priority=list(range(14)) + ["no_such_sampler"])])


def test_research_sampler_registered_placed_and_fed_from_extra_args():
    """A new step: registered by name, its field from extra_args, placed by sampler_priority."""
    @register_sampler("shift_top", fields={"shift_top_by": (0.0, np.float32)},
                      active=lambda p: p["shift_top_by"] != 0.0)
    def shift_top(logits, p, md):
        import jax.numpy as jnp

        top = logits >= jnp.max(logits, axis=-1, keepdims=True)
        return jnp.where(top, logits - p["shift_top_by"][:, None], logits)

    try:
        v = 100
        logits = _logits(3, v, seed=zlib.crc32(b"shift") % 100, scale=1.0)
        logits[:, 0] = 10.0  # token 0 dominates
        after_topk = SP(top_k=1, extra_args={"shift_top_by": 20.0})
        first = SP(top_k=1, extra_args={"shift_top_by": 20.0},
                   sampler_priority=["shift_top"] + list(range(14)))
        got = np.asarray(process_logits(logits, [SP(), after_topk, first]))
        np.testing.assert_array_equal(got[0], logits[0])
        assert np.flatnonzero(np.isfinite(got[1])).tolist() == [0]  # top-k kept 0, then it shifted
        assert got[1][0] == pytest.approx(-10.0)
        kept = np.flatnonzero(np.isfinite(got[2]))  # shifted first: top-k keeps another token
        assert kept.tolist() == [int(np.argmax(logits[2][1:])) + 1]
        with pytest.raises(ValueError, match="not a field of any registered sampler"):
            process_logits(logits[:1], [SP(extra_args={"nope": 1.0})])
    finally:
        unregister_sampler("shift_top")


def test_repetition_penalty_window_and_slope_vs_numpy():
    """Kobold's rep_pen_range / rep_pen_slope: only the last `range` tokens count, and tokens seen only
    in the older half of that window get 1 + (penalty - 1) * slope."""
    v = 1000
    logits = _logits(4, v, seed=9)
    hist = [int(t) for t in np.random.default_rng(9).integers(0, 40, 30)]
    params = [SP(repetition_penalty=2.0), SP(repetition_penalty=2.0, repetition_penalty_range=10),
              SP(repetition_penalty=2.0, repetition_penalty_range=10, repetition_penalty_slope=0.5),
              SP(repetition_penalty=2.0, repetition_penalty_slope=0.0)]
    got = np.asarray(process_logits(logits, params, [(hist[:20], hist[20:])] * 4))

    def want(l, rep, rng, slope):
        x = hist[-rng:] if rng else hist
        older, newer = set(x[:len(x) // 2]), set(x[len(x) // 2:])
        out = l.astype(np.float64).copy()
        for t in older | newer:
            pen = rep if t in newer else 1.0 + (rep - 1.0) * slope
            out[t] = out[t] / pen if out[t] > 0 else out[t] * pen
        return out

    for i, (rng, slope) in enumerate([(0, 1.0), (10, 1.0), (10, 0.5), (0, 0.0)]):
        _same_values(got[i], want(logits[i], 2.0, rng, slope))
    assert not np.allclose(got[0], got[1]) and not np.allclose(got[1], got[2])
