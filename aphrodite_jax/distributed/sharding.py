"""Logical axis names -> mesh axes.

Model code annotates every weight with logical axis names (`embed`, `heads`, `kv_heads`, `mlp`, `vocab`,
or None) as `nnx.Param(..., logical_axes=(...))`; it never names devices. This table maps them onto the
('model',) mesh. Changing a sharding strategy means changing this table only.

A model whose dimension does not divide evenly by the TP size annotates it with None (replicated) instead
of the logical name; `shard_dim_if_divisible` is the helper for that decision.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aphrodite_jax.distributed.mesh import MODEL_AXIS

LOGICAL_RULES: dict[str, Optional[str]] = {
    "embed": None,  # hidden size: replicated
    "heads": MODEL_AXIS,  # attention heads (q, and the fused q|k|v columns)
    "kv_heads": MODEL_AXIS,  # KV heads (KV cache axis 2)
    "mlp": MODEL_AXIS,  # intermediate size
    "vocab": MODEL_AXIS,  # vocabulary
}


def logical_to_spec(axes: Sequence[Optional[str]], rules: Mapping[str, Optional[str]] = LOGICAL_RULES) -> P:
    """PartitionSpec for a tuple of logical names; raises if two dims land on the same mesh axis."""
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
        out.append(rules[name])
    used = [a for a in out if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {tuple(axes)} map two dims onto one mesh axis: {tuple(out)}")
    return P(*out)


def named_sharding(mesh: Mesh, axes: Sequence[Optional[str]],
                   rules: Mapping[str, Optional[str]] = LOGICAL_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def shard_dim_if_divisible(name: str, size: int, tp_size: int) -> Optional[str]:
    """`name` when `size` splits evenly over tp_size devices, else None (replicate that dim)."""
    return name if tp_size > 1 and size % tp_size == 0 else None


def plan_attention(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """How attention is split over tp_size devices: (attn_tp, stored_kv_heads).

    attn_tp is tp_size when every device can own whole q heads together with the KV heads they read:
    num_heads % tp == 0 and either num_kv_heads % tp == 0, or tp % num_kv_heads == 0 in which case each
    KV head is repeated tp/num_kv_heads times (stored_kv_heads = tp, one per device). Otherwise
    (e.g. 9 q heads on 4 devices) attention is replicated: attn_tp = 1, the q/k/v/o weights and the KV
    cache are whole on every device and only the MLP and vocabulary are split.
    """
    if tp_size <= 1:
        return 1, num_kv_heads
    if num_heads % tp_size != 0:
        return 1, num_kv_heads
    if num_kv_heads % tp_size == 0:
        return tp_size, num_kv_heads
    if tp_size % num_kv_heads == 0:
        return tp_size, tp_size
    return 1, num_kv_heads
