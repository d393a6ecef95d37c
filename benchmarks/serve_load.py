"""The load generator of benchmarks/serve.py and the statistics over its runs: percentiles, an incremental
SSE parser, exact-length prompts, one streaming request, a run at fixed concurrency, and the summary table.

No server management here (serve.py starts and stops servers), so the tests drive all of it over
httpx.MockTransport without a server.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional


# ----------------------------------------------------------------------------------------- pure parts
def percentile(values: Iterable[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default); None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class SSEParser:
    """Incremental Server-Sent Events parser: feed bytes as they arrive, get back each event's data.

    Events end at a blank line ("\\n\\n", "\\r\\n\\r\\n" or "\\r\\r"); several `data:` lines in one event are
    joined with "\\n"; comment lines (":") and other fields (event, id, retry) are skipped. UTF-8 split
    across network chunks is reassembled."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buf = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += self._decoder.decode(chunk)
        events = []
        while True:
            m = re.search(r"\r\n|\r|\n", self._buf)
            if m is None:
                break
            if m.group() == "\r" and m.end() == len(self._buf):
                break  # a lone "\r" at the end may be the first half of "\r\n"
            line, self._buf = self._buf[:m.start()], self._buf[m.end():]
            if line == "":
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
        return events

    def close(self) -> list[str]:
        """Flush an event the stream ended without a blank line after."""
        tail = self.feed(b"\n\n") if (self._buf or self._data) else []
        return tail


class PromptBuilder:
    """Deterministic prompts of an exact token length, built from whole-word tokens of the tokenizer."""

    def __init__(self, tokenizer: Any, seed: int = 0):
        self.tok = tokenizer
        self.seed = seed
        vocab = tokenizer.get_vocab()
        words = set()
        for token in vocab:
            text = tokenizer.convert_tokens_to_string([token])
            if re.fullmatch(r" [a-z]{3,9}", text):
                words.add(text)
        if len(words) < 100:
            raise ValueError(f"the tokenizer has only {len(words)} whole-word tokens to build prompts from")
        self.words = sorted(words)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def build(self, n_tokens: int, key: Any) -> str:
        """A prompt of exactly n_tokens tokens; the same key gives the same prompt, another key another."""
        if n_tokens < 1:
            raise ValueError(f"prompt length must be >= 1, got {n_tokens}")
        rng = random.Random(f"{self.seed}|{key}")
        for _ in range(50):
            text = "".join(rng.choice(self.words) for _ in range(n_tokens + 4)).lstrip()
            ids = self._encode(text)[:n_tokens]
            text = self.tok.decode(ids)
            if len(self._encode(text)) == n_tokens:
                return text
        raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens (key {key!r})")


@dataclass
class RequestResult:
    ok: bool
    ttft: Optional[float] = None
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    output_tokens: int = 0
    latency: float = 0.0
    error: str = ""


def summarize(results: list[RequestResult], duration: float, expected_tokens: Optional[int] = None) -> dict:
    """Aggregate one run; latencies in milliseconds, rates over the run's wall time."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    itls = [g * 1e3 for r in ok for g in r.itl]
    out_tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    short = sum(1 for r in ok if expected_tokens is not None and r.output_tokens != expected_tokens)
    return {
        "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else "",
        "wrong_length": short, "duration_s": duration, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / duration if duration > 0 else 0.0,
        "req_s": len(ok) / duration if duration > 0 else 0.0,
        "ttft_ms_median": percentile(ttfts, 50), "ttft_ms_p99": percentile(ttfts, 99),
        "itl_ms_median": percentile(itls, 50), "itl_ms_p99": percentile(itls, 99),
    }


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_len: int
    output_len: int
    concurrency: int
    num_requests: int
    metric: str = "output_tok_s"  # what the side-by-side ratio compares: output_tok_s or ttft_ms_median


# The standard table: the workloads the serving figures are stated for, each with its metric.
TABLE = (
    Workload("32in-256out-c32", 32, 256, 32, 32),
    Workload("256in-128out-c16", 256, 128, 16, 16),
    Workload("32in-128out-c1", 32, 128, 1, 4),
    Workload("1024in-ttft-c1", 1024, 4, 1, 3, metric="ttft_ms_median"),
)


def speedup(metric: str, ours: dict, theirs: dict) -> Optional[float]:
    """> 1 means ours is ahead: a throughput ratio ours/theirs, or for a latency theirs/ours."""
    a, b = ours.get(metric), theirs.get(metric)
    if not a or not b:
        return None
    return b / a if "_ms" in metric else a / b


def format_table(rows: list[dict]) -> str:
    cols = [("server", "server", "{}"), ("workload", "workload", "{}"), ("pair", "pair", "{}"),
            ("output_tok_s", "out tok/s", "{:.1f}"), ("req_s", "req/s", "{:.2f}"),
            ("ttft_ms_median", "TTFT med ms", "{:.0f}"), ("ttft_ms_p99", "TTFT p99 ms", "{:.0f}"),
            ("itl_ms_median", "ITL med ms", "{:.1f}"), ("itl_ms_p99", "ITL p99 ms", "{:.1f}"),
            ("errors", "errors", "{}"), ("wrong_length", "short", "{}")]
    head = [c[1] for c in cols]
    body = [[("-" if r.get(k) is None else f.format(r[k])) for k, _, f in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


# ----------------------------------------------------------------------------------------- HTTP load
async def one_request(client, url: str, body: dict) -> RequestResult:
    t0 = time.perf_counter()
    parser = SSEParser()
    res = RequestResult(ok=False)
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {text[:200]}"
                return res
            async for raw in resp.aiter_raw():
                now = time.perf_counter()
                for data in parser.feed(raw):
                    if data.strip() == "[DONE]":
                        continue
                    msg = json.loads(data)
                    if msg.get("error"):
                        res.error = f"stream error: {str(msg['error'])[:200]}"
                        return res
                    if msg.get("usage") and msg["usage"].get("completion_tokens") is not None:
                        usage_tokens = int(msg["usage"]["completion_tokens"])
                    if not any(c.get("text") for c in msg.get("choices") or ()):
                        continue  # usage-only or finish-only chunks carry no token
                    if res.ttft is None:
                        res.ttft = now - t0
                    elif last is not None:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
            parser.close()
    except Exception as exc:  # a benchmark records the failure and goes on
        res.error = f"{type(exc).__name__}: {exc}"[:200]
        return res
    res.latency = time.perf_counter() - t0
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    res.ok = res.ttft is not None
    if not res.ok:
        res.error = "the stream ended without a token"
    return res


async def run_load(url: str, model: str, prompts: list[str], output_len: int, concurrency: int,
                   temperature: float = 0.0, ignore_eos: bool = True, transport=None) -> dict:
    """Send every prompt with `concurrency` requests in flight; `transport` is for tests (httpx.MockTransport)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    # A fresh connection per request: llama-server may close a kept-alive one after a stream, and httpx would
    # then fail the next request on it ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), limits=limits,
                                 transport=transport) as client:
        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": temperature,
                        "stream": True, "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
                results.append(await one_request(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        duration = time.perf_counter() - t0
    return summarize(results, duration, output_len if ignore_eos else None)
