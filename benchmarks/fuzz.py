"""Fuzz the server from its own /openapi.json with schemathesis: every operation, valid and invalid
bodies, against the real model. A pass means no 5xx (nor an in-band 500 inside an SSE stream) and
every 4xx in OpenAI's error shape.

    python benchmarks/fuzz.py --url http://127.0.0.1:2242 --examples 2000 --seed 1

Generation bodies keep `max_tokens` small (1..4) so thousands of requests finish in minutes on a CPU;
run the server with `--max-tokens-limit 4` as well so a request that leaves it out is short too.
The suite runs a bounded, derandomized version (tests/serving/test_fuzz.py).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
# Fields that make a request run long (output tokens, choices); kept small, not removed.
SMALL = {"max_tokens": 4, "max_completion_tokens": 4, "n": 3, "best_of": 3, "min_tokens": 4,
         "max_length": 4, "max_context_length": 2048}


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)  # (reason, curl command, response text)

    def line(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items(), key=lambda kv: str(kv[0])))
        return f"{self.requests} requests ({statuses}); {len(self.failures)} failures"


def _tame(body: Any, model: str, rng: random.Random) -> Any:
    """Clamp the few fields that set how long generation runs, and name the served model in most
    requests (a random name only reaches the 404); everything else is left as generated."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str) and rng.random() < 0.8:
            body["model"] = model
        for key, cap in SMALL.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                body[key] = value % cap + 1
    return body


def _error_shape_problem(resp) -> Optional[str]:
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "4xx body is not {'error': {...}}"
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"4xx error keys {sorted(err) if isinstance(err, dict) else type(err).__name__}"
    if err["code"] != resp.status_code or not err["message"] or not isinstance(err["message"], str):
        return "4xx error code/message mismatch"
    return None


def check_response(case, resp) -> Optional[str]:
    """Why the response is a failure, or None."""
    status = resp.status_code
    if status >= 500:
        return f"{status} server error"
    if 400 <= status < 500:
        return _error_shape_problem(resp)
    if "text/event-stream" in resp.headers.get("content-type", ""):
        for line in resp.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                err = json.loads(line[6:]).get("error") or {}
                if isinstance(err, dict) and int(err.get("code") or 0) >= 500:
                    return f"in-band {err.get('code')} in an SSE stream: {err.get('message')}"
    return None


def run_fuzz(base_url: str, examples: int, seed: int = 0, timeout: float = 120.0,
             derandomize: bool = True, verbose: bool = False) -> FuzzReport:
    """Send `examples` generated requests (positive and negative, over every operation) to base_url."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    strategy = st.one_of([op.as_strategy(generation_mode=m) for op in ops for m in modes])
    report = FuzzReport()
    session = requests.Session()
    model = session.get(f"{base_url}/v1/models", timeout=timeout).json()["data"][0]["id"]
    rng = random.Random(seed)

    @hseed(seed)
    @settings(max_examples=examples, derandomize=derandomize, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=strategy)
    def one(case) -> None:
        if case.body is not None and not isinstance(case.body, type(schemathesis.core.NOT_SET)):
            case.body = _tame(case.body, model, rng)
        try:
            resp = case.call(base_url=base_url, session=session, timeout=timeout)
        except requests.RequestException as exc:
            report.requests += 1
            report.by_status["error"] += 1
            report.failures.append((f"transport error: {exc!r}", case.as_curl_command(), ""))
            if verbose:
                print(f"[fuzz] FAILURE transport error {exc!r}\n  {case.as_curl_command()[:2000]}",
                      file=sys.stderr, flush=True)
            return
        report.requests += 1
        report.by_status[resp.status_code] += 1
        problem = check_response(case, resp)
        if problem:
            report.failures.append((problem, case.as_curl_command(), resp.text[:2000]))
            if verbose:
                print(f"[fuzz] FAILURE {problem}\n  {case.as_curl_command()}\n  {resp.text[:500]}",
                      file=sys.stderr, flush=True)
        if verbose and report.requests % 100 == 0:
            print(f"[fuzz] {report.line()}", file=sys.stderr, flush=True)

    one()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:2242")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=random.randrange(2**31))
    ap.add_argument("--failures", default="fuzz_failures.jsonl", help="where failing cases are written")
    args = ap.parse_args(argv)
    start = time.monotonic()
    report = run_fuzz(args.url, args.examples, args.seed, derandomize=False, verbose=True)
    with open(args.failures, "w") as f:
        for reason, curl, text in report.failures:
            f.write(json.dumps({"reason": reason, "curl": curl, "response": text}) + "\n")
    print(f"seed {args.seed}: {report.line()} in {time.monotonic() - start:.0f} s")
    for reason, count in Counter(r for r, _, _ in report.failures).most_common():
        print(f"  {count} x {reason}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
