"""Rotary position embeddings with HF's scaling types: default, linear, dynamic, llama3, yarn.

The inverse frequencies follow transformers/modeling_rope_utils.py (formulas, not code). They are
computed once on the host in float64 and kept as a static tuple (not a weight).

"dynamic" (NTK): HF recomputes inv_freq from seq_len = max(position_ids) + 1 whenever that exceeds
max_position_embeddings, and re-rotates *every* position of that forward with it. A paged KV cache holds
keys already rotated, so we instead scale per token: a row at position p uses seq_len = max(p + 1,
max_position_embeddings). For contexts within max_position_embeddings this is exactly HF (default
frequencies); beyond it, decode steps match HF's query rotation, while prompt keys past the limit differ
from HF's (which used the whole prompt's length for all of them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class RopeSpec:
    """Everything needed to rotate: hashable, so it can live in a module's static attributes."""

    inv_freq: tuple[float, ...]  # [rot_dim/2]
    attention_scaling: float
    rot_dim: int
    # dynamic NTK only:
    dynamic: bool = False
    base: float = 10000.0
    factor: float = 1.0
    max_position: int = 0


def rope_parameters(hf_config) -> dict[str, Any]:
    """rope_type, rope_theta and the scaling keys, from either the new (rope_parameters) or old
    (rope_theta + rope_scaling) config format."""
    params = None
    if hasattr(hf_config, "standardize_rope_params"):
        try:
            hf_config.standardize_rope_params()
        except Exception:  # older configs without the fields: fall back below
            pass
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def make_rope_spec(hf_config, head_dim: int) -> RopeSpec:
    p = rope_parameters(hf_config)
    kind = p["rope_type"]
    base = float(p["rope_theta"])
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    inv = _default_inv_freq(base, dim)
    scaling = 1.0
    max_pos = int(hf_config.max_position_embeddings)
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / float(p["factor"])
    elif kind == "dynamic":
        return RopeSpec(tuple(inv.tolist()), 1.0, dim, dynamic=True, base=base, factor=float(p["factor"]),
                        max_position=max_pos)
    elif kind == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv, scaling = _yarn(p, base, dim, hf_config)
    else:
        raise NotImplementedError(f"rope_type {kind!r} is not supported")
    return RopeSpec(tuple(float(x) for x in inv), float(scaling), dim)


def _yarn(p: dict, base: float, dim: int, hf_config) -> tuple[np.ndarray, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or hf_config.max_position_embeddings / orig
    att, mscale, mscale_all = p.get("attention_factor"), p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if att is None:
        att = get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if (mscale and mscale_all) \
            else get_mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrap = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    interp = extrap / factor
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return interp * (1 - keep) + extrap * keep, float(att)


def _inv_freq(spec: RopeSpec, positions: jax.Array) -> jax.Array:
    """[rot/2] (static) or [T, rot/2] (dynamic NTK, per token)."""
    if not spec.dynamic:
        return jnp.asarray(np.asarray(spec.inv_freq, np.float32))
    dim = spec.rot_dim
    seq = jnp.maximum(positions.astype(jnp.float32) + 1.0, float(spec.max_position))  # [T]
    base = spec.base * ((spec.factor * seq / spec.max_position) - (spec.factor - 1)) ** (dim / (dim - 2))
    expo = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim  # [rot/2]
    return 1.0 / (base[:, None] ** expo[None, :])  # [T, rot/2]


def apply_rope(x: jax.Array, positions: jax.Array, spec: RopeSpec) -> jax.Array:
    """Rotate x [T, N, D] by positions i32[T], HF "rotate_half" (NeoX) convention."""
    inv = _inv_freq(spec, positions)
    freqs = positions.astype(jnp.float32)[:, None] * inv  # [T, rot/2]
    cos = jnp.cos(freqs) * spec.attention_scaling
    sin = jnp.sin(freqs) * spec.attention_scaling
    cos = jnp.concatenate([cos, cos], axis=-1)[:, None, :].astype(x.dtype)  # [T, 1, rot]
    sin = jnp.concatenate([sin, sin], axis=-1)[:, None, :].astype(x.dtype)
    rot, rest = x[..., :spec.rot_dim], x[..., spec.rot_dim:]
    half = spec.rot_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], axis=-1)
