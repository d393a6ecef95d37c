"""Sampler steps that read the token history or carry state: DRY, no-repeat-ngram and Mirostat v2.

The history is `md.history_ids` [B, H]: prompt + output, right-aligned (the newest token in column
H - 1, padding on the left; `md.history_len` [B] valid entries). Matching runs as a short loop over
match offsets, each pass one [B, H] comparison, so the cost is O(B * H * max n-gram) with no [B, H, H]
intermediate.

No-repeat-ngram covers prompt + output (docs/decisions.md D4); DRY penalises a candidate only when its
match length reaches dry_allowed_length (D5, the original definition). Mirostat v2 follows v0.5.3
(D28): it runs after the chain (its state mu is per sequence, kept by the engine and updated from the
logprob of the drawn token, which comes from this truncated distribution).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from aphrodite_jax.sampling.step import sampler_step

NEG_INF = -jnp.inf
_EPS = 1e-5


def _shifted(padded: jax.Array, h: int, k) -> jax.Array:
    """Column c of the result is column c - k of the unpadded array (padded = [pad(H) | x(H)])."""
    return jax.lax.dynamic_slice_in_dim(padded, h - k, h, axis=1)


def _pad_left(x: jax.Array, value) -> jax.Array:
    return jnp.concatenate([jnp.full_like(x, value), x], axis=1)  # [B, 2H]


# --- no-repeat-ngram ------------------------------------------------------------------------
@sampler_step("no_repeat_ngram", fields={"no_repeat_ngram_size": np.int32},
              active=lambda p: p["no_repeat_ngram_size"] > 0)
def no_repeat_ngram(logits, p, md):
    """Bans every token t such that (last n-1 tokens, t) already occurs as an n-gram (HF semantics)."""
    b, v = logits.shape
    h = md.history_ids  # [B, H]
    width = h.shape[1]
    n = p["no_repeat_ngram_size"]  # [B]
    col = jnp.arange(width)[None, :]  # [1, H]
    start = width - md.history_len  # [B]
    # Candidate e: the n-gram h[e-n+1 .. e] lies inside the history.
    ok = (col - (n[:, None] - 1) >= start[:, None]) & (n[:, None] > 0)  # [B, H]
    hp = _pad_left(h, -1)

    def body(k, ok):  # compare h[e-1-k] with h[H-1-k], k < n-1
        prev = _shifted(hp, width, k + 1)  # [B, H]
        target = jax.lax.dynamic_slice_in_dim(h, width - 1 - k, 1, axis=1)  # [B, 1]
        return ok & ((prev == target) | (k >= n[:, None] - 1))

    ok = jax.lax.fori_loop(0, jnp.maximum(jnp.max(n) - 1, 0), body, ok)
    rows = jnp.arange(b)[:, None]
    banned = jnp.zeros((b, v), bool).at[rows, jnp.where(ok, h, v)].set(True, mode="drop")
    return jnp.where(banned, NEG_INF, logits)


# --- DRY --------------------------------------------------------------------------------------
@sampler_step(
    "dry",
    fields={"dry_multiplier": np.float32, "dry_base": np.float32,
            "dry_allowed_length": np.int32, "dry_range": np.int32,
            "dry_max_ngram": np.int32, "dry_max_occurrences": np.int32,
            "dry_early_exit_match_len": np.int32},
    active=lambda p: p["dry_multiplier"] > _EPS)
def dry(logits, p, md):
    """DRY: for each earlier occurrence i of the last token (the last
    dry_max_occurrences, newest first, stopping after one whose match reaches
    dry_early_exit_match_len), m = how many tokens before i match the tokens before the end (no
    breakers, at most dry_max_ngram); the token after i gets len = max(len, m + 1) when m > 0; then
    l_t -= multiplier * base^(len_t - allowed_length) for len_t >= allowed_length."""
    b, v = logits.shape
    h = md.history_ids  # [B, H]
    width = h.shape[1]
    col = jnp.arange(width)[None, :]  # [1, H]
    rng = p["dry_range"]
    length = jnp.where(rng > 0, jnp.minimum(md.history_len, rng), md.history_len)  # [B]
    start = (width - length)[:, None]  # [B, 1]
    valid = col >= start
    brk = jnp.any(h[:, :, None] == md.dry_breakers[:, None, :], axis=-1)  # [B, H]
    last = h[:, width - 1:]  # [B, 1]
    row_on = (length >= 2) & ~brk[:, width - 1]  # [B]
    occ = valid & (h == last) & (col < width - 1)  # [B, H]
    occ_i = occ.astype(jnp.int32)
    later = jnp.cumsum(occ_i[:, ::-1], axis=1)[:, ::-1] - occ_i  # occurrences after column c
    occ = occ & (later < p["dry_max_occurrences"][:, None])
    max_ngram = p["dry_max_ngram"][:, None]
    hp, bp = _pad_left(h, -1), _pad_left(brk, True)

    def body(k, carry):  # offset k = 1, 2, ...: h[i - k] == h[L - k], inside the window, no breaker
        run, m = carry
        target = jax.lax.dynamic_slice_in_dim(h, width - 1 - k, 1, axis=1)  # [B, 1]
        run = (run & (_shifted(hp, width, k) == target) & ~_shifted(bp, width, k)
               & (col - k >= start) & (k <= max_ngram))
        return run, m + run.astype(jnp.int32)

    top = jnp.minimum(jnp.max(jnp.where(row_on, p["dry_max_ngram"], 0)), width - 1)
    _, m = jax.lax.fori_loop(1, top + 1, body, (occ, jnp.zeros((b, width), jnp.int32)))
    # Early exit: nothing older than the newest occurrence whose match reaches the exit length.
    hit = occ & (m + 1 >= p["dry_early_exit_match_len"][:, None])
    newest_hit = jnp.max(jnp.where(hit, col, -1), axis=1, keepdims=True)  # [B, 1]
    keep = occ & (m > 0) & (col >= newest_hit) & row_on[:, None]
    nxt = jnp.concatenate([h[:, 1:], jnp.full((b, 1), v, h.dtype)], axis=1)  # token after column c
    rows = jnp.arange(b)[:, None]
    lens = jnp.zeros((b, v), jnp.int32).at[rows, jnp.where(keep, nxt, v)].max(m + 1, mode="drop")
    allowed = p["dry_allowed_length"][:, None]
    pen = p["dry_multiplier"][:, None] * jnp.power(p["dry_base"][:, None],
                                                   (lens - allowed).astype(jnp.float32))
    return logits - jnp.where((lens > 0) & (lens >= allowed), pen, 0.0)


# --- Mirostat v2 ------------------------------------------------------------------------------
@sampler_step("mirostat", fields={"mirostat_mode": np.int32, "mirostat_mu": (0.0, np.float32)},
              active=lambda p: p["mirostat_mode"] == 2,
              host=lambda sp: {"mirostat_mode": sp.mirostat_mode, "mirostat_mu": 2.0 * sp.mirostat_tau})
def mirostat(logits, p, md):
    """Removes tokens whose surprise -log2 p exceeds the sequence's mu, never the most likely one."""
    surprise = -jax.nn.log_softmax(logits, axis=-1) / math.log(2.0)  # [B, V]
    top = logits >= jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where((surprise > p["mirostat_mu"][:, None]) & ~top, NEG_INF, logits)


def mirostat_update(mu: float, logprob: float, tau: float, eta: float) -> float:
    """Host-side state update after a draw: mu <- mu - eta * (surprise - tau), surprise in bits."""
    return mu - eta * (-logprob / math.log(2.0) - tau)
