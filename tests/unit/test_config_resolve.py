"""EngineConfig.resolve: the user's config stays as given; the resolved value is frozen and complete."""
import dataclasses

import pytest

from aphrodite_jax.config import (CHUNKED_PREFILL_BUDGET, MIN_WHOLE_PROMPT_BUDGET, ConfigError, EngineConfig,
                                  ResolvedConfig)


def test_resolve_leaves_the_user_config_alone():
    cfg = EngineConfig.from_kwargs(max_num_seqs=4, block_size=8)
    before = cfg.to_dict()
    resolved = cfg.resolve(1024)
    assert cfg.to_dict() == before
    assert cfg.scheduler.max_num_batched_tokens is None and cfg.scheduler.enable_chunked_prefill is None
    assert isinstance(resolved, ResolvedConfig) and resolved.max_model_len == 1024
    assert resolved.scheduler.enable_chunked_prefill is True
    assert resolved.scheduler.max_num_batched_tokens == MIN_WHOLE_PROMPT_BUDGET  # whole prompt, at least 2048
    assert resolved.cache.block_size == 8 and resolved.scheduler.max_num_seqs == 4
    assert cfg.resolve(1024) == resolved  # a value: resolving twice gives the same


def test_resolved_config_is_frozen_all_the_way_down():
    resolved = EngineConfig().resolve(512)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.max_model_len = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.scheduler.max_num_batched_tokens = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.cache.block_size = 8


def test_resolved_config_keeps_every_engine_field():
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert engine_fields <= {f.name for f in dataclasses.fields(ResolvedConfig)}
    cfg = EngineConfig(max_logprobs=7, compilation_cache_dir=None)
    resolved = cfg.resolve(256)
    for name in engine_fields - {"scheduler"}:
        assert getattr(resolved, name) == getattr(cfg, name), name
    assert resolved.attention_backend == getattr(cfg, "attention_backend", "auto")


@pytest.mark.parametrize("kw, max_model_len, chunked, budget", [
    ({}, 8192, True, 8192),  # the whole-prompt budget follows a long context
    ({"enable_chunked_prefill": True}, 8192, True, CHUNKED_PREFILL_BUDGET),
    ({"enable_chunked_prefill": False}, 1024, False, MIN_WHOLE_PROMPT_BUDGET),
    ({"max_num_batched_tokens": 300}, 1024, True, 300),
    ({"max_num_batched_tokens": 16, "max_num_seqs": 64}, 1024, True, 64),  # at least one token per sequence
])
def test_scheduler_budget_defaults(kw, max_model_len, chunked, budget):
    resolved = EngineConfig.from_kwargs(**kw).resolve(max_model_len)
    assert resolved.scheduler.enable_chunked_prefill is chunked
    assert resolved.scheduler.max_num_batched_tokens == budget


def test_unchunked_budget_below_the_context_is_refused():
    cfg = EngineConfig.from_kwargs(enable_chunked_prefill=False, max_num_batched_tokens=512)
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        cfg.resolve(1024)


def test_dead_fields_are_gone_and_refused():
    for name in ("data_parallel_size", "disable_log_stats", "cache_dtype"):
        with pytest.raises(ConfigError, match="unknown engine argument"):
            EngineConfig.from_kwargs(**{name: 2})
