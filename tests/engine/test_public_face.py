"""The engine's public face: StepInput/StepOutput carry a step's state (no hidden state between runner
calls), and AsyncLLMEngine.snapshot() is consistent while the engine thread steps."""
import asyncio
import threading

import numpy as np
import pytest

from aphrodite_jax import SamplingParams
from aphrodite_jax.runner.step_io import StepInput, StepOutput


def _pages(runner, first: int, n_tokens: int) -> list[int]:
    """Page ids at the top of the cache, away from what the scheduler hands out first."""
    n = -(-n_tokens // runner.block_size)
    top = runner.num_gpu_blocks - 1 - first
    return list(range(top - n + 1, top + 1))


def _prompt_lp(runner, out: StepOutput, prompt: list[int]):
    return runner.prompt_logprobs(out, list(range(len(prompt) - 1)), prompt[1:])


def test_step_output_carries_prompt_logprobs_state(default_llm):
    engine = default_llm.engine
    runner = engine.runner
    assert not engine.has_unfinished_requests()
    a = [(7 * i + 3) % 4000 + 100 for i in range(20)]
    b = [(11 * i + 5) % 4000 + 100 for i in range(37)]
    step_a = StepInput([(a, 0, _pages(runner, 0, len(a)))], [0], prompt_logprobs=True)
    step_b = StepInput([(b, 0, _pages(runner, 8, len(b)))], [0], prompt_logprobs=True)
    out_a = runner.run_model(step_a)
    out_b = runner.run_model(step_b)  # a second step runs before A's prompt logprobs are read
    assert isinstance(out_a, StepOutput) and out_a.token_bucket >= len(a) and out_b.token_bucket >= len(b)
    assert out_a.hidden.shape[0] == out_a.token_bucket and out_a.logits is not None
    late_a, late_b = _prompt_lp(runner, out_a, a), _prompt_lp(runner, out_b, b)
    # The same steps run alone, their prompt logprobs read at once.
    now_a = _prompt_lp(runner, runner.run_model(step_a), a)
    now_b = _prompt_lp(runner, runner.run_model(step_b), b)
    for late, now in ((late_a, now_a), (late_b, now_b)):
        for x, y in zip(late, now):
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=1e-5)
    assert len(late_a[0]) == len(a) - 1 and len(late_b[0]) == len(b) - 1
    assert not np.allclose(late_a[0][:5], late_b[0][:5])  # two different prompts, two different answers
    # The engine's own path gives the same numbers for A.
    default_llm.engine.add_request("plp", None, SamplingParams(max_tokens=1, prompt_logprobs=1),
                                   prompt_token_ids=a)
    final = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o
    got = [final.prompt_logprobs[j + 1][a[j + 1]].logprob for j in range(len(a) - 1)]
    np.testing.assert_allclose(got, late_a[0], atol=1e-4)


def test_snapshot_is_consistent_while_the_engine_runs(default_llm):
    from aphrodite_jax.engine.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(default_llm.engine)
    before = engine.snapshot()
    seen, errors = [], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append(engine.snapshot())
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    async def main():
        async def one(i):
            params = SamplingParams(temperature=0.0, max_tokens=12 + i, ignore_eos=True)
            return [o async for o in engine.generate(None, params, f"snap-{i}",
                                                     prompt_token_ids=[100 + i] * (5 + 7 * i))][-1]

        return await asyncio.gather(*(one(i) for i in range(6)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outs = asyncio.run(main())
    finally:
        stop.set()
        watcher.join(30)
        after = engine.snapshot()
        engine.shutdown()
    assert not errors, errors
    assert all(o.finished for o in outs)
    busy = [s for s in seen if s.requests]
    assert busy, "no snapshot was taken while requests ran"
    steps = [s.steps for s in seen]
    assert steps == sorted(steps)  # counters only grow
    gen = [s.generation_tokens for s in seen]
    assert gen == sorted(gen)
    for s in seen:
        ids = [r.request_id for r in s.requests]
        assert len(ids) == len(set(ids)), ids  # no request in two queues at once
        by_state = {k: sum(r.state == k for r in s.requests) for k in ("running", "waiting", "swapped")}
        assert (by_state["running"], by_state["waiting"], by_state["swapped"]) == (
            s.num_running, s.num_waiting, s.num_swapped)
        assert 0.0 <= s.gpu_cache_usage <= 1.0 and s.num_gpu_blocks == default_llm.engine.runner.num_gpu_blocks
        for r in s.requests:
            i = int(r.request_id.split("-")[1])
            assert r.prompt_tokens == 5 + 7 * i and 0 <= r.output_tokens <= 12 + i
    assert not after.requests and after.num_running == after.num_waiting == 0
    assert after.generation_tokens - before.generation_tokens == sum(12 + i for i in range(6))
    assert after.steps > before.steps
    with pytest.raises(AttributeError):
        after.num_running = 3  # a frozen copy
