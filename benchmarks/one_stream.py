"""One stream's decode step, in process: where the inter-token time goes (the one-stream row).

    python benchmarks/one_stream.py [--quantization int8] [--pairs 5] [--arms base,single] [--parts]

Builds one engine (the test suite's shapes), then runs one greedy request at a time (--input-len prompt
tokens, --output-len out, EOS ignored) for each arm in turn, A B A B, --pairs times, and prints per arm the
median time of an `engine.step()` in decode (the in-process ITL: schedule, pack, dispatch, sample, stop
checks, detokenize) and output tok/s of the request. Arms are runtime switches of the same engine:
  base    one-token steps padded to the 8-row bucket (the old path)
  single  one-token steps in the 1-row bucket
--parts also times the step's pieces (model, logits, sampler, host) by blocking after each: slower overall,
but it says which piece is which. The last line is one JSON object; quote `uptime` with the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's code

from offline_throughput import synthetic_prompts  # noqa: E402

ARMS = {"base": {"single_bucket": False}, "single": {"single_bucket": True}}  # TuningProfile fields per arm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--arms", default="base,single")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--parts", action="store_true")
    args = ap.parse_args()
    arms = args.arms.split(",")

    import jax
    from aphrodite_jax import LLM, SamplingParams

    llm = LLM(quantization=args.quantization or None, max_model_len=2048, max_num_seqs=32,
              num_gpu_blocks_override=2048)
    engine = llm.engine
    runner, sampler = engine.runner, engine.sampler
    parts: dict[str, list[float]] = {}
    if args.parts:  # block after each device call, so each piece's time is its own
        def timed(name, fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                out = jax.block_until_ready(fn(*a, **k))
                parts.setdefault(name, []).append(time.perf_counter() - t0)
                return out
            return wrapper
        runner.run_model = timed("model+logits", runner.run_model)
        class Timed:  # the sampler with its call timed
            def __getattr__(self, name):
                return getattr(sampler, name)
            __call__ = staticmethod(timed("sampler", sampler))
        engine.sampler = Timed()

    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True, seed=0)

    def run(arm: str, prompt: list[int]):
        runner.tuning = dataclasses.replace(runner.tuning, **ARMS[arm])  # the arm's tuning profile
        parts.clear()
        engine.add_request(f"{arm}-{time.monotonic_ns()}", None, params, prompt_token_ids=prompt)
        steps, t_start = [], time.perf_counter()
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_start
        decode = steps[1:]  # step 0 is the prefill
        pieces = {k: statistics.median(v[1:]) * 1e3 for k, v in parts.items()}
        return statistics.median(decode) * 1e3, args.output_len / wall, pieces

    for arm in arms:  # warm every arm once
        run(arm, synthetic_prompts(tok, 1, args.input_len, seed=999)[0])
    res: dict[str, list] = {a: [] for a in arms}
    for p in range(args.pairs):
        prompt = synthetic_prompts(tok, 1, args.input_len, seed=p)[0]
        for arm in arms:
            res[arm].append(run(arm, prompt))
    out = {"load": os.getloadavg()[0]}
    for arm in arms:
        itl = [r[0] for r in res[arm]]
        tps = [r[1] for r in res[arm]]
        line = (f"{arm:7s} step ms {', '.join(f'{x:.2f}' for x in itl)} -> median {statistics.median(itl):.2f}; "
                f"tok/s median {statistics.median(tps):.1f}")
        if args.parts:
            for k in res[arm][0][2]:
                line += f"; {k} {statistics.median(r[2][k] for r in res[arm]):.2f} ms"
        print(line, flush=True)
        out[arm] = {"step_ms": statistics.median(itl), "tok_s": statistics.median(tps)}
    if len(arms) == 2:
        a, b = arms
        ratio = [x[0] / y[0] for x, y in zip(res[a], res[b])]
        print(f"step time {a}/{b} per pair median {statistics.median(ratio):.2f}")
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
