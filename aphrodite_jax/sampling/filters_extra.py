"""More built-in sampler steps: dynamic temperature, top-nsigma, top-a, TFS, eta and epsilon cutoff,
typical-p, quadratic smoothing, XTC and skew.

Each is a pure function (logits f32[B, V], params {name: [B]}, md) -> f32[B, V], made a SamplerStep by
`sampler_step`; builtin.py lists them in the default order, skew last (post-softmax).
eta/epsilon are in units of 1e-4 (docs/decisions.md D2); typical-p keeps the token that crosses the
threshold (D6); top-nsigma's sigma is taken over the finite logits (D28). XTC's coin comes from the
row's key (fold_in(PRNGKey(seed), output_index), then a constant), so a seeded request is reproducible
and the coin is independent of the token draw.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aphrodite_jax.sampling.filters import largest_threshold
from aphrodite_jax.sampling.step import sampler_step

_EPS = 1e-5
_TEMPERATURE_MIN = 2e-5  # the floor of a sampling temperature (and of a NaN dynamic one)
NEG_INF = -jnp.inf
_CUTOFF_UNIT = 1e-4  # eta_cutoff / epsilon_cutoff units (docs/decisions.md D2)
_XTC_SALT = 0x58544331  # "XTC1": folded into the row key for XTC's coin


def _probs(logits):
    return jax.nn.softmax(logits, axis=-1)  # [B, V]; -inf rows entries -> 0


def _entropy(logits):
    """H(p) in nats per row: f32[B]."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(logits > NEG_INF, jnp.exp(lp) * lp, 0.0), axis=-1)


# --- temperature, with dynamic temperature -------------------------------------------------
def _temperature_host(sp):
    if sp.temperature < _EPS:  # greedy: neutral inside the chain, argmax at the end
        return {"temperature": 1.0, "dynatemp_min": 0.0, "dynatemp_max": 0.0, "dynatemp_exponent": 1.0}
    return {"temperature": sp.temperature, "dynatemp_min": sp.dynatemp_min,
            "dynatemp_max": sp.dynatemp_max, "dynatemp_exponent": sp.dynatemp_exponent}


def _dynatemp_on(p):
    return (abs(p["dynatemp_min"]) > _EPS) | (abs(p["dynatemp_max"]) > _EPS)


@sampler_step(
    "temperature",
    fields={"temperature": np.float32, "dynatemp_min": np.float32,
            "dynatemp_max": np.float32, "dynatemp_exponent": np.float32},
    active=lambda p: (abs(p["temperature"] - 1.0) >= _EPS) | _dynatemp_on(p), host=_temperature_host)
def temperature(logits, p, md):
    """l <- (l - max l) / T. With dynatemp, T = min + (max - min) * (H / ln #finite)^exponent
    (H of softmax(l) before scaling), replacing `temperature`; NaN -> 2e-5; floored at 2e-5."""
    n_fin = jnp.sum(logits > NEG_INF, axis=-1).astype(jnp.float32)  # [B]
    ratio = _entropy(logits) / jnp.log(n_fin)  # [B]; 0/0 = NaN for one finite token
    lo, hi = p["dynatemp_min"], p["dynatemp_max"]
    t_dyn = lo + (hi - lo) * jnp.power(ratio, p["dynatemp_exponent"])
    t_dyn = jnp.where(jnp.isnan(t_dyn), _TEMPERATURE_MIN, t_dyn)
    t = jnp.where(_dynatemp_on(p), t_dyn, p["temperature"])
    t = jnp.maximum(t, _TEMPERATURE_MIN)[:, None]  # [B, 1]
    return (logits - jnp.max(logits, axis=-1, keepdims=True)) / t


# --- top-nsigma ----------------------------------------------------------------------------
@sampler_step("top_nsigma", fields={"nsigma": np.float32}, active=lambda p: p["nsigma"] > _EPS)
def top_nsigma(logits, p, md):
    """Removes l_i < max l - nsigma * std(l), std unbiased over the finite logits."""
    fin = logits > NEG_INF
    n = jnp.sum(fin, axis=-1, keepdims=True).astype(jnp.float32)  # [B, 1]
    mean = jnp.sum(jnp.where(fin, logits, 0.0), axis=-1, keepdims=True) / n
    var = jnp.sum(jnp.where(fin, (logits - mean) ** 2, 0.0), axis=-1, keepdims=True) / (n - 1.0)
    cut = jnp.max(logits, axis=-1, keepdims=True) - p["nsigma"][:, None] * jnp.sqrt(var)
    return jnp.where(logits < cut, NEG_INF, logits)  # NaN cut (one token) removes nothing


