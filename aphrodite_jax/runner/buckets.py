"""Shape buckets: every array shape that reaches `jit` is one of a few powers of two.

Pure functions, no JAX: the runner pads each step up to the next bucket, and warm-up compiles every
bucket once, so a serving process never compiles after start-up.
"""
from __future__ import annotations

import bisect


def power_of_two_buckets(minimum: int, maximum: int) -> list[int]:
    """Powers of two from `minimum` up to the first one >= `maximum` (so `maximum` always fits)."""
    if minimum < 1 or maximum < 1:
        raise ValueError("bucket bounds must be positive")
    out = []
    b = 1
    while b < minimum:
        b *= 2
    while True:
        out.append(b)
        if b >= maximum:
            return out
        b *= 2


def pick_bucket(buckets: list[int], n: int) -> int:
    """Smallest bucket >= n; raises if n exceeds the largest (a scheduler bug, never padding)."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def step_shapes(token_buckets: list[int], sample_buckets: list[int]) -> list[tuple[int, int]]:
    """Every (tokens, sampled rows) pair a step can have: a step never samples more rows than tokens."""
    return [(t, b) for t in token_buckets for b in sample_buckets if b <= max(t, sample_buckets[0])]
