"""runner/packing.py: a pytree of small arrays travels as one int32 buffer and comes back bit-exact."""
import jax
import numpy as np
import pytest

from aphrodite_jax.runner.packing import pack, unpack
from aphrodite_jax.sampling.metadata import SamplingRow, make_sampling_metadata
from aphrodite_jax.sampling_params import SamplingParams


def _tree():
    rng = np.random.default_rng(0)
    return {"f": np.array([1.5, -np.inf, np.nan, 3e-38], np.float32),
            "u": np.array([[0, 2**32 - 1], [7, 2**31]], np.uint32),
            "b": np.array([True, False, True]),
            "i": rng.integers(-2**31, 2**31 - 1, (2, 3, 4), dtype=np.int32),
            "nested": [np.zeros((0,), np.float32), np.array(5, np.int32)]}


def test_round_trip_inside_jit_is_bit_exact():
    tree = _tree()
    packed = pack(tree)
    assert packed.buf.dtype == np.int32 and packed.buf.size == packed.layout.size == 4 + 4 + 3 + 24 + 0 + 1
    assert jax.tree.leaves(packed) == [packed.buf]  # one leaf: one transfer
    out = jax.jit(unpack)(jax.device_put(packed))
    for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    assert jax.tree.structure(out) == jax.tree.structure(tree)


def test_layout_is_static_and_stable():
    a, b = pack(_tree()), pack(_tree())
    assert a.layout == b.layout and hash(a.layout) == hash(b.layout)
    t = _tree()
    t["i"] = np.zeros((2, 3, 5), np.int32)
    assert pack(t).layout != a.layout  # a new shape is a new layout (a new variant, never a wrong unpack)


def test_sampling_metadata_round_trip():
    rows = [SamplingRow(SamplingParams(temperature=0.7, top_k=5, logit_bias={3: 2.0}, seed=9), 4, 2,
                        (1, 2, 3), (4, 5)),
            SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.1, min_tokens=3), 0, 1, (9,), (7,))]
    md = make_sampling_metadata(rows, 8, 100, eos_token_ids=(2,), bias_width=16, allowed_width=16,
                                dry_width=16, history_width=32)
    out = jax.jit(unpack)(jax.device_put(pack(md)))
    for want, got in zip(jax.tree.leaves(md), jax.tree.leaves(out)):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_rejects_other_widths():
    with pytest.raises(TypeError, match="float64"):
        pack({"x": np.zeros(2, np.float64)})
