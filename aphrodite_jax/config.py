"""Engine configuration: plain dataclasses that validate themselves on construction.

They are filled from CLI flags or a YAML file (serving/), never from environment variables.
`EngineConfig.from_kwargs(**engine_args)` is the one entry point used by `LLM(...)` and the server.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from pallas_kernels.backends import backend_names

DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float", "fp32", "bf16", "fp16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = ("int8",)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
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


@dataclass
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
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(self.block_size in (8, 16, 32), f"block_size must be 8, 16 or 32, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.kv_cache_memory > 0, f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override > 0,
               f"num_gpu_blocks_override must be positive, got {self.num_gpu_blocks_override}")
        _check(self.swap_space >= 0, f"swap_space must be >= 0 GiB, got {self.swap_space}")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: sequences and tokens per step, chunked prefill, preemption."""

    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None  # None -> chosen from max_model_len / chunking
    # None (default): chunked, with a budget that holds a whole prompt (see resolve_scheduler_defaults)
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


@dataclass
class ParallelConfig:
    """Device mesh ('data', 'model'): tensor parallelism runs over 'model'."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        _check(self.data_parallel_size >= 1,
               f"data_parallel_size must be >= 1, got {self.data_parallel_size}")


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
    disable_log_stats: bool = False
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
