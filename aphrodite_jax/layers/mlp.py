"""Gated MLP (SwiGLU, GeGLU) with gate and up fused into one matmul.

Fused column layout, for an MLP split over m = tp devices (m = 1 when the intermediate size does not
divide): [m, 2, I/m] flattened, i.e. each device's contiguous column block holds [its gate | its up], so
sharding the fused weight's columns over 'model' gives every device matching gate/up halves.
"""
from __future__ import annotations

import numpy as np
import jax
from flax import nnx

from aphrodite_jax.distributed.sharding import shard_dim_if_divisible
from aphrodite_jax.layers.activation import activation_name, get_activation
from aphrodite_jax.layers.linear import Linear
from aphrodite_jax.layers.loading import load_fused, load_linear


def fuse_gate_up(gate: np.ndarray, up: np.ndarray, m: int) -> np.ndarray:
    """HF gate/up [I, H] (torch layout) -> fused [H, m*2*(I/m)] in the layout above. Biases [I] -> [m*2*(I/m)]."""
    inter, rest = gate.shape[0], gate.shape[1:]
    both = np.stack([gate.reshape(m, inter // m, *rest), up.reshape(m, inter // m, *rest)], axis=1)  # [m, 2, I/m, H]
    return both.reshape(2 * inter, *rest).T


class GatedMLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs, tp_size: int = 1,
                 act: str = "silu", bias: bool = False):
        self.act = activation_name(act)
        mlp_axis = shard_dim_if_divisible("mlp", intermediate, tp_size)
        self.m = tp_size if mlp_axis is not None else 1
        self.intermediate = intermediate
        self.gate_up = Linear(hidden, 2 * intermediate, use_bias=bias, dtype=dtype, rngs=rngs, axes=("embed", mlp_axis))
        self.down = Linear(intermediate, hidden, use_bias=bias, dtype=dtype, rngs=rngs, axes=(mlp_axis, "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, H]
        t = x.shape[0]
        gu = self.gate_up(x)  # [T, 2I]
        if self.m == 1:  # gate | up: the layout a fused epilogue reads
            y = self.down.fused_gate_matmul(gu, self.act)  # e.g. int8 on the CPU: SiLU * up inside the down matmul
            if y is not None:
                return y
        gu = gu.reshape(t, self.m, 2, self.intermediate // self.m)  # [T, m, 2, I/m]
        h = get_activation(self.act)(gu[:, :, 0]) * gu[:, :, 1]  # [T, m, I/m]
        return self.down(h.reshape(t, self.intermediate))  # [T, H]

    def load_hf(self, rel: str, value, session, full_name: str) -> None:
        """gate_proj/up_proj (weight and bias) fuse into gate_up once both are in; down_proj loads as is."""
        proj, _, kind = rel.partition(".")
        if proj == "down_proj":
            return load_linear(self.down, kind, value, session, full_name)
        load_fused(self.gate_up, kind, proj, value, ("gate_proj", "up_proj"),
                   lambda parts, _: fuse_gate_up(parts["gate_proj"], parts["up_proj"], self.m), session, full_name)
