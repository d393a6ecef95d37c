"""Builds the device half of an engine: mesh, model, tokenizer, ModelRunner and the device sampler.

Kept apart from llm_engine.py so the spine reads as bookkeeping, and so every JAX import of the engine
sits behind this one module. The user's EngineConfig is resolved here, once the model's context length
is known, into the frozen ResolvedConfig that everything after reads.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from aphrodite_jax.config import EngineConfig, ResolvedConfig
from aphrodite_jax.runner.cache_setup import cache_context, setup_compilation_cache
from aphrodite_jax.runner.device_sampler import DeviceSampler
from aphrodite_jax.runner.exec_cache import NO_CACHE, ExecutableCache
from aphrodite_jax.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class ModelStack:
    config: ResolvedConfig
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
        self.runner.mark_warm()
        self.sampler.mark_warm()
        logger.info("Compiled %d step variants in %.1f s (%d loaded from the executable cache, %d compiled)",
                    self.runner.num_variants + self.sampler.num_variants, time.perf_counter() - t0,
                    cache.hits - hits, cache.misses - misses)


def build_model_stack(user_config: EngineConfig) -> ModelStack:
    from aphrodite_jax.models.loader import load_model

    setup_compilation_cache(user_config.compilation_cache_dir)
    mesh = None
    tp = user_config.parallel.tensor_parallel_size
    if tp > 1:
        from aphrodite_jax.distributed.mesh import make_mesh

        mesh = make_mesh(tp)
    t0 = time.perf_counter()
    loaded = load_model(user_config.model, mesh, cache_dir=user_config.compilation_cache_dir,
                        attention_backend=user_config.attention_backend, page_size=user_config.cache.block_size)
    logger.info("Loaded the %s model (%s) in %.1f s", loaded.source_kind,
                type(loaded.model).__name__, time.perf_counter() - t0)
    from aphrodite_jax.tokenization import eos_token_ids, generation_defaults, load_tokenizer

    tokenizer = load_tokenizer(loaded.tokenizer_source, loaded.gguf_file, user_config.compilation_cache_dir)
    gen_config = generation_defaults(loaded.tokenizer_source if not loaded.gguf_file else None)
    max_model_len = loaded.max_model_len
    config = user_config.resolve(max_model_len)
    vocab_size = loaded.hf_config.vocab_size
    runner = ModelRunner(config, loaded.model, loaded.hf_config, max_model_len=max_model_len,
                         vocab_size=vocab_size, dtype=loaded.dtype, mesh=mesh)
    runner.exec_cache = ExecutableCache(config.compilation_cache_dir, cache_context(config, loaded, runner))
    eos = eos_token_ids(loaded.hf_config, tokenizer, gen_config)
    sampler = DeviceSampler(runner, vocab_size, config.max_logprobs, eos)
    return ModelStack(config=config, runner=runner, sampler=sampler, tokenizer=tokenizer,
                      hf_config=loaded.hf_config, max_model_len=max_model_len, eos_token_ids=eos,
                      generation_config=gen_config)
