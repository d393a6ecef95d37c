"""Request limits and slow clients on the real server as `run_server` configures uvicorn
(serving.cli.uvicorn_config): each limit is a 400 naming its field, an oversized body a 413, and a
client that trickles its request is disconnected after --request-read-timeout."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from server_utils import free_port

pytestmark = pytest.mark.slow

READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def limited(default_llm):
    import uvicorn

    from aphrodite_jax.engine.async_engine import AsyncLLMEngine
    from serving.cli import uvicorn_config
    from serving.config import ServingConfig
    from serving.openai.api_server import build_app

    cfg = ServingConfig(port=free_port(), max_request_body_bytes=64 * 1024, max_n=4, max_tokens_limit=32,
                        max_stop_strings=8, max_stop_string_chars=64, max_logit_bias=16,
                        max_guide_bytes=2048, request_read_timeout=READ_TIMEOUT, uvicorn_log_level="warning")
    engine = AsyncLLMEngine(default_llm.engine)
    server = uvicorn.Server(uvicorn_config(build_app(engine, cfg), cfg, host="127.0.0.1"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{cfg.port}"
    server.should_exit = True
    thread.join(30)
    engine.shutdown()


def _check_400(resp: httpx.Response, param: str, status: int = 400) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["param"] == param and param in err["message"], err


def test_each_limit_is_a_400_naming_its_field(limited):
    big_schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(200)}}
    c = {"model": "default", "prompt": "Hi", "max_tokens": 2}
    m = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [
        ("/v1/completions", {**c, "n": 5}, "n"),
        # Found by fuzzing: ints past int32 overflowed inside the engine step (a 500).
        ("/v1/completions", {**c, "top_k": 2**40}, "top_k"),
        ("/v1/chat/completions", {**m, "dry_range": 4816675416}, "dry_range"),
        ("/v1/completions", {**c, "stop_token_ids": [1, 2**63]}, "stop_token_ids"),
        ("/v1/completions", {**c, "n": 2, "best_of": 5}, "best_of"),
        ("/v1/completions", {**c, "max_tokens": 33}, "max_tokens"),
        ("/v1/chat/completions", {"model": "default", "messages": m["messages"], "max_completion_tokens": 33},
         "max_tokens"),
        ("/v1/completions", {**c, "stop": [str(i) for i in range(9)]}, "stop"),
        ("/v1/chat/completions", {**m, "stop": "x" * 65}, "stop"),
        ("/v1/completions", {**c, "logit_bias": {str(i): 1.0 for i in range(17)}}, "logit_bias"),
        ("/v1/completions", {**c, "guided_json": big_schema}, "guided_json"),
        ("/v1/completions", {**c, "guided_json": json.dumps(big_schema)}, "guided_json"),
        ("/v1/chat/completions", {**m, "guided_regex": "(a|b)" * 500}, "guided_regex"),
        ("/v1/chat/completions", {**m, "guided_grammar": "root ::= " + " | ".join(['"x"'] * 500)},
         "guided_grammar"),
        ("/v1/completions", {**c, "guided_choice": [f"choice {i}" for i in range(300)]}, "guided_choice"),
        ("/v1/chat/completions", {**m, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": big_schema}}}, "response_format"),
        ("/v1/chat/completions", {**m, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": big_schema}}]}, "tools"),
    ]
    k = {"prompt": "Hi", "max_context_length": 512, "max_length": 2}  # the Kobold API, same limits
    cases += [
        ("/api/v1/generate", {**k, "n": 5}, "n"),
        ("/api/v1/generate", {**k, "top_k": 2**40}, "top_k"),
        ("/api/v1/generate", {**k, "max_length": 33}, "max_length"),
        ("/api/extra/generate/stream", {**k, "stop_sequence": [str(i) for i in range(9)]}, "stop_sequence"),
        ("/api/v1/generate", {**k, "grammar": "root ::= " + " | ".join(['"x"'] * 500)}, "grammar"),
    ]
    with httpx.Client(base_url=limited, timeout=120) as h:
        for route, body, param in cases:
            _check_400(h.post(route, json=body), param)
        big = json.dumps({**c, "prompt": "a" * 70_000})
        resp = h.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"]["code"] == 413
        # Within every limit the same server answers; without max_tokens the cap is the default.
        ok = h.post("/v1/completions", json={**c, "n": 4, "stop": ["x"] * 8, "logit_bias": {"5": 1.0}})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 4, ok.text
        capped = h.post("/v1/chat/completions", json={**m, "max_tokens": None, "ignore_eos": True})
        assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] == 32, capped.text
    oa = openai.OpenAI(base_url=limited + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="`n` must be at most 4"):
        oa.completions.create(model="default", prompt="Hi", n=5, max_tokens=1)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) before `seconds` pass."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_slow_loris_clients_are_disconnected(limited):
    host, port = limited.removeprefix("http://").split(":")
    budget = READ_TIMEOUT + 10  # generous: the server closes after READ_TIMEOUT
    # 1) A request head that never ends, trickled a byte at a time past the timeout.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head)
        closed = False
        for _ in range(int(budget / 0.25)):
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            if _closed_within(s, 0.25):
                closed = True
                break
        assert closed, "a trickled request head kept its connection"
    # 2) A whole head, then a declared body that never arrives in full.
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head + b"Content-Length: 100\r\n\r\n{\"model\":")
        assert _closed_within(s, budget)
    # 3) A silent connection.
    with socket.create_connection((host, int(port))) as s:
        assert _closed_within(s, budget)
    # 4) A keep-alive connection that answers one request, then trickles the next one.
    body = json.dumps({"model": "default", "prompt": "Hi", "max_tokens": 1}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        s.settimeout(60)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            reply += s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\n")
        assert _closed_within(s, budget)
    # A request that arrived whole is served however long it runs (here longer than the timeout).
    with httpx.Client(base_url=limited, timeout=300) as h:
        r = h.post("/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 32,
                                            "ignore_eos": True, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
