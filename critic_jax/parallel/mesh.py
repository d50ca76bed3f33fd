"""Device mesh and logical-to-mesh sharding rules, both read from the config.

The mesh always has the axes ("data", "fsdp", "tensor"); any of them may have
size 1. Batch dimensions are split over ("data", "fsdp"), parameters over
"fsdp" (ZeRO-3 style) and "tensor" (Megatron style), as the rules say.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "MESH_AXES",
  "BATCH_AXES",
  "DEFAULT_RULES",
  "make_mesh",
  "mesh_shape_from_config",
  "rules_from_config",
  "logical_to_sharding",
  "batch_sharding",
  "replicated",
  "strip_boxes",
]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Parameters: embed over fsdp, the "wide" dims over
# tensor. Activations (act_*): batch over data+fsdp, heads/mlp/vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("act_batch", BATCH_AXES),
  ("act_length", None),
  ("act_cache_length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),
  ("act_head_dim", None),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("norm", None),
  ("pos", None),
  ("head_out", None),
)

log = logging.getLogger(__name__)


def mesh_shape_from_config(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves {"data": -1, "fsdp": 2, "tensor": 1} against the device count.

  At most one axis may be -1 (takes the remaining devices). Unknown axis names
  and shapes that do not multiply to the device count raise.
  """
  mesh_cfg = dict(mesh_cfg)
  for k in mesh_cfg:
    if k not in MESH_AXES:
      raise KeyError(f"unknown mesh axis config.mesh.{k}; mesh axes are {MESH_AXES}")
  shape = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in shape.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
  fixed = int(np.prod([s for s in shape.values() if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"config.mesh {shape}: {num_devices} devices are not divisible by the fixed axes ({fixed})"
      )
    shape[free[0]] = num_devices // fixed
  if int(np.prod(list(shape.values()))) != num_devices:
    raise ValueError(f"config.mesh {shape} needs {np.prod(list(shape.values()))} devices, "
                     f"have {num_devices}")  # fmt: skip
  return shape


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """Builds a Mesh over ("data", "fsdp", "tensor") with Auto axis types.

  Auto axes let the compiler propagate shardings from the constraints the model
  names, which is what the logical-axis rules rely on.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_from_config(mesh_cfg or {"data": -1}, len(devices))
  dims = tuple(shape[a] for a in MESH_AXES)
  if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))  # fmt: skip


def rules_from_config(rules: Sequence | None) -> tuple[tuple[str, Any], ...]:
  """Normalises rules from a config (lists from the CLI/JSON become tuples)."""
  if rules is None:
    return DEFAULT_RULES
  known = [n for n, _ in DEFAULT_RULES]  # every logical axis the models name
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"config.sharding_rules: rule {item!r} must be (logical_axis, mesh_axes)")
    name, axes = item
    if name not in known:
      close = difflib.get_close_matches(str(name), known, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ValueError(
        f"config.sharding_rules: rule {item!r} names unknown logical axis {name!r}{hint} "
        f"(known: {', '.join(known)})"
      )
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in axes if isinstance(axes, tuple) else (axes,):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"config.sharding_rules: rule {item!r} names unknown mesh axis {a!r}")
    out.append((name, axes))
  return tuple(out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
  """Drops mesh axes from dims they do not divide (e.g. 2 kv heads over tensor=4)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in names]))
    if dim % size:
      log.warning("replicating dim of size %d of %s: not divisible by mesh axes %s (%d)",
                  dim, where, names, size)  # fmt: skip
      fitted.append(None)
    else:
      fitted.append(axes)
  return P(*fitted)


def strip_boxes(tree: Any) -> Any:
  """Removes `nn.LogicallyPartitioned` boxes without applying sharding constraints."""

  def unbox(x):
    return x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x

  return jax.tree.map(unbox, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_to_sharding(abstract_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
  """NamedShardings for a (possibly boxed) abstract pytree from its logical axis names.

  Leaves boxed with `nn.LogicallyPartitioned` are mapped through `rules`; other
  leaves are replicated. The result has the structure of `nn.unbox(abstract_tree)`.
  """
  logical = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = strip_boxes(abstract_tree)
  paths = jax.tree_util.tree_flatten_with_path(shapes)[0]
  spec_leaves = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
  if len(paths) != len(spec_leaves):
    raise ValueError("internal error: spec tree does not match the abstract tree")
  shardings = [
    NamedSharding(mesh, _fit_spec(s, tuple(leaf.shape), mesh, jax.tree_util.keystr(path)))
    for (path, leaf), s in zip(paths, spec_leaves, strict=True)
  ]
  return jax.tree.unflatten(jax.tree.structure(shapes), shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
