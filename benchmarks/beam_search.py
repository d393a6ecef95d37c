"""Beam search cost: wall time of `best_of`-beam search against greedy on the same prompts, and the
share of it spent in the host-side beam bookkeeping (`BeamGroup.step`).

    python benchmarks/beam_search.py --num-prompts 8 --input-len 64 --output-len 64 --width 4

Beam requests ignore EOS, so every search runs to --output-len (early_stopping true would end it
sooner). The greedy run decodes the same prompts (one row each); the beam run decodes `width` rows per
prompt, so per-step cost is what to compare: `ms/step`. Each figure is the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from offline_throughput import synthetic_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args()

    from aphrodite_jax import LLM, SamplingParams
    from aphrodite_jax.engine import beam_search

    llm = LLM(max_model_len=args.max_model_len, max_num_seqs=32, num_gpu_blocks_override=2048)
    prompts = synthetic_prompts(llm.get_tokenizer(), args.num_prompts, args.input_len)
    host = {"s": 0.0}
    step = beam_search.BeamGroup.step

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return step(self, *a, **kw)
        finally:
            host["s"] += time.perf_counter() - t0

    beam_search.BeamGroup.step = timed

    def run(params):
        eng = llm.engine
        steps0, host["s"] = eng.stats.steps, 0.0
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        dt = time.perf_counter() - t0
        steps = eng.stats.steps - steps0
        return {"s": dt, "steps": steps, "ms_per_step": 1e3 * dt / steps, "host_beam_s": host["s"]}

    greedy = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    beam = SamplingParams(use_beam_search=True, best_of=args.width, temperature=0.0, max_tokens=args.output_len,
                          ignore_eos=True, early_stopping=False)
    run(greedy), run(beam)  # first runs touch every code path once
    res = {}
    for name, params in (("greedy", greedy), ("beam", beam)):
        runs = [run(params) for _ in range(args.repeats)]
        res[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    res["beam_host_share"] = res["beam"]["host_beam_s"] / res["beam"]["s"]
    res["args"] = vars(args)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
