"""ModelRunner: owns the device state (weights, KV cache) and runs one scheduled step.

The model is split once into graphdef + flat state leaves; one jitted pure function runs the model
over a ragged batch padded to (token bucket, sample bucket) shapes, with the KV cache donated. Host
metadata is packed into one int32 buffer and moved with one transfer per step. Every shape is
compiled in `warmup()`, so a serving process never compiles afterwards.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from aphrodite_jax.config import EngineConfig
from aphrodite_jax.layers.attention_metadata import AttentionMetadata
from aphrodite_jax.runner.buckets import pick_bucket, power_of_two_buckets, step_shapes

logger = logging.getLogger(__name__)

COPY_CHUNK = 8  # pages per copy / swap call (padded), so page moves compile once


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # as stored (repeated for tensor parallelism when needed)
    head_dim: int
    dtype: Any

    def page_bytes(self, block_size: int) -> int:
        """Bytes one page takes across all layers."""
        itemsize = jnp.dtype(self.dtype).itemsize
        return self.num_layers * block_size * 2 * self.num_kv_heads * self.head_dim * itemsize


@dataclass
class StepResult:
    """Host copies of one step's sampler output, one row per requested sample."""

    token_ids: np.ndarray  # i32[R]
    logprobs: np.ndarray  # f32[R]
    topk_ids: Optional[np.ndarray]  # i32[R, K] or None when no row asked for logprobs
    topk_logprobs: Optional[np.ndarray]  # f32[R, K]


