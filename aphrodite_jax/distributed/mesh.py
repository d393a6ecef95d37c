"""The 1-D device mesh ('model',): tensor parallelism runs over 'model'."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import jax
from jax.sharding import Mesh

MODEL_AXIS = "model"


def make_mesh(tp_size: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (tp_size,) mesh over the first tp_size devices (the default backend's when not given)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got tp={tp_size}")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < tp_size:
        raise ValueError(f"mesh ({tp_size},) needs {tp_size} devices, only {len(devices)} available")
    return Mesh(np.array(devices[:tp_size], dtype=object), (MODEL_AXIS,))


def mesh_tp_size(mesh: Optional[Mesh]) -> int:
    """Size of the 'model' axis (1 when there is no mesh)."""
    if mesh is None:
        return 1
    return int(mesh.shape[MODEL_AXIS])
