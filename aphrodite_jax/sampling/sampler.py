"""The on-device sampler: one jit-friendly function over the batch with per-row parameters.

Pipeline (docs/decisions.md D27): logit_bias / bans / min_tokens stop-id bans (sparse, `md.bias_*`) ->
allowed_token_ids mask -> the registered sampler chain (registry.py, default order) ->
logprobs = log_softmax(processed logits) -> greedy rows take the argmax, the others an inverse-CDF draw
(one uniform per row against the cumulative probabilities; exactly the categorical distribution, and
one random number per row instead of a Gumbel sample per vocabulary entry, which cost ~50 ms per
step at B=32, V=49152 on CPU) with key fold_in(PRNGKey(seed), output_index).

Returned logprobs are those of the final processed distribution (docs/decisions.md D30): truncated
tokens are -inf there, and every returned value is clamped to >= -9999.0 (D13).
Prompt logprobs (`prompt_logprobs`) are the raw model distribution's log_softmax.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from aphrodite_jax.sampling.metadata import (  # noqa: F401  (re-exported)
    SamplingMetadata, SamplingRow, make_sampling_metadata, seed_key_data)
from aphrodite_jax.sampling.registry import apply_samplers

LOGPROB_FLOOR = -9999.0


class SamplerOutput(NamedTuple):
    token_ids: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B], logprob of the sampled token
    ranks: jax.Array  # i32[B], 1-based vocab rank of the sampled token
    topk_ids: jax.Array  # i32[B, K]
    topk_logprobs: jax.Array  # f32[B, K]


class PromptLogprobs(NamedTuple):
    logprobs: jax.Array  # f32[N], logprob of the given next token
    ranks: jax.Array  # i32[N]
    topk_ids: jax.Array  # i32[N, K]
    topk_logprobs: jax.Array  # f32[N, K]


def apply_logits_processors(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Sparse logit bias and bans, then the allowed_token_ids mask (the chain's head, D27)."""
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]  # [B, 1]
    # Behind a cond: the scatter writes a copy of the [B, V] logits (~1 ms at [32, 49152] on CPU), and
    # most batches have no bias at all (padding ids are V).
    logits = jax.lax.cond(jnp.any(md.bias_ids < v),
                          lambda lg: lg.at[rows, md.bias_ids].add(md.bias_vals, mode="drop"),  # [B, V]
                          lambda lg: lg, logits)

    def _allowed(lg):
        ok = jnp.zeros((b, v), bool).at[rows, md.allowed_ids].set(True, mode="drop")  # [B, V]
        return jnp.where(md.has_allowed[:, None] & ~ok, -jnp.inf, lg)

    return jax.lax.cond(jnp.any(md.has_allowed), _allowed, lambda lg: lg, logits)


def apply_chain(logits: jax.Array, md: SamplingMetadata, only: Optional[frozenset[str]] = None) -> jax.Array:
    """logits f32[B, V] -> the final processed logits f32[B, V] the draw and the logprobs use."""
    logits = apply_logits_processors(logits.astype(jnp.float32), md)
    return apply_samplers(logits, md.params, md, only)


def _row_keys(md: SamplingMetadata) -> jax.Array:
    """Per-row draw keys, typed key array [B]."""
    keys = jax.vmap(lambda kd: jax.random.wrap_key_data(kd, impl="threefry2x32"))(md.key_data)
    return jax.vmap(jax.random.fold_in)(keys, md.output_index)


def _gather_logprobs(logprobs: jax.Array, ids: jax.Array, k: int):
    """logprobs f32[B, V], ids i32[B] -> (lp f32[B], rank i32[B], topk ids i32[B, K], topk lp f32[B, K])."""
    lp = jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]  # [B]
    rank = 1 + jnp.sum(logprobs > lp[:, None], axis=-1).astype(jnp.int32)  # [B]
    if k > 0:
        top_lp, top_ids = jax.lax.top_k(logprobs, k)  # [B, K]
    else:
        top_lp = jnp.zeros((logprobs.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logprobs.shape[0], 0), jnp.int32)
    return (jnp.maximum(lp, LOGPROB_FLOOR), rank, top_ids.astype(jnp.int32),
            jnp.maximum(top_lp, LOGPROB_FLOOR))


ARGMAX_BLOCK = 128


