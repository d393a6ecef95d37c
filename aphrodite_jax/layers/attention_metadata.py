"""Per-step attention metadata: the device-side description of one ragged batch.

Built on the host by the ModelRunner (padded to bucket shapes), moved to the device in one transfer,
and passed unchanged through every layer to `pallas_kernels.ragged_paged_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax


@jax.tree_util.register_dataclass
@dataclass
class AttentionMetadata:
    positions: jax.Array  # i32[T]   absolute position of each query row (RoPE); 0 for padding rows
    kv_lens: jax.Array  # i32[S]     context length per sequence, this step's tokens included
    page_indices: jax.Array  # i32[S, pages_per_seq]
    cu_q_lens: jax.Array  # i32[S+1]  cumulative query rows per sequence
    num_seqs: jax.Array  # i32[1]     real sequences among the S rows
