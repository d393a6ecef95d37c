"""The int8 kernel's weight storages side by side: 30 layers of the default model's four matmuls (distinct
weights, so they stream from memory as in a decode step), Q4_1-like weights stored three ways, interleaved.

    python benchmarks/int8_storage.py [--batches 1,32,1024] [--reps 7]

w8: the asymmetric 8-bit grid with f32 scales (what any non-GGUF weight gets); w4: 4-bit nibbles, f32 scales;
w4h: nibbles with f16 scales (what a Q4_1 GGUF gets). Prints per-batch medians (ms) and per-pair ratios.
Figures are noisy on a shared machine: quote the ratios and `uptime`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's code

LAYERS = 30
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # qkv, o, gate_up, down (K, N)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,32,1024")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import jax
    from pallas_kernels import int8_matmul as K

    ok, why = K.kernel_status()
    if not ok:
        sys.exit(f"int8 kernel unavailable: {why}")
    rng = np.random.default_rng(0)
    packs = {"w8": [], "w4": [], "w4h": []}
    for _ in range(LAYERS):
        for k, n in SHAPES:
            i = rng.integers(0, 16, size=(k, n))
            i[0::32], i[1::32] = 0, 15
            d4 = rng.uniform(1e-3, 2e-3, size=(k // 32, 1, n)).astype(np.float16).astype(np.float32)
            w = (d4 * i.reshape(k // 32, 32, n).astype(np.float32) - 8 * d4).reshape(k, n)
            q, d, m = K.quantize_blocks(w)
            packs["w8"].append(tuple(map(jax.device_put, K.pack_blocks(q, d, m))))
            packs["w4"].append(tuple(map(jax.device_put, K.pack_blocks4(q, d, m))))
            packs["w4h"].append(tuple(map(jax.device_put, K.pack_blocks4(q, d, m, half=True))))

    def chain(w4: bool):
        def f(x, ws):  # x [M, 576]
            for layer in range(LAYERS):
                (a, da), (b, db), (c, dc), (e, de) = ws[4 * layer:4 * layer + 4]
                h = K.int8_matmul(x, a, da, 960, True, w4)[:, :576]
                x = x + K.int8_matmul(h, b, db, 576, True, w4)
                g = K.int8_matmul(x, c, dc, 3072, True, w4)
                x = x + 0.01 * K.int8_matmul(g[:, :1536], e, de, 576, True, w4)
            return x
        return jax.jit(f)

    fns = {"w8": chain(False), "w4": chain(True), "w4h": chain(True)}
    for mrows in [int(b) for b in args.batches.split(",")]:
        x = jax.device_put(rng.standard_normal((mrows, 576)).astype(np.float32))
        for name, f in fns.items():
            jax.block_until_ready(f(x, packs[name]))  # compile, warm
        ts: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.reps):
            for name, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, packs[name]))
                ts[name].append((time.perf_counter() - t0) * 1e3)
        med = {name: statistics.median(v) for name, v in ts.items()}
        pair = {name: statistics.median([b / a for a, b in zip(ts["w8"], ts[name])]) for name in ("w4", "w4h")}
        print(f"M={mrows}: {LAYERS} layers' matmuls, median ms w8 {med['w8']:.2f}, w4 {med['w4']:.2f}, "
              f"w4h {med['w4h']:.2f}; per-pair ratio to w8: w4 {pair['w4']:.3f}, w4h {pair['w4h']:.3f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
