"""Meshes, logical-axis sharding rules, sharded init and multi-host data."""

from critic_jax.parallel.distributed import (
  host_rows,
  is_main_process,
  make_global_batch,
  maybe_initialize,
  to_host,
)
from critic_jax.parallel.mesh import (
  BATCH_AXES,
  DEFAULT_RULES,
  MESH_AXES,
  batch_sharding,
  logical_to_sharding,
  make_mesh,
  mesh_shape_from_config,
  replicated,
  rules_from_config,
  strip_boxes,
)

__all__ = [
  "BATCH_AXES",
  "DEFAULT_RULES",
  "MESH_AXES",
  "batch_sharding",
  "host_rows",
  "is_main_process",
  "logical_to_sharding",
  "make_global_batch",
  "make_mesh",
  "maybe_initialize",
  "mesh_shape_from_config",
  "replicated",
  "rules_from_config",
  "strip_boxes",
  "to_host",
]
