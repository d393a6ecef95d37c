"""Acceptance 4: on a (1, 4) mesh of virtual CPU devices the model really is split, and its logits equal
the single-device ones."""
from __future__ import annotations

import numpy as np
import pytest
import jax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from aphrodite_jax.config import ModelConfig  # noqa: E402
from aphrodite_jax.distributed import logical_to_spec, make_mesh, plan_attention  # noqa: E402
from aphrodite_jax.models.loader import load_model  # noqa: E402
from model_test_utils import RunnerDriver, make_runner  # noqa: E402

TP = 4
CASES = {
    # 4 q heads / 2 KV heads on 4 devices: each KV head is repeated twice, one head of each per device
    "kv_repeated": ("Llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)),
    # 6 q heads do not split over 4 devices: attention is replicated, MLP and vocab stay split
    "attn_replicated": ("Qwen2", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)),
}


def _shard_shapes(arr: jax.Array) -> set[tuple[int, ...]]:
    return {tuple(s.data.shape) for s in arr.addressable_shards}


def _run(loaded, mesh=None, steps: int = 2) -> np.ndarray:
    """Logits of every token over a prefill and `steps` greedy decode steps, through the engine's runner."""
    runner = make_runner(loaded, mesh=mesh, num_pages=32)
    pool = RunnerDriver(runner, seed=2)
    chunk = {0: [int(x) for x in np.random.default_rng(0).integers(0, 256, 11)], 1: [5, 9, 200]}
    out = []
    for _ in range(steps + 1):
        logits = pool.step(chunk)
        out.append(logits)
        ends = np.cumsum([len(v) for v in chunk.values()]) - 1
        chunk = {s: [int(logits[e].argmax())] for s, e in zip(chunk, ends)}
    return np.concatenate(out), runner


@pytest.fixture(scope="module")
def four_devices():
    if len(jax.devices()) < TP:
        pytest.skip("needs 4 (virtual) devices: run under tests/conftest.py")
    return make_mesh(tp_size=TP)


@pytest.mark.parametrize("case", list(CASES))
def test_tp4_matches_single_device_and_is_split(case, tmp_path, four_devices):
    arch, extra = CASES[case]
    cfg = getattr(transformers, f"{arch}Config")(
        intermediate_size=128, num_hidden_layers=2, vocab_size=256, max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    getattr(transformers, f"{arch}ForCausalLM")(cfg).save_pretrained(tmp_path, safe_serialization=True)
    mc = ModelConfig(model=str(tmp_path), dtype="float32")
    single = load_model(mc)
    split = load_model(mc, mesh=four_devices)

    layer = split.model.layers[0]
    h, inter, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = h // heads
    # MLP and vocabulary are split 4 ways on every case
    gate_up = layer.mlp.gate_up.weight[...]
    assert len(gate_up.addressable_shards) == TP
    assert _shard_shapes(gate_up) == {(h, 2 * inter // TP)}
    assert _shard_shapes(layer.mlp.down.weight[...]) == {(inter // TP, h)}
    assert _shard_shapes(split.model.embed.weight[...]) == {(cfg.vocab_size // TP, h)}

    attn_tp, stored_kv = plan_attention(heads, kv, TP)
    qkv_cols = (heads + 2 * stored_kv) * d
    _, runner = _run(split, four_devices, steps=0)
    caches, pages, page = runner.kv_caches, runner.num_gpu_blocks, runner.block_size
    if case == "kv_repeated":
        assert (attn_tp, stored_kv) == (TP, TP)
        assert _shard_shapes(layer.attn.qkv.weight[...]) == {(h, qkv_cols // TP)}
        assert _shard_shapes(layer.attn.o_proj.weight[...]) == {(heads * d // TP, h)}
        assert _shard_shapes(caches[0]) == {(pages, page, 2 * stored_kv // TP, d)}  # one K/V head pair each
    else:
        assert attn_tp == 1
        assert _shard_shapes(layer.attn.qkv.weight[...]) == {(h, qkv_cols)}
        assert _shard_shapes(caches[0]) == {(pages, page, 2 * kv, d)}

    ref, _ = _run(single)
    got, _ = _run(split, four_devices)
    assert np.abs(got - ref).max() <= 1e-5


def test_attention_plan_rules():
    assert plan_attention(32, 8, 4) == (4, 8)  # KV heads divide: no repeat
    assert plan_attention(9, 3, 3) == (3, 3)
    assert plan_attention(8, 1, 4) == (4, 4)  # MQA: repeat the KV head per device
    assert plan_attention(9, 3, 4) == (1, 3)  # SmolLM2 on 4 devices: replicated attention
    assert plan_attention(8, 3, 2) == (1, 3)


def test_logical_rules_reject_axis_collisions():
    assert tuple(logical_to_spec(("embed", "mlp"))) == (None, "model")
    with pytest.raises(ValueError):
        logical_to_spec(("heads", "mlp"))
