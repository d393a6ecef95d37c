"""Shared settings and workloads for the engine tests on the real default model (SmolLM2-135M GGUF).

Every engine in the suite uses the same cache shape and limits unless a test needs otherwise, so the
persistent compilation cache turns the second and later engines' warm-up into cache loads.
"""
from __future__ import annotations

import gc
import math
import random

from aphrodite_jax import LLM, SamplingParams

ENGINE_KW = dict(max_model_len=2048, max_num_seqs=32, num_gpu_blocks_override=2048)


def make_llm(**overrides) -> LLM:
    gc.collect()  # free the previous engine's device buffers before allocating a new cache
    return LLM(**{**ENGINE_KW, **overrides})


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(length)]


def mixed_greedy_workload(n: int = 32, seed: int = 0, max_prompt: int = 1500, max_out: int = 200):
    """n greedy requests with prompts of 1..max_prompt tokens and max_tokens of 1..max_out (both ends
    always present, the rest log-uniform), EOS ignored so every request runs its full length.
    Longer prompts get shorter outputs, which keeps the suite's decode steps cheap on a CPU."""
    rng = random.Random(seed)
    lens = sorted([1, max_prompt] + [log_uniform(rng, 1, max_prompt) for _ in range(n - 2)])
    outs = sorted([max_out, 1] + [log_uniform(rng, 1, max_out) for _ in range(n - 2)], reverse=True)
    order = list(range(n))
    rng.shuffle(order)  # submission order is not sorted by length
    lens, outs = [lens[i] for i in order], [outs[i] for i in order]
    prompts = [random_prompt(rng, k) for k in lens]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in outs]
    return prompts, params


def generate_tokens(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def assert_all_pages_free(llm: LLM) -> None:
    eng = llm.engine
    bm = eng.scheduler.block_manager
    assert not eng.has_unfinished_requests()
    assert bm.num_free_gpu_blocks == eng.runner.num_gpu_blocks
    assert bm.num_free_cpu_blocks == eng.runner.num_cpu_blocks
    assert not eng.scheduler.waiting and not eng.scheduler.running and not eng.scheduler.swapped
    assert not eng.requests