# --- top-a ---------------------------------------------------------------------------------
@sampler_step("top_a", fields={"top_a": np.float32}, active=lambda p: p["top_a"] > 0.0)
def top_a(logits, p, md):
    """Removes p_i < a * (max p)^2, never the most likely token (a > 1 / max p would empty the row)."""
    probs = _probs(logits)
    pmax = jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where((probs < p["top_a"][:, None] * pmax * pmax) & (probs < pmax), NEG_INF, logits)


# --- tail-free sampling --------------------------------------------------------------------
_TFS_CANDIDATES = 512


def _tfs_remove_sorted(s, z):
    """s f32[B, N] sorted descending (zero-padded past the row's nonzero tokens) -> remove bool[B, N]:
    d_k = |s_k - 2 s_k+1 + s_k+2|, C = cumsum(d / sum d); keep position 0, remove j >= 1 iff C_{j-1} > z."""
    b = s.shape[0]
    d = jnp.abs(s[:, :-2] - 2.0 * s[:, 1:-1] + s[:, 2:])  # [B, N-2]
    c = jnp.cumsum(d / jnp.sum(d, axis=-1, keepdims=True), axis=-1)  # [B, N-2]
    return jnp.concatenate([jnp.zeros((b, 1), bool), c > z[:, None], jnp.ones((b, 1), bool)], axis=-1)


@sampler_step("tfs", fields={"tfs": np.float32}, active=lambda p: p["tfs"] < 1.0 - _EPS)
def tfs(logits, p, md):
    """Tail-free sampling on the probabilities sorted descending; position V-1 is removed.

    A vocabulary sort costs ~0.5-1 s per step at B=32, V=49152 on CPU, so when every TFS row has at
    most _TFS_CANDIDATES - 2 tokens left (the usual case: TFS runs after top-k / top-p / min-p), the
    same formula runs on the top-_TFS_CANDIDATES probabilities (the rest are exact zeros, whose
    second differences vanish): exact, and a partial top-k instead of a sort."""
    b, v = logits.shape
    probs = _probs(logits)
    z = p["tfs"]
    rows = jnp.arange(b)[:, None]
    k = min(v, _TFS_CANDIDATES)
    nonzero = jnp.sum(probs > 0.0, axis=-1)  # [B]
    fits = jnp.all((nonzero <= k - 2) | (z >= 1.0 - _EPS))

    def few(_):
        s, idx = jax.lax.top_k(probs, k)  # [B, K] descending
        remove_sorted = _tfs_remove_sorted(jnp.pad(s, ((0, 0), (0, 2))), z)[:, :k]
        # positions past the nonzero tokens are zeros: already removed, nothing changes for them
        return jnp.zeros((b, v), bool).at[rows, idx].set(remove_sorted) & (probs > 0.0)

    def full(_):
        order = jnp.argsort(-probs, axis=-1)  # [B, V]
        s = jnp.take_along_axis(probs, order, axis=-1)
        return jnp.zeros((b, v), bool).at[rows, order].set(_tfs_remove_sorted(s, z))

    remove = jax.lax.cond(fits, few, full, None)
    return jnp.where(remove, NEG_INF, logits)


# --- eta / epsilon cutoff ------------------------------------------------------------------
def _cutoff(logits, eps):
    """Removes p_i < eps[B] except the argmax."""
    probs = _probs(logits)
    keep_top = logits >= jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where((probs < eps[:, None]) & ~keep_top, NEG_INF, logits)


@sampler_step("eta_cutoff", fields={"eta_cutoff": np.float32},
              active=lambda p: p["eta_cutoff"] > _EPS)
def eta_cutoff(logits, p, md):
    """eps = min(eta, sqrt(eta) * exp(-H)), eta in units of 1e-4."""
    eta = p["eta_cutoff"] * _CUTOFF_UNIT
    return _cutoff(logits, jnp.minimum(eta, jnp.sqrt(eta) * jnp.exp(-_entropy(logits))))


