"""A model family defined in this file alone, as a spec entry: GELU, (1 + w) norms, sandwich norms and a final
logit soft cap. It loads through the production loader (an HF folder of safetensors), runs through the engine's
ModelRunner, and its logits match a NumPy forward of the same weights."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from aphrodite_jax.config import ModelConfig
from aphrodite_jax.models import registry
from aphrodite_jax.models.loader import load_model
from aphrodite_jax.models.spec import base_spec
from model_test_utils import RunnerDriver, make_runner


# --- the family: the whole of what a new dense family needs ---
def toy_spec(cfg):
    return base_spec(cfg, norm_offset=True, sandwich_norms=True, final_soft_cap=cfg.final_logit_softcapping)


TOY = registry.Architecture("ToyForCausalLM", "llama", toy_spec)
# ---

CFG = dict(model_type="llama", architectures=["ToyForCausalLM"], hidden_size=32, intermediate_size=64,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128,
           max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="gelu",
           tie_word_embeddings=False, final_logit_softcapping=3.0)
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@pytest.fixture
def toy_arch():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.hf_name)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named, HF-layout ([out, in]) weights; norm weights w around 0 (applied as 1 + w)."""
    rng = np.random.default_rng(seed)
    h, i, d, hq, hkv, v = 32, 64, 8, 4, 2, 128

    def r(*shape, s=0.2):
        return (s * rng.standard_normal(shape)).astype(np.float32)

    w = {"model.embed_tokens.weight": r(v, h, s=1.0), "model.norm.weight": r(h), "lm_head.weight": r(v, h, s=0.5)}
    for n in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{n}."
        w.update({p + "self_attn.q_proj.weight": r(hq * d, h), p + "self_attn.k_proj.weight": r(hkv * d, h),
                  p + "self_attn.v_proj.weight": r(hkv * d, h), p + "self_attn.o_proj.weight": r(h, hq * d),
                  p + "mlp.gate_proj.weight": r(i, h), p + "mlp.up_proj.weight": r(i, h),
                  p + "mlp.down_proj.weight": r(h, i)})
        w.update({p + f"{norm}.weight": r(h) for norm in NORMS})
    return w


# --- the NumPy reference forward (fp64) ---
def _rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + CFG["rms_norm_eps"]) * (1.0 + w)


def _rope(x, pos):  # x [T, N, D], rotate-half convention
    d = x.shape[-1]
    inv = 1.0 / CFG["rope_theta"] ** (np.arange(0, d, 2) / d)
    f = pos[:, None] * inv[None]  # [T, D/2]
    cos, sin = np.cos(np.concatenate([f, f], -1))[:, None], np.sin(np.concatenate([f, f], -1))[:, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


_erf = np.vectorize(math.erf)


def _numpy_logits(w, ids, cap=CFG["final_logit_softcapping"]):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t, d, hq, hkv = len(ids), 8, 4, 2
    pos = np.arange(t, dtype=np.float64)
    x = w["model.embed_tokens.weight"][ids]  # [T, H]
    mask = np.tril(np.ones((t, t), bool))
    for n in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        q = _rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, hq, d), pos)
        k = _rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, hkv, d), pos)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, hkv, d)
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) * d ** -0.5
        s = np.where(mask[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, v).reshape(t, hq * d) @ w[p + "self_attn.o_proj.weight"].T
        x = x + _rms(o, w[p + "post_attention_layernorm.weight"])
        h = _rms(x, w[p + "pre_feedforward_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        m = (0.5 * g * (1.0 + _erf(g / math.sqrt(2.0))) * (h @ w[p + "mlp.up_proj.weight"].T)) \
            @ w[p + "mlp.down_proj.weight"].T
        x = x + _rms(m, w[p + "post_feedforward_layernorm.weight"])
    logits = _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
    return logits if cap is None else cap * np.tanh(logits / cap)  # [T, V]


def test_toy_family_matches_numpy(toy_arch, tmp_path):
    weights = _weights()
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    save_file(weights, str(tmp_path / "model.safetensors"))
    loaded = load_model(ModelConfig(model=str(tmp_path), dtype="float32"))
    assert type(loaded.model).__name__ == "ToyForCausalLM"
    assert loaded.model.layers[0].attn_out_norm is not None and loaded.model.layers[0].mlp.act == "gelu"

    ids = [int(x) for x in np.random.default_rng(1).integers(0, CFG["vocab_size"], 12)]
    pool = RunnerDriver(make_runner(loaded), seed=3)
    got = [pool.step({0: ids})]  # [12, V]: the prefill
    for _ in range(3):  # greedy decode steps through the paged cache
        ids.append(int(got[-1][-1].argmax()))
        got.append(pool.step({0: [ids[-1]]}))
    want = _numpy_logits(weights, ids)
    got = np.concatenate(got)  # [15, V]
    assert np.abs(_numpy_logits(weights, ids, cap=None)).max() > 2 * CFG["final_logit_softcapping"]  # capped
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_moe_layers_are_refused_until_supported(toy_arch):
    import jax.numpy as jnp
    from flax import nnx
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in CFG.items() if k != "model_type"})
    moe = registry.Architecture("ToyMoeForCausalLM", "llama",
                                lambda c: dataclasses.replace(toy_spec(c), layer_mlp=("dense", "moe")))
    with pytest.raises(NotImplementedError, match="MoE"):
        moe.model_class(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_load_weights_names_used_and_refuses_bad_sets(toy_arch):
    import jax.numpy as jnp
    from transformers import LlamaConfig

    from aphrodite_jax.models.loader import build_abstract

    cfg = LlamaConfig(**{k: v for k, v in CFG.items() if k != "model_type"})
    weights = _weights()

    def load(ws):
        return build_abstract(toy_arch.model_class, cfg, jnp.float32, None).load_weights(ws.items())

    assert load(weights) == set(weights)
    with pytest.raises(KeyError, match="unexpected weight"):
        load({**weights, "model.layers.0.self_attn.w_proj.weight": weights["lm_head.weight"]})
    with pytest.raises(KeyError, match="unexpected weight"):
        load({**weights, "model.layers.0.mlp.up_proj.bias": np.zeros(64, np.float32)})  # no MLP bias here
    with pytest.raises(ValueError, match="incomplete fused"):
        load({k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(ValueError, match="not provided"):
        load({k: v for k, v in weights.items() if k != "model.layers.1.post_feedforward_layernorm.weight"})
