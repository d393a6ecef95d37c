"""SwiGLU MLP with gate and up fused into one matmul.

Fused column layout, for an MLP split over m = tp devices (m = 1 when the intermediate size does not
divide): [m, 2, I/m] flattened, i.e. each device's contiguous column block holds [its gate | its up], so
sharding the fused weight's columns over 'model' gives every device matching gate/up halves.
"""
from __future__ import annotations

import numpy as np
import jax
from flax import nnx

from aphrodite_jax.distributed.sharding import shard_dim_if_divisible
from aphrodite_jax.layers.linear import Linear


def fuse_gate_up(gate: np.ndarray, up: np.ndarray, m: int) -> np.ndarray:
    """HF gate/up [I, H] (torch layout) -> fused [H, m*2*(I/m)] in the layout above."""
    inter, hidden = gate.shape
    both = np.stack([gate.reshape(m, inter // m, hidden), up.reshape(m, inter // m, hidden)], axis=1)  # [m, 2, I/m, H]
    return both.reshape(2 * inter, hidden).T


class GatedMLP(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs, tp_size: int = 1,
                 act: str = "silu"):
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported (silu only)")
        mlp_axis = shard_dim_if_divisible("mlp", intermediate, tp_size)
        self.m = tp_size if mlp_axis is not None else 1
        self.intermediate = intermediate
        self.act = act
        self.gate_up = Linear(hidden, 2 * intermediate, use_bias=False, dtype=dtype, rngs=rngs, axes=("embed", mlp_axis))
        self.down = Linear(intermediate, hidden, use_bias=False, dtype=dtype, rngs=rngs, axes=(mlp_axis, "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, H]
        t = x.shape[0]
        gu = self.gate_up(x)  # [T, 2I]
        if self.m == 1:  # gate | up: the layout a fused epilogue reads
            y = self.down.fused_gate_matmul(gu, self.act)  # e.g. int8 on the CPU: SiLU * up inside the down matmul
            if y is not None:
                return y
        gu = gu.reshape(t, self.m, 2, self.intermediate // self.m)  # [T, m, 2, I/m]
        h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]  # [T, m, I/m]
        return self.down(h.reshape(t, self.intermediate))  # [T, H]
