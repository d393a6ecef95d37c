"""Failures on the real engine and server: a failed step (forced by making the runner raise) answers its
requests with OpenAI-shaped 500s and the engine carries on; repeated failures make /health 503 and
run_server exit non-zero; 500 simultaneous requests against a small scheduler either finish or get a
503 with Retry-After past --max-queue-len. Limits and slow clients are in test_limits.py."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading

import httpx
import openai
import pytest

from server_utils import free_port, start_server

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


@contextlib.contextmanager
def failing_runner(llm, times: int | None = 1):
    """Make the runner's model call raise for the next `times` steps (None: until the block ends).
    It raises before the jitted step runs, so the KV cache survives, as after a host-side failure."""
    runner = llm.runner
    real = runner.run_model
    left = {"n": times}

    def run_model(*args, **kwargs):
        if left["n"] is None or left["n"] > 0:
            if left["n"] is not None:
                left["n"] -= 1
            raise RuntimeError("injected failure in the model step")
        return real(*args, **kwargs)

    runner.run_model = run_model
    try:
        yield left
    finally:
        del runner.run_model  # back to the class's method


def _assert_clean(llm) -> None:
    bm = llm.scheduler.block_manager
    assert not llm.requests and not llm.has_unfinished_requests()
    assert bm.num_free_gpu_blocks == llm.runner.num_gpu_blocks


def test_failed_step_answers_500_and_the_engine_recovers(default_llm):
    llm = default_llm.engine
    srv = start_server(llm)
    try:
        oa = openai.OpenAI(base_url=srv.v1, api_key="x", max_retries=0, timeout=300)
        model = oa.models.list().data[0].id
        before = oa.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        body = {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=srv.base_url, timeout=300) as h:
            # A request whose first step fails: a plain 500 in OpenAI's shape.
            with failing_runner(llm):
                err = _error(h.post("/v1/completions", json=body), 500)
            assert "injected failure" in err["message"] and err["type"] == "InternalServerError"
            # A stream whose step fails mid-way: the 200 is sent, so the error comes in-band.
            events = []
            chat = {k: v for k, v in body.items() if k != "prompt"}
            chat.update(messages=[{"role": "user", "content": "Tell me a story"}], stream=True)
            with h.stream("POST", "/v1/chat/completions", json=chat) as resp:
                assert resp.status_code == 200
                armed = None
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if len(events) == 3 and armed is None:
                        armed = failing_runner(llm)
                        armed.__enter__()
                if armed is not None:
                    armed.__exit__(None, None, None)
            assert events[-1] == "[DONE]"
            errors = [json.loads(e)["error"] for e in events[:-1] if '"error"' in e]
            assert len(errors) == 1 and errors[0]["code"] == 500 and "injected failure" in errors[0]["message"]
            assert not any(json.loads(e)["choices"][0].get("finish_reason") for e in events[:-2])
            assert srv.wait_idle(60)
            _assert_clean(llm)
            assert h.get("/health").status_code == 200
        after = oa.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
        assert after == before
        assert srv.engine.dead is None
    finally:
        srv.stop()


def test_a_dead_engine_answers_503_and_run_server_exits_nonzero(default_llm, monkeypatch):
    import aphrodite_jax.engine.llm_engine as llm_engine_mod
    from aphrodite_jax.engine.async_engine import MAX_CONSECUTIVE_FAILURES, AsyncLLMEngine
    from serving import cli

    llm = default_llm.engine
    # 1) Behind the test harness: the engine dies after repeated failures; /health and new requests 503.
    engine = AsyncLLMEngine(llm)
    srv = start_server(async_engine=engine)
    try:
        body = {"model": srv.app.state.served_model_names[0], "prompt": PROMPT, "max_tokens": 4}
        with failing_runner(llm, times=None), httpx.Client(base_url=srv.base_url, timeout=300) as h:
            for i in range(MAX_CONSECUTIVE_FAILURES):
                _error(h.post("/v1/completions", json=body), 500)
            assert engine.dead is not None and not engine.is_running
            err = _error(h.get("/health"), 503)
            assert err["type"] == "ServiceUnavailableError"
            resp = h.post("/v1/completions", json=body)
            _error(resp, 503)
            assert resp.headers["retry-after"].isdigit()
        _assert_clean(llm)
    finally:
        srv.stop()
        engine.shutdown()

    # 2) The real run_server (uvicorn, signal handlers) over the same LLMEngine exits with status 1.
    monkeypatch.setattr(llm_engine_mod, "LLMEngine", lambda config: llm)
    port = free_port()
    configs = cli.parse_flat(["--host", "127.0.0.1", "--port", str(port), "--disable-log-stats",
                              "--shutdown-timeout", "5", "--uvicorn-log-level", "warning"])
    seen: dict = {}

    def client() -> None:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=300) as h:
            for _ in range(600):
                try:
                    if h.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.1)
            model = h.get("/v1/models").json()["data"][0]["id"]
            seen["statuses"] = [h.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                                               "max_tokens": 4}).status_code
                                for _ in range(MAX_CONSECUTIVE_FAILURES)]

    levels = (logging.getLogger().level, logging.getLogger("jax").level)
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        with failing_runner(llm, times=None):
            status = cli.run_server(*configs)
    finally:
        logging.getLogger().setLevel(levels[0])
        logging.getLogger("jax").setLevel(levels[1])
    thread.join(60)
    assert seen["statuses"] == [500] * MAX_CONSECUTIVE_FAILURES
    assert status == cli.EXIT_ENGINE_DEAD != 0
    _assert_clean(llm)


@contextlib.contextmanager
def small_scheduler(llm, max_num_seqs: int, num_blocks: int):
    """Run the shared engine with a small batch and KV cache: a Scheduler over the first `num_blocks`
    pages of the runner's cache (the same compiled shapes, so no compile)."""
    from aphrodite_jax.engine.scheduler import Scheduler

    old_sched, old_config = llm.scheduler, llm.config
    config = dataclasses.replace(old_config, scheduler=dataclasses.replace(old_config.scheduler,
                                                                           max_num_seqs=max_num_seqs))
    llm.config = config
    llm.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, llm.runner.num_cpu_blocks,
                              llm.max_model_len)
    try:
        yield llm.scheduler
    finally:
        llm.scheduler, llm.config = old_sched, old_config


