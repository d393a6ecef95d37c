"""Per-backend tuning constants: numbers measured on one kind of machine, kept out of the code that uses them.

The scheduler and the runner read their constants from the profile of the platform the engine runs on
(`profile_for(jax.default_backend())`, chosen by the runner, handed to the scheduler by the engine). Plain
Python (no JAX), so the scheduler stays JAX-free. The TPU and GPU entries copy the CPU values until they are
measured there.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TuningProfile:
    # Below this many tokens a step is weight-bandwidth bound (padding is nearly free on the CPU), so the
    # scheduler trims chunked-prefill steps only down to token buckets at least this large.
    min_trim_bucket: int = 256
    # A step of one token with one draw (one stream decoding) runs in the 1-row bucket instead of padding to
    # 8 rows (about half the step at batch 1 on the CPU). False is the benchmarks' A/B arm (the padded path).
    single_bucket: bool = True

    def __post_init__(self) -> None:
        if self.min_trim_bucket < 1:
            raise ValueError(f"min_trim_bucket must be >= 1, got {self.min_trim_bucket}")


CPU = TuningProfile()
PROFILES = {"cpu": CPU, "tpu": TuningProfile(), "gpu": TuningProfile()}
ALIASES = {"cuda": "gpu", "rocm": "gpu"}  # platform names some JAX builds report for a GPU


def profile_for(platform: str) -> TuningProfile:
    """The profile of a JAX platform name ("cpu", "tpu", "gpu"); another platform gets the CPU values."""
    return PROFILES.get(ALIASES.get(platform, platform), CPU)
