"""Device mesh and logical-axis sharding rules (tensor parallelism over the 'model' mesh axis)."""
from aphrodite_jax.distributed.mesh import MODEL_AXIS, make_mesh, mesh_tp_size
from aphrodite_jax.distributed.sharding import (
    LOGICAL_RULES,
    logical_to_spec,
    named_sharding,
    plan_attention,
    shard_dim_if_divisible,
)

__all__ = ["MODEL_AXIS", "make_mesh", "mesh_tp_size", "LOGICAL_RULES", "logical_to_spec",
           "named_sharding", "plan_attention", "shard_dim_if_divisible"]