def test_overload_500_requests_finish_or_get_503(default_llm):
    from aphrodite_jax.engine.async_engine import AsyncLLMEngine

    llm = default_llm.engine
    queue_len, total = 48, 500
    with small_scheduler(llm, max_num_seqs=4, num_blocks=64) as sched:
        engine = AsyncLLMEngine(llm, max_queue_len=queue_len)
        srv = start_server(async_engine=engine)
        try:
            model = srv.app.state.served_model_names[0]
            # Prompts of 8..300 tokens: four long ones need more than the 64 pages, so some are preempted.
            prompts = [" ".join(["word"] * (8 + (i * 37) % 292)) for i in range(total)]

            async def one(client: httpx.AsyncClient, i: int):
                chat = i % 2 == 1
                body = {"model": model, "max_tokens": 2 + i % 3, "temperature": 0, "ignore_eos": True}
                if chat:
                    body["messages"] = [{"role": "user", "content": prompts[i]}]
                else:
                    body["prompt"] = prompts[i]
                r = await client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
                return i, r

            async def main():
                limits = httpx.Limits(max_connections=total, max_keepalive_connections=0)
                async with httpx.AsyncClient(base_url=srv.base_url, timeout=600, limits=limits) as c:
                    return await asyncio.gather(*(one(c, i) for i in range(total)))

            results = asyncio.run(main())
            ok = refused = 0
            for i, r in results:
                if r.status_code == 200:
                    ok += 1
                    choice = r.json()["choices"][0]
                    assert choice["finish_reason"] == "length"
                    assert r.json()["usage"]["completion_tokens"] == 2 + i % 3
                else:
                    err = _error(r, 503)
                    assert "max_queue_len=48" in err["message"]
                    assert int(r.headers["retry-after"]) >= 1
                    refused += 1
            assert ok + refused == total
            assert ok >= queue_len and refused > 0, (ok, refused)
            for _ in range(1200):  # the engine drains within a few steps of the last answer
                if not llm.has_unfinished_requests() and not llm.requests:
                    break
                threading.Event().wait(0.1)
            assert not sched.waiting and not sched.running and not sched.swapped
            assert sched.block_manager.num_free_gpu_blocks == 64
            print(f"overload: {ok} served, {refused} refused with 503, {sched.num_preemptions} preemptions")
        finally:
            srv.stop()
            engine.shutdown()
    _assert_clean(llm)
