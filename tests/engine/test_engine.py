"""Engine acceptance on the real default model: batch invariance, preemption, seeds, aborts, prefix
caching and no compiles after warm-up."""
from __future__ import annotations

import random
import re

import pytest

from aphrodite_jax import SamplingParams
from aphrodite_jax.guided import GuidedDecodingParams
from aphrodite_jax.runner.compile_guard import COUNTER, forbid_compiles
from engine_utils import (assert_all_pages_free, generate_tokens, make_llm, mixed_greedy_workload,
                          random_prompt)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


@pytest.fixture(scope="module")
def workload():
    return mixed_greedy_workload(n=32, seed=0)


@pytest.fixture(scope="module")
def solo(llm, workload):
    """Each request of the workload run alone."""
    prompts, params = workload
    return [generate_tokens(llm, [p], [sp])[0] for p, sp in zip(prompts, params)]


def _check_same(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i}: batched output differs from its solo output at token " \
                       f"{next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))}"


def test_solo_outputs_have_requested_lengths(solo, workload):
    assert [len(t) for t in solo] == [sp.max_tokens for sp in workload[1]]


@pytest.mark.parametrize("chunked,prefix", [(False, False), (True, False), (False, True), (True, True)])
def test_batch_invariance(llm, workload, solo, chunked, prefix):
    engine = llm if not (chunked or prefix) else make_llm(enable_chunked_prefill=chunked,
                                                        enable_prefix_caching=prefix)
    prompts, params = workload
    _check_same(generate_tokens(engine, prompts, params), solo)
    assert_all_pages_free(engine)
    if chunked:  # the 1500-token prompt really was split over steps
        assert engine.engine.config.scheduler.max_num_batched_tokens < 1500


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_gives_same_tokens(llm, mode):
    rng = random.Random(7)
    prompts = [random_prompt(rng, rng.randint(100, 200)) for _ in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True) for _ in prompts]
    want = generate_tokens(llm, prompts, params)
    # 16 requests need about 16 * 14 pages at the end; 144 pages (the floor: one full-length
    # sequence) force preemption.
    capped = make_llm(num_gpu_blocks_override=144, preemption_mode=mode, max_num_seqs=16,
                      max_model_len=2048, max_num_batched_tokens=512, enable_chunked_prefill=True)
    got = generate_tokens(capped, prompts, params)
    assert capped.engine.scheduler.num_preemptions > 0
    _check_same(got, want)
    assert_all_pages_free(capped)


def test_no_compiles_after_warmup(llm):
    rng = random.Random(3)
    prompts, params = [], []
    for i in range(200):
        prompts.append(random_prompt(rng, rng.choice([1, 3, 17, 40, 90])))
        kind = i % 8
        if kind == 0:
            sp = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 8))
        elif kind == 1:
            sp = SamplingParams(temperature=0.9, top_p=0.8, top_k=40, seed=i, max_tokens=rng.randint(1, 8))
        elif kind == 2:
            sp = SamplingParams(temperature=0.7, min_p=0.1, logprobs=rng.randint(0, 5), max_tokens=6)
        elif kind == 3:
            sp = SamplingParams(temperature=1.0, n=2, best_of=3, max_tokens=4, seed=i)
        elif kind == 4:
            sp = SamplingParams(temperature=0.0, min_tokens=4, max_tokens=8, stop=["\n", "."])
        elif kind == 5:
            sp = SamplingParams(temperature=0.5, max_tokens=8, stop_token_ids=[13, 28], ignore_eos=True)
        elif kind == 6:  # every history sampler, its own order, a ban window
            sp = SamplingParams(temperature=0.8, repetition_penalty=1.2, frequency_penalty=0.3,
                                dry_multiplier=0.8, dry_sequence_breaker_ids=[13], no_repeat_ngram_size=3,
                                sampler_priority=list(range(14))[::-1], token_ban_ranges=[([28], 0, 2)],
                                max_tokens=rng.randint(1, 8), seed=i)
        else:
            sp = SamplingParams(temperature=1.0, mirostat_mode=2, mirostat_tau=4.0, mirostat_eta=0.1,
                                xtc_probability=0.5, temperature_last=True, top_a=0.1, tfs=0.9, eta_cutoff=3,
                                epsilon_cutoff=3, typical_p=0.9, smoothing_factor=0.2, nsigma=2.0,
                                skew=0.1, dynatemp_min=0.5, dynatemp_max=1.5, max_tokens=6)
        if i % 25 == 24:  # guided rows mask the logits on device: warmed per sample bucket too
            guide = GuidedDecodingParams(json={"type": "object", "properties": {"a": {"type": "integer"}}}
                                         if i % 50 == 49 else None, regex=None if i % 50 == 49 else "[a-z]{2,9}")
            sp = SamplingParams(temperature=0.8, seed=i, n=2, max_tokens=6, guided_decoding=guide)
        params.append(sp)
    before = COUNTER.compiles
    with forbid_compiles():
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert COUNTER.compiles == before
    assert len(outs) == 200 and all(o.finished for o in outs)
    assert [len(o.outputs) for o in outs[3::8]] == [2] * len(outs[3::8])
    assert all(re.fullmatch("[a-z]{1,9}", c.text) for o in outs[24::50] for c in o.outputs)
    assert_all_pages_free(llm)


