"""The quantization hook and the registry of weight formats, keyed by the `--quantization` name.

`quantize_model` runs once after the fp32 weights are loaded (models/loader.py) and replaces the weights of
every Linear (qkv, o_proj, gate_up, down, an untied lm_head) and the tied embedding's LM head by the
format's weight type (aphrodite_jax/layers/weights.py). A new format is one WeightType subclass and one line
in FORMATS (its name also goes into config.QUANTIZATIONS, the flag's choices).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from flax import nnx

from aphrodite_jax.layers.embed import Embedding
from aphrodite_jax.layers.int8_weights import Int8Blocks
from aphrodite_jax.layers.linear import Linear
from aphrodite_jax.layers.weights import WeightType

logger = logging.getLogger(__name__)

FORMATS: dict[str, type[WeightType]] = {
    "int8": Int8Blocks,  # 8-bit blocks (4-bit where a matrix is on that grid); layers/int8_weights.py
}


def get_format(method: str) -> type[WeightType]:
    """The weight type of a `--quantization` name; an unknown name is a ValueError naming the known ones."""
    try:
        return FORMATS[method]
    except KeyError:
        raise ValueError(f"quantization {method!r} is not supported; choose one of {tuple(FORMATS)}") from None


def quantize_model(model, method: str, mode: Optional[str] = None) -> Optional[str]:
    """Replace the model's matmul weights by `method`'s weight type in place; returns the backend used (None:
    left fp32). mode: the format's backend (e.g. int8's "cpu_kernel" or "xla"); default: its choose_backend()."""
    fmt = get_format(method)
    if getattr(model, "mesh", None) is not None:
        raise ValueError(f"--quantization {method} with tensor or data parallelism is not supported yet")
    backend = mode or fmt.choose_backend()
    if backend is None:
        return None
    t0 = time.perf_counter()
    count = 0
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, Linear) and node.quantize(fmt, backend):
            count += 1
    if getattr(model, "lm_head", "absent") is None and isinstance(getattr(model, "embed", None), Embedding):
        model.embed.quantize_head(fmt, backend)  # tied embedding: only its attend (the LM head) is quantized
        count += 1
    mats = [node for _, node in nnx.iter_graph(model) if isinstance(node, WeightType)]
    logger.info("Quantized %d weight matrices to %s (%s) in %.1f s", count, method, fmt.summary(mats, backend),
                time.perf_counter() - t0)
    return backend
