"""The throughput cost of the full sampler chain against greedy, at batch 32.

Runs `LLM.generate` on the same prompts with (A) greedy and (B) every sampler on at once (truncation,
penalties, DRY, no-repeat-ngram, XTC, skew, Mirostat, bans, a custom order for half the rows),
alternating A B A B in one process, and prints output tokens/s per run, the medians and the ratio.
`--micro` instead times the jitted sampler alone on random [B, V] logits: greedy, the full chain, and
each step on its own (median ms per call).

    python benchmarks/sampler_overhead.py --batch 32 --input-len 64 --output-len 64 --repeats 3
    python benchmarks/sampler_overhead.py --preset frontend   # temperature, min-p, rep. penalty, DRY
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


# A front-end style order: penalties first, truncation, temperature last (SamplerIDs).
FRONTEND_ORDER = [6, 7, 8, 0, 1, 2, 3, 4, 9, 10, 11, 12, 13, 5]
OFF = {"tfs": 1.0, "skew": 0.0, "dry_multiplier": 0.0, "typical_p": 1.0, "mirostat_mode": 0,
       "no_repeat_ngram_size": 0, "xtc_probability": 0.0, "nsigma": 0.0}


def full_chain(seed: int, custom_order: bool, exclude: tuple[str, ...] = ()):
    from aphrodite_jax import SamplingParams

    kw = dict(
        temperature=0.8, dynatemp_min=0.6, dynatemp_max=1.0, top_p=0.95, top_k=60, top_a=0.05, min_p=0.02,
        tfs=0.98, eta_cutoff=2.0, epsilon_cutoff=1.0, typical_p=0.98, smoothing_factor=0.1, nsigma=3.0,
        xtc_threshold=0.1, xtc_probability=0.3, skew=0.05, repetition_penalty=1.1, frequency_penalty=0.1,
        presence_penalty=0.1, no_repeat_ngram_size=6, dry_multiplier=0.8, dry_sequence_breaker_ids=[198, 28],
        mirostat_mode=2, mirostat_tau=8.0, mirostat_eta=0.1, logit_bias={1: -2.0}, custom_token_bans=[2],
        sampler_priority=FRONTEND_ORDER if custom_order else None, temperature_last=not custom_order,
        seed=seed, max_tokens=None, ignore_eos=True)
    kw.update({name: OFF[name] for name in exclude})
    return SamplingParams(**kw)


def frontend_preset(seed: int):
    """What a role-play front-end typically sends: temperature, min-p, repetition penalty, DRY."""
    from aphrodite_jax import SamplingParams

    return SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.1, dry_multiplier=0.8,
                          dry_sequence_breaker_ids=[198, 28], seed=seed, ignore_eos=True)


def micro(batch: int, vocab: int = 49152) -> None:
    """Median ms per sampler call at [batch, vocab]: greedy, the full chain, then each step alone."""
    import jax

    from aphrodite_jax.sampling.metadata import SamplingRow
    from aphrodite_jax.sampling.registry import registered_steps
    from aphrodite_jax.sampling.sampler import make_sampling_metadata, sample
    from aphrodite_jax.sampling_params import SamplingParams

    logits = jax.device_put((np.random.default_rng(0).normal(size=(batch, vocab)) * 3).astype(np.float32))
    hist = [int(t) for t in np.random.default_rng(1).integers(0, vocab, 300)]

    def bench(rows, greedy, only=None):
        md = jax.device_put(make_sampling_metadata(rows, batch, vocab, bias_width=8, allowed_width=8,
                                                   history_width=2048, dry_width=16))
        f = sample.lower(logits, md, all_greedy=greedy, only=only).compile()
        for _ in range(2):
            jax.block_until_ready(f(logits, md))
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            jax.block_until_ready(f(logits, md))
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    greedy = [SamplingRow(SamplingParams(temperature=0.0), 0, 0, hist[:200], hist[200:])] * batch
    full = [SamplingRow(full_chain(i, i % 2 == 0), i, 5, hist[:200], hist[200:]) for i in range(batch)]
    print(f"greedy {bench(greedy, True):.1f} ms, full chain {bench(full, False):.1f} ms")
    for step in registered_steps():
        print(f"  {step.name:16s} alone {bench(full, False, frozenset([step.name])):.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--preset", choices=["full", "frontend"], default="full",
                    help="B = every sampler (full) or a typical front-end set (frontend)")
    ap.add_argument("--exclude", nargs="*", default=[], choices=sorted(OFF),
                    help="samplers to leave off in the full chain (to see what each costs)")
    ap.add_argument("--micro", action="store_true", help="time the jitted sampler alone")
    args = ap.parse_args()
    if args.micro:
        micro(args.batch)
        return

    from aphrodite_jax import LLM, SamplingParams

    llm = LLM(model=args.model, max_model_len=args.max_model_len, max_num_seqs=args.batch,
              num_gpu_blocks_override=2048)
    rng = np.random.default_rng(0)
    vocab = llm.engine.runner.vocab_size
    runs: dict[str, list[float]] = {"greedy": [], "full_chain": []}  # full_chain: the --preset
    for rep in range(args.repeats):
        for name in ("greedy", "full_chain"):
            prompts = [[int(t) for t in rng.integers(100, vocab - 100, args.input_len)] for _ in range(args.batch)]
            if name == "greedy":
                params = [SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)] * args.batch
            else:
                params = ([full_chain(i, i % 2 == 0, tuple(args.exclude)) for i in range(args.batch)]
                          if args.preset == "full" else [frontend_preset(i) for i in range(args.batch)])
                for p in params:
                    p.max_tokens = args.output_len
            t0 = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            dt = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            runs[name].append(n / dt)
            print(f"repeat {rep} {name:10s} {n / dt:8.1f} output tok/s ({n} tokens, {dt:.2f} s)", flush=True)
    g, f = statistics.median(runs["greedy"]), statistics.median(runs["full_chain"])
    print(f"median greedy {g:.1f} tok/s, full chain {f:.1f} tok/s: cost {100 * (1 - f / g):.1f}%")
    print(json.dumps({"preset": args.preset, "exclude": args.exclude, "greedy_tok_s": g, "full_chain_tok_s": f,
                      "cost_pct": 100 * (1 - f / g),
                      "batch": args.batch, "input_len": args.input_len, "output_len": args.output_len}))


if __name__ == "__main__":
    main()
