"""AsyncLLMEngine: the LLMEngine on its own thread, with one asyncio queue per request.

The engine thread owns the LLMEngine: it takes new requests and aborts from an inbox, runs `step()`
while there is work, and sleeps on a condition variable (never a timer) when idle. Outputs reach each
request's asyncio.Queue through `loop.call_soon_threadsafe`, so the event loop never blocks on the
device and streams are pushed the moment a step ends.

Failure policy: a step that raises fails only the requests it touched (their pages are freed, their
streams get an EngineStepError) and the engine carries on. After `MAX_CONSECUTIVE_FAILURES` failed
steps in a row, or once the device state is gone (`LLMEngine.is_healthy()`), the engine is dead:
every stream and queued request gets EngineDeadError, `is_running` turns False (the server's /health
answers 503) and the `on_dead` callbacks run, so the server can exit non-zero for its supervisor.
Overload: with `max_queue_len` set, a request arriving while that many are already waiting for a slot
is refused with QueueFullError (the server's 503 + Retry-After) instead of queueing without bound.

Public face: the server reads the engine only through this class: the model facts (`model_name`,
`max_model_len`, `vocab_size`, ...), `check_params`, `compile_guide` and `snapshot()`. Only the engine
thread touches the LLMEngine's queues, so a snapshot asked for from another thread is taken by the engine
thread between two steps (it wakes an idle engine), never halfway through one.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, AsyncIterator, Callable, Optional

from aphrodite_jax.config import EngineConfig
from aphrodite_jax.engine.snapshot import EngineSnapshot
from aphrodite_jax.outputs import RequestOutput
from aphrodite_jax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


MAX_CONSECUTIVE_FAILURES = 3


class EngineDeadError(RuntimeError):
    """The engine stopped (fatal failure or shutdown); it takes no more requests."""


class EngineStepError(RuntimeError):
    """The step running this request raised; the request was aborted, the engine carries on."""


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_queue_len` allows; the client should retry later."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by `abort()` while someone was still reading its stream."""


def _deliver(items: list) -> None:
    """On the event loop: hand one step's outputs to their streams' queues."""
    for queue, item in items:
        queue.put_nowait(item)


