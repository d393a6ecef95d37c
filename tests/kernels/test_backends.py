"""The attention-backend registry (pallas_kernels/backends.py): what "auto" picks, the error an explicit backend
gives for a model it cannot serve, the config field and CLI flag, and the choice reaching the model's layers."""
from __future__ import annotations

import ast
import dataclasses
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import pallas_kernels
from aphrodite_jax.config import ConfigError, EngineConfig, ModelConfig
from pallas_kernels import BACKENDS, AttentionNeeds, backend_names, resolve_attention_backend
from pallas_kernels import cpu_paged_attention as K
from rpa_cases import expected_cache, make_batch, random_seqs

AVAILABLE, WHY = K.kernel_status()
SMOL = AttentionNeeds(head_dim=64, num_q_heads=9, num_kv_heads=3, cache_dtype="float32", page_size=16)


def _error(name: str, platform: str, needs: AttentionNeeds) -> str:
    with pytest.raises(ValueError) as info:
        resolve_attention_backend(name, platform, needs)
    return str(info.value)


def test_names_are_the_config_choices():
    assert backend_names() == ("auto", "reference", "cpu", "cpu_jax", "tpu", "gpu")
    assert set(BACKENDS) == set(backend_names()[1:])


def test_auto_on_cpu_is_the_cpp_kernel_where_it_builds(caplog):
    with caplog.at_level(logging.WARNING):
        backend = resolve_attention_backend("auto", "cpu", SMOL)
    assert backend.name == ("cpu" if AVAILABLE else "cpu_jax")
    if AVAILABLE:  # resolving registered the kernel: a step loaded from the executable cache finds it
        assert K.TARGET in pallas_kernels.registered_ffi_targets()
        assert not caplog.records
        assert backend.description == "C++ kernel"


def test_auto_on_other_platforms():
    assert resolve_attention_backend("auto", "tpu", SMOL).name == "tpu"
    assert resolve_attention_backend("auto", "gpu", SMOL).name == "reference"  # never gpu yet
    assert resolve_attention_backend("auto", "metal", SMOL).name == "reference"


@pytest.mark.parametrize("change, why", [
    ({"head_dim": 96}, "head_dim 96 not in (64, 128, 256)"),
    ({"cache_dtype": "bfloat16"}, "cache dtype bfloat16 not in ('float32',)"),
])
def test_auto_falls_back_to_cpu_jax_with_one_warning(caplog, change, why):
    needs = dataclasses.replace(SMOL, **change)
    with caplog.at_level(logging.WARNING):
        assert resolve_attention_backend("auto", "cpu", needs).name == "cpu_jax"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0].getMessage() and "cpu_jax" in warnings[0].getMessage()


def test_auto_falls_back_where_the_kernel_does_not_build(monkeypatch, caplog):
    monkeypatch.setattr(K, "kernel_status", lambda: (False, "no C++ compiler found (test)"))
    with caplog.at_level(logging.WARNING):
        assert resolve_attention_backend("auto", "cpu", SMOL).name == "cpu_jax"
    assert "no C++ compiler found (test)" in caplog.text
    assert "its kernel is unavailable (no C++ compiler found (test))" in _error("cpu", "cpu", SMOL)


@pytest.mark.parametrize("name, platform, change, message", [
    ("cpu", "cpu", {"head_dim": 96}, "head_dim 96 not in (64, 128, 256)"),
    ("cpu", "cpu", {"cache_dtype": "bfloat16"}, "cache dtype bfloat16 not in ('float32',)"),
    ("cpu", "tpu", {}, "platform tpu not in ('cpu',)"),
    ("tpu", "cpu", {}, "platform cpu not in ('tpu',)"),
    ("gpu", "gpu", {"page_size": 8}, "page size 8 not in (16, 32)"),
    ("reference", "cpu", {"num_q_heads": 8}, "8 query heads are not whole groups of 3 KV heads"),
])
def test_an_explicit_backend_names_what_it_lacks(name, platform, change, message):
    assert _error(name, platform, dataclasses.replace(SMOL, **change)) == (
        f"attention backend {name!r} cannot serve this model: {message}")


def test_an_explicit_backend_that_fits_is_taken():
    assert resolve_attention_backend("cpu_jax", "cpu", SMOL).name == "cpu_jax"
    assert resolve_attention_backend("reference", "tpu", dataclasses.replace(SMOL, head_dim=96)).name == "reference"
    assert resolve_attention_backend("gpu", "gpu", SMOL).name == "gpu"
    if AVAILABLE:
        assert resolve_attention_backend("cpu", "cpu", SMOL).name == "cpu"


