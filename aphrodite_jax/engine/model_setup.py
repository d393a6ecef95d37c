"""Builds the device half of an engine: mesh, model, tokenizer, ModelRunner and the device sampler.

Kept apart from llm_engine.py so the spine reads as bookkeeping, and so every JAX import of the engine
sits behind this one module.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from aphrodite_jax.config import EngineConfig
from aphrodite_jax.runner.exec_cache import NO_CACHE, CompileJob, ExecutableCache, compile_one
from aphrodite_jax.runner.model_runner import ModelRunner
from aphrodite_jax.sampling.metadata import SamplingRow, make_sampling_metadata
from aphrodite_jax.sampling.registry import verify_params
from aphrodite_jax.runner.packing import Packed, pack, unpack
from aphrodite_jax.sampling.sampler import sample


@functools.partial(jax.jit, static_argnames=("max_num_logprobs", "all_greedy"))
def sample_packed(logits: jax.Array, md: Packed, *, max_num_logprobs: int = 0, all_greedy: bool = False):
    """`sample` on metadata that arrived as one packed buffer."""
    return sample(logits, unpack(md), max_num_logprobs=max_num_logprobs, all_greedy=all_greedy)

logger = logging.getLogger(__name__)


class Draw(NamedTuple):
    """One sampled token with its logprob information (host values)."""

    token_id: int
    logprob: float
    rank: int
    topk_ids: np.ndarray  # i32[K]
    topk_logprobs: np.ndarray  # f32[K]


class SampleResult:
    def __init__(self, out: Any):
        self.token_ids = np.asarray(out.token_ids)
        self.logprobs = np.asarray(out.logprobs)
        self.ranks = np.asarray(out.ranks)
        self.topk_ids = np.asarray(out.topk_ids)
        self.topk_logprobs = np.asarray(out.topk_logprobs)

    def row(self, k: int) -> Draw:
        return Draw(int(self.token_ids[k]), float(self.logprobs[k]), int(self.ranks[k]),
                    self.topk_ids[k], self.topk_logprobs[k])


class DeviceSampler:
    """Turns per-draw SamplingRows into one padded SamplingMetadata and runs the jitted sampler.

    Variants compiled ahead of time: every sample bucket x {all greedy, some sampled} x {no logprobs,
    max_logprobs}. Logprob requests always compute the top `max_logprobs`, so a new `logprobs` value never
    recompiles; the metadata widths are pinned (BIAS_WIDTH sparse biases/bans and allowed ids, DRY_WIDTH
    breakers, the token history always at max_model_len: a step with no history sampler skips those steps
    behind their `lax.cond`, and the unused [B, max_model_len] array costs well under a millisecond, while a
    separate no-history variant cost a quarter of a cold start's compile time), so only a
    request beyond those widths (more than 512 logit_bias/ban entries or allowed ids, more than 16 DRY breakers)
    compiles a new variant, once.
    """

    BIAS_WIDTH = 512  # logit_bias (OpenAI allows 300 entries) + bans + stop ids; ~2 KB per row
    DRY_WIDTH = 16

    def __init__(self, runner: ModelRunner, vocab_size: int, max_logprobs: int, eos_token_ids: Sequence[int]):
        self.runner = runner
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs
        self.eos_token_ids = tuple(eos_token_ids)
        self._compiled: dict[tuple, Callable] = {}
        self._warm = False

    @staticmethod
    def _key(logits, md: Packed, all_greedy: bool, k: int) -> tuple:
        return (logits.shape[0], all_greedy, k, md.layout)

    def _fn(self, logits, md, all_greedy: bool, k: int):
        key = self._key(logits, md, all_greedy, k)
        fn = self._compiled.get(key)
        if fn is None:
            if self._warm:
                logger.warning("compiling a sampler variant after warm-up: %s", key[:3])
            fn = compile_one(self.runner.exec_cache, sample_packed, "sample", (logits, md),
                             {"max_num_logprobs": k, "all_greedy": all_greedy})
            self._compiled[key] = fn
        return fn

    def metadata(self, rows: Sequence[SamplingRow], batch_bucket: int) -> Packed:
        """Host arrays for one step's draws, padded to the sample bucket, packed into one buffer (one
        transfer instead of one per leaf: runner/packing.py)."""
        return pack(make_sampling_metadata(rows, batch_bucket, self.vocab_size, eos_token_ids=self.eos_token_ids,
                                           bias_width=self.BIAS_WIDTH, allowed_width=self.BIAS_WIDTH,
                                           dry_width=self.DRY_WIDTH,
                                           history_width=self.runner.max_model_len))

    @staticmethod
    def verify(params: Any) -> None:
        """Registry-level checks of a request (research step names, extra_args)."""
        verify_params(params)

    def __call__(self, logits: jax.Array, md: Any, rows: Sequence[SamplingRow]) -> SampleResult:
        """Draw one token per row; `md` is this step's metadata, already on the device."""
        all_greedy = all(r.params.temperature < 1e-5 for r in rows)
        k = self.max_logprobs if any(r.params.logprobs for r in rows) else 0
        return SampleResult(self._fn(logits, md, all_greedy, k)(logits, md))

    def warmup_jobs(self) -> list[CompileJob]:
        """Every variant warm-up covers, as jobs for `ExecutableCache.compile_all`."""
        from aphrodite_jax.sampling_params import SamplingParams

        jobs = []
        for b in self.runner.sample_buckets:
            logits = jax.ShapeDtypeStruct((b, self.vocab_size), np.float32,
                                          sharding=self.runner._replicated())
            for greedy in (True, False):
                for k in (0, self.max_logprobs) if b > 1 else (0,):  # no logprobs at 1 row (buckets_for)
                    params = SamplingParams(temperature=0.0 if greedy else 1.0, logprobs=k or None)
                    md = self.metadata([SamplingRow(params, 0, 0, (1,), ())], b)
                    md = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                        x.shape, x.dtype, sharding=self.runner._replicated()), md)
                    key = self._key(logits, md, greedy, k)
                    if key not in self._compiled and key not in {j.key for j in jobs}:
                        jobs.append(CompileJob(self._compiled, key, "sample", sample_packed, (logits, md),
                                               {"max_num_logprobs": k, "all_greedy": greedy}))
        return jobs