class _SnapshotRequest:
    """One snapshot asked for by another thread; the engine thread fills it in and sets `done`."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[EngineSnapshot] = None
        self.error: Optional[BaseException] = None


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: Any, max_queue_len: Optional[int] = None):
        """`max_queue_len` overrides the engine config's `scheduler.max_queue_len`."""
        self.engine = engine
        self._cv = threading.Condition()
        self._snapshots: list[_SnapshotRequest] = []  # asked for by other threads, taken between steps
        self._inbox: deque = deque()
        self._aborts: deque = deque()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self._closed = False  # set by the engine thread on exit; add_request refuses from then on
        self.dead: Optional[BaseException] = None
        self.on_dead: list[Callable[[BaseException], None]] = []
        self.consecutive_failures = 0
        self.max_queue_len: Optional[int] = max_queue_len if max_queue_len is not None else getattr(
            getattr(getattr(engine, "config", None), "scheduler", None), "max_queue_len", None)
        self._thread = threading.Thread(target=self._run, name="aphrodite-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> "AsyncLLMEngine":
        from aphrodite_jax.engine.llm_engine import LLMEngine

        return cls(LLMEngine(EngineConfig.from_kwargs(**kwargs)))

    # ------------------------------------------------------------------ what the server reads
    # Facts fixed at start-up: safe to read from any thread.
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> Optional[str]:
        """The model path or hub id as given (None: the bundled default)."""
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_logprobs(self) -> int:
        return self.engine.max_logprobs

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.engine.eos_token_ids)

    @property
    def hf_config(self) -> Any:
        return self.engine.hf_config

    @property
    def generation_config(self) -> dict:
        """generation_config.json's sampling defaults ({} when the model has none)."""
        return self.engine.generation_config or {}

    @property
    def resolved_config(self) -> Any:
        """The engine's resolved (frozen) config."""
        return self.engine.config

    def check_params(self, params: SamplingParams) -> None:
        """LLMEngine.check_params: the vocabulary checks of sampling params (ValueError)."""
        self.engine.check_params(params)

    def compile_guide(self, guided: Any) -> Any:
        """Compile (and cache) a guided-decoding guide; blocking, so callers on an event loop run it in a
        worker thread. Raises GuideError or ValueError."""
        return self.engine.compile_guide(guided)

    def snapshot(self, timeout: float = 60.0) -> EngineSnapshot:
        """Queues, KV usage and counters, taken by the engine thread between two steps. Thread-safe; it
        waits for a running step to end, so callers on an event loop run it in a worker thread."""
        request = _SnapshotRequest()
        with self._cv:
            running = not self._closed and threading.current_thread() is not self._thread
            if running:
                self._snapshots.append(request)
                self._cv.notify()
        if not running:  # the engine thread is gone (nothing changes the engine now) or is the caller
            return self.engine.snapshot()
        if not request.done.wait(timeout):
            raise TimeoutError(f"the engine thread took no snapshot within {timeout} s")
        if request.error is not None:
            raise request.error
        return request.value

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    # ------------------------------------------------------------------ client side
    async def add_request(self, request_id: str, prompt: Optional[str], sampling_params: SamplingParams,
                          prompt_token_ids: Optional[list[int]] = None,
                          add_special_tokens: bool = True) -> asyncio.Queue:
        """Queue a request; raises the engine's validation error (e.g. prompt too long), QueueFullError
        or EngineDeadError here."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead!r}")
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        stream = _Stream(loop)

        def resolve(exc: Optional[BaseException]) -> None:
            if not accepted.done():
                accepted.set_exception(exc) if exc else accepted.set_result(None)

        item = (request_id, prompt, sampling_params, prompt_token_ids, add_special_tokens, stream,
                lambda exc=None: loop.call_soon_threadsafe(resolve, exc))
        with self._cv:
            if self._closed or self._stopped:
                raise EngineDeadError("the engine is shutting down" if self.dead is None
                                      else f"the engine is dead: {self.dead!r}")
            self._inbox.append(item)
            self._cv.notify()
        await accepted
        return stream.queue

    async def generate(self, prompt: Optional[str], sampling_params: SamplingParams, request_id: str,
                       prompt_token_ids: Optional[list[int]] = None,
                       add_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until the request finishes. Cancelling the iterator aborts."""
        queue = await self.add_request(request_id, prompt, sampling_params, prompt_token_ids,
                                       add_special_tokens)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _drain_inbox(self) -> None:
        with self._cv:
            inbox, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
        waiting = self._num_waiting()
        for rid, prompt, params, ids, add_special, stream, done in inbox:
            if self.max_queue_len is not None and waiting >= self.max_queue_len:
                done(QueueFullError(f"the server is overloaded: {waiting} requests are already "
                                    f"waiting (max_queue_len={self.max_queue_len}); retry later"))
                continue
            try:
                self.engine.add_request(rid, prompt, params, prompt_token_ids=ids,
                                        add_special_tokens=add_special)
            except Exception as exc:  # validation errors go back to the caller
                done(exc)
                continue
            self._streams[rid] = stream
            waiting += 1
            done(None)
        for rid in aborts:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                self.engine.abort_request(rid)
                # End the stream, so a reader other than the aborter does not wait forever.
                stream.put(RequestAbortedError(f"request {rid} was aborted"))

    def _num_waiting(self) -> int:
        sched = getattr(self.engine, "scheduler", None)
        return len(getattr(sched, "waiting", ()))

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in the loop itself: never leave clients hanging
            logger.exception("the engine thread crashed")
            self._die(exc)
        finally:
            with self._cv:
                self._closed = True
                inbox, self._inbox = list(self._inbox), deque()
            err = EngineDeadError("the engine was shut down" if self.dead is None
                                  else f"the engine is dead: {self.dead!r}")
            for item in inbox:
                item[-1](err)  # requests that never got in
            self._fail_all(err)
            self._take_snapshots()  # asked for before the thread closed: answered, not left waiting

    def _loop(self) -> None:
        while True:
            with self._cv:
                while (not self._stopped and not self._inbox and not self._aborts and not self._snapshots
                       and not self.engine.has_unfinished_requests()):
                    self._cv.wait()
                if self._stopped:
                    return
            self._take_snapshots()
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, not the server
                if not self._step_failed(exc):
                    return
                continue
            self.consecutive_failures = 0
            # One wake-up of each event loop per step for all its streams, not one per stream.
            batches: dict[asyncio.AbstractEventLoop, list] = {}
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                batches.setdefault(stream.loop, []).append((stream.queue, out))
                if out.finished:
                    del self._streams[out.request_id]
            for loop, items in batches.items():
                loop.call_soon_threadsafe(_deliver, items)

    def _take_snapshots(self) -> None:
        """On the engine thread, between steps: answer every snapshot asked for since the last one."""
        if not self._snapshots:  # read without the lock: one missed now is answered after the next step
            return
        with self._cv:
            requests, self._snapshots = self._snapshots, []
        if not requests:
            return
        try:
            value, error = self.engine.snapshot(), None
        except Exception as exc:  # pragma: no cover - reported to the askers, the engine carries on
            value, error = None, exc
        for request in requests:
            request.value, request.error = value, error
            request.done.set()

    def _step_failed(self, exc: Exception) -> bool:
        """Fail the failed step's requests; return False when the engine cannot go on (now dead)."""
        self.consecutive_failures += 1
        ids = list(getattr(self.engine, "step_request_ids", None) or self._streams)
        logger.error("engine step failed (%d in a row), failing its %d request(s): %r",
                     self.consecutive_failures, len(ids), exc, exc_info=exc)
        err = EngineStepError(f"the engine failed while running this request: {type(exc).__name__}: {exc}")
        healthy = getattr(self.engine, "is_healthy", lambda: True)()
        if healthy and self.consecutive_failures < MAX_CONSECUTIVE_FAILURES:
            self._fail(ids, err)
            return True
        why = ("the device state was lost" if not healthy
               else f"{self.consecutive_failures} steps failed in a row")
        # Dead before the step's own requests hear of their failure: a client answered by it must already
        # see a dead engine (is_running False, /health 503), not race the rest of the shutdown.
        self.dead = death = RuntimeError(f"{why}; last error: {type(exc).__name__}: {exc}")
        self._fail(ids, err)
        self._after_death(death)
        return False

    def _die(self, exc: BaseException) -> None:
        if self.dead is not None:
            return
        self.dead = exc
        self._after_death(exc)

    def _after_death(self, exc: BaseException) -> None:
        """Fail every other request and run the on_dead callbacks (self.dead is already set)."""
        logger.critical("the engine is dead (%s); failing every request", exc)
        self._fail_all(EngineDeadError(f"the engine is dead: {exc}"))
        for callback in list(self.on_dead):
            try:
                callback(exc)
            except Exception:  # pragma: no cover - a callback must not hide the death
                logger.exception("on_dead callback failed")

    def _fail(self, request_ids, exc: BaseException) -> None:
        for rid in request_ids:
            try:
                self.engine.abort_request(rid)
            except Exception:  # pragma: no cover - best effort while failing
                logger.exception("abort after failure")
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(exc)

    def _fail_all(self, exc: BaseException) -> None:
        self._fail(list(self._streams), exc)