def test_seeded_request_is_batch_independent(llm):
    rng = random.Random(11)
    prompt = random_prompt(rng, 40)
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=32, ignore_eos=True)
    alone = generate_tokens(llm, [prompt], [sp])[0]
    others = [random_prompt(rng, rng.randint(5, 300)) for _ in range(20)]
    other_params = [SamplingParams(temperature=1.0, max_tokens=rng.randint(5, 40)) for _ in others]
    busy = generate_tokens(llm, others[:10] + [prompt] + others[10:],
                           other_params[:10] + [sp] + other_params[10:])[10]
    assert busy == alone
    unseeded = generate_tokens(llm, [prompt], [SamplingParams(temperature=1.0, top_p=0.95, seed=99,
                                                              max_tokens=32, ignore_eos=True)])[0]
    assert unseeded != alone  # the seed really drives the draw


def test_aborts_free_pages_and_leave_others_unchanged(llm):
    rng = random.Random(5)
    prompts = [random_prompt(rng, rng.randint(1, 300)) for _ in range(40)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(10, 40), ignore_eos=True) for _ in prompts]
    want = generate_tokens(llm, prompts, params)
    eng = llm.engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"abort-{i}", None, sp, prompt_token_ids=p)
    to_abort = set(rng.sample(range(40), 20))
    abort_at = {i: rng.randint(0, 25) for i in to_abort}
    done, step = {}, 0
    while eng.has_unfinished_requests():
        for i in [i for i, s in abort_at.items() if s == step]:
            eng.abort_request(f"abort-{i}")
        for out in eng.step():
            if out.finished:
                done[int(out.request_id.split("-")[1])] = out.outputs[0].token_ids
        step += 1
    for i in range(40):
        if i not in to_abort:
            assert done[i] == want[i]
    assert all(i not in done or abort_at[i] > 0 for i in to_abort)
    assert_all_pages_free(llm)


def test_prefix_caching_prefills_only_the_suffix(llm):
    rng = random.Random(9)
    prefix = random_prompt(rng, 1000)
    a = prefix + random_prompt(rng, 20)
    b = prefix + random_prompt(rng, 30)
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want_b = generate_tokens(llm, [b], [sp])[0]
    cached = make_llm(enable_prefix_caching=True)
    sched = cached.engine.scheduler
    generate_tokens(cached, [a], [sp])
    before = sched.num_prefill_tokens_computed
    got_b = generate_tokens(cached, [b], [sp])[0]
    block = cached.engine.config.cache.block_size
    assert sched.num_prefill_tokens_computed - before == len(b) - (len(prefix) // block) * block
    assert got_b == want_b
    assert_all_pages_free(cached)
