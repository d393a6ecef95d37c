"""The extra sampler steps (filters_extra.py) against NumPy versions of their formulas."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aphrodite_jax.sampling.filters_extra import xtc_coins
from aphrodite_jax.sampling.registry import registered_steps
from aphrodite_jax.sampling.sampler import make_sampling_metadata, apply_chain
from aphrodite_jax.sampling import process_logits
from aphrodite_jax.sampling_params import SamplingParams as SP

B = 8
_process = jax.jit(apply_chain)
WIDTHS = dict(bias_width=8, allowed_width=8, history_width=16, dry_width=8)
VOCABS = (1000, 49152)


def _md(rows, v):
    rows = [(sp, seed, idx) for sp, seed, idx in rows]
    return make_sampling_metadata(rows, B, v, **WIDTHS)


def _logits(v, seed, scale=3.0):
    """Random logits with a few -inf (banned) entries in some rows."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(B, v)) * scale).astype(np.float32)
    x[1, rng.choice(v, 10, replace=False)] = -np.inf
    return x


def _lsm(x):
    x = np.asarray(x, np.float64)
    m = np.max(x[np.isfinite(x)])
    return x - m - np.log(np.sum(np.exp(x[np.isfinite(x)] - m)))


def _p(x):
    return np.exp(_lsm(x))


def _h(x):
    lp = _lsm(x)
    fin = np.isfinite(lp)
    return -np.sum(np.exp(lp[fin]) * lp[fin])


def _rm(l, mask):
    return np.where(mask, -np.inf, l)


# --- NumPy versions of the formulas (one row [V], float64) -----------------------------------
def np_dynatemp(l, lo, hi, ex):
    n = np.sum(np.isfinite(l))
    t = lo + (hi - lo) * (_h(l) / np.log(n)) ** ex
    return l / max(t, 2e-5)


def np_nsigma(l, n):
    fin = l[np.isfinite(l)]
    return _rm(l, l < fin.max() - n * np.std(fin, ddof=1))


def np_top_a(l, a):
    p = _p(l)
    return _rm(l, (p < a * p.max() ** 2) & (p < p.max()))


def np_tfs(l, z):
    p = _p(l)
    order = np.argsort(-p, kind="stable")
    s = p[order]
    d = np.abs(s[:-2] - 2 * s[1:-1] + s[2:])
    c = np.cumsum(d / d.sum())
    remove = np.zeros(len(l), bool)
    for j in range(1, len(l) - 1):
        remove[j] = c[j - 1] > z
    remove[-1] = True
    out = l.copy()
    out[order[remove]] = -np.inf
    return out


def np_eta(l, eta):
    eta *= 1e-4
    p = _p(l)
    eps = min(eta, np.sqrt(eta) * np.exp(-_h(l)))
    return _rm(l, (p < eps) & (p < p.max()))


def np_epsilon(l, e):
    p = _p(l)
    return _rm(l, (p < e * 1e-4) & (p < p.max()))


def np_typical(l, tau):
    """HF TypicalLogitsWarper: keep the sorted-by-deviation prefix up to the crossing token."""
    lp = _lsm(l)
    with np.errstate(invalid="ignore"):
        delta = np.abs(-lp - _h(l))
    order = np.argsort(delta, kind="stable")
    cum = np.cumsum(np.exp(lp[order]))
    last = min(int(np.sum(cum < tau)), len(l) - 1)
    keep = np.zeros(len(l), bool)
    keep[order[:last + 1]] = True
    return _rm(l, ~keep)


def np_quadratic(l, f, c):
    m = l[np.isfinite(l)].max()
    d = l - m
    with np.errstate(invalid="ignore"):
        new = m - f * (3 - c) / 2 * d ** 2 + f * (c - 1) / 2 * d ** 3
    return np.where(np.isfinite(l), new, l)


def np_xtc(l, theta, u, prob):
    if not u < prob:
        return l
    p = _p(l)
    order = np.argsort(-p, kind="stable")
    s = p[order]
    m = int(np.sum(s[1:] >= theta))
    out = l.copy()
    out[order[:m]] = -np.inf
    return out


def np_skew_probs(l, sk):
    f = np.cumsum(_p(l)) ** np.exp(sk)
    return np.diff(f, prepend=0.0)


def _same(got, want):
    got_lp, want_lp = _lsm(got), _lsm(want)
    np.testing.assert_array_equal(np.isfinite(got_lp), np.isfinite(want_lp))
    fin = np.isfinite(want_lp)
    np.testing.assert_allclose(got_lp[fin], want_lp[fin], rtol=2e-4, atol=2e-4)


