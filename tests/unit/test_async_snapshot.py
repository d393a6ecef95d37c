"""AsyncLLMEngine.snapshot(): taken on the engine thread between steps, promptly, busy or idle."""
import asyncio
import threading
import time
from types import SimpleNamespace

from aphrodite_jax.engine.async_engine import AsyncLLMEngine


class BusyEngine:
    """An engine whose requests never finish: each step sleeps a little and counts."""

    def __init__(self):
        self.steps = 0
        self.requests: set[str] = set()
        self.in_step = False
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_queue_len=None))

    def add_request(self, rid, *args, **kwargs):
        self.requests.add(rid)

    def abort_request(self, rid):
        self.requests.discard(rid)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.in_step = True
        time.sleep(0.005)
        self.steps += 1
        self.in_step = False
        return []

    def snapshot(self):
        return SimpleNamespace(steps=self.steps, in_step=self.in_step, thread=threading.current_thread().name,
                               requests=tuple(sorted(self.requests)))


def test_snapshot_is_taken_between_steps_and_promptly():
    llm = BusyEngine()
    engine = AsyncLLMEngine(llm)

    async def main():
        idle = await asyncio.to_thread(engine.snapshot)  # an idle engine thread wakes up for it
        assert idle.thread == "aphrodite-engine" and idle.steps == 0 and idle.requests == ()
        await engine.add_request("busy", None, None)
        snaps, waits = [], []
        for _ in range(20):
            t0 = time.monotonic()
            snaps.append(await asyncio.to_thread(engine.snapshot))
            waits.append(time.monotonic() - t0)
        await asyncio.to_thread(engine.shutdown)  # while the stream's loop is still open
        return snaps, waits

    try:
        snaps, waits = asyncio.run(main())
    finally:
        engine.shutdown()
    assert all(s.thread == "aphrodite-engine" and not s.in_step for s in snaps)
    assert all(s.requests == ("busy",) for s in snaps)
    steps = [s.steps for s in snaps]
    assert steps == sorted(steps) and steps[-1] > steps[0]  # the engine kept stepping meanwhile
    assert max(waits) < 1.0, waits  # a few 5 ms steps at most, never starved
    after = engine.snapshot()  # the thread is gone: read directly
    assert after.thread == threading.current_thread().name and after.steps >= steps[-1]
