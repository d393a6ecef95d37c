"""Decode speed of --quantization int8 against fp32, side by side in one process (the one-stream row).

    python benchmarks/quant_decode.py [--pairs 5] [--batches 1,32] [--input-len 32] [--output-len 128]

Builds one fp32 and one int8 engine (the test suite's engine shapes, so the fp32 programs come from the
persistent compilation cache), then for each batch size runs fp32 and int8 alternately (A B A B, --pairs
times) on fresh prompts and prints output tok/s per run, the medians and the int8/fp32 ratio of medians.
A run is `LLM.generate` of `batch` greedy requests of --input-len prompt tokens and --output-len output
tokens with EOS ignored; tok/s = output tokens / wall time (one prefill included, as a client sees it).
The last line is one JSON object. Figures are noisy on a shared machine: quote the ratios and `uptime`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from offline_throughput import synthetic_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--num-gpu-blocks-override", type=int, default=2048)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if max(batches) > args.max_num_seqs:
        ap.error("a batch is larger than --max-num-seqs")

    from aphrodite_jax import LLM, SamplingParams

    kw = dict(model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              num_gpu_blocks_override=args.num_gpu_blocks_override)
    engines = {}
    for name, quant in (("fp32", None), ("int8", "int8")):
        t0 = time.perf_counter()
        engines[name] = LLM(quantization=quant, **kw)
        print(f"{name} engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    tokenizer = engines["fp32"].get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def run(llm, prompts) -> float:
        t0 = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    result = {"load": os.getloadavg()[0], "input_len": args.input_len, "output_len": args.output_len}
    seed = 0
    for b in batches:
        for llm in engines.values():  # warm-up: first requests of this batch size
            run(llm, synthetic_prompts(tokenizer, b, args.input_len, seed=10_000 + b))
        figs: dict[str, list[float]] = {n: [] for n in engines}
        for _ in range(args.pairs):
            seed += 1
            prompts = synthetic_prompts(tokenizer, b, args.input_len, seed=seed)  # fresh per pair, same for A, B
            for name, llm in engines.items():
                figs[name].append(run(llm, prompts))
        med = {n: statistics.median(v) for n, v in figs.items()}
        ratio = med["int8"] / med["fp32"]
        print(f"batch {b:>3}: fp32 {', '.join(f'{v:.1f}' for v in figs['fp32'])} -> median {med['fp32']:.1f} tok/s; "
              f"int8 {', '.join(f'{v:.1f}' for v in figs['int8'])} -> median {med['int8']:.1f} tok/s; "
              f"int8/fp32 {ratio:.2f}", flush=True)
        result[f"batch{b}"] = {"fp32": med["fp32"], "int8": med["int8"], "ratio": ratio}
    result["load_end"] = os.getloadavg()[0]
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