def max_and_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max f32[B], argmax i32[B]) over the last axis of f32[B, V], first index on ties, as jnp.argmax.

    XLA's CPU backend runs argmax (a variadic index/value reduce) ~25x slower than a max (17 ms vs 0.7 ms
    at [32, 49152]), and a [B, V] select of indices followed by a min still writes and reads the whole
    array. So: per-block maxima (a plain reduce), the first block holding the row max, then the first
    index in that block: one pass over [B, V], the rest on [B, V/128] and [B, 128].
    A row with a NaN gets an id in range: V - 1 when its max is NaN (no position equals it); XLA CPU's
    max reduce may skip NaNs instead, and then it is the argmax of the rest."""
    b, v = x.shape
    w = ARGMAX_BLOCK
    pad = -v % w
    xp = x if pad == 0 else jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    xb = xp.reshape(b, -1, w)  # [B, nb, W]
    bmax = jnp.max(xb, axis=-1)  # [B, nb]
    m = jnp.max(bmax, axis=-1)  # [B]
    nb = bmax.shape[1]
    hit_b = bmax == m[:, None]  # [B, nb]
    j = jnp.min(jnp.where(hit_b, jnp.arange(nb, dtype=jnp.int32), nb), axis=-1)  # [B] first such block
    blk = jnp.take_along_axis(xb, jnp.minimum(j, nb - 1)[:, None, None], axis=1)[:, 0]  # [B, W]
    i = jnp.min(jnp.where(blk == m[:, None], jnp.arange(w, dtype=jnp.int32), w), axis=-1)  # [B]
    ids = jnp.where(j < nb, j * w + i, v - 1)
    return m, jnp.minimum(ids, v - 1).astype(jnp.int32)


def _blocked_draw(probs: jax.Array, unif: jax.Array, block: int = 128) -> jax.Array:
    """Inverse-CDF draw: the first id whose cumulative probability reaches u = (1 - unif) * total, for
    probs f32[B, V] and unif f32[B] in [0, 1), so u is in (0, total]. Two levels (per-block sums, then
    one block), because a cumsum over [32, 49152] costs ~14 ms on XLA CPU and the blocked one well under
    1 ms. Never picks a zero-probability id."""
    b, v = probs.shape
    pad = -v % block
    p = jnp.pad(probs, ((0, 0), (0, pad))).reshape(b, -1, block)  # [B, nb, W]
    bcdf = jnp.cumsum(p.sum(-1), axis=-1)  # [B, nb]
    nb = bcdf.shape[1]
    u = (1.0 - unif) * bcdf[:, -1]  # [B], in (0, total]: a zero-probability token is never picked
    j = jnp.minimum(jnp.sum(bcdf < u[:, None], axis=-1), nb - 1)  # [B] first block reaching u
    prefix = jnp.where(j > 0, jnp.take_along_axis(bcdf, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0], 0.0)
    pb = jnp.take_along_axis(p, j[:, None, None], axis=1)[:, 0]  # [B, W]
    inner = jnp.sum(jnp.cumsum(pb, axis=-1) < (u - prefix)[:, None], axis=-1)  # [B]
    w = jnp.arange(block, dtype=jnp.int32)
    last_nz = jnp.max(jnp.where(pb > 0, w, 0), axis=-1)  # rounding can run past the block's last token
    first_nz = jnp.min(jnp.where(pb > 0, w, block - 1), axis=-1)
    inner = jnp.clip(inner, first_nz, last_nz)
    return jnp.minimum(j * block + inner, v - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("max_num_logprobs", "all_greedy", "only"))
def sample(logits: jax.Array, md: SamplingMetadata, *, max_num_logprobs: int = 0,
           all_greedy: bool = False, only: Optional[frozenset[str]] = None) -> SamplerOutput:
    """Samples one token per row of logits f32[B, V].

    max_num_logprobs (static): K of the returned top-k. all_greedy (static): skip the random draw.
    only (static, optional): restrict the chain to these step names (see registry.py on costs).
    """
    processed = apply_chain(logits, md, only)  # [B, V]
    m, greedy_ids = max_and_argmax(processed)  # [B], [B]
    if all_greedy and max_num_logprobs == 0:
        # Fast path: the argmax's logprob is max - logsumexp, and its rank is 1 (ties resolve to the
        # first id, so no other id is strictly larger); no [B, V] log_softmax is materialised.
        safe = jnp.where(jnp.isfinite(m), m, 0.0)
        lse = safe + jnp.log(jnp.sum(jnp.exp(processed - safe[:, None]), axis=-1))
        b = logits.shape[0]
        return SamplerOutput(greedy_ids, jnp.maximum(m - lse, LOGPROB_FLOOR), jnp.ones((b,), jnp.int32),
                             jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), jnp.float32))
    logprobs = jax.nn.log_softmax(processed, axis=-1)  # [B, V]
    if all_greedy:
        ids = greedy_ids
    else:
        probs = jnp.exp(logprobs)  # [B, V]
        unif = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(_row_keys(md))  # [B]
        ids = jnp.where(md.greedy, greedy_ids, _blocked_draw(probs, unif))
    lp, rank, top_ids, top_lp = _gather_logprobs(logprobs, ids, max_num_logprobs)
    return SamplerOutput(ids, lp, rank, top_ids, top_lp)


@functools.partial(jax.jit, static_argnames=("num_logprobs",))
def prompt_logprobs(logits: jax.Array, next_ids: jax.Array, *, num_logprobs: int = 0) -> PromptLogprobs:
    """Per-position logprob of the given next prompt token: logits f32[N, V], next_ids i32[N].

    Position i's logits predict token i+1 of the prompt; the caller pairs them (the first prompt token
    has no logprob). Values are clamped to >= -9999.0.
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [N, V]
    return PromptLogprobs(*_gather_logprobs(logprobs, next_ids.astype(jnp.int32), num_logprobs))


apply_chain_jit = jax.jit(apply_chain, static_argnames=("only",))
