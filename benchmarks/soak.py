"""Soak: many requests at high concurrency, with clients that abort or vanish, then check nothing leaked.

    python benchmarks/soak.py                       # in-process server on the default model, 2000 x 64
    python benchmarks/soak.py --requests 500 --concurrency 32
    python benchmarks/soak.py --url http://127.0.0.1:2242 --pid 1234   # an external server (no page check)

The mix: completions and chat, streaming and not, random parameters from the sampler set. 10% of the
requests are aborted by the client at a random point (a streaming client stops reading and closes, a
plain one gives up after a random delay); 10% drop their TCP connection mid-stream (an RST, no
goodbye). Greedy requests come from a small pool whose solo answers are taken first, one at a time.

Pass means: every request that was not cut got a 200 with the right finish_reason (`length` exactly
at max_tokens, `stop` only before it) and usage, every greedy answer equals its solo answer, and after
the run every KV page is free, the waiting/running/swapped queues are empty, and the server's resident
memory is within 10% of what it was after the first 200 requests.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import httpx

WORDS = ("river stone light garden music paper window winter horse letter city ocean forest road "
         "song dream bread cloud mountain mirror lamp door friend storm clock field star").split()
GREEDY_POOL = 24


def rss_bytes(pid: Optional[int] = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Spec:
    """One request: its route, body, and what the client does to it."""

    index: int
    chat: bool
    body: dict
    cut: str = ""  # "" | "abort" | "drop"
    greedy_key: Optional[int] = None

    @property
    def route(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


@dataclass
class SoakReport:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    dropped: int = 0
    errors: list = field(default_factory=list)  # (index, problem)
    greedy_checked: int = 0
    greedy_mismatch: int = 0
    finish: Counter = field(default_factory=Counter)
    wall_s: float = 0.0
    rss_after_200: int = 0
    rss_end: int = 0
    leaked_pages: Optional[int] = None
    queues: Optional[dict] = None

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_after_200) / self.rss_after_200 if self.rss_after_200 else 0.0

    def ok(self, check_rss: bool = True) -> bool:
        return (not self.errors and not self.greedy_mismatch and self.leaked_pages in (0, None)
                and (self.queues is None or not any(self.queues.values()))
                and (not check_rss or not self.rss_after_200 or self.rss_growth <= 0.10))

    def summary(self) -> str:
        mib = 2**20
        return (f"{self.requests} requests in {self.wall_s:.0f} s: {self.completed} completed, "
                f"{self.aborted} aborted by the client, {self.dropped} dropped connections, "
                f"{len(self.errors)} errors; finish reasons {dict(self.finish)}; greedy "
                f"{self.greedy_checked} checked, {self.greedy_mismatch} differ from solo; RSS after 200 "
                f"requests {self.rss_after_200 / mib:.0f} MiB, at the end {self.rss_end / mib:.0f} MiB "
                f"({self.rss_growth:+.1%}); leaked pages {self.leaked_pages}; queues {self.queues}")


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))


def _random_sampling(rng: random.Random) -> dict:
    """A few random samplers from the implemented set, at sane values."""
    choices = {
        "temperature": lambda: round(rng.uniform(0.3, 1.5), 2), "top_p": lambda: round(rng.uniform(0.5, 1), 2),
        "top_k": lambda: rng.choice([0, 5, 40]), "min_p": lambda: round(rng.uniform(0, 0.2), 2),
        "top_a": lambda: round(rng.uniform(0, 0.5), 2), "tfs": lambda: round(rng.uniform(0.5, 1), 2),
        "typical_p": lambda: round(rng.uniform(0.5, 1), 2), "eta_cutoff": lambda: round(rng.uniform(0, 5), 2),
        "epsilon_cutoff": lambda: round(rng.uniform(0, 5), 2),
        "smoothing_factor": lambda: round(rng.uniform(0, 1), 2), "xtc_probability": lambda: 0.5,
        "nsigma": lambda: round(rng.uniform(0.5, 2), 2), "repetition_penalty": lambda: 1.1,
        "presence_penalty": lambda: 0.5, "frequency_penalty": lambda: 0.3,
        "dynatemp_min": lambda: 0.5, "skew": lambda: 0.5, "seed": lambda: rng.randrange(10**6),
    }
    body = {k: choices[k]() for k in rng.sample(sorted(choices), rng.randint(1, 5))}
    if "dynatemp_min" in body:
        body["dynatemp_max"] = 1.5
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.2:
        body["n"] = 2
    if rng.random() < 0.2:
        body["logprobs"] = 2 if rng.random() < 0.5 else None
    return {k: v for k, v in body.items() if v is not None}


def make_specs(n: int, seed: int, model: str, max_tokens: int = 16) -> tuple[list[Spec], list[dict]]:
    rng = random.Random(seed)
    pool = []  # the greedy requests: (chat, prompt, max_tokens)
    for k in range(GREEDY_POOL):
        pool.append({"chat": k % 2 == 1, "prompt": _prompt(rng), "max_tokens": rng.randint(1, max_tokens)})
    specs = []
    for i in range(n):
        r = rng.random()
        cut = "abort" if r < 0.10 else "drop" if r < 0.20 else ""
        stream = cut == "drop" or rng.random() < 0.5  # a dropped TCP connection is mid-stream
        if rng.random() < 0.3:
            g = rng.randrange(GREEDY_POOL)
            chat, prompt, max_tokens = pool[g]["chat"], pool[g]["prompt"], pool[g]["max_tokens"]
            body = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
        else:
            g, chat, prompt = None, rng.random() < 0.5, _prompt(rng)
            body = {"max_tokens": rng.randint(1, max_tokens), "ignore_eos": rng.random() < 0.5, **_random_sampling(rng)}
            if chat and body.get("logprobs") is not None:
                body["logprobs"], body["top_logprobs"] = True, body["logprobs"]
        body["model"] = model
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        specs.append(Spec(i, chat, body, cut, g))
    return specs, pool


def _choices_text(chat: bool, choices: list) -> dict[int, str]:
    return {c["index"]: (c["message"]["content"] if chat else c["text"]) for c in choices}


def check_answer(spec: Spec, finishes: dict[int, str], usage: Optional[dict],
                 n_tokens: dict[int, int]) -> Optional[str]:
    """Why a completed answer is wrong, or None."""
    body = spec.body
    n = body.get("n", 1)
    if sorted(finishes) != list(range(n)):
        return f"choices {sorted(finishes)} for n={n}"
    for idx, reason in finishes.items():
        tokens = n_tokens.get(idx)
        if reason == "length":
            if tokens is not None and tokens != body["max_tokens"]:
                return f"finish_reason length after {tokens} of {body['max_tokens']} tokens"
        elif reason == "stop":
            if body.get("ignore_eos") and not body.get("stop"):
                return "finish_reason stop although ignore_eos and no stop strings"
            if tokens is not None and tokens > body["max_tokens"]:
                return f"{tokens} tokens for max_tokens {body['max_tokens']}"
        else:
            return f"finish_reason {reason!r}"
    if usage is None:
        return "no usage"
    if usage["completion_tokens"] > n * body["max_tokens"] or usage["prompt_tokens"] < 1:
        return f"usage {usage}"
    return None


async def _plain(client: httpx.AsyncClient, spec: Spec, rng: random.Random):
    if spec.cut == "abort":
        try:
            await asyncio.wait_for(client.post(spec.route, json=spec.body), rng.uniform(0.01, 2.0))
        except asyncio.TimeoutError:
            return "cut", None
        return "cut-late", None  # it finished before the client gave up
    resp = await client.post(spec.route, json=spec.body)
    if resp.status_code != 200:
        return "error", f"HTTP {resp.status_code}: {resp.text[:300]}"
    data = resp.json()
    finishes = {c["index"]: c["finish_reason"] for c in data["choices"]}
    text = _choices_text(spec.chat, data["choices"])
    tokens = {}
    if len(data["choices"]) == 1:
        tokens[data["choices"][0]["index"]] = data["usage"]["completion_tokens"]
    return "done", (finishes, data["usage"], tokens, text)


async def _streamed(client: httpx.AsyncClient, spec: Spec, rng: random.Random):
    stop_after = rng.randint(1, 6) if spec.cut == "abort" else None
    finishes, text, usage, events = {}, {}, None, 0
    async with client.stream("POST", spec.route, json=spec.body) as resp:
        if resp.status_code != 200:
            return "error", f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return "error", f"in-band error {chunk['error']}"
            events += 1
            if stop_after is not None and events >= stop_after:
                return "cut", None  # leaving the block closes the connection
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                piece = c.get("delta", {}).get("content") if spec.chat else c.get("text")
                text[c["index"]] = text.get(c["index"], "") + (piece or "")
                if c.get("finish_reason"):
                    finishes[c["index"]] = c["finish_reason"]
    tokens = {0: usage["completion_tokens"]} if usage and spec.body.get("n", 1) == 1 else {}
    return "done", (finishes, usage, tokens, text)


async def _drop(host: str, port: int, spec: Spec, rng: random.Random):
    """Send the request over a raw socket, read a little of the stream, then reset the connection."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(spec.body).encode()
    writer.write(f"POST {spec.route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    want = rng.randint(1, 4096)  # bytes of the response to read before vanishing
    seen = b""
    try:
        while len(seen) < want and b"data: [DONE]" not in seen:
            data = await asyncio.wait_for(reader.read(4096), 300)
            if not data:
                break
            seen += data
    finally:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()
    return "cut", None


async def _solo_answers(client: httpx.AsyncClient, pool: list[dict], model: str) -> list[str]:
    answers = []
    for g in pool:
        body = {"model": model, "temperature": 0, "max_tokens": g["max_tokens"], "ignore_eos": True}
        if g["chat"]:
            body["messages"] = [{"role": "user", "content": g["prompt"]}]
        else:
            body["prompt"] = g["prompt"]
        resp = await client.post("/v1/chat/completions" if g["chat"] else "/v1/completions", json=body)
        resp.raise_for_status()
        answers.append(_choices_text(g["chat"], resp.json()["choices"])[0])
    return answers


async def soak(base_url: str, requests: int, concurrency: int, seed: int = 0, max_tokens: int = 16,
               rss: Optional[Callable[[], int]] = None, progress: bool = False) -> SoakReport:
    host, port = base_url.removeprefix("http://").split(":")
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    report = SoakReport(requests=requests)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        specs, pool = make_specs(requests, seed, model, max_tokens)
        solo = await _solo_answers(client, pool, model)
        todo: asyncio.Queue = asyncio.Queue()
        for s in specs:
            todo.put_nowait(s)
        finished = 0
        start = time.monotonic()

        async def worker(wid: int) -> None:
            nonlocal finished
            rng = random.Random(seed * 1000 + wid)
            while not todo.empty():
                spec = todo.get_nowait()
                try:
                    if spec.cut == "drop":
                        kind, result = await _drop(host, int(port), spec, rng)
                    elif spec.body.get("stream"):
                        kind, result = await _streamed(client, spec, rng)
                    else:
                        kind, result = await _plain(client, spec, rng)
                except Exception as exc:  # noqa: BLE001 - every failure is reported
                    kind, result = "error", f"{type(exc).__name__}: {exc}"
                if kind == "cut":
                    report.dropped += spec.cut == "drop"
                    report.aborted += spec.cut == "abort"
                elif kind == "cut-late":
                    report.aborted += 1
                elif kind == "error":
                    report.errors.append((spec.index, result))
                else:
                    finishes, usage, tokens, text = result
                    problem = check_answer(spec, finishes, usage, tokens)
                    if problem:
                        report.errors.append((spec.index, problem))
                    report.finish.update(finishes.values())
                    report.completed += 1
                    if spec.greedy_key is not None:
                        report.greedy_checked += 1
                        if text.get(0) != solo[spec.greedy_key]:
                            report.greedy_mismatch += 1
                            report.errors.append((spec.index, f"greedy {text.get(0)!r} != solo "
                                                              f"{solo[spec.greedy_key]!r}"))
                finished += 1
                if finished == min(200, requests) and rss is not None:
                    report.rss_after_200 = rss()
                if progress and finished % 100 == 0:
                    print(f"[soak] {finished}/{requests} done, {len(report.errors)} errors, "
                          f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        report.wall_s = time.monotonic() - start
    return report


def engine_state(llm, timeout: float = 120.0) -> tuple[int, dict]:
    """(leaked KV pages, queue lengths) once the engine has drained (aborts land within a step)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and (llm.has_unfinished_requests() or llm.requests):
        time.sleep(0.05)
    sched = llm.scheduler
    leaked = llm.runner.num_gpu_blocks - sched.block_manager.num_free_gpu_blocks
    queues = {"waiting": len(sched.waiting), "running": len(sched.running), "swapped": len(sched.swapped),
              "requests": len(llm.requests)}
    return leaked, queues


def _serve_in_process(engine_kw: dict):
    """The default model behind run_server's uvicorn settings, in this process (so its engine can be
    inspected); the load generator shares the process, so RSS includes its few MiB."""
    import uvicorn

    from aphrodite_jax.config import EngineConfig
    from aphrodite_jax.engine.async_engine import AsyncLLMEngine
    from aphrodite_jax.engine.llm_engine import LLMEngine
    from serving.cli import uvicorn_config
    from serving.config import ServingConfig
    from serving.openai.api_server import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    llm = LLMEngine(EngineConfig.from_kwargs(**engine_kw))
    engine = AsyncLLMEngine(llm)
    cfg = ServingConfig(port=port, uvicorn_log_level="warning", disable_log_requests=True)
    server = uvicorn.Server(uvicorn_config(build_app(engine, cfg), cfg, host="127.0.0.1"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", llm, engine, server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=16, help="largest max_tokens a request asks for")
    ap.add_argument("--url", help="an external server (default: start one in this process)")
    ap.add_argument("--pid", type=int, help="the external server's pid, for its resident memory")
    ap.add_argument("--max-num-seqs", type=int, default=32)  # the suite's shapes: a warm compile cache
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--num-gpu-blocks-override", type=int, default=2048)
    args = ap.parse_args(argv)
    llm = engine = server = None
    if args.url:
        base, rss = args.url.rstrip("/"), (lambda: rss_bytes(args.pid)) if args.pid else None
    else:
        base, llm, engine, server = _serve_in_process(dict(
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            num_gpu_blocks_override=args.num_gpu_blocks_override))
        rss = rss_bytes
    report = asyncio.run(soak(base, args.requests, args.concurrency, args.seed, args.max_tokens, rss=rss,
                              progress=True))
    if llm is not None:
        report.leaked_pages, report.queues = engine_state(llm)
    if rss is not None:
        report.rss_end = rss()
    print(report.summary())
    for index, problem in report.errors[:20]:
        print(f"  request {index}: {problem}")
    if server is not None:
        server.should_exit = True
        engine.shutdown()
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