@dataclass
class ModelStack:
    runner: ModelRunner
    sampler: DeviceSampler
    tokenizer: Any
    hf_config: Any
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    generation_config: dict

    def warmup(self) -> None:
        """Compile every runner and sampler variant in one pool (or load them from the executable cache)."""
        t0 = time.perf_counter()
        cache = self.runner.exec_cache or NO_CACHE
        hits, misses = cache.hits, cache.misses
        cache.compile_all(self.runner.warmup_jobs() + self.sampler.warmup_jobs())
        self.runner._warm = self.sampler._warm = True
        logger.info("Compiled %d step variants in %.1f s (%d loaded from the executable cache, %d compiled)",
                    len(self.runner._compiled) + len(self.sampler._compiled), time.perf_counter() - t0,
                    cache.hits - hits, cache.misses - misses)


def _setup_compilation_cache(path: Optional[str]) -> None:
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every variant, however quick: a warm start that misses the executable cache (new source) still skips
    # XLA's compile for each step whose lowered code did not change.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def resolve_scheduler_defaults(config: EngineConfig, max_model_len: int) -> None:
    """Fill the token budget: a whole prompt must fit a step unless prefill is chunked.

    Default (chunking not set): chunked prefill with the whole-prompt budget. No prompt is split for
    lack of budget, but the scheduler may fill a step's last prefill chunk up to the budget and trim it
    down to a token bucket (scheduler._align_to_bucket), so new prompts ride along running decodes
    instead of padding a step up to the next power of two. An explicit --enable-chunked-prefill keeps
    the small 512-token default budget (short steps, steadier inter-token latency).
    """
    sched = config.scheduler
    if sched.enable_chunked_prefill is None:
        sched.enable_chunked_prefill = True
        if sched.max_num_batched_tokens is None:
            sched.max_num_batched_tokens = max(max_model_len, 2048)
    if sched.max_num_batched_tokens is None:
        sched.max_num_batched_tokens = 512 if sched.enable_chunked_prefill else max(max_model_len, 2048)
    if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens ({sched.max_num_batched_tokens}) is smaller than max_model_len "
            f"({max_model_len}); lower --max-model-len or use --enable-chunked-prefill")
    sched.max_num_batched_tokens = max(sched.max_num_batched_tokens, sched.max_num_seqs)