def _run(rows, logits):
    """Through the research API (aphrodite_jax.sampling.process_logits), plus the equivalent
    metadata (for XTC's coins: output index = the length of the output history given)."""
    md = _md(rows, logits.shape[1])
    hist = [((), [0] * r[2]) for r in rows]
    got = process_logits(logits[:len(rows)], [r[0] for r in rows], hist, seeds=[r[1] for r in rows])
    return np.asarray(got), md


# (sampler, SamplingParams kwargs per row (None = off row), numpy function of (row logits, kwargs))
CASES = {
    "dynatemp": ([None, dict(dynatemp_min=0.5, dynatemp_max=1.5), dict(dynatemp_min=0.2, dynatemp_max=3.0,
                  dynatemp_exponent=2.0), dict(temperature=0.7), dict(dynatemp_min=0.0, dynatemp_max=0.8,
                  dynatemp_exponent=0.5)],
                 lambda l, kw: (np_dynatemp(l, kw.get("dynatemp_min", 0.0), kw.get("dynatemp_max", 0.0),
                                            kw.get("dynatemp_exponent", 1.0))
                                if "dynatemp_max" in kw else l / kw.get("temperature", 1.0))),
    "nsigma": ([None, dict(nsigma=0.5), dict(nsigma=1.0), dict(nsigma=2.0), dict(nsigma=0.01)],
               lambda l, kw: np_nsigma(l, kw["nsigma"])),
    "top_a": ([None, dict(top_a=0.2), dict(top_a=1.0), dict(top_a=0.01), dict(top_a=5.0)],
              lambda l, kw: np_top_a(l, kw["top_a"])),
    "tfs": ([None, dict(tfs=0.95), dict(tfs=0.5), dict(tfs=0.99), dict(tfs=0.1)],
            lambda l, kw: np_tfs(l, kw["tfs"])),
    "eta": ([None, dict(eta_cutoff=3.0), dict(eta_cutoff=0.5), dict(eta_cutoff=30.0), dict(eta_cutoff=500.0)],
            lambda l, kw: np_eta(l, kw["eta_cutoff"])),
    "epsilon": ([None, dict(epsilon_cutoff=3.0), dict(epsilon_cutoff=0.3), dict(epsilon_cutoff=100.0),
                 dict(epsilon_cutoff=1000.0)],
                lambda l, kw: np_epsilon(l, kw["epsilon_cutoff"])),
    "typical": ([None, dict(typical_p=0.9), dict(typical_p=0.5), dict(typical_p=0.2), dict(typical_p=0.0)],
                lambda l, kw: np_typical(l, kw["typical_p"])),
    "quadratic": ([None, dict(smoothing_factor=0.3), dict(smoothing_factor=0.1, smoothing_curve=2.0),
                   dict(smoothing_factor=1.0, smoothing_curve=0.5), dict(smoothing_curve=2.0)],
                  lambda l, kw: (np_quadratic(l, kw["smoothing_factor"], kw.get("smoothing_curve", 1.0))
                                 if "smoothing_factor" in kw else l)),
}


@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_sampler_rows_vs_numpy(name, v):
    kws, fn = CASES[name]
    logits = _logits(v, seed=zlib.crc32(name.encode()) % 1000 + v)  # str hash() differs per process
    if name in ("top_a", "eta", "epsilon", "typical"):
        logits[4] *= 2.0  # a peakier row
    rows = [(SP(**(kw or {})), 0, 0) for kw in kws]
    got, _ = _run(rows, logits)
    np.testing.assert_array_equal(got[0], logits[0])  # off row untouched
    for i, kw in enumerate(kws[1:], 1):
        want = fn(logits[i].astype(np.float64), kw)
        if name == "quadratic":  # raw values, not only the distribution
            np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-3)
        if name == "typical" and not np.array_equal(np.isfinite(got[i]), np.isfinite(want)):
            # fp32 cumulative sums may put the crossing token on the other side of a threshold it
            # straddles: the kept set must then lie between those of tau -/+ 1e-5.
            tau = kw["typical_p"]
            lo = np.isfinite(fn(logits[i].astype(np.float64), {"typical_p": tau - 1e-5}))
            hi = np.isfinite(fn(logits[i].astype(np.float64), {"typical_p": tau + 1e-5}))
            kept = np.isfinite(got[i])
            assert np.all(kept[lo]) and not np.any(kept & ~hi)
            continue
        _same(got[i], want)
    if name not in ("dynatemp", "quadratic"):  # truncation samplers remove something in some row
        assert any(np.isfinite(got[i]).sum() < np.isfinite(logits[i]).sum() for i in range(1, len(kws)))


