"""The device half of sampling: per-draw SamplingRows -> one packed metadata buffer -> the jitted sampler.

The sampler steps themselves live in aphrodite_jax/sampling/; this module owns the compiled variants, the
fixed metadata widths and the host copy of the result (`SampleResult`, one `Draw` per row).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from aphrodite_jax.runner.exec_cache import CompileJob, compile_one
from aphrodite_jax.runner.packing import Packed, pack, unpack
from aphrodite_jax.sampling.metadata import SamplingRow, make_sampling_metadata
from aphrodite_jax.sampling.registry import verify_params
from aphrodite_jax.sampling.sampler import sample

logger = logging.getLogger(__name__)


@functools.partial(jax.jit, static_argnames=("max_num_logprobs", "all_greedy"))
def sample_packed(logits: jax.Array, md: Packed, *, max_num_logprobs: int = 0, all_greedy: bool = False):
    """`sample` on metadata that arrived as one packed buffer."""
    return sample(logits, unpack(md), max_num_logprobs=max_num_logprobs, all_greedy=all_greedy)


class Draw(NamedTuple):
    """One sampled token with its logprob information (host values)."""

    token_id: int
    logprob: float
    rank: int
    topk_ids: np.ndarray  # i32[K]
    topk_logprobs: np.ndarray  # f32[K]


class SampleResult:
    """The sampler's output copied to the host once; `row(k)` is draw k."""

    def __init__(self, out: Any):
        self.token_ids = np.asarray(out.token_ids)  # i32[B]
        self.logprobs = np.asarray(out.logprobs)  # f32[B]
        self.ranks = np.asarray(out.ranks)  # i32[B]
        self.topk_ids = np.asarray(out.topk_ids)  # i32[B, K]
        self.topk_logprobs = np.asarray(out.topk_logprobs)  # f32[B, K]

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

    def __init__(self, runner: Any, vocab_size: int, max_logprobs: int, eos_token_ids: Sequence[int]):
        self.runner = runner  # a ModelRunner: buckets, sharding, executable cache
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs
        self.eos_token_ids = tuple(eos_token_ids)
        self._compiled: dict[tuple, Callable] = {}
        self._warm = False

    @property
    def num_variants(self) -> int:
        """Compiled (or loaded) sampler executables."""
        return len(self._compiled)

    def mark_warm(self) -> None:
        """Warm-up is done: a variant compiled from now on is logged as a missed bucket."""
        self._warm = True

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

        replicated = self.runner.replicated_sharding
        jobs = []
        for b in self.runner.sample_buckets:
            logits = jax.ShapeDtypeStruct((b, self.vocab_size), np.float32, sharding=replicated)
            for greedy in (True, False):
                for k in (0, self.max_logprobs) if b > 1 else (0,):  # no logprobs at 1 row (buckets_for)
                    params = SamplingParams(temperature=0.0 if greedy else 1.0, logprobs=k or None)
                    md = self.metadata([SamplingRow(params, 0, 0, (1,), ())], b)
                    md = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), md)
                    key = self._key(logits, md, greedy, k)
                    if key not in self._compiled and key not in {j.key for j in jobs}:
                        jobs.append(CompileJob(self._compiled, key, "sample", sample_packed, (logits, md),
                                               {"max_num_logprobs": k, "all_greedy": greedy}))
        return jobs
