"""Builds the device half of an engine: mesh, model, tokenizer, ModelRunner and the device sampler.

Kept apart from llm_engine.py so the spine reads as bookkeeping, and so every JAX import of the engine
sits behind this one module.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np

from aphrodite_jax.config import EngineConfig
from aphrodite_jax.runner.model_runner import ModelRunner
from aphrodite_jax.sampling.metadata import SamplingRow, make_sampling_metadata, needs_history
from aphrodite_jax.sampling.registry import verify_params
from aphrodite_jax.sampling.sampler import sample

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
    max_logprobs} x {no token history, history of max_model_len}. Logprob requests always compute
    the top `max_logprobs`, so a new `logprobs` value never recompiles; the metadata widths are pinned
    (BIAS_WIDTH sparse biases/bans and allowed ids, DRY_WIDTH breakers, the history at max_model_len), so only a
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

    def _fn(self, logits, md, all_greedy: bool, k: int):
        key = (logits.shape[0], all_greedy, k, jax.tree.map(lambda x: x.shape, md).__repr__())
        fn = self._compiled.get(key)
        if fn is None:
            if self._warm:
                logger.warning("compiling a sampler variant after warm-up: %s", key[:3])
            fn = sample.lower(logits, md, max_num_logprobs=k, all_greedy=all_greedy).compile()
            self._compiled[key] = fn
        return fn

    def metadata(self, rows: Sequence[SamplingRow], batch_bucket: int):
        """Host arrays for one step's draws, padded to the sample bucket."""
        history = self.runner.max_model_len if any(needs_history(r.params) for r in rows) else None
        return make_sampling_metadata(rows, batch_bucket, self.vocab_size, eos_token_ids=self.eos_token_ids,
                                      bias_width=self.BIAS_WIDTH, allowed_width=self.BIAS_WIDTH,
                                      dry_width=self.DRY_WIDTH,
                                      history_width=history)

    @staticmethod
    def verify(params: Any) -> None:
        """Registry-level checks of a request (research step names, extra_args)."""
        verify_params(params)

    def __call__(self, logits: jax.Array, md: Any, rows: Sequence[SamplingRow]) -> SampleResult:
        """Draw one token per row; `md` is this step's metadata, already on the device."""
        all_greedy = all(r.params.temperature < 1e-5 for r in rows)
        k = self.max_logprobs if any(r.params.logprobs for r in rows) else 0
        return SampleResult(self._fn(logits, md, all_greedy, k)(logits, md))

    def warmup(self) -> None:
        from aphrodite_jax.sampling_params import SamplingParams

        for b in self.runner.sample_buckets:
            logits = jax.ShapeDtypeStruct((b, self.vocab_size), np.float32,
                                          sharding=self.runner._replicated())
            for greedy in (True, False):
                for k in (0, self.max_logprobs):
                    for penalty in (1.0, 1.1):  # without / with the token history
                        params = SamplingParams(temperature=0.0 if greedy else 1.0, logprobs=k or None,
                                                repetition_penalty=penalty)
                        md = self.metadata([SamplingRow(params, 0, 0, (1,), ())], b)
                        md = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
                            x.shape, x.dtype, sharding=self.runner._replicated()), md)
                        self._fn(logits, md, greedy, k)
        self._warm = True


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
        t0 = time.perf_counter()
        self.runner.warmup()
        self.sampler.warmup()
        logger.info("Compiled %d step variants in %.1f s", len(self.runner._compiled) + len(self.sampler._compiled),
                    time.perf_counter() - t0)


def _setup_compilation_cache(path: Optional[str]) -> None:
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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


def build_model_stack(config: EngineConfig) -> ModelStack:
    from aphrodite_jax.models.loader import load_model

    _setup_compilation_cache(config.compilation_cache_dir)
    mesh = None
    tp = config.parallel.tensor_parallel_size
    if tp > 1 or config.parallel.data_parallel_size > 1:
        from aphrodite_jax.distributed.mesh import make_mesh

        mesh = make_mesh(tp, config.parallel.data_parallel_size)
    t0 = time.perf_counter()
    loaded = load_model(config.model, mesh)
    logger.info("Loaded the %s model (%s) in %.1f s", loaded.source_kind,
                type(loaded.model).__name__, time.perf_counter() - t0)
    from aphrodite_jax.tokenization import eos_token_ids, generation_defaults, load_tokenizer

    tokenizer = load_tokenizer(loaded.tokenizer_source, loaded.gguf_file)
    gen_config = generation_defaults(loaded.tokenizer_source if not loaded.gguf_file else None)
    max_model_len = loaded.max_model_len
    resolve_scheduler_defaults(config, max_model_len)
    vocab_size = loaded.hf_config.vocab_size
    runner = ModelRunner(config, loaded.model, loaded.hf_config, max_model_len=max_model_len,
                         vocab_size=vocab_size, dtype=loaded.dtype, mesh=mesh)
    eos = eos_token_ids(loaded.hf_config, tokenizer, gen_config)
    sampler = DeviceSampler(runner, vocab_size, config.max_logprobs, eos)
    return ModelStack(runner=runner, sampler=sampler, tokenizer=tokenizer, hf_config=loaded.hf_config,
                      max_model_len=max_model_len, eos_token_ids=eos, generation_config=gen_config)
