"""Greedy tokens of the default model on fixed prompts, fp32 and int8, to compare two checkouts of the engine.

A refactor that must keep behaviour (same numbers, same kernels) should give the same tokens before and after:

    python benchmarks/greedy_tokens.py --checkout OLD_CHECKOUT --out old.json
    python benchmarks/greedy_tokens.py --out new.json          # this checkout
    python benchmarks/greedy_tokens.py --compare old.json new.json

`--checkout` puts that folder first on the import path, so its aphrodite_jax runs (default: the checkout this
script is in). `--compare` exits 1 on any difference and names the first differing position of each prompt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PROMPTS = [
    "The capital of France is",
    "Write a haiku about autumn leaves:\n",
    "def fibonacci(n):",
    "Explain in two sentences why the sky is blue.",
    "<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n",
]


def dump(args) -> None:
    sys.path.insert(0, os.path.abspath(args.checkout))
    from aphrodite_jax import LLM, SamplingParams

    print(f"aphrodite_jax from {os.path.dirname(sys.modules['aphrodite_jax'].__file__)}")

    out: dict = {"max_tokens": args.max_tokens, "prompts": PROMPTS}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for quant in args.quantization:
        llm = LLM(args.model, max_model_len=512, max_num_seqs=8, num_gpu_blocks_override=256,
                  quantization=None if quant == "none" else quant)
        results = llm.generate(PROMPTS, params, use_tqdm=False)
        out[quant] = [list(r.outputs[0].token_ids) for r in results]
        del llm
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"wrote {args.out}: {', '.join(q for q in args.quantization)} x {len(PROMPTS)} prompts")


def compare(a_path: str, b_path: str) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    differ = 0
    for quant in [k for k in a if isinstance(a[k], list) and k != "prompts"]:
        if quant not in b:
            print(f"{quant}: missing from {b_path}")
            differ += 1
            continue
        for i, (x, y) in enumerate(zip(a[quant], b[quant])):
            if x == y:
                print(f"{quant} prompt {i}: {len(x)} tokens identical")
                continue
            first = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            print(f"{quant} prompt {i}: differs from token {first}")
            differ += 1
    print("identical" if not differ else f"{differ} differences")
    return 1 if differ else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the tokens here (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two files written by --out")
    ap.add_argument("--checkout", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the repository root whose aphrodite_jax to run (default: this script's)")
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quantization", nargs="+", default=["none", "int8"], help="'none' is fp32")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        ap.error("give --out FILE or --compare A B")
    dump(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
