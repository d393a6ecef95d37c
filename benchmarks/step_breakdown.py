"""Per-part time of one jitted model step on this machine (medians), so the forward's cost can be split.

Builds the default model's architecture (SmolLM2-135M config from its GGUF, random weights: timing only)
and times, each as its own jitted program over all layers, for a decode batch or a fresh prefill:
  forward   the whole model step (embed, all layers, attention with the paged cache, final norm)
  attention all layers' ragged_paged_attention calls alone (KV write + attention)
  matmuls   all layers' QKV, O, gate_up and down matmuls alone
  elementw  all layers' RMSNorms, RoPE, SiLU*up and residual adds alone
  logits    the LM head for the sampled rows ([B, H] x [H, V])
  sampler   the all-greedy sampler (no logprobs asked) on [B, V]

Examples:
  python benchmarks/step_breakdown.py --decode 32 --context 64
  python benchmarks/step_breakdown.py --prefill 1024
  python benchmarks/step_breakdown.py --decode 32 --context 64 --ab cpu_jax,cpu   # A B A B, ratios
The machine may be shared: parts run interleaved round-robin, and --ab alternates impls per round. An impl is
an attention backend (pallas_kernels/backends.py; cpu_jax,cpu compares pure JAX with the C++ kernel): each
gets its own model built with that backend (the same weights).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's code


def _as_gguf_grids(model):
    """Round the dummy weights as the default GGUF holds them: every Linear to Q4_1 (16 levels per block of
    32 inputs, f16 d and m), the tied embedding to Q8_0, so `--quantization int8` picks the served storage."""
    import jax.numpy as jnp
    from flax import nnx
    from aphrodite_jax.layers.linear import Linear

    def blocks(w):  # [K, N] -> [K/32, 32, N]
        return w.reshape(w.shape[0] // 32, 32, w.shape[1])

    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.weight is not None:
            w = blocks(np.asarray(node.weight.get_value(), np.float32))
            lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
            d = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
            m = lo.astype(np.float16).astype(np.float32)
            i = np.clip(np.rint((w - m) / np.where(d > 0, d, 1)), 0, 15)
            node.weight.set_value(jnp.asarray((d * i + m).reshape(-1, w.shape[2])))
    if getattr(model, "lm_head", None) is None and hasattr(model, "embed"):
        e = np.asarray(model.embed.weight.get_value(), np.float32)  # [V, H]: blocks of 32 along H
        b = e.reshape(e.shape[0], -1, 32)
        d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        q = np.rint(b / np.where(d > 0, d, 1))
        model.embed.weight.set_value(jnp.asarray((q * d).reshape(e.shape)))


def make_model(args, cfg, impl: str):
    """The model with random weights (the same for every impl: one seed), its attention backend `impl`
    resolved as the engine does (models/loader.py)."""
    import jax.numpy as jnp
    from flax import nnx

    from aphrodite_jax.models.loader import choose_attention, init_dummy_weights
    from aphrodite_jax.models.registry import get_model_class

    cls = get_model_class(cfg)
    backend = choose_attention(impl, cls, cfg, jnp.float32, 16)
    model = cls(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), attention_backend=backend)
    init_dummy_weights(model, seed=0)
    if args.quantization:
        from aphrodite_jax.layers.quantization import quantize_model

        _as_gguf_grids(model)  # so the int8 storage is the served one (4-bit layers, exact Q8_0 head)
        quantize_model(model, args.quantization)
    return model


def build(args, impls):
    import jax.numpy as jnp

    from aphrodite_jax.layers.attention_metadata import AttentionMetadata
    from aphrodite_jax.loaders.gguf_loader import GGUFModel
    from aphrodite_jax.loaders.resolve import resolve_model

    cfg = GGUFModel(str(resolve_model(None).path)).hf_config()
    if args.layers:
        cfg.num_hidden_layers = args.layers
    models = {impl: make_model(args, cfg, impl) for impl in impls}
    model = models[impls[0]]
    page, pps = 16, args.max_model_len // 16
    if args.prefill:
        lens, ctx = [args.prefill], [0]
    else:
        lens, ctx = [1] * args.decode, [args.context - 1] * args.decode
    n = sum(lens)
    t = max(args.min_bucket, 1 << (n - 1).bit_length())
    s = args.max_num_seqs
    rng = np.random.default_rng(0)
    perm = rng.permutation(args.pages)  # scattered pages, as a long-running server has
    kv_lens = np.zeros(s, np.int32)
    pages = np.zeros((s, pps), np.int32)
    cu = np.zeros(s + 1, np.int32)
    positions = np.zeros(t, np.int32)
    off = 0
    for i, (q, c) in enumerate(zip(lens, ctx)):
        kv_lens[i] = q + c
        need = -(-(q + c) // page)
        pages[i, :need] = perm[off % args.pages:off % args.pages + need]
        off += need
        cu[i + 1] = cu[i] + q
        positions[cu[i]:cu[i] + q] = np.arange(c, c + q)
    cu[len(lens) + 1:] = cu[len(lens)]
    md = AttentionMetadata(positions=jnp.asarray(positions), kv_lens=jnp.asarray(kv_lens),
                           page_indices=jnp.asarray(pages), cu_q_lens=jnp.asarray(cu),
                           num_seqs=jnp.asarray([len(lens)], jnp.int32))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, t), jnp.int32)
    heads = model.layers[0].attn.kv_heads_stored
    caches = [jnp.asarray(rng.standard_normal((args.pages, page, 2 * heads, model.head_dim)), jnp.float32)
              for _ in range(model.num_layers)]
    return cfg, models, md, ids, caches, t, len(lens)


def parts(cfg, model, md, ids, caches, t, b, impl):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pallas_kernels import ragged_paged_attention
    from aphrodite_jax.layers.rotary import apply_rope
    from aphrodite_jax.sampling.metadata import SamplingRow
    from aphrodite_jax.sampling.sampler import sample
    from aphrodite_jax.sampling_params import SamplingParams

    graphdef, state = nnx.split(model)
    rpa = functools.partial(ragged_paged_attention, impl=model.layers[0].attn.attention_backend)  # as resolved

    def fwd(state, caches, ids, md):  # the model was built with this impl as its attention backend
        return nnx.merge(graphdef, state)(ids, caches, md)

    hq, hkv, d = cfg.num_attention_heads, model.layers[0].attn.kv_heads_stored, model.head_dim
    key = jax.random.PRNGKey(1)
    q = jax.random.normal(key, (t, hq, d))
    k = jax.random.normal(key, (t, hkv, d))

    def attention(caches, q, k, md):
        out = []
        for c in caches:
            o, c = rpa(q, k, k, c, md.kv_lens, md.page_indices, md.cu_q_lens, md.num_seqs, sm_scale=d ** -0.5)
            q = q + o * 1e-3  # a dependency chain, as in the model
            out.append(c)
        return q, out

    x = jax.random.normal(key, (t, cfg.hidden_size))

    def matmuls(state, x):
        m = nnx.merge(graphdef, state)
        for lyr in m.layers:
            h = lyr.attn.qkv(x)[:, :hq * d]
            x = x + lyr.attn.o_proj(h)
            gu = lyr.mlp.gate_up(x)
            x = x + lyr.mlp.down(gu[:, :lyr.mlp.intermediate])
        return x

    def elementwise(state, x, pos):
        m = nnx.merge(graphdef, state)
        for lyr in m.layers:
            h = lyr.input_norm(x)
            qh = apply_rope(jnp.tile(h[:, :d * hq].reshape(t, hq, d), 1), pos, lyr.attn.rope)
            kh = apply_rope(h[:, :d * hkv].reshape(t, hkv, d), pos, lyr.attn.rope)
            x = x + qh.reshape(t, -1)[:, :cfg.hidden_size] + kh.reshape(t, -1).sum(-1, keepdims=True)
            h = lyr.post_norm(x)
            g = jnp.concatenate([h, h, h], -1)[:, :lyr.mlp.intermediate]
            x = x + (jax.nn.silu(g) * g)[:, :cfg.hidden_size]
        return m.norm(x)

    hidden = jax.random.normal(key, (b, cfg.hidden_size))
    logits_fn = jax.jit(lambda state, h: nnx.merge(graphdef, state).compute_logits(h))
    logits = logits_fn(state, hidden)
    from aphrodite_jax.sampling.metadata import make_sampling_metadata
    rows = [SamplingRow(SamplingParams(temperature=0.0), 0, 0, (1,), ()) for _ in range(b)]
    smd = jax.device_put(make_sampling_metadata(rows, b, cfg.vocab_size, bias_width=512, allowed_width=512,
                                                dry_width=16))
    fns = {
        "forward": (jax.jit(fwd, donate_argnums=(1,)), "caches", (state, None, ids, md)),
        "attention": (jax.jit(attention, donate_argnums=(0,)), "caches0", (None, q, k, md)),
        "matmuls": (jax.jit(matmuls), None, (state, x)),
        "elementw": (jax.jit(elementwise), None, (state, x, md.positions)),
        "logits": (logits_fn, None, (state, hidden)),
    }
    fns["sampler"] = (functools.partial(sample, max_num_logprobs=0, all_greedy=True), None, (logits, smd))
    return fns



def trace_ops(entry, state, run, n, top=30):
    """Trace n calls of the forward and sum the CPU thunk events by name (fusions, dots, loops)."""
    import glob
    import gzip
    import json
    import re
    import tempfile

    import jax
    fn, donate, a = entry
    d = tempfile.mkdtemp(prefix="step_trace_")
    jax.profiler.start_trace(d)
    for _ in range(n):
        run(fn, donate, a)
    jax.profiler.stop_trace()
    ev = json.load(gzip.open(sorted(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True))[-1]))["traceEvents"]
    tot: dict[str, list[float]] = {}
    by_tid: dict = {}
    for e in ev:
        if e.get("ph") == "X" and not e["name"].startswith(("$", "end:", "Thunk", "Pjit", "Common")):
            by_tid.setdefault(e.get("tid"), []).append(e)
    for es in by_tid.values():  # attribute ops to the while loop they run in ("while/op")
        es.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list = []
        for e in es:
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1].get("dur", 0):
                stack.pop()
            name = re.sub(r"[.\d]+$", "", e["name"])  # fusion.12 -> fusion
            key = ("while/" if any(s["name"].startswith("while") for s in stack) else "") + name
            tot.setdefault(key, [0.0, 0])
            tot[key][0] += e.get("dur", 0) / 1e3 / n
            tot[key][1] += 1 / n
            stack.append(e)
    print(f"trace ({d}), per forward call, ms and count (events nest: loops contain their bodies):")
    for k, (ms, c) in sorted(tot.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:9.2f}  x{c:7.1f}  {k}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--decode", type=int, default=32, help="decode rows (one new token each)")
    g.add_argument("--prefill", type=int, help="one fresh prompt of this many tokens")
    ap.add_argument("--context", type=int, default=64, help="context length of each decode row")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--min-bucket", type=int, default=8, help="smallest token bucket (the runner's)")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: the model's)")
    ap.add_argument("--pages", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--quantization", default=None, help="e.g. int8: the served `--quantization` weights")
    ap.add_argument("--impl", default="auto",
                    help="attention backend (the engine's --attention-backend): auto, reference, cpu (the C++ "
                         "kernel), cpu_jax (pure JAX)")
    ap.add_argument("--ab", help="two attention impls, e.g. reference,cpu: forward and attention of each, "
                                 "interleaved, with the ratio B/A of the medians")
    ap.add_argument("--only", help="comma list of parts to time")
    ap.add_argument("--trace", type=int, default=0, metavar="N",
                    help="also trace N forward calls with jax.profiler and print the top ops by total time")
    args = ap.parse_args()
    if args.prefill:
        args.decode = None

    import jax

    impls = args.ab.split(",") if args.ab else [args.impl]
    cfg, models, md, ids, caches, t, b = build(args, impls)
    model = models[impls[0]]
    sets = {impl: parts(cfg, models[impl], md, ids, caches, t, b, impl) for impl in impls}
    only = set(args.only.split(",")) if args.only else None
    state = {"caches": caches}
    state["caches0"] = [c + 0 for c in caches]
    times: dict[tuple[str, str], list[float]] = {}

    def run(fn, donate, a):
        a = list(a)
        if donate == "caches":
            a[1] = state["caches"]
        elif donate == "caches0":
            a[0] = state["caches0"]
        t0 = time.perf_counter()
        out = fn(*a)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        if donate == "caches":
            state["caches"] = out[1]
        elif donate == "caches0":
            state["caches0"] = out[1]
        return dt

    for rep in range(args.reps + 1):  # round 0 compiles and warms
        for impl in impls:
            for name, (fn, donate, a) in sets[impl].items():
                if only and name not in only:
                    continue
                if len(impls) > 1 and name not in ("forward", "attention"):
                    if impl != impls[0]:
                        continue
                dt = run(fn, donate, a)
                if rep:
                    times.setdefault((impl, name), []).append(dt * 1e3)
    shape = f"prefill {args.prefill}" if args.prefill else f"decode {args.decode} x ctx {args.context}"
    print(f"{shape}: token bucket {t}, {model.num_layers} layers, backend {jax.default_backend()}, "
          f"{args.reps} reps (medians, ms)")
    for (impl, name), xs in times.items():
        print(f"  {impl:10s} {name:10s} {statistics.median(xs):9.2f}   (min {min(xs):.2f})")
    if args.trace:
        trace_ops(sets[impls[-1]]["forward"], state, run, args.trace)
    if len(impls) == 2:
        a, bb = impls
        for name in ("forward", "attention"):
            if (a, name) in times and (bb, name) in times:
                ra = [y / x for x, y in zip(times[(a, name)], times[(bb, name)])]
                print(f"  {name}: {bb}/{a} time ratio per round median {statistics.median(ra):.3f}")


if __name__ == "__main__":
    main()
