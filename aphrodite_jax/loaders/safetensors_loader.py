"""Tensor-by-tensor reader for an HF folder's safetensors (one file or shards + index.json).

Tensors come back as numpy in HF names and layout. bf16 is read through safetensors' numpy backend,
which yields `ml_dtypes.bfloat16` arrays (numpy has no native bf16); the model casts them to its dtype
as each tensor is placed on device, so only one tensor is on the host at a time.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np


def safetensors_files(folder: str) -> list[str]:
    """The shard files in index order (or the single model file, or every *.safetensors)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return files


def count_safetensors_weights(folder: str) -> int:
    from safetensors import safe_open
    total = 0
    for path in safetensors_files(folder):
        with safe_open(path, framework="np") as f:
            total += len(list(f.keys()))
    return total


def iter_safetensors_weights(folder: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_name, np.ndarray) one tensor at a time, shard by shard."""
    from safetensors import safe_open
    for path in safetensors_files(folder):
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
