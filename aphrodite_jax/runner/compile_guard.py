"""Counts XLA compiles and jaxpr traces, so tests (and /metrics) can see any compile after warm-up.

JAX reports every backend compile and every trace through `jax.monitoring`; one process-wide listener
counts them. `CompileGuard.forbid()` makes a later compile raise instead of silently stalling a step.
"""
from __future__ import annotations

import threading

import jax

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    def __init__(self) -> None:
        self.compiles = 0
        self.traces = 0
        self.forbidden_depth = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def set_forbidden(self, forbid: bool) -> bool:
        """Make compiles on this thread raise (or not); returns the previous setting."""
        prev = getattr(self._local, "forbid", False)
        self._local.forbid = forbid
        return prev

    def on_event(self, event: str, duration: float, **_: object) -> None:
        """The jax.monitoring listener."""
        if event not in (_TRACE_EVENT, _COMPILE_EVENT):
            return
        with self._lock:
            if event == _COMPILE_EVENT:
                self.compiles += 1
            else:
                self.traces += 1
        if getattr(self._local, "forbid", False):
            raise RuntimeError(
                f"XLA {('compile' if event == _COMPILE_EVENT else 'trace')} after warm-up: a shape or "
                "static argument reached jit that warm-up did not cover")


COUNTER = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(COUNTER.on_event)


class forbid_compiles:
    """Context manager: any trace or compile inside (on this thread) raises RuntimeError."""

    def __enter__(self):
        self._prev = COUNTER.set_forbidden(True)
        return self

    def __exit__(self, *exc):
        COUNTER.set_forbidden(self._prev)
        return False
