"""Offline throughput: output tokens/s of `LLM.generate` on a batch of prompts, beside HF transformers.

    python benchmarks/offline_throughput.py --num-prompts 32 --input-len 128 --output-len 128 [--hf]

Prompts are deterministic synthetic text of a set token length, different for every prompt. Every
request ignores EOS so each produces exactly --output-len tokens. With --hf, HF transformers'
`generate()` (fp32, greedy, padded batches of --hf-batch) runs on the same prompts in the same process,
after ours, and the ratio is printed. Each figure is the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def synthetic_prompts(tokenizer, n: int, input_len: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    words = ["river", "stone", "light", "market", "garden", "engine", "paper", "winter", "signal", "forest",
             "copper", "violet", "harbor", "planet", "silver", "thunder", "meadow", "lantern", "canyon", "echo"]
    out = []
    for i in range(n):
        text = f"Story {i}: " + " ".join(rng.choice(words) for _ in range(input_len * 2))
        ids = tokenizer.encode(text, add_special_tokens=False)[:input_len]
        out.append(ids)
    return out


def run_ours(llm, prompts, output_len: int) -> float:
    from aphrodite_jax import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return n / dt


def run_hf(model, prompts, output_len: int, batch: int, pad_id: int) -> float:
    import torch

    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=pad_id)
        n += (out.shape[1] - width) * len(chunk)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf", action="store_true", help="also run HF transformers generate() side by side")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--quantization", default=None, help="ours only, e.g. int8 (HF stays fp32)")
    args = ap.parse_args()

    from aphrodite_jax import LLM

    llm = LLM(model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              quantization=args.quantization)
    tok = llm.get_tokenizer()
    ours, hf = [], []
    hf_model = None
    if args.hf:
        import torch
        from transformers import AutoModelForCausalLM

        from aphrodite_jax.loaders.resolve import resolve_model

        torch.set_num_threads(2)
        r = resolve_model(args.model)
        kw = {"gguf_file": r.filename} if r.kind == "gguf" else {}
        hf_model = AutoModelForCausalLM.from_pretrained(str(r.folder) if r.kind == "gguf" else str(r.path),
                                                        dtype=torch.float32, **kw).eval()
    run_ours(llm, synthetic_prompts(tok, 4, 16, seed=999), 4)  # warm the host paths
    for rep in range(args.repeats):
        prompts = synthetic_prompts(tok, args.num_prompts, args.input_len, seed=rep)
        ours.append(run_ours(llm, prompts, args.output_len))
        if hf_model is not None:
            hf.append(run_hf(hf_model, prompts, args.output_len, args.hf_batch,
                             tok.pad_token_id if tok.pad_token_id is not None else 0))
        print(f"repeat {rep}: ours {ours[-1]:.1f} tok/s" + (f", HF {hf[-1]:.1f} tok/s" if hf else ""))
    result = {"quantization": args.quantization, "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len,
              "ours_tok_s": round(statistics.median(ours), 1)}
    if hf:
        result["hf_tok_s"] = round(statistics.median(hf), 1)
        result["ratio"] = round(result["ours_tok_s"] / result["hf_tok_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
