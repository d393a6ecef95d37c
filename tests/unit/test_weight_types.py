"""Weight types (layers/weights.py, layers/int8_weights.py), the format registry, the fused epilogue and the
per-token adapter delta of Linear (layers/adapter.py), on both int8 backends where the CPU kernel runs."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from aphrodite_jax.config import QUANTIZATIONS
from aphrodite_jax.layers.adapter import NO_ADAPTER, AdapterDelta
from aphrodite_jax.layers.embed import Embedding
from aphrodite_jax.layers.int8_weights import BlockWeight, Int4Blocks, Int8Blocks
from aphrodite_jax.layers.linear import Linear
from aphrodite_jax.layers.mlp import GatedMLP
from aphrodite_jax.layers.quantization import FORMATS, get_format, quantize_model
from aphrodite_jax.layers.weights import DenseWeight, WeightType
from pallas_kernels import int8_matmul as K

AVAILABLE, WHY = K.kernel_status()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"CPU int8 kernel unavailable: {WHY}")
BACKENDS = ["xla"] + (["cpu_kernel"] if AVAILABLE else [])


def _dense(k, n, seed=0):
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)


def _q4_1(k, n, seed=1):
    """w = d4 * i + m4 per block of 32 (i in 0..15, f16 d4 and m4): a GGUF Q4_1 tensor, dequantized."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, 16, size=(k, n))
    i[0::32], i[1::32] = 0, 15
    d4 = rng.uniform(1e-3, 1e-2, size=(k // 32, 1, n)).astype(np.float16).astype(np.float32)
    m4 = rng.uniform(-0.1, 0.0, size=(k // 32, 1, n)).astype(np.float16).astype(np.float32)
    return (d4 * i.reshape(k // 32, 32, n).astype(np.float32) + m4).reshape(k, n)


def _q8_0(k, n, seed=2):
    """w = d8 * q8 per block of 32 (q8 in -127..127, f16 d8): a GGUF Q8_0 tensor, dequantized."""
    rng = np.random.default_rng(seed)
    q8 = rng.integers(-127, 128, size=(k, n)).astype(np.float32)
    q8[0::32] = 127
    d8 = rng.uniform(1e-3, 1e-2, size=(k // 32, 1, n)).astype(np.float16).astype(np.float32)
    return (q8.reshape(k // 32, 32, n) * d8).reshape(k, n)


def _expected(w, x, backend):
    """What a block weight of w computes for x: the dequantized product (xla) or the kernel's NumPy model."""
    q8 = K.q8_0_blocks(w)
    q, d, m = q8 if q8 is not None else K.quantize_blocks(w)
    if backend == "xla":
        return x @ K.dequantize_blocks(q, d, m, w.shape[0])
    return K.reference_int8_matmul(x, q, d, m)


# ------------------------------------------------------------------ the types' matmuls
def test_dense_weight_matches_numpy():
    w, x = _dense(48, 20), _dense(5, 48, seed=1)
    dw = DenseWeight.from_dense(w)
    np.testing.assert_allclose(np.asarray(dw.matmul(jnp.asarray(x))), x @ w, rtol=1e-5, atol=1e-6)
    y32 = dw.matmul(jnp.asarray(x, jnp.bfloat16), out_dtype=jnp.float32)
    assert y32.dtype == jnp.float32 and y32.shape == (5, 20)
    assert dw.fused_gate_matmul(jnp.zeros((5, 96)), "silu") is None  # dense offers no epilogue


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["generic", "q4_1", "q8_0"])
def test_block_weights_match_their_numpy_model(backend, kind):
    k, n = 96, 40
    w = {"generic": _dense(k, n), "q4_1": _q4_1(k, n), "q8_0": _q8_0(k, n)}[kind]
    lw = Int8Blocks.from_dense(w, backend)
    # The per-matrix choice: Q4_1 as 4-bit nibbles on the CPU kernel only; f16 scales where exact.
    assert type(lw) is (Int4Blocks if (kind == "q4_1" and backend == "cpu_kernel") else Int8Blocks)
    assert lw.half == (kind == "q8_0" or (kind == "q4_1" and backend == "cpu_kernel"))
    assert lw.name == "int8" and lw.backend == backend
    x = np.random.default_rng(3).standard_normal((2, 3, k)).astype(np.float32)
    y = np.asarray(jax.jit(lambda a: lw.matmul(a))(jnp.asarray(x)))
    assert y.shape == (2, 3, n)
    want = _expected(w, x.reshape(6, k), backend)
    np.testing.assert_allclose(y.reshape(6, n), want, rtol=1e-5, atol=1e-4)
    exact = x.reshape(6, k).astype(np.float64) @ w.astype(np.float64)  # against the dense weight
    assert np.linalg.norm(y.reshape(6, n) - exact) / np.linalg.norm(exact) < 0.01
    y32 = lw.matmul(jnp.asarray(x, jnp.bfloat16), out_dtype=jnp.float32)
    assert y32.dtype == jnp.float32


@needs_kernel
def test_int4_blocks_direct_and_their_limits():
    w = _q4_1(64, 24)
    lw = Int4Blocks.from_dense(w, "cpu_kernel")
    assert lw.w4 and lw.half and lw.q[...].shape == (32, 32)  # [Np, Kp / 2]
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(lw.matmul(jnp.asarray(x))), _expected(w, x, "cpu_kernel"),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="CPU int8 kernel only"):
        Int4Blocks.from_dense(w, "xla")
    with pytest.raises(ValueError, match="not on the 4-bit grid"):
        Int4Blocks.from_dense(_dense(64, 24), "cpu_kernel")
    with pytest.raises(ValueError, match="unknown int8 backend"):
        Int8Blocks.from_dense(w, "gpu_kernel")


# ------------------------------------------------------------------ the epilogue capability
@needs_kernel
@pytest.mark.parametrize("kind", ["generic", "q4_1"])
def test_fused_silu_epilogue_equals_unfused(kind):
    k, n, t = 64, 40, 5
    w = _dense(k, n) if kind == "generic" else _q4_1(k, n)
    lw = Int8Blocks.from_dense(w, "cpu_kernel")
    gu = (np.random.default_rng(5).standard_normal((t, 2 * k)) * 3).astype(np.float32)
    fused = lw.fused_gate_matmul(jnp.asarray(gu), "silu")
    assert fused is not None and fused.shape == (t, n)
    unfused = lw.matmul(jax.nn.silu(jnp.asarray(gu[:, :k])) * jnp.asarray(gu[:, k:]))
    np.testing.assert_allclose(np.asarray(fused), np.asarray(unfused), rtol=1e-5, atol=1e-6)
    assert lw.fused_gate_matmul(jnp.asarray(gu), "gelu") is None  # only SiLU is offered


def test_xla_blocks_offer_no_epilogue():
    lw = Int8Blocks.from_dense(_dense(64, 8), "xla")
    assert lw.fused_gate_matmul(jnp.zeros((2, 128)), "silu") is None  # XLA fuses the activation itself


def _mlp(backend=None):
    mlp = GatedMLP(64, 96, dtype=jnp.float32, rngs=nnx.Rngs(0))
    if backend:
        mlp.gate_up.quantize(Int8Blocks, backend)
        mlp.down.quantize(Int8Blocks, backend)
    return mlp


def _ffi_silu_flags(fn, x):
    """The silu_mul attribute of every int8 kernel call in fn's jaxpr."""
    eqns = jax.make_jaxpr(fn)(x).jaxpr.eqns
    return [int(dict(e.params["attributes"])["silu_mul"]) for e in eqns if e.primitive.name == "ffi_call"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_takes_the_epilogue_exactly_where_offered(backend):
    x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 64)).astype(np.float32))
    mlp = _mlp(backend)
    y = np.asarray(jax.jit(lambda a: mlp(a))(x))
    gu = mlp.gate_up(x)
    unfused = np.asarray(mlp.down(jax.nn.silu(gu[:, :96]) * gu[:, 96:]))
    np.testing.assert_allclose(y, unfused, rtol=1e-5, atol=1e-6)
    if backend == "cpu_kernel":  # gate_up, then the down projection with SiLU * up inside
        assert _ffi_silu_flags(lambda a: mlp(a), x) == [0, 1]
    else:
        assert _ffi_silu_flags(lambda a: mlp(a), x) == []


def test_linear_epilogue_adds_the_bias():
    lin = Linear(32, 8, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(1))
    lin.bias.set_value(jnp.arange(8, dtype=jnp.float32))
    assert lin.fused_gate_matmul(jnp.zeros((2, 64)), "silu") is None  # dense
    if AVAILABLE:
        lin.quantize(Int8Blocks, "cpu_kernel")
        y = lin.fused_gate_matmul(jnp.zeros((2, 64)), "silu")
        np.testing.assert_allclose(np.asarray(y), np.broadcast_to(np.arange(8.0), (2, 8)), atol=1e-6)


# ------------------------------------------------------------------ the registry and the hook
def test_registry_names_the_config_choices():
    assert tuple(FORMATS) == QUANTIZATIONS
    assert get_format("int8") is Int8Blocks and issubclass(Int8Blocks, WeightType)
    with pytest.raises(ValueError, match=r"quantization 'gptq' is not supported; choose one of \('int8',\)"):
        get_format("gptq")
    with pytest.raises(ValueError, match="not supported"):
        quantize_model(_mlp(), "fp8", mode="xla")


class _Tied(nnx.Module):
    """Two matmuls and a tied LM head, as the models have them (lm_head None, embed an Embedding)."""

    def __init__(self):
        self.mlp = _mlp()
        self.embed = Embedding(100, 64, dtype=jnp.float32, rngs=nnx.Rngs(2))
        self.lm_head = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_model_replaces_every_matmul(backend, caplog):
    model = _Tied()
    h = jnp.asarray(np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32))
    e = np.asarray(model.embed.weight.get_value())  # [V, H]
    with caplog.at_level(logging.INFO, logger="aphrodite_jax.layers.quantization"):
        assert quantize_model(model, "int8", mode=backend) == backend
    assert isinstance(model.mlp.gate_up.weight, BlockWeight) and isinstance(model.mlp.down.weight, BlockWeight)
    assert isinstance(model.embed.head, BlockWeight) and isinstance(model.embed.weight, nnx.Param)
    assert f"Quantized 3 weight matrices to int8 ({backend}; 0 of them on the 4-bit grid, stored as nibbles, " \
           "0 with f16 scales)" in caplog.text
    logits = np.asarray(model.embed.attend(h))
    np.testing.assert_allclose(logits, _expected(e.T.copy(), np.asarray(h), backend), rtol=1e-5, atol=1e-4)
    assert not model.mlp.down.quantize(Int8Blocks, backend)  # already quantized: left alone


# ------------------------------------------------------------------ the adapter delta
def _adapter_case(seed=8, t=6, k=24, n=10, r=3, adapters=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)).astype(np.float32)
    a = (rng.standard_normal((adapters, k, r)) * 0.3).astype(np.float32)
    b = (rng.standard_normal((adapters, r, n)) * 0.3).astype(np.float32)
    return x, a, b


@pytest.mark.parametrize("per_adapter_scale", [False, True])
def test_adapter_delta_matches_numpy(per_adapter_scale):
    x, a, b = _adapter_case()
    idx = np.array([0, 2, NO_ADAPTER, 1, 2, 0], np.int32)  # per-token adapters, one token without
    scale = np.array([0.5, 2.0, -1.0], np.float32) if per_adapter_scale else 0.25
    lin = Linear(24, 10, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(3))
    lin.bias.set_value(jnp.linspace(-1, 1, 10, dtype=jnp.float32))
    w, bias = np.asarray(lin.weight.get_value()), np.asarray(lin.bias.get_value())
    delta = AdapterDelta(jnp.asarray(idx), jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale))
    y = np.asarray(jax.jit(lambda xx, d: lin(xx, adapter=d))(jnp.asarray(x), delta))
    want = x @ w + bias
    for i, j in enumerate(idx):
        if j >= 0:
            s = scale[j] if per_adapter_scale else scale
            want[i] += s * (x[i] @ a[j] @ b[j])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    base = np.asarray(lin(jnp.asarray(x)))
    np.testing.assert_array_equal(y[2], base[2])  # the token without an adapter is unchanged, bit for bit
    assert not np.allclose(y[0], base[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_delta_on_a_quantized_weight(backend):
    x, a, b = _adapter_case(t=4, k=64, n=16)
    lin = Linear(64, 16, use_bias=False, dtype=jnp.float32, rngs=nnx.Rngs(4))
    lin.quantize(Int8Blocks, backend)
    idx = jnp.asarray([1, NO_ADAPTER, 0, 1], jnp.int32)
    y = np.asarray(lin(jnp.asarray(x), adapter=AdapterDelta(idx, jnp.asarray(a), jnp.asarray(b), 0.5)))
    base = np.asarray(lin(jnp.asarray(x)))
    delta = np.stack([0.5 * x[i] @ a[j] @ b[j] if j >= 0 else np.zeros(16, np.float32)
                      for i, j in enumerate(np.asarray(idx))])
    np.testing.assert_allclose(y, base + delta, rtol=1e-5, atol=1e-5)


def _primitives(fn, *args):
    return [(e.primitive.name, str(e.params)) for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


def test_no_adapter_traces_the_plain_matmul():
    """adapter=None costs nothing: the traced program is x @ W + b, as it was before the seam (and an
    adapter adds ops); project_f32 is the one f32-accumulating dot."""
    lin = Linear(24, 10, use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(5))
    w, bias = lin.weight.get_value(), lin.bias.get_value()
    x = jnp.ones((6, 24), jnp.float32)
    plain = _primitives(lambda a: a @ w + bias, x)
    assert _primitives(lambda a: lin(a), x) == plain
    assert _primitives(lambda a: lin(a, adapter=None), x) == plain
    _, a, b = _adapter_case()
    delta = AdapterDelta(jnp.zeros(6, jnp.int32), jnp.asarray(a), jnp.asarray(b))
    assert len(_primitives(lambda xx: lin(xx, adapter=delta), x)) > len(plain)
    f32 = _primitives(lambda a: jnp.einsum("nh,hv->nv", a, w, preferred_element_type=jnp.float32), x)
    assert _primitives(lambda a: lin.project_f32(a), x) == f32