@sampler_step("epsilon_cutoff", fields={"epsilon_cutoff": np.float32},
              active=lambda p: p["epsilon_cutoff"] > _EPS)
def epsilon_cutoff(logits, p, md):
    """Removes p_i < epsilon (units of 1e-4) except the argmax."""
    return _cutoff(logits, p["epsilon_cutoff"] * _CUTOFF_UNIT)


# --- locally typical -----------------------------------------------------------------------
@sampler_step("typical_p", fields={"typical_p": np.float32},
              active=lambda p: p["typical_p"] < 1.0 - _EPS)
def typical_p(logits, p, md):
    """HF: delta_i = |-ln p_i - H|; sort by delta ascending, accumulate p; keep the tokens up to and
    including the first whose cumulative mass reaches tau (ties in delta survive)."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    delta = jnp.abs(-lp - _entropy(logits)[:, None])  # [B, V], inf for removed tokens
    # HF keeps delta <= the smallest delta value c with mass(delta <= c) >= tau: a bisection over
    # -delta (no vocab sort, as top-p). Target min(tau, total) keeps all when f32 mass stays < tau.
    probs = jnp.exp(lp)
    target = jnp.minimum(p["typical_p"], jnp.sum(probs, axis=-1))
    neg_thr = largest_threshold(-delta, probs, target)  # [B, 1]
    return jnp.where(-delta < neg_thr, NEG_INF, logits)


# --- quadratic / cubic smoothing -----------------------------------------------------------
@sampler_step("quadratic", fields={"smoothing_factor": np.float32,
                                   "smoothing_curve": np.float32},
              active=lambda p: p["smoothing_factor"] > _EPS)
def quadratic(logits, p, md):
    """l' = M - k d^2 + s d^3, d = l - M, k = f (3 - c) / 2, s = f (c - 1) / 2; -inf stays -inf."""
    f, c = p["smoothing_factor"][:, None], p["smoothing_curve"][:, None]
    m = jnp.max(logits, axis=-1, keepdims=True)
    d = logits - m
    new = m - f * (3.0 - c) / 2.0 * d * d + f * (c - 1.0) / 2.0 * d * d * d
    return jnp.where(logits > NEG_INF, new, logits)


# --- XTC -----------------------------------------------------------------------------------
def xtc_coins(md) -> jax.Array:
    """u ~ U(0, 1) per row from fold_in(fold_in(PRNGKey(seed), output_index), XTC salt): f32[B]."""
    def one(kd, idx):
        key = jax.random.wrap_key_data(kd, impl="threefry2x32")
        key = jax.random.fold_in(jax.random.fold_in(key, idx), _XTC_SALT)
        return jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(md.key_data, md.output_index)


@sampler_step("xtc", fields={"xtc_threshold": np.float32, "xtc_probability": np.float32},
              active=lambda p: p["xtc_probability"] > _EPS)
def xtc(logits, p, md):
    """With probability pi: if m = #{tokens other than the top with p >= theta} > 0, remove the top m,
    i.e. every token more likely than the least likely one with p >= theta."""
    probs = _probs(logits)
    above = probs >= p["xtc_threshold"][:, None]  # [B, V]
    m = jnp.sum(above, axis=-1) - 1  # [B]; the top token is above whenever any other is
    least = jnp.min(jnp.where(above, probs, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    apply = (xtc_coins(md) < p["xtc_probability"]) & (m > 0)  # [B]
    return jnp.where(apply[:, None] & (probs > least), NEG_INF, logits)


# --- skew (post-softmax) ------------------------------------------------------------------
@sampler_step("skew", fields={"skew": np.float32}, active=lambda p: p["skew"] > _EPS)
def skew(logits, p, md):
    """F = cumsum(p) in token-id order, F' = F^exp(skew), p' = diff(F'), l = ln p'."""
    cdf = jnp.clip(jnp.cumsum(_probs(logits), axis=-1), 0.0, 1.0)
    cdf = jnp.power(cdf, jnp.exp(p["skew"])[:, None])
    new = jnp.diff(cdf, axis=-1, prepend=0.0)
    return jnp.where(new > 0.0, jnp.log(jnp.maximum(new, 1e-38)), NEG_INF)
