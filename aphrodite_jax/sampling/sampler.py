"""The on-device sampler: one jit-friendly function over the batch with per-row parameters.

Pipeline (spec 3.1): logit_bias / bans / min_tokens stop-id bans (sparse, `md.bias_*`) ->
allowed_token_ids mask -> the registered sampler chain (registry.py, default order) ->
logprobs = log_softmax(processed logits) -> greedy rows take the argmax, the others an inverse-CDF draw
(one uniform per row against the cumulative probabilities; exactly the categorical distribution, and
one random number per row instead of a Gumbel sample per vocabulary entry, which cost ~50 ms per
step at B=32, V=49152 on CPU) with key fold_in(PRNGKey(seed), output_index).

Returned logprobs are those of the final processed distribution, as the spec (2.6) says: truncated
tokens are -inf there, and every returned value is clamped to >= -9999.0 (design decision 13).
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
    """Spec 3.1 step 2-4: sparse logit bias and bans, then the allowed_token_ids mask."""
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]  # [B, 1]
    logits = logits.at[rows, md.bias_ids].add(md.bias_vals, mode="drop")  # [B, V]

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


@functools.partial(jax.jit, static_argnames=("max_num_logprobs", "all_greedy", "only"))
def sample(logits: jax.Array, md: SamplingMetadata, *, max_num_logprobs: int = 0,
           all_greedy: bool = False, only: Optional[frozenset[str]] = None) -> SamplerOutput:
    """Samples one token per row of logits f32[B, V].

    max_num_logprobs (static): K of the returned top-k. all_greedy (static): skip the random draw.
    only (static, optional): restrict the chain to these step names (see registry.py on costs).
    """
    processed = apply_chain(logits, md, only)  # [B, V]
    logprobs = jax.nn.log_softmax(processed, axis=-1)  # [B, V]
    greedy_ids = jnp.argmax(processed, axis=-1).astype(jnp.int32)  # [B]
    if all_greedy:
        ids = greedy_ids
    else:
        v = logits.shape[-1]
        cdf = jnp.cumsum(jnp.exp(logprobs), axis=-1)  # [B, V]
        unif = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(_row_keys(md))  # [B]
        u = (1.0 - unif) * cdf[:, -1]  # in (0, total]: a zero-probability token is never picked
        drawn = jnp.minimum(jnp.sum(cdf < u[:, None], axis=-1), v - 1).astype(jnp.int32)  # [B]
        ids = jnp.where(md.greedy, greedy_ids, drawn)
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
