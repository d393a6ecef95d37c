"""Acceptance 1: our models, loaded by our loader from a save_pretrained folder, match HF PyTorch in fp32.

Each case: prefill of a 20-token prompt through the engine's ModelRunner and its paged cache (pages from a
shuffled free list), then 8 decode steps fed with HF's greedy tokens; max |logit difference| <= 1e-4 at
every step.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from aphrodite_jax.config import ModelConfig  # noqa: E402
from aphrodite_jax.models.loader import load_model  # noqa: E402
from model_test_utils import RunnerDriver, make_runner  # noqa: E402

TOL = 1e-4
PROMPT_LEN, DECODE_STEPS, PAGE = 20, 8, 8
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


def _build(arch: str, **extra):
    """(HF torch model in eval mode, its config) with random weights."""
    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    cfg = cfg_cls(**{**BASE, **extra})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # biases are zero-initialised by HF: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _load_ours(hf_model, tmp_path, dtype="float32"):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    return load_model(ModelConfig(model=str(tmp_path), dtype=dtype))


def _hf_logits(hf_model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float().numpy()  # [L, V]


def _prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, BASE["vocab_size"], n)]


def _check_parity(hf_model, loaded) -> None:
    pool = RunnerDriver(make_runner(loaded, block_size=PAGE), seed=1)
    tokens = _prompt(0)
    ours = pool.step({0: tokens})  # [20, V]
    ref = _hf_logits(hf_model, tokens)
    assert np.abs(ours - ref).max() <= TOL, f"prefill: {np.abs(ours - ref).max()}"
    for step in range(DECODE_STEPS):
        nxt = int(ref[-1].argmax())
        tokens.append(nxt)
        ours = pool.step({0: [nxt]})[0]
        ref = _hf_logits(hf_model, tokens)
        err = np.abs(ours - ref[-1]).max()
        assert err <= TOL, f"decode step {step}: {err}"


CASES = {
    "llama": ("Llama", {}),
    "mistral_sliding": ("Mistral", dict(sliding_window=7)),
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(head_dim=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_architecture_matches_hf(case, tmp_path):
    arch, extra = CASES[case]
    hf_model = _build(arch, **extra)
    loaded = _load_ours(hf_model, tmp_path)
    assert type(loaded.model).__name__ == f"{arch}ForCausalLM"
    assert loaded.max_model_len == BASE["max_position_embeddings"]
    _check_parity(hf_model, loaded)


ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    # within max_position_embeddings, HF's dynamic NTK keeps the default frequencies (see layers/rotary.py)
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("kind", list(ROPE))
def test_llama_rope_scaling_matches_hf(kind, tmp_path):
    params = {**ROPE[kind], "rope_theta": 10000.0}
    hf_model = _build("Llama", rope_parameters=params)
    _check_parity(hf_model, _load_ours(hf_model, tmp_path))


def test_ragged_batch_equals_each_alone(tmp_path):
    """Two sequences of different lengths in one ragged batch give the logits each gives alone."""
    loaded = _load_ours(_build("Llama"), tmp_path)
    prompts = {0: _prompt(3, 20), 1: _prompt(4, 13)}
    nxt = {0: [7], 1: [42]}

    def run(which):
        pool = RunnerDriver(make_runner(loaded, block_size=PAGE), seed=5)
        out = {}
        for chunk in (prompts, nxt):
            logits = pool.step({s: chunk[s] for s in which})
            start = 0
            for s in which:
                out.setdefault(s, []).append(logits[start:start + len(chunk[s])])
                start += len(chunk[s])
        return {s: np.concatenate(v) for s, v in out.items()}

    both = run([0, 1])
    for s in (0, 1):
        alone = run([s])[s]
        assert np.abs(both[s] - alone).max() <= 1e-5


def test_bfloat16_loads_and_tracks_fp32(tmp_path):
    hf_model = _build("Llama")
    loaded = _load_ours(hf_model, tmp_path, dtype="bfloat16")
    model = loaded.model
    assert model.layers[0].attn.qkv.weight[...].dtype == jnp.bfloat16
    runner = make_runner(loaded, block_size=PAGE)
    assert runner.kv_caches[0].dtype == jnp.bfloat16
    tokens = _prompt(0)
    ours = RunnerDriver(runner).step({0: tokens})
    ref = _hf_logits(hf_model, tokens)
    assert ours.dtype == np.float32
    # bf16 keeps ~3 significant digits: far from fp32 exactness, but well correlated with it
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99


def test_dummy_load_format_builds_from_config_alone(tmp_path):
    hf_model = _build("Qwen3", head_dim=32)
    hf_model.config.save_pretrained(tmp_path)  # config only, no weights
    loaded = load_model(ModelConfig(model=str(tmp_path), load_format="dummy", dtype="float32"))
    w = np.asarray(loaded.model.layers[1].mlp.down.weight[...])
    assert w.shape == (BASE["intermediate_size"], BASE["hidden_size"])
    assert 0.005 < w.std() < 0.05
    assert np.all(np.asarray(loaded.model.norm.weight[...]) == 1.0)
