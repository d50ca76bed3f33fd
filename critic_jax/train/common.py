"""Pieces every trainer shares: mesh set-up, model building, resume, batches, logging loop."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from critic_jax.models import ModelConfig, Transformer
from critic_jax.parallel import (
  host_rows,
  make_global_batch,
  make_mesh,
  maybe_initialize,
  rules_from_config,
)
from critic_jax.train.checkpoint import Checkpointer, load_params
from critic_jax.train.state import TrainState, abstract_with_shardings, init_train_state

__all__ = [
  "setup_mesh",
  "model_config_from",
  "build_model",
  "fresh_state",
  "init_or_restore",
  "maybe_restore",
  "BatchFeeder",
  "save_config",
]

log = logging.getLogger(__name__)


def setup_mesh(config: ml_collections.ConfigDict) -> tuple[Mesh, tuple]:
  """Starts multi-host JAX if asked, then builds the mesh and sharding rules from config."""
  dist = config.get("distributed", None)
  maybe_initialize(dist.to_dict() if dist is not None else None)
  mesh = make_mesh(config.mesh.to_dict() if "mesh" in config else None)
  rules = rules_from_config(config.get("sharding_rules", None))
  log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  return mesh, rules


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None) -> ModelConfig:
  """`config.model` -> ModelConfig; checks the vocabulary covers the tokenizer's."""
  mcfg = ModelConfig.from_dict(config.model, where="config.model")
  if vocab_size is not None and mcfg.vocab_size < vocab_size:
    raise ValueError(
      f"config.model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's "
      f"vocabulary ({vocab_size})"
    )
  return mcfg


def build_model(mcfg: ModelConfig) -> tuple[Transformer, Callable[[jax.Array], Any]]:
  """The model and a boxed-params initialiser `rng -> params` for sharded init."""
  model = Transformer(mcfg)
  dummy = np.zeros((1, 8), np.int32)

  def init_params(rng):
    return model.init(rng, dummy)["params"]

  return model, init_params


def fresh_state(
  init_params, tx, seed: int, mesh: Mesh, rules, init_cfg=None
) -> tuple[TrainState, Any]:
  """A sharded fresh state; `config.init.checkpoint` (a critic_jax workdir) replaces its params.

  Returns (state, state shardings).
  """
  state, shardings = init_train_state(init_params, tx, jax.random.PRNGKey(seed), mesh, rules)
  source = (init_cfg or {}).get("checkpoint", "") if init_cfg is not None else ""
  if source:
    abstract = abstract_with_shardings(state.params, shardings.params)
    params = load_params(source, abstract)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    state = state.replace(params=params, opt_state=opt_state)
    log.info("initialised params from the checkpoint in %s", source)
  return state, shardings


def maybe_restore(
  state: TrainState, shardings, ckpt: Checkpointer | None
) -> tuple[TrainState, dict | None]:
  """The latest checkpoint in `ckpt`, restored into `shardings`, or `state` when there is none."""
  step = ckpt.latest_step() if ckpt is not None else None
  if step is None:
    return state, None
  log.info("resuming from checkpoint step %d in %s", step, ckpt.directory)
  return ckpt.restore(step, abstract_with_shardings(state, shardings))


def init_or_restore(
  init_params, tx, seed: int, mesh: Mesh, rules, ckpt: Checkpointer | None, init_cfg=None
) -> tuple[TrainState, Any, dict | None]:
  """Sharded fresh init (see `fresh_state`), or the latest checkpoint in the same shardings.

  Returns (state, state shardings, data iterator state or None when fresh).
  """
  state, shardings = fresh_state(init_params, tx, seed, mesh, rules, init_cfg)
  state, data_state = maybe_restore(state, shardings, ckpt)
  return state, shardings, data_state


class BatchFeeder:
  """Pulls global batches from a grain iterator and hands this host's rows to the mesh.

  Every host iterates the same global stream (so the data order does not depend
  on the number of hosts) and keeps rows `host_rows(B)`; `make_global_batch`
  stitches the hosts' rows into arrays sharded over the batch axes. `extra`
  (batch -> more fields, e.g. cached reference log-probs) runs on the host.
  """

  def __init__(self, dataset, mesh: Mesh, global_batch: int, state: dict | None = None,
               extra: Callable[[dict], dict] | None = None):  # fmt: skip
    self.mesh = mesh
    self.rows = host_rows(global_batch)
    self.extra = extra
    self._it = iter(dataset)
    if state:
      self._it.set_state(state)

  def next(self) -> tuple[dict[str, jax.Array], int]:
    """(global batch, number of real tokens in it)."""
    batch = dict(next(self._it))
    if self.extra is not None:
      batch.update(self.extra(batch))
    local = {k: np.asarray(v)[self.rows] for k, v in batch.items()}
    tokens = sum(
      int(np.sum(np.asarray(v) != 0)) for k, v in batch.items() if k.endswith("segment_ids")
    )
    return make_global_batch(local, self.mesh), tokens

  def get_state(self) -> dict:
    return self._it.get_state()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
