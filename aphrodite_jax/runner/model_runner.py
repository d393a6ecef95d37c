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
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from aphrodite_jax.config import ResolvedConfig
from aphrodite_jax.layers.attention_metadata import AttentionMetadata
from aphrodite_jax.runner.buckets import pick_bucket, power_of_two_buckets, step_shapes
from aphrodite_jax.runner.exec_cache import CompileJob, ExecutableCache, compile_one
from aphrodite_jax.runner.step_io import Row, StepInput, StepOutput
from aphrodite_jax.tuning import profile_for

logger = logging.getLogger(__name__)

COPY_CHUNK = 8  # pages per copy / swap call (padded), so page moves compile once
SINGLE = 1  # the token and sample bucket of a one-token, one-draw step (see ModelRunner.__init__)


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
    def __init__(self, config: ResolvedConfig, model: Any, hf_config: Any, *, max_model_len: int,
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
        # Bucket 1 is only for a step of one token that samples one row (one stream decoding): at batch 1
        # a step padded to 8 rows costs about twice one of 1 row (the int8 matmuls and attention scale with
        # the padded rows), while every other step keeps the buckets from 8 up.
        self.token_buckets = [SINGLE] + power_of_two_buckets(8, self.max_tokens)
        self.sample_buckets = [SINGLE] + power_of_two_buckets(8, self.max_num_seqs)
        self.seq_bucket = self.sample_buckets[-1]  # attention rows: always the max (cheap metadata)
        # A one-token step that wants logprobs samples in the 8-row bucket (its sampler variants are
        # costly to compile and rare at one stream); one with prompt logprobs runs padded (never happens:
        # a one-token prompt chunk is a prompt's last token, which has no prompt logprob).
        self.shapes = [(SINGLE, SINGLE), (SINGLE, self.sample_buckets[1])] + step_shapes(
            self.token_buckets[1:], self.sample_buckets[1:])
        self.tuning = profile_for(jax.default_backend())  # tuning.single_bucket: False pads one-token steps to 8

        # The model knows whether attention (hence the cache) is split over KV heads or replicated.
        self._kv_sharding = (model.kv_cache_sharding() if hasattr(model, "kv_cache_sharding") else
                             None if mesh is None else NamedSharding(mesh, P(None, None, "model", None)))
        graphdef, state = nnx.split(model)
        self._leaves, self._treedef = jax.tree.flatten(state)
        self._graphdef = graphdef
        del model  # the runner holds the weights only as leaves

        self.num_gpu_blocks, self.num_cpu_blocks = self._plan_cache()
        self.kv_caches = self._allocate_caches()
        self.host_cache = None  # lazily allocated swap space: np [L, cpu_blocks, page, 2Hkv, D]
        self._warm = False
        self.exec_cache: Optional[ExecutableCache] = None  # set by the engine: executables kept on disk
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

    def _allocate_caches(self) -> list[jax.Array]:
        s = self.kv_spec
        shape = (self.num_gpu_blocks, self.block_size, 2 * s.num_kv_heads, s.head_dim)
        sharding = self._kv_sharding
        alloc = jax.jit(lambda: jnp.zeros(shape, s.dtype), out_shardings=sharding)
        return [alloc() for _ in range(s.num_layers)]

    @property
    def replicated_sharding(self) -> Optional[NamedSharding]:
        """The sharding of host inputs and small outputs: replicated over the mesh (None without one)."""
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    @property
    def num_variants(self) -> int:
        """Compiled (or loaded) step executables."""
        return len(self._compiled)

    def mark_warm(self) -> None:
        """Warm-up is done: a variant compiled from now on is logged as a missed bucket."""
        self._warm = True

    def _build_jits(self) -> None:
        """Jitted pure functions; `warmup()` compiles them ahead of time for every bucket."""
        graphdef, treedef = self._graphdef, self._treedef
        cache_sharding = self._kv_sharding
        n_layers = self.kv_spec.num_layers

        def forward(leaves, kv_caches, packed, *, num_tokens: int):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            ids, md = self._unpack(packed, num_tokens)
            return model(ids, kv_caches, md)  # (hidden [T, H], kv_caches)

        def logits(leaves, hidden, idx):  # hidden [T, H], idx i32[B] -> f32[B, V]
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return model.compute_logits(hidden[idx])

        max_lp = self.config.max_logprobs

        def prompt_lp(leaves, hidden, idx, next_ids):  # -> lp [T], rank [T], topk ids/lps [T, K]
            from aphrodite_jax.sampling.sampler import prompt_logprobs

            return tuple(prompt_logprobs(logits(leaves, hidden, idx), next_ids, num_logprobs=max_lp))

        fwd_out = None if cache_sharding is None else (self.replicated_sharding, [cache_sharding] * n_layers)
        cache_out = None if cache_sharding is None else [cache_sharding] * n_layers
        self._jits = {
            "forward": jax.jit(forward, static_argnames=("num_tokens",), donate_argnums=(1,),
                               out_shardings=fwd_out),
            "logits": jax.jit(logits, out_shardings=self.replicated_sharding),
            "prompt_lp": jax.jit(prompt_lp),
            "copy": jax.jit(lambda c, src, dst: [x.at[dst].set(x[src], mode="drop") for x in c],
                            donate_argnums=(0,), out_shardings=cache_out),
            "gather": jax.jit(lambda c, idx: jnp.stack([x[idx] for x in c])),
            "scatter": jax.jit(lambda c, idx, d: [x.at[idx].set(d[i], mode="drop") for i, x in enumerate(c)],
                               donate_argnums=(0,), out_shardings=cache_out),
        }
        self._compiled: dict[tuple, Any] = {}

    def _call(self, name: str, key: tuple, *args, **static):
        """Run the ahead-of-time compiled executable for (name, key); compile it first if missing."""
        fn = self._compiled.get((name,) + key)
        if fn is None:
            if self._warm:
                logger.warning("compiling %s%s after warm-up: a bucket was missed", name, key)
            fn = compile_one(self.exec_cache, self._jits[name], name, args, static)
            self._compiled[(name,) + key] = fn
        return fn(*args)

    def device_put(self, x: Any) -> Any:
        """Host array (or pytree of them) -> device, replicated over the mesh when there is one."""
        return jax.device_put(x, self.replicated_sharding) if self.mesh is not None else jax.device_put(x)

    # ------------------------------------------------------------------ packing
    def _layout(self, num_tokens: int) -> list[tuple[str, tuple[int, ...]]]:
        s = self.seq_bucket
        return [("ids", (num_tokens,)), ("positions", (num_tokens,)), ("kv_lens", (s,)),
                ("page_indices", (s, self.pages_per_seq)), ("cu_q_lens", (s + 1,)), ("num_seqs", (1,))]

    def _unpack(self, packed, num_tokens: int):
        parts, off = {}, 0
        for name, shape in self._layout(num_tokens):
            n = math.prod(shape)
            parts[name] = packed[off:off + n].reshape(shape)
            off += n
        md = AttentionMetadata(positions=parts["positions"], kv_lens=parts["kv_lens"],
                               page_indices=parts["page_indices"], cu_q_lens=parts["cu_q_lens"],
                               num_seqs=parts["num_seqs"])
        return parts["ids"], md

    def _pack(self, num_tokens: int, rows: Sequence[Row]) -> np.ndarray:
        """rows: (new token ids, start position, page table) per sequence, in batch order."""
        layout = self._layout(num_tokens)
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
        return buf

    # ------------------------------------------------------------------ running
    def buckets_for(self, num_tokens: int, num_samples: int, *, logprobs: bool = False,
                    prompt_logprobs: bool = False) -> tuple[int, int]:
        """(token bucket, sample bucket); tokens are padded up to at least the sample bucket, which
        keeps the shape set small when best_of draws several samples from one row. logprobs / prompt
        logprobs: whether a draw of the step wants them / the step computes some (see __init__)."""
        if self.tuning.single_bucket and num_tokens <= SINGLE and num_samples <= SINGLE and not prompt_logprobs:
            return SINGLE, (self.sample_buckets[1] if logprobs else SINGLE)
        b = pick_bucket(self.sample_buckets[1:], max(num_samples, 1))
        return pick_bucket(self.token_buckets[1:], max(num_tokens, b)), b

    def run_model(self, step: StepInput) -> StepOutput:
        """Run the model on a ragged batch (see StepInput) padded to its (token, sample) buckets. The
        sampler metadata rides along in the step's one `device_put`."""
        t, b = self.buckets_for(step.num_tokens, len(step.sample_rows), logprobs=step.logprobs,
                                prompt_logprobs=step.prompt_logprobs)
        idx = np.zeros(b, np.int32)
        if step.sample_rows:
            ends = np.cumsum([len(r[0]) for r in step.rows]) - 1
            idx[:len(step.sample_rows)] = ends[np.asarray(step.sample_rows)]
        packed, idx, sampling = self.device_put((self._pack(t, step.rows), idx, step.sampling))  # one transfer
        hidden, self.kv_caches = self._call("forward", (t,), self._leaves, self.kv_caches, packed,
                                            num_tokens=t)
        logits = self._call("logits", (t, b), self._leaves, hidden, idx) if step.sample_rows else None
        return StepOutput(logits=logits, sampling=sampling, hidden=hidden, token_bucket=t)

    def prompt_logprobs(self, out: StepOutput, token_idx: Sequence[int], next_ids: Sequence[int]):
        """Logprob, rank and top-`max_logprobs` of the given next token at rows `token_idx` of the step
        `out` came from (all padded to its token bucket). Returns host arrays."""
        t = out.token_bucket
        idx = np.zeros(t, np.int32)
        nxt = np.zeros(t, np.int32)
        idx[:len(token_idx)] = token_idx
        nxt[:len(next_ids)] = next_ids
        res = self._call("prompt_lp", (t,), self._leaves, out.hidden, self.device_put(idx),
                         self.device_put(nxt))
        n = len(token_idx)
        return tuple(np.asarray(x)[:n] for x in res)

    def copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: copy page src -> dst for each pair, in chunks of COPY_CHUNK."""
        for i in range(0, len(pairs), COPY_CHUNK):
            chunk = pairs[i:i + COPY_CHUNK]
            src = np.zeros(COPY_CHUNK, np.int32)
            dst = np.full(COPY_CHUNK, self.num_gpu_blocks, np.int32)
            src[:len(chunk)] = [p[0] for p in chunk]
            dst[:len(chunk)] = [p[1] for p in chunk]
            self.kv_caches = self._call("copy", (), self.kv_caches, self.device_put(src),
                                        self.device_put(dst))

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
            data = np.asarray(self._call("gather", (), self.kv_caches, self.device_put(idx)))
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
            self.kv_caches = self._call("scatter", (), self.kv_caches, self.device_put(idx),
                                        self.device_put(data))

    # ------------------------------------------------------------------ warm-up
    def warmup_jobs(self) -> list[CompileJob]:
        """Every bucket of every step function, as jobs for `ExecutableCache.compile_all` (ahead of time,
        nothing runs). Add a new step variant here and warm-up, the compile guard and the executable
        cache all cover it."""
        i32 = jnp.int32

        def sds(shape, dtype=i32):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=self.replicated_sharding)

        hidden_size = self.hf_config.hidden_size
        jobs = []
        for t in self.token_buckets:
            n = sum(math.prod(shape) for _, shape in self._layout(t))
            jobs.append(("forward", (t,), (self._leaves, self.kv_caches, sds((n,))), {"num_tokens": t}))
        for t, b in self.shapes:
            jobs.append(("logits", (t, b), (self._leaves, sds((t, hidden_size), self.kv_spec.dtype),
                                            sds((b,))), {}))
        for t in self.token_buckets[1:]:  # never at SINGLE (buckets_for)
            jobs.append(("prompt_lp", (t,), (self._leaves, sds((t, hidden_size), self.kv_spec.dtype),
                                             sds((t,)), sds((t,))), {}))
        s = self.kv_spec
        data = sds((s.num_layers, COPY_CHUNK, self.block_size, 2 * s.num_kv_heads, s.head_dim), s.dtype)
        jobs += [("copy", (), (self.kv_caches, sds((COPY_CHUNK,)), sds((COPY_CHUNK,))), {}),
                 ("gather", (), (self.kv_caches, sds((COPY_CHUNK,))), {}),
                 ("scatter", (), (self.kv_caches, sds((COPY_CHUNK,)), data), {})]
        return [CompileJob(self._compiled, (name,) + key, name, self._jits[name], args, static)
                for name, key, args, static in jobs if (name,) + key not in self._compiled]
