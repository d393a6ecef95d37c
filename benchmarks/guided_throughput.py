"""Guided decoding overhead: output tokens/s of 32 concurrent requests, half of them JSON-schema guided,
against the same 32 requests with none guided.

    python benchmarks/guided_throughput.py [--num-requests 32] [--output-len 128] [--repeats 3]
                                           [--backend xgrammar]

Every request produces exactly --output-len tokens: unguided ones ignore EOS, and the guided ones follow
a schema (a list of at least 200 records) that cannot be finished within that length, so the guide
masks every step. Each repetition uses fresh prompts and fresh schemas (new property names), so guide
compilation is part of the measured time; `--reuse-schemas` keeps the same (cached) schemas, leaving
only the per-step cost. The runs alternate (unguided, guided) and the medians are
printed with the overhead = 1 - guided / unguided.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_throughput import synthetic_prompts  # noqa: E402


def schema_for(rep: int, k: int) -> dict:
    item = {"type": "object", "properties": {
        f"name_{rep}_{k}": {"type": "string", "maxLength": 16},
        "qty": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["tool", "food", "book"]}}, "required": [f"name_{rep}_{k}", "qty", "kind"]}
    return {"type": "object", "properties": {"items": {"type": "array", "items": item, "minItems": 200}},
            "required": ["items"]}


def run(llm, prompts, output_len: int, guided: bool, rep: int, backend: str) -> float:
    from aphrodite_jax import SamplingParams
    from aphrodite_jax.guided import GuidedDecodingParams

    params = []
    for k in range(len(prompts)):
        guide = GuidedDecodingParams(json=schema_for(rep, k), backend=backend) if guided and k % 2 == 0 else None
        params.append(SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, guided_decoding=guide))
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n == output_len * len(prompts), "every request must run its full length"
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="xgrammar", choices=("xgrammar", "outlines"))
    ap.add_argument("--reuse-schemas", action="store_true",
                    help="the same 16 schemas every repetition (compiled once, before timing): per-step cost only")
    args = ap.parse_args()
    if args.backend == "outlines":  # it cannot enforce numeric bounds (and says so)
        global schema_for
        plain = schema_for

        def schema_for(rep, k):  # noqa: F811
            s = plain(rep, k)
            s["properties"]["items"]["items"]["properties"]["qty"] = {"type": "integer"}
            return s

    from aphrodite_jax import LLM

    llm = LLM(max_model_len=2048, max_num_seqs=32, num_gpu_blocks_override=2048)
    warm = synthetic_prompts(llm.get_tokenizer(), args.num_requests, args.input_len, seed=999)
    run(llm, warm, 8, True, -1, args.backend)  # first use of the backend (tokenizer tables)
    if args.reuse_schemas:
        run(llm, warm, 8, True, 0, args.backend)  # compiles (and caches) the schemas every rep will use
    base, guided = [], []
    for rep in range(args.repeats):
        prompts = synthetic_prompts(llm.get_tokenizer(), args.num_requests, args.input_len, seed=2 * rep)
        base.append(run(llm, prompts, args.output_len, False, rep, args.backend))
        prompts = synthetic_prompts(llm.get_tokenizer(), args.num_requests, args.input_len, seed=2 * rep + 1)
        guided.append(run(llm, prompts, args.output_len, True, 0 if args.reuse_schemas else rep, args.backend))
        print(f"rep {rep}: unguided {base[-1]:.1f} tok/s, half guided {guided[-1]:.1f} tok/s", flush=True)
    b, g = statistics.median(base), statistics.median(guided)
    print(json.dumps({"requests": args.num_requests, "output_len": args.output_len, "backend": args.backend,
                      "schemas": "reused (cached)" if args.reuse_schemas else "fresh each repetition",
                      "unguided_tok_s": round(b, 1), "half_guided_tok_s": round(g, 1),
                      "overhead": round(1 - g / b, 3)}))


if __name__ == "__main__":
    main()
