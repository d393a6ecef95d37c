"""The CPU int8 FFI kernel (pallas_kernels/native) against its NumPy model, and the block quantizer.

The kernel quantizes activations per block of 32 exactly like `reference_int8_matmul`, so the two agree to
float rounding; a second check bounds the distance to the plain fp32 product (what quantization costs).
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels import int8_matmul as K
from aphrodite_jax.layers.int8_weights import Int8Blocks

AVAILABLE, WHY = K.kernel_status()
needs_kernel = pytest.mark.skipif(not AVAILABLE, reason=f"CPU int8 kernel unavailable: {WHY}")

# (M tokens, K inputs, N outputs): batch 1/8/32, odd sizes (K and N off the 32/16 grid), the model's shapes
# (qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576, the tied LM head 576->49152), a prefill tile.
SHAPES = [(1, 576, 960), (8, 576, 576), (32, 576, 3072), (32, 1536, 576), (1, 576, 49152), (5, 100, 37),
          (3, 33, 17), (7, 31, 1), (1, 1, 16), (130, 576, 960)]


def _case(m, k, n, seed=0):
    rng = np.random.default_rng(seed + m * 7 + k * 13 + n)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, : min(k, 3)] *= 20.0  # a few outlier channels, as real activations have
    return x, w


@needs_kernel
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("residual", [True, False])
def test_kernel_matches_numpy_model(m, k, n, residual):
    x, w = _case(m, k, n)
    q, d, mn = K.quantize_blocks(w)
    packed, dm = K.pack_blocks(q, d, mn)
    y = np.asarray(jax.jit(lambda a, b, c: K.int8_matmul(a, b, c, n, residual))(x, packed, dm))
    assert y.shape == (m, n)
    ref = K.reference_int8_matmul(x, q, d, mn, residual)
    scale = np.abs(x).sum(axis=1, keepdims=True) * np.abs(w).max()  # bound on |y| per row
    np.testing.assert_allclose(y, ref, rtol=0, atol=float(scale.max()) * 2e-6)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    # 8-bit weights: ~0.5% of the product's norm; 8-bit activations add ~1%, the residual plane ~0.
    assert rel < (0.01 if residual else 0.025), rel


@needs_kernel
def test_kernel_zero_rows_and_blocks():
    """All-zero activation rows and constant weight blocks (d = 0) give exact results."""
    x = np.zeros((4, 64), np.float32)
    x[1] = 1.0
    x[2, 32:] = -2.0
    w = np.full((64, 48), 0.25, np.float32)
    w[:32, 5] = 0.0
    q, d, mn = K.quantize_blocks(w)
    packed, dm = K.pack_blocks(q, d, mn)
    y = np.asarray(jax.jit(lambda a, b, c: K.int8_matmul(a, b, c, 48))(x, packed, dm))
    np.testing.assert_allclose(y, x @ w, rtol=1e-6, atol=1e-6)


def _q4_1(k, n, seed=1):
    """Weights as a GGUF Q4_1 tensor dequantizes to: w = d4 * i + m4 per block of 32, i in 0..15 -> (w, i)."""
    rng = np.random.default_rng(seed)
    kp = -(-k // 32) * 32
    i = rng.integers(0, 16, size=(kp, n))
    i[0::32] = 0
    i[1::32] = 15  # every block spans the full 4-bit range, as Q4_1's min/max do
    d4 = rng.uniform(1e-3, 1e-2, size=(kp // 32, 1, n)).astype(np.float16).astype(np.float32)  # GGUF: f16
    m4 = rng.uniform(-0.1, 0.0, size=(kp // 32, 1, n)).astype(np.float16).astype(np.float32)
    w = (d4 * i.reshape(kp // 32, 32, n).astype(np.float32) + m4).reshape(kp, n)
    return w[:k], i[:k]


def test_q4_1_blocks_are_exact():
    """A GGUF Q4_1 block (w = d4 * i + m4, i in 0..15) lands on the 8-bit grid exactly (q = 17 i)."""
    k, n = 96, 40
    w, i = _q4_1(k, n)
    q, d, mn = K.quantize_blocks(w)
    np.testing.assert_array_equal(q.astype(int), 17 * i)
    np.testing.assert_allclose(K.dequantize_blocks(q, d, mn, k), w, rtol=0, atol=2e-7)


def test_pack_layout():
    """Byte (g, k4, j, r) of the packed weights is q[4 k4 + r, 16 g + j]."""
    rng = np.random.default_rng(2)
    q = rng.integers(0, 256, size=(64, 40)).astype(np.uint8)
    d = rng.random((2, 40)).astype(np.float32)
    packed, dm = K.pack_blocks(q, d, d + 1)
    u = packed.reshape(3, 16, 16, 4)  # [Np/16, Kp/4, 16, 4] with Np = 48
    assert u[1, 5, 3, 2] == q[4 * 5 + 2, 16 + 3]
    assert (u[2, :, 8:] == 0).all()  # padded outputs
    dmv = dm.reshape(3, 2, 2, 16)
    assert dmv[2, 1, 0, 7] == d[1, 39] and dmv[2, 1, 1, 7] == d[1, 39] + 1


# 4-bit packing: batch 1/4/32, a prefill tile, the model's shapes, K and N off the grid, N = 1.
SHAPES4 = [(1, 576, 960), (4, 576, 3072), (32, 1536, 576), (130, 576, 960), (1, 576, 49152), (3, 64, 17),
           (2, 32, 1), (9, 1536, 40)]


@needs_kernel
@pytest.mark.parametrize("m,k,n", SHAPES4)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("half", [False, True])
def test_kernel_4bit_matches_numpy_model(m, k, n, residual, half):
    """Weights on the 4-bit grid (Q4_1) packed as nibbles (with f32 or f16 scales) give the 8-bit numbers."""
    w, _ = _q4_1(k, n, seed=m + k + n)
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    q, d, mn = K.quantize_blocks(w)
    assert K.on_4bit_grid(q) and K.half_scales_exact(w, q, d, mn)
    packed, dm = K.pack_blocks4(q, d, mn, half)
    assert dm.dtype == (np.float16 if half else np.float32)
    assert packed.shape[1] == q.shape[0] // 2
    y = np.asarray(jax.jit(lambda a, b, c: K.int8_matmul(a, b, c, n, residual, w4=True))(x, packed, dm))
    ref = K.reference_int8_matmul(x, q, d, mn, residual)
    scale = np.abs(x).sum(axis=1, keepdims=True) * np.abs(w).max()
    np.testing.assert_allclose(y, ref, rtol=0, atol=float(scale.max()) * 2e-6)


def test_pack4_layout():
    """Byte (g, s, j, r) of the 4-bit packing holds i[8 s + r, 16 g + j] low and i[8 s + 4 + r, 16 g + j] high."""
    rng = np.random.default_rng(5)
    i = rng.integers(0, 16, size=(64, 40))
    d = rng.random((2, 40)).astype(np.float32)
    packed, dm = K.pack_blocks4((17 * i).astype(np.uint8), d, d + 1)
    u = packed.reshape(3, 8, 16, 4)  # [Np/16, Kp/8, 16, 4] with Np = 48
    assert u[1, 5, 3, 2] == i[8 * 5 + 2, 16 + 3] | (i[8 * 5 + 4 + 2, 16 + 3] << 4)
    assert (u[2, :, 8:] == 0).all()  # padded outputs
    dmv = dm.reshape(3, 2, 2, 16)
    np.testing.assert_allclose(dmv[2, 1, 0, 7], 17 * d[1, 39], rtol=1e-7)
    assert not K.on_4bit_grid(np.array([[17, 18]], np.uint8))
    w, _ = _q4_1(64, 8)
    w[3, 2] += 1e-4  # off the f16 scales' values
    q, d, mn = K.quantize_blocks(w)
    assert not K.half_scales_exact(w, q, d, mn)


@pytest.mark.parametrize("mode", ["xla"] + (["cpu_kernel"] if AVAILABLE else []))
def test_int8_weight_module(mode):
    """The layer interface: leading dims kept, weight-only (xla) equals x @ dequantized W."""
    x, w = _case(6, 80, 24)
    lw = Int8Blocks.from_dense(w, mode)
    x3 = jnp.asarray(x.reshape(2, 3, 80))
    y = np.asarray(jax.jit(lambda a: lw.matmul(a))(x3))
    assert y.shape == (2, 3, 24)
    q, d, mn = K.quantize_blocks(w)
    if mode == "xla":
        np.testing.assert_allclose(y.reshape(6, 24), x @ K.dequantize_blocks(q, d, mn, 80), rtol=1e-5, atol=1e-4)
    else:
        assert not lw.w4  # generic weights: 8-bit
        np.testing.assert_allclose(y.reshape(6, 24), K.reference_int8_matmul(x, q, d, mn), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_int8_weight_module_picks_4bit_for_q4_1():
    w, _ = _q4_1(96, 40)
    lw = Int8Blocks.from_dense(w, "cpu_kernel")
    assert lw.w4 and lw.half and lw.q[...].shape == (48, 48)  # [Np, Kp / 2]
    assert lw.dm[...].dtype == jnp.float16
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    q, d, mn = K.quantize_blocks(w)
    y = np.asarray(jax.jit(lambda a: lw.matmul(a))(jnp.asarray(x)))
    np.testing.assert_allclose(y, K.reference_int8_matmul(x, q, d, mn), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("m,k,n,w4", [(m, k, n, w4) for m, k, n in [(1, 1536, 576), (32, 1536, 576), (7, 100, 37),
                                                                     (130, 64, 40)]
                                       for w4 in (False, True) if not (w4 and k % 32)])  # Q4_1 rows: whole blocks
def test_kernel_silu_mul_matches_numpy_model(m, k, n, w4):
    """The down projection's prologue: x = gate | up, the kernel quantizes silu(gate) * up."""
    rng = np.random.default_rng(m + k)
    w = _q4_1(k, n, seed=n)[0] if w4 else (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    gu = (rng.standard_normal((m, 2 * k)) * 3).astype(np.float32)
    gu[0, :4] = [-100.0, 100.0, 0.0, -0.0]  # the exponential's clamps and zero
    q, d, mn = K.quantize_blocks(w)
    packed, dm = (K.pack_blocks4(q, d, mn, True) if w4 else K.pack_blocks(q, d, mn))
    y = np.asarray(jax.jit(lambda a, b, c: K.int8_matmul(a, b, c, n, w4=w4, silu_mul=True))(gu, packed, dm))
    h = K.silu_mul_reference(gu)
    np.testing.assert_allclose(h, np.asarray(jax.nn.silu(gu[:, :k]) * gu[:, k:]), rtol=1e-5, atol=1e-6)
    ref = K.reference_int8_matmul(h, q, d, mn)
    scale = np.abs(h).sum(axis=1).max() * np.abs(w).max()
    np.testing.assert_allclose(y, ref, rtol=0, atol=float(scale) * 2e-6)


@needs_kernel
def test_gated_mlp_int8_uses_the_fused_down_projection():
    from flax import nnx
    from aphrodite_jax.layers.mlp import GatedMLP

    mlp = GatedMLP(64, 96, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    mlp.gate_up.quantize(Int8Blocks, "cpu_kernel")
    mlp.down.quantize(Int8Blocks, "cpu_kernel")
    y = np.asarray(jax.jit(lambda a: mlp(a))(jnp.asarray(x)))
    gu = np.asarray(mlp.gate_up(jnp.asarray(x)))
    unfused = np.asarray(mlp.down.weight.matmul(jnp.asarray(K.silu_mul_reference(gu))))
    np.testing.assert_allclose(y, unfused, rtol=1e-5, atol=1e-6)


def _q8_0(k, n, seed=2):
    """Weights as a GGUF Q8_0 tensor dequantizes to: w = d8 * q8 per block of 32, d8 f16, q8 in -127..127."""
    rng = np.random.default_rng(seed)
    q8 = rng.integers(-127, 128, size=(k, n)).astype(np.float32)
    q8[0::32] = 127  # the block's max, as Q8_0's scale is amax / 127
    d8 = rng.uniform(1e-3, 1e-2, size=(k // 32, 1, n)).astype(np.float16).astype(np.float32)
    return (q8.reshape(k // 32, 32, n) * d8).reshape(k, n)


def test_q8_0_blocks_are_exact():
    w = _q8_0(96, 40)
    q, d, mn = K.q8_0_blocks(w)
    np.testing.assert_array_equal(K.dequantize_blocks(q, d, mn, 96), w)
    assert np.array_equal(d.astype(np.float16).astype(np.float32), d) and np.array_equal(mn, -128 * d)
    assert K.q8_0_blocks(_case(1, 64, 8)[1]) is None  # generic weights: the asymmetric grid
    assert K.q8_0_blocks(_q4_1(64, 8)[0]) is None


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 576, 49152), (32, 576, 1000), (7, 64, 17)])
def test_int8_weight_q8_0_exact_with_f16_scales(m, k, n):
    w = _q8_0(k, n, seed=m)
    lw = Int8Blocks.from_dense(w, "cpu_kernel")
    assert lw.half and not lw.w4 and lw.dm[...].dtype == jnp.float16
    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    y = np.asarray(jax.jit(lambda a: lw.matmul(a))(jnp.asarray(x)))
    q, d, mn = K.q8_0_blocks(w)
    ref = K.reference_int8_matmul(x, q, d, mn)
    scale = np.abs(x).sum(axis=1).max() * np.abs(w).max()
    np.testing.assert_allclose(y, ref, rtol=0, atol=float(scale) * 2e-6)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 1e-4  # only the activations are approximate
