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
  "graft_params",
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


def _init_source(init_cfg, field: str) -> str:
  return str(init_cfg.get(field, "") or "") if init_cfg is not None else ""


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None) -> ModelConfig:
  """`config.model` -> ModelConfig; checks the vocabulary covers the tokenizer's.

  With `config.init.hf_path` set, the architecture (sizes, norms, RoPE, biases,
  vocabulary) comes from that Hugging Face folder and `config.model` only picks
  the runtime fields (heads, dtypes, remat, scan_layers, attention_impl).
  """
  mcfg = ModelConfig.from_dict(config.model, where="config.model")
  where = "config.model.vocab_size"
  hf_path = _init_source(config.get("init"), "hf_path")
  if hf_path:
    from critic_jax.interop import model_config_from_hf

    mcfg = model_config_from_hf(hf_path, mcfg)
    where = f"the vocab_size of {hf_path}/config.json (config.init.hf_path)"
  if vocab_size is not None and mcfg.vocab_size < vocab_size:
    raise ValueError(
      f"{where}={mcfg.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})"
    )
  return mcfg


def build_model(mcfg: ModelConfig) -> tuple[Transformer, Callable[[jax.Array], Any]]:
  """The model and a boxed-params initialiser `rng -> params` for sharded init."""
  model = Transformer(mcfg)
  dummy = np.zeros((1, 8), np.int32)

  def init_params(rng):
    return model.init(rng, dummy)["params"]

  return model, init_params


def graft_params(target: Any, source: Any, shardings: Any) -> tuple[Any, int]:
  """Puts `source` (one model's params) into every matching sub-tree of `target`.

  Walks `target` (a trainer's params: one Transformer, `{"trunk", "head"}`, or
  `{"A": ..., "B": ...}` for two reward models): where a dict's keys are all in
  `source` the walk goes down both trees together; elsewhere it looks for
  `source` further down. A leaf is replaced when the shapes agree (cast to the
  target dtype and placed in the target sharding); a leaf `source` lacks (e.g. a
  head only the trainer has) keeps its fresh value.

  Returns:
    (the grafted params, number of leaves replaced).
  """
  count = 0

  def walk(t, s, sh):
    nonlocal count
    if isinstance(t, dict) and isinstance(s, dict):
      if set(t) <= set(s):
        return {k: walk(t[k], s[k], sh[k]) for k in t}
      return {k: walk(t[k], s, sh[k]) for k in t}
    if not isinstance(t, dict) and not isinstance(s, dict) and t.shape == s.shape:
      count += 1
      return jax.device_put(s.astype(t.dtype), sh)
    return t

  return walk(target, source, shardings), count


def fresh_state(
  init_params, tx, seed: int, mesh: Mesh, rules, init_cfg=None, mcfg: ModelConfig | None = None
) -> tuple[TrainState, Any]:
  """A sharded fresh state whose params may come from elsewhere.

  `config.init.checkpoint` (a critic_jax workdir) replaces the params outright;
  `config.init.hf_path` (a local transformers folder, see `critic_jax.interop`)
  is loaded shard by shard for `mcfg` (from `model_config_from`) and grafted
  into every sub-model of the params (`graft_params`). Both reset the
  optimizer state to its init for the new params.

  Returns (state, state shardings).
  """
  state, shardings = init_train_state(init_params, tx, jax.random.PRNGKey(seed), mesh, rules)
  source = _init_source(init_cfg, "checkpoint")
  hf_path = _init_source(init_cfg, "hf_path")
  if source and hf_path:
    raise ValueError(f"config.init: set checkpoint ({source!r}) or hf_path ({hf_path!r}), not both")
  params = None
  if source:
    abstract = abstract_with_shardings(state.params, shardings.params)
    params = load_params(source, abstract)
    log.info("initialised params from the checkpoint in %s", source)
  elif hf_path:
    if mcfg is None:
      raise ValueError("config.init.hf_path needs the model config built by model_config_from")
    from critic_jax.interop import load_hf_params

    hf = load_hf_params(hf_path, mcfg, mesh, rules, rng=jax.random.PRNGKey(seed + 1))
    params, n = graft_params(state.params, hf, shardings.params)
    if n == 0:
      raise ValueError(
        f"config.init.hf_path={hf_path!r}: no parameter of the checkpoint matches this "
        f"trainer's params (top-level keys {sorted(state.params)})"
      )
    total = len(jax.tree.leaves(state.params))
    log.info("initialised %d of %d param arrays from the HF checkpoint in %s", n, total, hf_path)
  if params is not None:
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    state = state.replace(params=params, opt_state=opt_state)
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
  init_params,
  tx,
  seed: int,
  mesh: Mesh,
  rules,
  ckpt: Checkpointer | None,
  init_cfg=None,
  mcfg: ModelConfig | None = None,
) -> tuple[TrainState, Any, dict | None]:
  """Sharded fresh init (see `fresh_state`), or the latest checkpoint in the same shardings.

  Returns (state, state shardings, data iterator state or None when fresh).
  """
  state, shardings = fresh_state(init_params, tx, seed, mesh, rules, init_cfg, mcfg)
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
