"""The DecoderSpec options no HF parity test covers (what Gemma-like families will use): a parallel residual,
an attention soft cap, sm_scale from query_pre_attn_scalar, an embedding multiplier, biases on qkv / o / MLP,
(1 + w) q/k norms, GELU-tanh and tied embeddings. Each family here is registered by the test, loaded through
the production loader, run through the engine's runner and checked against a NumPy forward read off its spec."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from aphrodite_jax.config import ModelConfig
from aphrodite_jax.models import registry
from aphrodite_jax.models.loader import load_model
from aphrodite_jax.models.spec import base_spec
from model_test_utils import RunnerDriver, make_runner

H, I, D, HQ, HKV, V, LAYERS = 32, 64, 8, 4, 2, 128, 2
CFG = dict(model_type="llama", hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
           num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, vocab_size=V, max_position_embeddings=64,
           rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
           attn_logit_softcapping=0.8, query_pre_attn_scalar=4)


def _parallel_spec(cfg):
    return base_spec(cfg, parallel_residual=True, norm_offset=True, qk_norm=True, qkv_bias=True, o_bias=True,
                     mlp_bias=True, attn_soft_cap=cfg.attn_logit_softcapping,
                     query_pre_attn_scalar=cfg.query_pre_attn_scalar, embed_multiplier=cfg.hidden_size ** 0.5)


def _plain_spec(cfg):  # the same weights without the options: shows each option changes the logits
    return base_spec(cfg, qk_norm=True, qkv_bias=True, o_bias=True, mlp_bias=True)


FAMILIES = {"ToyParallelForCausalLM": _parallel_spec, "ToyPlainForCausalLM": _plain_spec}


@pytest.fixture
def families():
    archs = [registry.register(registry.Architecture(name, "llama", fn)) for name, fn in FAMILIES.items()]
    yield {a.hf_name: a for a in archs}
    for a in archs:
        registry.unregister(a.hf_name)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.2):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    w = {"model.embed_tokens.weight": r(V, H, s=0.3), "model.norm.weight": r(H)}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        for proj, rows in (("q", HQ * D), ("k", HKV * D), ("v", HKV * D)):
            w[p + f"self_attn.{proj}_proj.weight"], w[p + f"self_attn.{proj}_proj.bias"] = r(rows, H), r(rows)
        w[p + "self_attn.o_proj.weight"], w[p + "self_attn.o_proj.bias"] = r(H, HQ * D), r(H)
        w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = r(D), r(D)
        for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            w[p + f"mlp.{proj}_proj.weight"], w[p + f"mlp.{proj}_proj.bias"] = r(*shape), r(shape[0])
        w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = r(H), r(H)
    return w


def _numpy_logits(spec, w, ids):
    """fp64 forward of the spec's options (the subset these families use)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t = len(ids)
    off = 1.0 if spec.norm_offset else 0.0

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + spec.norm_eps) * (off + g)

    def rope(x):  # [T, N, D], rotate-half
        inv = 1.0 / CFG["rope_theta"] ** (np.arange(0, D, 2) / D)
        f = np.arange(t)[:, None] * inv[None]
        f = np.concatenate([f, f], -1)[:, None]
        return x * np.cos(f) + np.concatenate([-x[..., D // 2:], x[..., :D // 2]], -1) * np.sin(f)

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    x = w["model.embed_tokens.weight"][ids] * (spec.embed_multiplier or 1.0)  # [T, H]
    scale = D ** -0.5 if spec.sm_scale is None else spec.sm_scale
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope(rms(lin(h, p + "self_attn.q_proj").reshape(t, HQ, D), w[p + "self_attn.q_norm.weight"]))
        k = rope(rms(lin(h, p + "self_attn.k_proj").reshape(t, HKV, D), w[p + "self_attn.k_norm.weight"]))
        v = lin(h, p + "self_attn.v_proj").reshape(t, HKV, D)
        k, v = np.repeat(k, HQ // HKV, axis=1), np.repeat(v, HQ // HKV, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) * scale
        if spec.attn_soft_cap is not None:
            s = spec.attn_soft_cap * np.tanh(s / spec.attn_soft_cap)
        s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = lin(np.einsum("hqk,khd->qhd", a, v).reshape(t, HQ * D), p + "self_attn.o_proj")
        mid = x if spec.parallel_residual else x + o
        h = rms(mid, w[p + "post_attention_layernorm.weight"])
        g = lin(h, p + "mlp.gate_proj")
        act = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)))  # GELU-tanh
        m = lin(act * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
        x = (x + o + m) if spec.parallel_residual else mid + m
    return rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T  # tied head, [T, V]


def _ours(arch, weights, ids, tmp_path):
    folder = tmp_path / arch
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**CFG, "architectures": [arch]}))
    save_file(weights, str(folder / "model.safetensors"))
    loaded = load_model(ModelConfig(model=str(folder), dtype="float32"))
    assert type(loaded.model).__name__ == arch
    return loaded, RunnerDriver(make_runner(loaded), seed=4).step({0: ids})  # [T, V]


def test_spec_options_match_numpy(families, tmp_path):
    weights = _weights()
    ids = [int(x) for x in np.random.default_rng(2).integers(0, V, 13)]
    want = {}
    for arch in FAMILIES:
        loaded, got = _ours(arch, weights, ids, tmp_path)
        spec = families[arch].spec(loaded.hf_config)
        want[arch] = _numpy_logits(spec, weights, ids)
        np.testing.assert_allclose(got, want[arch], atol=1e-4, rtol=0, err_msg=arch)
    parallel = families["ToyParallelForCausalLM"].spec(loaded.hf_config)
    assert parallel.sm_scale == 0.5 and parallel.activation == "gelu_tanh" and parallel.tie_word_embeddings
    assert np.abs(want["ToyParallelForCausalLM"] - want["ToyPlainForCausalLM"]).max() > 0.1
