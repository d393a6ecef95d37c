"""The 2-D device mesh ('data', 'model'): tensor parallelism runs over 'model'."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import jax
from jax.sharding import Mesh

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(tp_size: int = 1, dp_size: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (dp_size, tp_size) mesh over the first dp*tp devices (the default backend's when not given)."""
    if tp_size < 1 or dp_size < 1:
        raise ValueError(f"tp_size and dp_size must be >= 1, got tp={tp_size} dp={dp_size}")
    devices = list(jax.devices() if devices is None else devices)
    need = tp_size * dp_size
    if len(devices) < need:
        raise ValueError(f"mesh ({dp_size}, {tp_size}) needs {need} devices, only {len(devices)} available")
    grid = np.array(devices[:need], dtype=object).reshape(dp_size, tp_size)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def mesh_tp_size(mesh: Optional[Mesh]) -> int:
    """Size of the 'model' axis (1 when there is no mesh)."""
    if mesh is None:
        return 1
    return int(mesh.shape[MODEL_AXIS])
