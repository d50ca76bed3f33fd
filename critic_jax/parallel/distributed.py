"""Multi-host start-up and per-host data -> global arrays.

On a TPU pod slice or a multi-node GPU job every host runs the same program;
`maybe_initialize` calls `jax.distributed.initialize()` (which discovers the
coordinator from the TPU/SLURM/Open MPI environment, or takes it from the
config), after which `jax.devices()` spans all hosts. Each host feeds only its
own rows of every batch (`host_rows`), and `make_global_batch` assembles them
into global arrays sharded over the mesh's batch axes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from critic_jax.parallel.mesh import batch_sharding

__all__ = ["maybe_initialize", "host_rows", "make_global_batch", "is_main_process", "to_host"]

log = logging.getLogger(__name__)
_INITIALIZED = False


def maybe_initialize(dist_cfg: Mapping[str, Any] | None = None) -> None:
  """Initialises multi-host JAX once, if the config or the environment asks for it.

  `dist_cfg` keys: `enabled` (bool, or "auto": only when a cluster environment
  is detected), `coordinator_address`, `num_processes`, `process_id`,
  `local_device_ids`, `cpu_collectives` ("gloo" to run several CPU processes).
  """
  global _INITIALIZED
  if _INITIALIZED:
    return
  cfg = dict(dist_cfg or {})
  enabled = cfg.get("enabled", "auto")
  env_hint = any(
    k in os.environ
    for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_ID",
              "MEGASCALE_COORDINATOR_ADDRESS")
  )  # fmt: skip
  if enabled == "auto":
    enabled = bool(cfg.get("coordinator_address")) or env_hint
  if not enabled:
    return
  if cfg.get("cpu_collectives"):
    jax.config.update("jax_cpu_collectives_implementation", cfg["cpu_collectives"])
  kwargs = {
    k: cfg[k]
    for k in ("coordinator_address", "num_processes", "process_id", "local_device_ids")
    if cfg.get(k) is not None
  }
  jax.distributed.initialize(**kwargs)
  _INITIALIZED = True
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())  # fmt: skip


def is_main_process() -> bool:
  return jax.process_index() == 0


def host_rows(global_batch_size: int) -> slice:
  """The rows of a global batch that this host feeds (contiguous, equal shares)."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by {n} processes")
  per = global_batch_size // n
  i = jax.process_index()
  return slice(i * per, (i + 1) * per)


def make_global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's rows into global arrays sharded over the batch axes.

  Every array's leading dim is this host's share of the global batch.
  """
  out = {}
  n = jax.process_count()
  for k, v in local.items():
    v = np.asarray(v)
    sharding = batch_sharding(mesh, v.ndim)
    global_shape = (v.shape[0] * n,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array as numpy, on every host."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