def _file_identity(path: Optional[str]) -> Any:
    """(path, size, mtime) of a weight file, or of every file in a weight folder."""
    if not path or not os.path.exists(path):
        return path
    if os.path.isdir(path):
        return sorted(_file_identity(os.path.join(path, f)) for f in os.listdir(path)
                      if os.path.isfile(os.path.join(path, f)))
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def cache_context(config: EngineConfig, loaded: Any, runner: ModelRunner) -> dict[str, Any]:
    """The engine's part of the executable-cache key: whatever the traced steps close over besides their
    arguments (engine and model config, shapes derived from them, the weight source)."""
    engine = config.to_dict()
    for k in ("compilation_cache_dir", "forbid_compile_after_warmup", "disable_log_stats"):
        engine.pop(k, None)
    hf = loaded.hf_config.to_dict() if hasattr(loaded.hf_config, "to_dict") else repr(loaded.hf_config)
    return {"engine": engine, "hf_config": hf, "dtype": str(loaded.dtype), "max_model_len": runner.max_model_len,
            "vocab_size": runner.vocab_size, "model_class": type(loaded.model).__qualname__,
            "attention_backend": loaded.attention_backend,
            "kv_spec": repr(runner.kv_spec), "mesh": None if runner.mesh is None else repr(runner.mesh),
            "weights": (loaded.source_kind, _file_identity(loaded.source_path))}


def build_model_stack(config: EngineConfig) -> ModelStack:
    from aphrodite_jax.models.loader import load_model

    _setup_compilation_cache(config.compilation_cache_dir)
    mesh = None
    tp = config.parallel.tensor_parallel_size
    if tp > 1 or config.parallel.data_parallel_size > 1:
        from aphrodite_jax.distributed.mesh import make_mesh

        mesh = make_mesh(tp, config.parallel.data_parallel_size)
    t0 = time.perf_counter()
    loaded = load_model(config.model, mesh, cache_dir=config.compilation_cache_dir,
                        attention_backend=config.attention_backend, page_size=config.cache.block_size)
    logger.info("Loaded the %s model (%s) in %.1f s", loaded.source_kind,
                type(loaded.model).__name__, time.perf_counter() - t0)
    from aphrodite_jax.tokenization import eos_token_ids, generation_defaults, load_tokenizer

    tokenizer = load_tokenizer(loaded.tokenizer_source, loaded.gguf_file, config.compilation_cache_dir)
    gen_config = generation_defaults(loaded.tokenizer_source if not loaded.gguf_file else None)
    max_model_len = loaded.max_model_len
    resolve_scheduler_defaults(config, max_model_len)
    vocab_size = loaded.hf_config.vocab_size
    runner = ModelRunner(config, loaded.model, loaded.hf_config, max_model_len=max_model_len,
                         vocab_size=vocab_size, dtype=loaded.dtype, mesh=mesh)
    runner.exec_cache = ExecutableCache(config.compilation_cache_dir, cache_context(config, loaded, runner))
    eos = eos_token_ids(loaded.hf_config, tokenizer, gen_config)
    sampler = DeviceSampler(runner, vocab_size, config.max_logprobs, eos)
    return ModelStack(runner=runner, sampler=sampler, tokenizer=tokenizer, hf_config=loaded.hf_config,
                      max_model_len=max_model_len, eos_token_ids=eos, generation_config=gen_config)