def test_tfs_and_typical_on_peaky_rows_keep_few():
    v = 1000
    logits = _logits(v, 7, scale=8.0)
    got, _ = _run([(SP(tfs=0.5), 0, 0), (SP(typical_p=0.2), 0, 0)], logits)
    assert 1 <= np.isfinite(got[0]).sum() < 50 and 1 <= np.isfinite(got[1]).sum() < 50
    _same(got[0], np_tfs(logits[0].astype(np.float64), 0.5))
    _same(got[1], np_typical(logits[1].astype(np.float64), 0.2))


@pytest.mark.parametrize("v", VOCABS)
def test_xtc_rows_vs_numpy(v):
    logits = _logits(v, 11, scale=6.0)  # peaky: several tokens above 0.1
    kws = [None, dict(xtc_probability=1.0, xtc_threshold=0.1), dict(xtc_probability=1.0, xtc_threshold=0.05),
           dict(xtc_probability=0.5, xtc_threshold=0.1), dict(xtc_probability=1.0, xtc_threshold=0.9),
           dict(xtc_probability=0.5, xtc_threshold=0.02, seed=3)]
    rows = [(SP(**(kw or {})), 100 + i, i) for i, kw in enumerate(kws)]
    got, md = _run(rows, logits)
    coins = np.asarray(xtc_coins(jax.device_put(md)))
    np.testing.assert_array_equal(got[0], logits[0])
    removed = 0
    for i, kw in enumerate(kws[1:], 1):
        want = np_xtc(logits[i].astype(np.float64), kw["xtc_threshold"], coins[i], kw["xtc_probability"])
        _same(got[i], want)
        removed += np.isfinite(got[i]).sum() < np.isfinite(logits[i]).sum()
    assert removed >= 2


def test_xtc_coin_is_per_row_seeded_and_fair():
    v = 1000
    rows = [(SP(xtc_probability=0.5), s, k) for s, k in [(1, 0), (1, 1), (2, 0), (1, 0)]]
    md = jax.device_put(_md(rows, v))
    c = np.asarray(xtc_coins(md))
    assert c[0] == c[3] and c[0] != c[1] and c[0] != c[2]  # a function of (seed, output index) only
    many = make_sampling_metadata([(SP(xtc_probability=0.5), s, 0) for s in range(B)], B, v, **WIDTHS)
    us = np.concatenate([np.asarray(xtc_coins(jax.device_put(many.replace(output_index=np.full(B, k, np.int32)))))
                         for k in range(64)])
    assert 0.4 < us.mean() < 0.6 and us.min() >= 0.0 and us.max() < 1.0


@pytest.mark.parametrize("v", VOCABS)
def test_skew_rows_vs_numpy(v):
    logits = _logits(v, 21, scale=2.0)
    kws = [None, dict(skew=0.5), dict(skew=2.0), dict(skew=0.05)]
    got, _ = _run([(SP(**(kw or {})), 0, 0) for kw in kws], logits)
    np.testing.assert_array_equal(got[0], logits[0])
    for i, kw in enumerate(kws[1:], 1):
        want = np_skew_probs(logits[i].astype(np.float64), kw["skew"])
        np.testing.assert_allclose(np.exp(got[i].astype(np.float64)), want, atol=2e-5)
        assert abs(np.exp(got[i].astype(np.float64)).sum() - 1.0) < 1e-3
        assert not np.allclose(want, _p(logits[i]), atol=1e-4)  # skew changed the distribution


def test_default_order_and_chain():
    names = [s.name for s in registered_steps()]
    want = ["penalties", "temperature", "top_nsigma", "top_p_top_k", "top_a", "min_p", "tfs", "eta_cutoff",
            "epsilon_cutoff", "typical_p", "quadratic", "xtc", "skew"]
    assert [n for n in names if n in want] == want
    v = 1000
    logits = _logits(v, 31)
    sp = SP(temperature=0.8, nsigma=2.0, top_k=200, top_a=0.001, min_p=0.001, tfs=0.98, eta_cutoff=1.0,
            epsilon_cutoff=1.0, typical_p=0.95, smoothing_factor=0.2)
    got, _ = _run([(sp, 0, 0)], logits)
    l = logits[0].astype(np.float64) / 0.8
    l = np_nsigma(l, 2.0)
    kth = np.sort(l)[::-1][199]
    l = np.where(l >= kth, l, -np.inf)
    l = np_top_a(l, 0.001)
    p = _p(l)
    l = _rm(l, p < 0.001 * p.max())
    for f in (lambda x: np_tfs(x, 0.98), lambda x: np_eta(x, 1.0), lambda x: np_epsilon(x, 1.0),
              lambda x: np_typical(x, 0.95), lambda x: np_quadratic(x, 0.2, 1.0)):
        l = f(l)
    _same(got[0], l)


