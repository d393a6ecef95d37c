"""SamplingMetadata: the per-row sampler inputs of one step, padded to a batch bucket B.

Built on the host as NumPy arrays by `make_sampling_metadata`; the runner moves the whole pytree to the
device (`jax.device_put(md)`) in one transfer. Every array's shape depends only on B, V-independent
widths and bucketed list lengths, never on parameter values, so new values never recompile.

Layout (padded rows are greedy and neutral; padded ids are `vocab_size`, which scatters drop):
- params: {field: [B]} for every field of every registered sampler step (registry.all_fields()).
- greedy bool[B]: temperature < 1e-5 (argmax of the processed logits).
- key_data u32[B, 2]: threefry key data of the row's seed, (seed >> 32, seed & 0xffffffff) of the seed
  as uint64, i.e. `jax.random.PRNGKey(seed)` for 0 <= seed < 2**31; output_index i32[B]: the index of
  the output token being drawn. The draw key is fold_in(key, output_index), so it never depends on
  the other rows.
- bias_ids i32[B, Kb], bias_vals f32[B, Kb]: sparse additive logit changes, applied before the chain:
  logit_bias (clamped to +-100), custom_token_bans or the token_ban_ranges open at this output index
  (-inf) and, while the output is shorter than min_tokens, the row's stop ids (EOS unless ignore_eos,
  plus stop_token_ids) (-inf).
- allowed_ids i32[B, Ka] + has_allowed bool[B]: allowed_token_ids mask.
- history_ids i32[B, H]: prompt + output tokens, right-aligned (the newest token in the last column,
  padding on the left), with history_len i32[B] and output_len i32[B] (the output is the last
  output_len entries). Filled only for rows that use a history sampler (penalties, DRY,
  no-repeat-ngram); width 1 when no row does.
- order i32[B, C]: per row, the index (into registry.chain_steps()) of the step run at each position
  of the reorderable chain (sampler_priority / temperature_last, per request).
- dry_breakers i32[B, Kd]: DRY sequence-breaker ids.
Widths are powers of two (>= 8 when used); pass fixed widths to pin the shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np

from aphrodite_jax.sampling.registry import (all_fields, chain_steps, host_values,
                                             registered_steps, row_order)
from aphrodite_jax.sampling_params import SamplingParams

_EPS = 1e-5


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingMetadata:
    params: dict  # {field: [B]}
    greedy: Any  # bool[B]
    key_data: Any  # u32[B, 2]
    output_index: Any  # i32[B]
    bias_ids: Any  # i32[B, Kb]
    bias_vals: Any  # f32[B, Kb]
    allowed_ids: Any  # i32[B, Ka]
    has_allowed: Any  # bool[B]
    history_ids: Any  # i32[B, H]
    history_len: Any  # i32[B]
    output_len: Any  # i32[B]
    order: Any  # i32[B, C]
    dry_breakers: Any  # i32[B, Kd]

    def replace(self, **kw: Any) -> "SamplingMetadata":
        return dataclasses.replace(self, **kw)


class SamplingRow(NamedTuple):
    """One row of the batch: the request's params, its seed, and the number of outputs so far."""

    params: SamplingParams
    seed: int
    output_index: int
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    mirostat_mu: Optional[float] = None  # the sequence's Mirostat state (None: initial, 2 * tau)


def _width(n: int, fixed: Optional[int]) -> int:
    if fixed is not None and n <= fixed:
        return fixed
    if n == 0:
        return 1
    return max(8, 1 << (n - 1).bit_length())


def seed_key_data(seed: int) -> tuple[int, int]:
    """Threefry key data of a (possibly negative, 64-bit) seed."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s >> 32, s & 0xFFFFFFFF


def _has_penalty(sp: SamplingParams) -> bool:
    return (abs(sp.presence_penalty) >= _EPS or abs(sp.frequency_penalty) >= _EPS
            or sp.repetition_penalty > 1.0 + _EPS)


def needs_history(sp: SamplingParams) -> bool:
    """Whether the row's token history must go to the device (penalties, DRY, no-repeat-ngram)."""
    return _has_penalty(sp) or sp.dry_multiplier > _EPS or sp.no_repeat_ngram_size > 0


def _bans(sp: SamplingParams, output_len: int) -> list[int]:
    """custom_token_bans, or (they replace it, docs/decisions.md D27) the token_ban_ranges open now."""
    if sp.token_ban_ranges is None:
        return list(sp.custom_token_bans or ())
    return [t for tokens, start, length in sp.token_ban_ranges if start <= output_len < start + length
            for t in tokens]


