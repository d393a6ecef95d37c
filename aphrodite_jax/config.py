"""Engine configuration: plain dataclasses that validate themselves on construction.

They are filled from CLI flags or a YAML file (serving/), never from environment variables.
`EngineConfig.from_kwargs(**engine_args)` is the one entry point used by `LLM(...)` and the server.
Once the model is loaded, `EngineConfig.resolve(max_model_len)` turns the user's config into a frozen
`ResolvedConfig` with every "chosen later" default filled in; the engine reads only that value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from pallas_kernels.backends import backend_names

DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float", "fp32", "bf16", "fp16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = ("int8",)

# Token budgets of a step when --max-num-batched-tokens is not given (see EngineConfig.resolve).
CHUNKED_PREFILL_BUDGET = 512  # explicit --enable-chunked-prefill: short steps, steady inter-token latency
MIN_WHOLE_PROMPT_BUDGET = 2048  # otherwise: max(max_model_len, this), so a whole prompt fits one step


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how: the model path/name, tokenizer, dtype and context length."""

    model: Optional[str] = None  # None -> the bundled default (SmolLM2-135M-Instruct GGUF)
    tokenizer: Optional[str] = None
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    seed: int = 0
    load_format: str = "auto"
    revision: Optional[str] = None
    # Only for load_format="dummy": a config.json path/dict or an HF hub id already cached.
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    # "int8": 8-bit block weights for the matmuls (layers/quantization.py; CPU: an AVX-512 VNNI kernel;
    # TPU/GPU: XLA weight-only int8).
    quantization: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.quantization in (None,) + QUANTIZATIONS,
               f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.load_format in LOAD_FORMATS,
               f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        _check(self.max_model_len is None or self.max_model_len > 0,
               f"max_model_len must be positive, got {self.max_model_len}")
        _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: page size and how many pages (from a memory budget or fixed)."""

    block_size: int = 16
    # Fraction of accelerator memory for weights + KV cache (TPU/GPU only).
    gpu_memory_utilization: float = 0.9
    # GiB of host memory for the KV cache when running on the CPU.
    kv_cache_memory: float = 2.0
    num_gpu_blocks_override: Optional[int] = None
    enable_prefix_caching: bool = False
    swap_space: float = 4.0  # GiB of host memory for swapped-out pages

    def __post_init__(self) -> None:
        _check(self.block_size in (8, 16, 32), f"block_size must be 8, 16 or 32, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.kv_cache_memory > 0, f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override > 0,
               f"num_gpu_blocks_override must be positive, got {self.num_gpu_blocks_override}")
        _check(self.swap_space >= 0, f"swap_space must be >= 0 GiB, got {self.swap_space}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences and tokens per step, chunked prefill, preemption."""

    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None  # None -> chosen from max_model_len / chunking
    # None (default): chunked, with a budget that holds a whole prompt (see EngineConfig.resolve)
    enable_chunked_prefill: Optional[bool] = None
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    max_queue_len: Optional[int] = None  # most requests waiting for a slot; more get a 503

    def __post_init__(self) -> None:
        _check(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens > 0,
               f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        _check(self.preemption_mode in ("recompute", "swap"),
               f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        _check(self.max_queue_len is None or self.max_queue_len >= 1,
               f"max_queue_len must be >= 1, got {self.max_queue_len}")


@dataclass(frozen=True)
class ParallelConfig:
    """Device mesh ('model',): tensor parallelism runs over 'model'."""

    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Persistent JAX compilation cache; None disables it.
    compilation_cache_dir: Optional[str] = "~/.cache/aphrodite_jax/jax_cache"
    # Tests set this: any XLA compile after warm-up raises instead of silently stalling a step.
    forbid_compile_after_warmup: bool = False
    max_logprobs: int = 20
    # The attention kernel: "auto" (by platform and model) or a backend of pallas_kernels/backends.py,
    # resolved once at start (models/loader.py).
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        _check(self.attention_backend in backend_names(),
               f"attention_backend must be one of {backend_names()}, got {self.attention_backend!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat keyword arguments (`LLM(model=..., block_size=...)`, CLI flags)."""
        groups = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                  "parallel": ParallelConfig}
        parts: dict[str, dict[str, Any]] = {g: {} for g in groups}
        top: dict[str, Any] = {}
        top_names = {f.name for f in fields(cls)} - set(groups)
        for key, value in kwargs.items():
            for g, klass in groups.items():
                if key in {f.name for f in fields(klass)}:
                    parts[g][key] = value
                    break
            else:
                if key in top_names:
                    top[key] = value
                else:
                    raise ConfigError(f"unknown engine argument: {key!r}")
        return cls(**{g: klass(**parts[g]) for g, klass in groups.items()}, **top)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve(self, max_model_len: int) -> "ResolvedConfig":
        """This config against a model of `max_model_len` tokens, as a new frozen value (self is left as
        it is). Fills the scheduler's token budget: a whole prompt must fit a step unless prefill is chunked.

        Default (chunking not set): chunked prefill with the whole-prompt budget. No prompt is split for
        lack of budget, but the scheduler may fill a step's last prefill chunk up to the budget and trim
        it down to a token bucket (scheduler._align_to_bucket), so new prompts ride along running
        decodes instead of padding a step up to the next power of two. An explicit
        --enable-chunked-prefill keeps the small CHUNKED_PREFILL_BUDGET (short steps, steadier
        inter-token latency).
        """
        sched = self.scheduler
        chunked, budget = sched.enable_chunked_prefill, sched.max_num_batched_tokens
        whole_prompt = max(max_model_len, MIN_WHOLE_PROMPT_BUDGET)
        if chunked is None:
            chunked = True
            budget = whole_prompt if budget is None else budget
        if budget is None:
            budget = CHUNKED_PREFILL_BUDGET if chunked else whole_prompt
        if not chunked and budget < max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens ({budget}) is smaller than max_model_len "
                f"({max_model_len}); lower --max-model-len or use --enable-chunked-prefill")
        scheduler = dataclasses.replace(sched, enable_chunked_prefill=chunked,
                                        max_num_batched_tokens=max(budget, sched.max_num_seqs))
        top = {f.name: getattr(self, f.name) for f in fields(self)}
        top["scheduler"] = scheduler
        return ResolvedConfig(**top, max_model_len=max_model_len)


@dataclass(frozen=True)
class ResolvedConfig:
    """An EngineConfig resolved against the loaded model (`EngineConfig.resolve`): frozen, with the
    context length known and the scheduler's chunking and token budget filled in. It has every field of
    EngineConfig (tests/engine checks that), so code reads `config.cache.block_size` on either."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig  # enable_chunked_prefill and max_num_batched_tokens are never None here
    parallel: ParallelConfig
    compilation_cache_dir: Optional[str]
    forbid_compile_after_warmup: bool
    max_logprobs: int
    max_model_len: int
    attention_backend: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
