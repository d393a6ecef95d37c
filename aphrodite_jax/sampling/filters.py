"""Built-in sampler steps: penalties, top-p/top-k, min-p (temperature with dynamic temperature lives
in filters_extra.py).

Each is a pure function (logits f32[B, V], params {name: [B]}, md) -> f32[B, V], made a SamplerStep by
`sampler_step`; builtin.py lists them for the registry.
Greedy rows carry neutral values (temperature 1, no truncation), as Aphrodite resets them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aphrodite_jax.sampling.step import sampler_step

_EPS = 1e-5
NEG_INF = -jnp.inf


def token_counts(ids: jax.Array, vocab_size: int) -> jax.Array:
    """Per-row counts of token ids: ids i32[B, L] padded with vocab_size (dropped) -> i32[B, V]."""
    b = ids.shape[0]
    rows = jnp.arange(b)[:, None]  # [B, 1]
    return jnp.zeros((b, vocab_size), jnp.int32).at[rows, ids].add(1, mode="drop")


def history_parts(md):
    """(history ids i32[B, H] with the padding as V, is_output bool[B, H])."""
    h = md.history_ids
    col = jnp.arange(h.shape[1])[None, :]  # [1, H]
    is_out = col >= h.shape[1] - md.output_len[:, None]
    return h, is_out


@sampler_step(
    "penalties",
    fields={"repetition_penalty": np.float32, "frequency_penalty": np.float32,
            "presence_penalty": np.float32, "repetition_penalty_range": np.int32,
            "repetition_penalty_slope": np.float32},
    active=lambda p: ((abs(p["presence_penalty"]) >= _EPS) | (abs(p["frequency_penalty"]) >= _EPS)
                      | (p["repetition_penalty"] > 1.0 + _EPS)),
)
def penalties(logits, p, md):
    """Repetition over prompt+output (optionally a window of the last tokens, its older half with a
    reduced penalty), then frequency and presence over output tokens.

    The token history comes as a right-aligned id array (md.history_ids [B, H], the output being its
    last md.output_len entries); the [B, V] counts are built here on device with a scatter-add, so the
    host never sends [B, V] data.
    """
    b, v = logits.shape
    hist, is_out = history_parts(md)
    width = hist.shape[1]
    out_counts = token_counts(jnp.where(is_out, hist, v), v)  # [B, V]
    # The repetition window (Kobold's rep_pen_range, 0 = all) and its newer half (full penalty; the
    # older half gets the slope-reduced one).
    rng = p["repetition_penalty_range"]
    length = jnp.where(rng > 0, jnp.minimum(md.history_len, rng), md.history_len)  # [B]
    col = jnp.arange(width)[None, :]
    in_window = col >= (width - length)[:, None]  # [B, H]
    newer = col >= (width - length + length // 2)[:, None]
    seen = token_counts(jnp.where(in_window, hist, v), v) > 0  # [B, V]
    seen_newer = token_counts(jnp.where(newer, hist, v), v) > 0
    rep = p["repetition_penalty"][:, None]  # [B, 1]
    reduced = 1.0 + (rep - 1.0) * p["repetition_penalty_slope"][:, None]
    rep = jnp.where(seen_newer, rep, reduced)  # [B, V]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - p["frequency_penalty"][:, None] * out_counts.astype(logits.dtype)
    logits = logits - p["presence_penalty"][:, None] * (out_counts > 0).astype(logits.dtype)
    return logits


def _sortable(x: jax.Array) -> jax.Array:
    """f32 -> u32 with the same order (finite values)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _unsortable(k: jax.Array) -> jax.Array:
    bits = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def largest_threshold(logits: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the largest value c with sum(weights[l >= c]) >= target: logits, weights f32[B, V],
    target f32[B] -> c f32[B, 1]. An exact bisection over the float bit patterns (32 passes over
    [B, V], no sort); c is always one of the row's finite logits when target <= the total weight."""
    finite = logits > NEG_INF
    lo = _sortable(jnp.min(jnp.where(finite, logits, jnp.inf), axis=-1))  # [B]
    hi = _sortable(jnp.max(logits, axis=-1))  # [B]

    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo + 1) // 2  # [B]
        ok = jnp.sum(jnp.where(logits >= _unsortable(mid)[:, None], weights, 0.0), axis=-1) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return _unsortable(lo)[:, None]


def _top_p_top_k_host(sp):
    return {"top_p": sp.top_p, "top_k": -1 if sp.top_k is None or sp.top_k <= 0 else sp.top_k}


@sampler_step("top_p_top_k", fields={"top_p": np.float32, "top_k": np.int32},
              active=lambda p: (p["top_p"] < 1.0 - _EPS) | (p["top_k"] > 0), host=_top_p_top_k_host)
def top_p_top_k(logits, p, md):
    """Top-k (keep l >= the k-th largest, ties survive), then top-p on the renormalized remainder.

    Top-p removes the tokens whose ascending cumulative probability is <= 1 - top_p and never the
    most likely one; equivalently it keeps l >= c for the largest c with mass(l >= c) >= top_p. Both
    cutoffs come from `largest_threshold` (bisection, no sort: a vocab sort is ~50x slower on CPU).
    Tokens tied with the last kept one survive too.
    """
    v = logits.shape[-1]
    k = p["top_k"]
    top_p = p["top_p"]  # [B]

    def top_k(lg):
        kk = jnp.where(k <= 0, v, jnp.minimum(k, v)).astype(jnp.float32)  # [B]
        finite = (lg > NEG_INF).astype(jnp.float32)  # [B, V]
        kth = largest_threshold(lg, finite, jnp.minimum(kk, jnp.sum(finite, axis=-1)))  # [B, 1]
        return jnp.where((k > 0)[:, None] & (lg < kth), NEG_INF, lg)

    def top_p_cut(lg):
        probs = jax.nn.softmax(lg, axis=-1)  # [B, V]
        cut = largest_threshold(lg, probs, jnp.minimum(top_p, jnp.sum(probs, axis=-1)))  # [B, 1]
        cut = jnp.where((top_p < 1.0 - _EPS)[:, None], cut, -jnp.inf)
        return jnp.where(lg >= cut, lg, NEG_INF)

    # Each cutoff is a 32-pass bisection: skip the one no row of the batch asks for.
    logits = jax.lax.cond(jnp.any(k > 0), top_k, lambda lg: lg, logits)
    return jax.lax.cond(jnp.any(top_p < 1.0 - _EPS), top_p_cut, lambda lg: lg, logits)


@sampler_step("min_p", fields={"min_p": np.float32}, active=lambda p: p["min_p"] > _EPS)
def min_p(logits, p, md):
    """Removes tokens with p_i < min_p * max_j p_j, i.e. l_i - max l < log(min_p)."""
    rel = logits - jnp.max(logits, axis=-1, keepdims=True)  # [B, V], <= 0
    return jnp.where(rel < jnp.log(p["min_p"])[:, None], NEG_INF, logits)