def test_unknown_backend():
    assert "unknown attention backend 'cuda'" in _error("cuda", "cpu", SMOL)
    with pytest.raises(ValueError, match="unknown attention backend"):
        pallas_kernels.ragged_paged_attention(*([None] * 8), sm_scale=1.0, impl="cuda")


@pytest.mark.parametrize("name", ["cpu_jax", "cpu"])
def test_cpu_backends_match_the_reference(name):
    """Each CPU backend, called through the registry, gives the reference's output and cache."""
    if name == "cpu" and not AVAILABLE:
        pytest.skip(f"CPU paged-attention kernel unavailable: {WHY}")
    import jax
    import functools

    rng = np.random.default_rng(7)
    seqs = random_seqs(rng, n_decode=3, n_prefill=1, n_chunked=2, max_len=50)
    b = make_batch(rng, seqs=seqs, page_size=16, num_kv_heads=2, group=3, head_dim=64)
    kw = dict(sm_scale=0.125, sliding_window=20, soft_cap=5.0)
    ref_out, ref_cache = jax.jit(functools.partial(BACKENDS["reference"], **kw))(*b.args())
    out, cache = jax.jit(functools.partial(BACKENDS[name], **kw))(*b.args())
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache), expected_cache(b))
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(ref_cache))


# ----------------------------------------------------------------------------- config and CLI
def test_config_field_is_validated():
    assert EngineConfig().attention_backend == "auto"
    assert EngineConfig.from_kwargs(attention_backend="cpu_jax").attention_backend == "cpu_jax"
    with pytest.raises(ConfigError, match=re.escape("attention_backend must be one of")):
        EngineConfig(attention_backend="cuda")


def test_flag_and_yaml_reach_the_engine_config(tmp_path):
    from serving.args import CLIError
    from serving.cli import parse_flat

    assert parse_flat([])[0].attention_backend == "auto"
    assert parse_flat(["--attention-backend", "cpu_jax"])[0].attention_backend == "cpu_jax"
    assert parse_flat(["--attention_backend=reference"])[0].attention_backend == "reference"
    path = tmp_path / "c.yaml"
    path.write_text("attention_backend: reference\n")
    assert parse_flat(["--config", str(path)])[0].attention_backend == "reference"
    with pytest.raises(CLIError, match="--attention-backend"):
        parse_flat(["--attention-backend", "cuda"])


# ----------------------------------------------------------------------------- the engine's model build
def _tiny(head_dim: int) -> ModelConfig:
    heads = 2
    return ModelConfig(load_format="dummy", dtype="float32", max_model_len=64, hf_overrides=dict(
        model_type="llama", hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim, vocab_size=128,
        max_position_embeddings=64))


def test_the_resolved_backend_reaches_every_attention_layer(caplog):
    from aphrodite_jax.models.loader import load_model

    loaded = load_model(_tiny(64), attention_backend="cpu_jax")
    assert loaded.attention_backend == "cpu_jax"
    assert [lyr.attn.attention_backend for lyr in loaded.model.layers] == ["cpu_jax", "cpu_jax"]
    with caplog.at_level(logging.INFO, logger="aphrodite_jax.models.loader"):
        auto = load_model(_tiny(64))
    assert auto.attention_backend == ("cpu" if AVAILABLE else "cpu_jax")
    assert f"attention: {auto.attention_backend} (" in caplog.text


def test_a_backend_that_cannot_serve_the_model_fails_the_load():
    from aphrodite_jax.models.loader import load_model

    with pytest.raises(ValueError, match=re.escape("'cpu' cannot serve this model: head_dim 96 not in")):
        load_model(_tiny(96), attention_backend="cpu")
    assert load_model(_tiny(96)).attention_backend == "cpu_jax"  # auto: the pure-JAX path, as before


def test_the_executable_cache_key_holds_the_resolved_backend():
    """A different backend never loads another's executable: the engine's part of the key differs."""
    from aphrodite_jax.runner.cache_setup import cache_context

    runner = SimpleNamespace(max_model_len=64, vocab_size=128, kv_spec=None, mesh=None)

    def context(backend: str) -> dict:
        loaded = SimpleNamespace(hf_config={}, dtype="float32", model=object(), source_kind="dummy",
                                 source_path=None, attention_backend=backend)
        return cache_context(EngineConfig(), loaded, runner)

    assert context("cpu") != context("cpu_jax")
    assert context("cpu")["engine"]["attention_backend"] == "auto"


def test_the_kernels_import_nothing_of_the_engine():
    root = Path(pallas_kernels.source_root())
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("aphrodite_jax", "serving") for n in names), (path, names)
