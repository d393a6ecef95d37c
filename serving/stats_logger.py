"""Periodic throughput/queue log lines while the engine is busy (what `--disable-log-stats` turns off).

Aphrodite logs these from its step loop every 5 s. Our engine thread must not block on logging, so a
small daemon thread reads the engine's counters instead; it writes nothing while the engine is idle.
The numbers are for humans: they are read without locks and may be one step stale.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

logger = logging.getLogger("aphrodite_jax.serving.stats")


class StatsLogger:
    def __init__(self, engine: Any, interval_s: float = 5.0):
        self.engine = engine  # an LLMEngine (it has .stats and .scheduler)
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
        stats, sched = self.engine.stats, self.engine.scheduler
        now = time.monotonic()
        t0, steps0, prompt0, gen0 = self._last
        steps, prompt, gen = stats.steps, stats.prompt_tokens, stats.generation_tokens
        self._last = (now, steps, prompt, gen)
        if steps == steps0:
            return None
        dt = max(now - t0, 1e-9)
        return (f"Avg prompt throughput: {(prompt - prompt0) / dt:.1f} tokens/s, "
                f"Avg generation throughput: {(gen - gen0) / dt:.1f} tokens/s, "
                f"Running: {len(sched.running)} reqs, Swapped: {len(sched.swapped)} reqs, "
                f"Pending: {len(sched.waiting)} reqs, "
                f"GPU KV cache usage: {100 * sched.gpu_cache_usage:.1f}%, "
                f"CPU KV cache usage: {100 * sched.cpu_cache_usage:.1f}%")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                text = self.line()
            except Exception:  # a list changed under us mid-read: skip this tick
                continue
            if text:
                logger.info(text)
