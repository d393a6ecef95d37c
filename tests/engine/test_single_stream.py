"""The one-stream path: a one-token decode step runs in the 1-row bucket, not padded to 8, and
gives the same tokens as the padded step."""
from __future__ import annotations

import dataclasses
import random

import pytest

from aphrodite_jax import SamplingParams
from engine_utils import assert_all_pages_free, generate_tokens, random_prompt

pytestmark = pytest.mark.slow


def _solo(llm, prompts, params, single: bool):
    runner = llm.engine.runner
    saved = runner.tuning
    runner.tuning = dataclasses.replace(saved, single_bucket=single)
    try:
        return [generate_tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params)]
    finally:
        runner.tuning = saved


def test_single_row_bucket_gives_the_padded_tokens(default_llm):
    runner = default_llm.engine.runner
    assert runner.buckets_for(1, 1) == (1, 1)
    assert runner.buckets_for(2, 1) == (8, 8) and runner.buckets_for(1, 2) == (8, 8)
    assert runner.buckets_for(1, 1, logprobs=True) == (1, 8)  # logprob draws sample in the 8-row bucket
    assert runner.buckets_for(1, 1, prompt_logprobs=True) == (8, 8)
    assert ("forward", 1) in runner._compiled  # warmed up: no compile on the first one-stream step
    rng = random.Random(5)
    prompts = [random_prompt(rng, n) for n in (1, 15, 40)]  # the first decode at a page edge, too
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)]
    calls = []
    orig = runner.buckets_for
    runner.buckets_for = lambda *a, **k: calls.append(orig(*a, **k)) or orig(*a, **k)
    try:
        single = _solo(default_llm, prompts, params, True)
        used = set(calls)
        calls.clear()
        padded = _solo(default_llm, prompts, params, False)
    finally:
        del runner.buckets_for
    assert {(1, 1), (1, 8)} <= used and not {(1, 1), (1, 8)} & set(calls)
    assert single == padded
    assert [len(t) for t in single] == [20, 20, 20]
    assert_all_pages_free(default_llm)