def kv_cache_spec_for(model: Any, hf_config: Any, tp_size: int, dtype: Any) -> KVCacheSpec:
    if hasattr(model, "kv_cache_spec"):
        layers, heads, head_dim = model.kv_cache_spec(hf_config, tp_size)
    else:
        layers = hf_config.num_hidden_layers
        heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if heads < tp_size:
            heads = tp_size
    return KVCacheSpec(layers, heads, head_dim, dtype)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: Any, hf_config: Any, *, max_model_len: int,
                 vocab_size: int, dtype: Any, mesh: Optional[jax.sharding.Mesh] = None,
                 sampler: Any = None):
        self.config = config
        self.mesh = mesh
        self.hf_config = hf_config
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.block_size = config.cache.block_size
        self.pages_per_seq = math.ceil(max_model_len / self.block_size)
        tp = config.parallel.tensor_parallel_size
        self.kv_spec = kv_cache_spec_for(model, hf_config, tp, dtype)

        sched = config.scheduler
        self.max_num_seqs = sched.max_num_seqs
        self.max_tokens = sched.max_num_batched_tokens
        self.token_buckets = power_of_two_buckets(8, self.max_tokens)
        self.sample_buckets = power_of_two_buckets(8, self.max_num_seqs)
        self.seq_bucket = self.sample_buckets[-1]  # attention rows: always the max (cheap metadata)
        self.shapes = step_shapes(self.token_buckets, self.sample_buckets)

        graphdef, state = nnx.split(model)
        self._leaves, self._treedef = jax.tree.flatten(state)
        self._graphdef = graphdef
        del model  # the runner holds the weights only as leaves

        self.num_gpu_blocks, self.num_cpu_blocks = self._plan_cache()
        self.kv_caches = self._allocate_caches()
        self.host_cache = None  # lazily allocated swap space: np [L, cpu_blocks, page, 2Hkv, D]
        self._build_jits()

    # ------------------------------------------------------------------ setup
    def _plan_cache(self) -> tuple[int, int]:
        cache = self.config.cache
        page_bytes = self.kv_spec.page_bytes(self.block_size)
        if cache.num_gpu_blocks_override is not None:
            num = cache.num_gpu_blocks_override
        elif jax.default_backend() == "cpu":
            num = int(cache.kv_cache_memory * 2**30 // page_bytes)
        else:
            stats = jax.devices()[0].memory_stats() or {}
            limit = stats.get("bytes_limit", 16 * 2**30)
            in_use = stats.get("bytes_in_use", 0)
            budget = limit * cache.gpu_memory_utilization - in_use - 2**30  # 1 GiB for activations
            num = int(max(budget, 0) // page_bytes)
        # A sequence of max_model_len must fit, or nothing long could ever run.
        num = max(num, self.pages_per_seq + 1)
        cpu = int(cache.swap_space * 2**30 // page_bytes)
        logger.info("KV cache: %d pages of %d tokens (%d tokens, %.2f GiB); swap space %d pages",
                    num, self.block_size, num * self.block_size, num * page_bytes / 2**30, cpu)
        return num, cpu

    def _cache_sharding(self):
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, P(None, None, "model", None))

    def _allocate_caches(self) -> list[jax.Array]:
        s = self.kv_spec
        shape = (self.num_gpu_blocks, self.block_size, 2 * s.num_kv_heads, s.head_dim)
        sharding = self._cache_sharding()
        alloc = jax.jit(lambda: jnp.zeros(shape, s.dtype), out_shardings=sharding)
        return [alloc() for _ in range(s.num_layers)]

    def _build_jits(self) -> None:
        graphdef, treedef = self._graphdef, self._treedef
        cache_sharding = self._cache_sharding()

        def forward(leaves, kv_caches, packed, *, num_tokens: int, num_samples: int):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            ids, md, logits_idx = self._unpack(packed, num_tokens, num_samples)
            hidden, kv_caches = model(ids, kv_caches, md)  # [T, H]
            logits = model.compute_logits(hidden[logits_idx])  # [B, V]
            return logits, kv_caches

        out_shardings = None
        if cache_sharding is not None:
            out_shardings = (NamedSharding(self.mesh, P()), [cache_sharding] * self.kv_spec.num_layers)
        self._forward = jax.jit(forward, static_argnames=("num_tokens", "num_samples"),
                                donate_argnums=(1,), out_shardings=out_shardings)

        def copy_pages(kv_caches, src, dst):  # src, dst: i32[COPY_CHUNK]; dst == P means skip
            return [c.at[dst].set(c[src], mode="drop") for c in kv_caches]

        def gather_pages(kv_caches, idx):
            return jnp.stack([c[idx] for c in kv_caches])  # [L, C, page, 2Hkv, D]

        def scatter_pages(kv_caches, idx, data):
            return [c.at[idx].set(data[i], mode="drop") for i, c in enumerate(kv_caches)]

        self._copy_pages = jax.jit(copy_pages, donate_argnums=(0,))
        self._gather_pages = jax.jit(gather_pages)
        self._scatter_pages = jax.jit(scatter_pages, donate_argnums=(0,))

    # ------------------------------------------------------------------ packing
    def _layout(self, num_tokens: int, num_samples: int) -> list[tuple[str, tuple[int, ...]]]:
        s = self.seq_bucket
        return [("ids", (num_tokens,)), ("positions", (num_tokens,)), ("kv_lens", (s,)),
                ("page_indices", (s, self.pages_per_seq)), ("cu_q_lens", (s + 1,)), ("num_seqs", (1,)),
                ("logits_idx", (num_samples,))]

    def _unpack(self, packed, num_tokens: int, num_samples: int):
        parts, off = {}, 0
        for name, shape in self._layout(num_tokens, num_samples):
            n = math.prod(shape)
            parts[name] = packed[off:off + n].reshape(shape)
            off += n
        md = AttentionMetadata(positions=parts["positions"], kv_lens=parts["kv_lens"],
                               page_indices=parts["page_indices"], cu_q_lens=parts["cu_q_lens"],
                               num_seqs=parts["num_seqs"])
        return parts["ids"], md, parts["logits_idx"]

    def _pack(self, num_tokens: int, num_samples: int, rows: Sequence[tuple[list[int], int, list[int]]],
              sample_rows: Sequence[int]) -> np.ndarray:
        """rows: (new token ids, start position, page table) per sequence; sample_rows: row index per sample."""
        layout = self._layout(num_tokens, num_samples)
        total = sum(math.prod(shape) for _, shape in layout)
        buf = np.zeros(total, np.int32)
        views, off = {}, 0
        for name, shape in layout:
            n = math.prod(shape)
            views[name] = buf[off:off + n].reshape(shape)
            off += n
        t = 0
        cu = views["cu_q_lens"]
        for i, (tokens, start, table) in enumerate(rows):
            n = len(tokens)
            views["ids"][t:t + n] = tokens
            views["positions"][t:t + n] = np.arange(start, start + n)
            views["kv_lens"][i] = start + n
            views["page_indices"][i, :len(table)] = table
            t += n
            cu[i + 1] = t
        cu[len(rows) + 1:] = t
        views["num_seqs"][0] = len(rows)
        ends = cu[1:len(rows) + 1] - 1
        views["logits_idx"][:len(sample_rows)] = ends[np.asarray(sample_rows, np.int64)] if sample_rows else []
        return buf

    # ------------------------------------------------------------------ running
    def buckets_for(self, num_tokens: int, num_samples: int) -> tuple[int, int]:
        b = pick_bucket(self.sample_buckets, max(num_samples, 1))
        t = pick_bucket(self.token_buckets, max(num_tokens, b))
        return t, b

    def run_model(self, rows: Sequence[tuple[list[int], int, list[int]]], sample_rows: Sequence[int]):
        """Run the model on a ragged batch; returns device logits [B_bucket, V] for the sample rows."""
        num_tokens = sum(len(r[0]) for r in rows)
        t, b = self.buckets_for(num_tokens, len(sample_rows))
        packed = jax.device_put(self._pack(t, b, rows, sample_rows))
        logits, self.kv_caches = self._forward(self._leaves, self.kv_caches, packed,
                                               num_tokens=t, num_samples=b)
        return logits

    def copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: copy page src -> dst for each pair, in chunks of COPY_CHUNK."""
        for i in range(0, len(pairs), COPY_CHUNK):
            chunk = pairs[i:i + COPY_CHUNK]
            src = np.zeros(COPY_CHUNK, np.int32)
            dst = np.full(COPY_CHUNK, self.num_gpu_blocks, np.int32)
            src[:len(chunk)] = [p[0] for p in chunk]
            dst[:len(chunk)] = [p[1] for p in chunk]
            self.kv_caches = self._copy_pages(self.kv_caches, src, dst)

    def _host_cache(self) -> np.ndarray:
        if self.host_cache is None:
            s = self.kv_spec
            self.host_cache = np.zeros((s.num_layers, max(self.num_cpu_blocks, 1), self.block_size,
                                        2 * s.num_kv_heads, s.head_dim), jnp.dtype(s.dtype))
        return self.host_cache

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Device page -> host page for each (gpu, cpu) pair."""
        host = self._host_cache()
        for i in range(0, len(pairs), COPY_CHUNK):
            chunk = pairs[i:i + COPY_CHUNK]
            idx = np.zeros(COPY_CHUNK, np.int32)
            idx[:len(chunk)] = [p[0] for p in chunk]
            data = np.asarray(self._gather_pages(self.kv_caches, idx))
            host[:, [p[1] for p in chunk]] = data[:, :len(chunk)]

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Host page -> device page for each (cpu, gpu) pair."""
        host = self._host_cache()
        s = self.kv_spec
        for i in range(0, len(pairs), COPY_CHUNK):
            chunk = pairs[i:i + COPY_CHUNK]
            idx = np.full(COPY_CHUNK, self.num_gpu_blocks, np.int32)
            idx[:len(chunk)] = [p[1] for p in chunk]
            data = np.zeros((s.num_layers, COPY_CHUNK) + host.shape[2:], host.dtype)
            data[:, :len(chunk)] = host[:, [p[0] for p in chunk]]
            self.kv_caches = self._scatter_pages(self.kv_caches, idx, data)

    # ------------------------------------------------------------------ warm-up
    def warmup_model(self, progress: bool = True) -> None:
        """Compile the model step for every (token, sample) bucket, and the page-move helpers."""
        shapes = self.shapes
        for t, b in tqdm(shapes, desc="Compiling model buckets", disable=not progress):
            rows = [([0], 0, [0])]
            packed = jax.device_put(self._pack(t, b, rows, [0]))
            logits, self.kv_caches = self._forward(self._leaves, self.kv_caches, packed,
                                                   num_tokens=t, num_samples=b)
            logits.block_until_ready()
        # Page 0 of this warm-up garbage is never read: pages are written before they are attended.
        self.copy_pages([(0, 0)])
        self.swap_in([(0, 0)]) if self.num_cpu_blocks else None
        self.swap_out([(0, 0)]) if self.num_cpu_blocks else None
