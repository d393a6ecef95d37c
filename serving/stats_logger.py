"""Periodic throughput/queue log lines while the engine is busy (what `--disable-log-stats` turns off).

Aphrodite logs these from its step loop every 5 s. Our engine thread must not block on logging, so a
small daemon thread takes the engine's snapshot instead (AsyncLLMEngine.snapshot, between two steps);
it writes nothing while the engine is idle.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger("aphrodite_jax.serving.stats")


class StatsLogger:
    def __init__(self, engine: Any, interval_s: float = 5.0):
        self.engine = engine  # anything with snapshot() -> EngineSnapshot (an AsyncLLMEngine)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aphrodite-stats", daemon=True)
        self._last = (time.monotonic(), 0, 0, 0)

    def start(self) -> "StatsLogger":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 1)

    def line(self) -> str | None:
        """The next log line, or None when nothing ran since the last one."""
        snap = self.engine.snapshot()
        now = time.monotonic()
        t0, steps0, prompt0, gen0 = self._last
        steps, prompt, gen = snap.steps, snap.prompt_tokens, snap.generation_tokens
        self._last = (now, steps, prompt, gen)
        if steps == steps0:
            return None
        dt = max(now - t0, 1e-9)
        return (f"Avg prompt throughput: {(prompt - prompt0) / dt:.1f} tokens/s, "
                f"Avg generation throughput: {(gen - gen0) / dt:.1f} tokens/s, "
                f"Running: {snap.num_running} reqs, Swapped: {snap.num_swapped} reqs, "
                f"Pending: {snap.num_waiting} reqs, "
                f"GPU KV cache usage: {100 * snap.gpu_cache_usage:.1f}%, "
                f"CPU KV cache usage: {100 * snap.cpu_cache_usage:.1f}%")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                text = self.line()
            except Exception:  # the engine is gone or failing: skip this tick
                logger.debug("stats snapshot failed", exc_info=True)
                continue
            if text:
                logger.info(text)
