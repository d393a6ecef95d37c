"""Test helper: a tiny host-side page allocator that builds AttentionMetadata by hand."""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from aphrodite_jax.layers.attention_metadata import AttentionMetadata


class PagePool:
    """Pages handed out from a shuffled free list, so page order in a table is non-trivial."""

    def __init__(self, num_pages: int, page_size: int, pages_per_seq: int, seed: int = 0):
        self.page_size, self.pages_per_seq = page_size, pages_per_seq
        self.free = list(np.random.default_rng(seed).permutation(num_pages))
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]):
        """chunks: seq id -> this step's token ids. Returns (input_ids i32[T], md)."""
        ids, positions, kv_lens, tables, cu = [], [], [], [], [0]
        for sid, toks in chunks.items():
            start = self.lens.get(sid, 0)
            end = start + len(toks)
            table = self.tables.setdefault(sid, [])
            while len(table) * self.page_size < end:
                table.append(int(self.free.pop()))
            self.lens[sid] = end
            ids += list(toks)
            positions += list(range(start, end))
            kv_lens.append(end)
            tables.append(table + [0] * (self.pages_per_seq - len(table)))
            cu.append(cu[-1] + len(toks))
        md = AttentionMetadata(
            positions=jnp.asarray(positions, jnp.int32), kv_lens=jnp.asarray(kv_lens, jnp.int32),
            page_indices=jnp.asarray(tables, jnp.int32), cu_q_lens=jnp.asarray(cu, jnp.int32),
            num_seqs=jnp.asarray([len(chunks)], jnp.int32))
        return jnp.asarray(ids, jnp.int32), md
