"""The device half: apply one step's packed token bitmask to the logits before the samplers.

Jitted per sample bucket (the runner's buckets), compiled in warm-up, so guided steps never compile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits f32[B, V], bitmask i32[B, ceil(V/32)] (bit j of word i: token 32 i + j allowed) -> the
    logits with every disallowed token at -inf. Rows that are not guided carry all-ones words."""
    b, v = logits.shape
    shifts = jnp.arange(32, dtype=jnp.int32)  # [32]
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(b, -1)[:, :v] != 0  # [B, V]
    return jnp.where(allowed, logits, -jnp.inf)
