"""SIGTERM on a real `python -m serving.openai` process: it stops taking requests (/health 503 or the
connection refused), lets requests in flight finish or aborts them after --shutdown-timeout, and exits 0.
Flags match the suite's common engine shapes so the persistent compilation cache is reused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_utils import free_port

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRACE = 3


def _wait_healthy(proc, base: str, log) -> None:
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, f"server exited early:\n{_read(log)}"
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server never became healthy:\n{_read(log)}"
        time.sleep(0.5)


def _read(log, tail: int = 5000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-tail:]


def test_sigterm_drains_and_exits_zero(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.openai", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "2048", "--max-num-seqs", "32", "--num-gpu-blocks-override", "2048",
         "--disable-log-stats", "--shutdown-timeout", str(GRACE)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_healthy(proc, base, log)
        model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        results: dict = {}

        def long_stream() -> None:
            """Far more tokens than the grace period allows: it is cut, never left hanging."""
            events, error = [], None
            try:
                with httpx.stream("POST", f"{base}/v1/completions", timeout=120,
                                  json={"model": model, "prompt": "Once upon a time", "max_tokens": 1900,
                                        "ignore_eos": True, "stream": True}) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if len(events) == 2:
                                results["streaming"].set()
            except httpx.HTTPError as exc:  # the connection is closed when the grace period ends
                error = exc
            results["stream"] = (events, error)

        def short_request() -> None:
            results["short"] = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})

        results["streaming"] = threading.Event()
        streamer = threading.Thread(target=long_stream, daemon=True)
        streamer.start()
        assert results["streaming"].wait(120), _read(log)
        shorty = threading.Thread(target=short_request, daemon=True)
        shorty.start()
        time.sleep(0.2)  # let the short request reach the server before the signal
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # From now on no new request is served: /health says 503 until the socket closes.
        for _ in range(10):
            try:
                assert httpx.get(f"{base}/health", timeout=5).status_code == 503
            except httpx.TransportError:
                break
            time.sleep(0.1)
        code = proc.wait(timeout=GRACE + 60)
        waited = time.monotonic() - sent
        streamer.join(30)
        shorty.join(30)
        assert not streamer.is_alive() and not shorty.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = _read(log, tail=10**7)
    assert code == 0, text[-5000:]
    assert results["short"].status_code == 200, results["short"].text  # in flight: finished
    assert len(results["short"].json()["choices"][0]["text"]) > 0
    events, error = results["stream"]
    finished = events and events[-1] == "[DONE]" and any(
        json.loads(e)["choices"] and json.loads(e)["choices"][0]["finish_reason"] == "length"
        for e in events[:-1])
    assert finished or error is not None or events[-1] != "[DONE]" or "error" in events[-2], events[-3:]
    assert "SIGTERM: no new requests" in text and "shutting down the engine" in text, text[-5000:]
    print(f"SIGTERM to exit: {waited:.1f} s (grace {GRACE} s); stream events before the cut: {len(events)}")
    print("\n".join(line for line in text.splitlines()
                    if any(w in line for w in ("SIGTERM", "Shutting down", "Cancel", "shutting down", "Finished"))))
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=5)
