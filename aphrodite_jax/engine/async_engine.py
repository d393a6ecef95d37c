"""AsyncLLMEngine: the LLMEngine on its own thread, with one asyncio queue per request.

The engine thread owns the LLMEngine: it takes new requests and aborts from an inbox, runs `step()`
while there is work, and sleeps on a condition variable (never a timer) when idle. Outputs reach each
request's asyncio.Queue through `loop.call_soon_threadsafe`, so the event loop never blocks on the
device and streams are pushed the moment a step ends.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, AsyncIterator, Optional

from aphrodite_jax.config import EngineConfig
from aphrodite_jax.outputs import RequestOutput
from aphrodite_jax.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: Any):
        self.engine = engine
        self._cv = threading.Condition()
        self._inbox: deque = deque()
        self._aborts: deque = deque()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self.dead: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="aphrodite-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> "AsyncLLMEngine":
        from aphrodite_jax.engine.llm_engine import LLMEngine

        return cls(LLMEngine(EngineConfig.from_kwargs(**kwargs)))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.dead is None

    # ------------------------------------------------------------------ client side
    async def add_request(self, request_id: str, prompt: Optional[str], sampling_params: SamplingParams,
                          prompt_token_ids: Optional[list[int]] = None,
                          add_special_tokens: bool = True) -> asyncio.Queue:
        """Queue a request; raises the engine's validation error (e.g. prompt too long) here."""
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
        for rid, prompt, params, ids, add_special, stream, done in inbox:
            try:
                self.engine.add_request(rid, prompt, params, prompt_token_ids=ids,
                                        add_special_tokens=add_special)
            except Exception as exc:  # validation errors go back to the caller
                done(exc)
                continue
            self._streams[rid] = stream
            done(None)
        for rid in aborts:
            if rid in self._streams:
                self.engine.abort_request(rid)
                self._streams.pop(rid, None)

    def _run(self) -> None:
        while True:
            with self._cv:
                while (not self._stopped and not self._inbox and not self._aborts
                       and not self.engine.has_unfinished_requests()):
                    self._cv.wait()
                if self._stopped:
                    break
            try:
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    continue
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, not the server
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream.put(out)
                if out.finished:
                    del self._streams[out.request_id]
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _fail_all(self, exc: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # pragma: no cover - best effort while failing
                logger.exception("abort after failure")
            stream.put(exc)
        self._streams.clear()