def make_sampling_metadata(rows: Sequence[Any], batch_bucket: int, vocab_size: int, *,
                           eos_token_ids: Sequence[int] = (), bias_width: Optional[int] = None,
                           allowed_width: Optional[int] = None, history_width: Optional[int] = None,
                           dry_width: Optional[int] = None) -> SamplingMetadata:
    """Host NumPy arrays for `sample()`; rows are `SamplingRow`s or tuples in its field order.

    A fixed width is a floor: a row that needs more gets the next power of two (a new shape)."""
    rows = [r if isinstance(r, SamplingRow) else SamplingRow(*r) for r in rows]
    b = batch_bucket
    if len(rows) > b:
        raise ValueError(f"{len(rows)} rows do not fit batch bucket {b}")
    fields = all_fields()
    params = {name: np.full((b,), off, dtype) for name, (off, dtype) in fields.items()}
    greedy = np.ones((b,), bool)
    key_data = np.zeros((b, 2), np.uint32)
    output_index = np.zeros((b,), np.int32)
    chain = chain_steps()
    order = np.tile(np.arange(len(chain), dtype=np.int32), (b, 1))
    biases: list[dict[int, float]] = []
    allowed: list[Optional[list[int]]] = []
    hist: list[Optional[list[int]]] = []
    out_lens = np.zeros((b,), np.int32)
    breakers: list[list[int]] = []
    steps = registered_steps()
    for i, r in enumerate(rows):
        sp = r.params
        for step in steps:
            for name, val in host_values(step, sp).items():
                params[name][i] = val
        if r.mirostat_mu is not None and "mirostat_mu" in params and sp.mirostat_mode == 2:
            params["mirostat_mu"][i] = r.mirostat_mu  # the step's host default is the initial 2 * tau
        greedy[i] = sp.temperature < _EPS
        key_data[i] = seed_key_data(r.seed)
        output_index[i] = r.output_index
        order[i] = row_order(sp, chain)
        bias: dict[int, float] = dict(sp.logit_bias or {})
        for t in _bans(sp, len(r.output_token_ids)):
            bias[t] = -np.inf
        if len(r.output_token_ids) < sp.min_tokens:
            for t in sp.all_stop_token_ids(eos_token_ids):
                bias[t] = -np.inf
        biases.append(bias)
        allowed.append(list(sp.allowed_token_ids) if sp.allowed_token_ids is not None else None)
        if needs_history(sp):
            hist.append(list(r.prompt_token_ids) + list(r.output_token_ids))
            out_lens[i] = len(r.output_token_ids)
        else:
            hist.append(None)
        breakers.append(list(sp.dry_sequence_breaker_ids) if sp.dry_multiplier > _EPS else [])

    kb = _width(max((len(x) for x in biases), default=0), bias_width)
    bias_ids = np.full((b, kb), vocab_size, np.int32)
    bias_vals = np.zeros((b, kb), np.float32)
    ka = _width(max((len(x) for x in allowed if x is not None), default=0), allowed_width)
    allowed_ids = np.full((b, ka), vocab_size, np.int32)
    has_allowed = np.zeros((b,), bool)
    need_h = max((len(h) for h in hist if h is not None), default=0)
    hw = _width(need_h, history_width)
    history_ids = np.full((b, hw), vocab_size, np.int32)
    history_len = np.zeros((b,), np.int32)
    kd = _width(max((len(x) for x in breakers), default=0), dry_width)
    dry_breakers = np.full((b, kd), vocab_size, np.int32)
    for i in range(len(rows)):
        if biases[i]:
            ids, vals = zip(*biases[i].items())
            bias_ids[i, :len(ids)] = ids
            bias_vals[i, :len(ids)] = vals
        if allowed[i] is not None:
            has_allowed[i] = True
            allowed_ids[i, :len(allowed[i])] = allowed[i]
        if hist[i]:
            history_ids[i, hw - len(hist[i]):] = hist[i]
            history_len[i] = len(hist[i])
        dry_breakers[i, :len(breakers[i])] = breakers[i]
    return SamplingMetadata(params, greedy, key_data, output_index, bias_ids, bias_vals, allowed_ids,
                            has_allowed, history_ids, history_len, out_lens, order, dry_breakers)