def test_greedy_rows_ignore_dynatemp_and_supported_fields():
    sp = SP(temperature=0.0, dynatemp_min=0.5, dynatemp_max=2.0)
    md = _md([(sp, 0, 0)], 1000)
    assert md.params["dynatemp_max"][0] == 0.0 and md.params["temperature"][0] == 1.0
    for kw in (dict(tfs=0.5), dict(top_a=0.1), dict(eta_cutoff=3.0), dict(epsilon_cutoff=3.0),
               dict(typical_p=0.5), dict(smoothing_factor=0.2, smoothing_curve=1.5), dict(nsigma=1.0),
               dict(skew=1.0), dict(xtc_probability=0.5), dict(dynatemp_min=0.1, dynatemp_max=1.0,
                                                               dynatemp_exponent=2.0)):
        SP(**kw)  # accepted now
    for kw, msg in ((dict(tfs=0.0), "tfs must be in (0, 1]"), (dict(top_a=-1.0), "top_a must be non negative"),
                    (dict(epsilon_cutoff=1001.0), "epsilon_cutoff must be in [0, 1000]"),
                    (dict(eta_cutoff=-1.0), "eta_cutoff must be non negative"),
                    (dict(typical_p=1.5), "typical_p must be in (0, 1]"), (dict(nsigma=-1.0), "nsigma must be"),
                    (dict(skew=-0.1), "skew must be non-negative"),
                    (dict(xtc_probability=1.5), "xtc_probability must be in [0, 1]")):
        with pytest.raises(ValueError, match=None) as e:
            SP(**kw)
        assert msg in str(e.value)


def test_parameter_values_do_not_recompile():
    v = 1000
    logits = jnp.asarray(_logits(v, 41))
    f = jax.jit(apply_chain)
    f(logits, jax.device_put(_md([(SP(tfs=0.9, xtc_probability=0.5, skew=0.3, nsigma=1.0), 1, 0)], v)))
    size = f._cache_size()
    for sp in (SP(tfs=0.5, typical_p=0.3, dynatemp_min=0.1, dynatemp_max=2.0), SP(eta_cutoff=4.0, top_a=0.3),
               SP(smoothing_factor=0.4, smoothing_curve=2.5, epsilon_cutoff=9.0, xtc_threshold=0.2,
                  xtc_probability=1.0)):
        f(logits, jax.device_put(_md([(sp, 5, 3)], v)))
    assert f._cache_size() == size


def test_nsigma_uses_unbiased_std_over_finite_logits():
    v = 1000
    logits = _logits(v, 51)
    rows, wants = [], []
    for i in range(4):
        l = logits[i].astype(np.float64)
        fin = l[np.isfinite(l)]
        s0, s1 = np.std(fin, ddof=0), np.std(fin, ddof=1)
        x = np.sort(fin)[-3]  # the third largest sits between the ddof=0 and ddof=1 cutoffs
        n = float(np.float32((fin.max() - x) / ((s0 + s1) / 2)))
        rows.append((SP(nsigma=n), 0, 0))
        wants.append(np_nsigma(l, n))
        assert np.isfinite(wants[-1]).sum() == 3  # kept only with ddof=1
    got, _ = _run(rows, logits)
    for i in range(4):
        _same(got[i], wants[i])


def test_dynatemp_single_finite_token_row():
    v = 1000
    logits = np.full((B, v), -np.inf, np.float32)
    logits[:, 7] = 2.0
    logits[1] = _logits(v, 61)[1]
    got, _ = _run([(SP(dynatemp_min=0.5, dynatemp_max=2.0), 0, 0)] * 2, logits)
    assert np.isfinite(got[0]).sum() == 1 and got[0, 7] == 0.0  # T -> 2e-5, the one token survives
    _same(got[1], np_dynatemp(logits[1].astype(np.float64), 0.5, 2.0, 1.0))


@pytest.mark.parametrize("v", VOCABS)
def test_tfs_after_truncation_takes_the_candidate_path_and_matches_numpy(v):
    """TFS after top-k (the default order) works on the top candidates instead of sorting V."""
    logits = _logits(v, 31, scale=1.0)
    kws = [dict(top_k=50, tfs=0.9), dict(top_k=300, tfs=0.5), dict(top_k=5, tfs=0.99), dict(top_k=50)]
    got, _ = _run([(SP(**kw), 0, 0) for kw in kws], logits)
    for i, kw in enumerate(kws):
        l = logits[i].astype(np.float64)
        kth = np.sort(l)[::-1][kw["top_k"] - 1]
        l = np.where(l >= kth, l, -np.inf)
        want = np_tfs(l, kw["tfs"]) if "tfs" in kw else l
        _same(got[i], want)
    assert np.isfinite(got[1]).sum() < 300
