"""AsyncLLMEngine's failure and overload policy, driven by a scripted fake LLMEngine (no model): a failed
step fails exactly the requests it ran, repeated failures or a lost device state kill the engine (every
waiter answered, `on_dead` called), and `max_queue_len` refuses requests past the waiting limit.
The same behaviour on the real engine and server is in test_reliability.py."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from aphrodite_jax.engine.async_engine import (MAX_CONSECUTIVE_FAILURES, AsyncLLMEngine, EngineDeadError,
                                               EngineStepError, QueueFullError)


class FakeEngine:
    """Runs at most `batch` requests per step; each finishes after `steps` steps. `fail_next` makes
    the next steps raise; `healthy` is what is_healthy() reports."""

    def __init__(self, batch: int = 2, steps: int = 3):
        self.batch, self.steps = batch, steps
        self.scheduler = SimpleNamespace(waiting=[])
        self.running: dict[str, int] = {}
        self.aborted: list[str] = []
        self.step_request_ids: list[str] = []
        self.fail_next = 0
        self.healthy = True
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_queue_len=None))

    def add_request(self, rid, prompt, params, prompt_token_ids=None, add_special_tokens=True):
        if prompt == "bad":
            raise ValueError("prompt is bad")
        self.scheduler.waiting.append(rid)

    def abort_request(self, rid):
        self.aborted.append(rid)
        self.running.pop(rid, None)
        if rid in self.scheduler.waiting:
            self.scheduler.waiting.remove(rid)

    def has_unfinished_requests(self):
        return bool(self.running or self.scheduler.waiting)

    def is_healthy(self):
        return self.healthy

    def step(self):
        while self.scheduler.waiting and len(self.running) < self.batch:
            self.running[self.scheduler.waiting.pop(0)] = 0
        self.step_request_ids = list(self.running)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected step failure")
        outs = []
        for rid in list(self.running):
            self.running[rid] += 1
            done = self.running[rid] >= self.steps
            if done:
                del self.running[rid]
            outs.append(SimpleNamespace(request_id=rid, finished=done))
        return outs


async def _collect(engine, rid, prompt="p"):
    try:
        outs = [o async for o in engine.generate(prompt, None, rid)]
        return "ok", len(outs)
    except Exception as exc:  # noqa: BLE001 - the test inspects the type
        return type(exc).__name__, str(exc)


def test_failed_step_fails_only_its_requests_and_the_engine_goes_on():
    fake = FakeEngine(batch=2, steps=3)
    engine = AsyncLLMEngine(fake)

    async def main():
        fake.fail_next = 1  # the first step, running a and b; c and d wait for a slot
        results = await asyncio.gather(*[_collect(engine, r) for r in "abcd"])
        later = await _collect(engine, "e")
        return results, later

    try:
        results, later = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [r[0] for r in results] == ["EngineStepError", "EngineStepError", "ok", "ok"], results
    assert "injected step failure" in results[0][1]
    assert sorted(fake.aborted) == ["a", "b"]  # their pages are freed through abort
    assert later == ("ok", 3)
    assert engine.dead is None and engine.consecutive_failures == 0


def test_repeated_failures_kill_the_engine_and_answer_everyone():
    fake = FakeEngine(batch=1, steps=2)
    engine = AsyncLLMEngine(fake)
    deaths = []
    engine.on_dead.append(deaths.append)

    async def main():
        fake.fail_next = MAX_CONSECUTIVE_FAILURES
        results = await asyncio.gather(*[_collect(engine, r) for r in "abcdef"])
        after = await _collect(engine, "z")
        return results, after

    results, after = asyncio.run(main())
    engine._thread.join(5)  # on_dead runs on the engine thread, after the streams are answered
    assert not engine._thread.is_alive()
    kinds = [r[0] for r in results]
    # The first MAX_CONSECUTIVE_FAILURES requests ran in the failed steps; the rest were still waiting.
    assert kinds[:MAX_CONSECUTIVE_FAILURES] == ["EngineStepError"] * MAX_CONSECUTIVE_FAILURES
    assert set(kinds[MAX_CONSECUTIVE_FAILURES:]) == {"EngineDeadError"}
    assert after[0] == "EngineDeadError"
    assert len(deaths) == 1 and "in a row" in str(deaths[0])
    assert not engine.is_running


def test_lost_device_state_is_fatal_at_once():
    fake = FakeEngine()
    engine = AsyncLLMEngine(fake)
    deaths = []
    engine.on_dead.append(deaths.append)
    fake.fail_next, fake.healthy = 1, False

    async def main():
        return await asyncio.gather(_collect(engine, "a"), _collect(engine, "b"), _collect(engine, "c"))

    results = asyncio.run(asyncio.wait_for(main(), 30))
    engine._thread.join(5)
    assert [r[0] for r in results] == ["EngineStepError", "EngineStepError", "EngineDeadError"]
    assert deaths and "device state" in str(deaths[0]) and not engine.is_running


def test_queue_limit_refuses_past_the_waiting_limit():
    fake = FakeEngine(batch=1, steps=2)
    engine = AsyncLLMEngine(fake, max_queue_len=3)
    assert engine.max_queue_len == 3

    async def main():
        return await asyncio.gather(*[_collect(engine, str(i)) for i in range(10)])

    try:
        results = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.shutdown()
    kinds = [r[0] for r in results]
    assert set(kinds) == {"ok", "QueueFullError"}
    assert kinds.count("ok") >= 3  # the limit counts requests waiting, not the running one
    assert "max_queue_len=3" in next(r[1] for r in results if r[0] == "QueueFullError")


def test_validation_errors_still_reach_the_caller_and_shutdown_answers_waiters():
    fake = FakeEngine()
    engine = AsyncLLMEngine(fake)

    async def main():
        bad = await _collect(engine, "x", prompt="bad")
        engine.shutdown()
        late = await _collect(engine, "y")
        return bad, late

    bad, late = asyncio.run(asyncio.wait_for(main(), 30))
    assert bad == ("ValueError", "prompt is bad")
    assert late[0] == "EngineDeadError"


def test_error_kinds_map_to_http():
    from serving.openai.errors import engine_error

    assert engine_error(QueueFullError("x")).status == 503
    assert engine_error(QueueFullError("x")).headers["Retry-After"].isdigit()
    assert engine_error(EngineDeadError("x")).status == 503
    assert engine_error(EngineStepError("x")).status == 500
    assert engine_error(KeyError("x")) is None


def test_max_queue_len_flag_reaches_the_engine_config():
    from serving.cli import parse_flat

    engine_config, serving_config = parse_flat(["--max-queue-len", "7", "--shutdown-timeout", "2.5"])
    assert engine_config.scheduler.max_queue_len == 7
    assert serving_config.shutdown_timeout == 2.5
    from serving.args import CLIError

    with pytest.raises(CLIError, match="max_queue_len"):
        parse_flat(["--max-queue-len", "0"])
