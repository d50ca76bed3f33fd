"""Reward-model training: Bradley-Terry, GPM, and CRM (two peer-reviewing RMs); sharded, resumable.

    python scripts/train.py --config=configs/reward_bt.py --workdir=runs/reward_bt
    python scripts/train.py --config=configs/reward_gpm_cyclic.py --workdir=runs/gpm_cyclic
    python scripts/train.py --config=configs/reward_crm_noise.py --workdir=runs/crm_noise

`config.loss` picks the objective from `critic_jax.critics.REWARD_OBJECTIVES`, with the keys of
`config.bt`, `config.gpm` or `config.crm` as its arguments:
  "bt":  scalar RM, L = -mean log sigma((r_w - r_l - m) / tau)   (Stiennon et al., 2009.01325)
  "gpm": GPM head, L = -mean log sigma((s(y_w > y_l) - m) / tau) (Zhang et al., 2410.02197)
  "crm": two scalar RMs A and B trained together; each keeps the ceil(rho B) pairs it finds
         easiest (lowest BT loss) and those train the *other* one (Zhang et al., 2505.10597),
         with an easy-to-hard epoch curriculum by the two RMs' mean margin.
Spec: `shared/specs/preference-and-reward.md` §1, §3, §4.

Sections of `train_and_evaluate`: mesh, data, model and optimizer, sharded init or resume,
the jitted step, evaluation, the loop, and reward centring (Stiennon: the bias b = mean reward
of reference responses, served as r - b).

Config keys (see configs/reward_bt.py `reward_config`):
  trainer="reward_model", seed, loss ("bt" | "gpm" | "crm");
  bt.{margin, tau}; gpm.{k, tau, gate, normalize, margin, gate_scale, gate_temperature};
  crm.{noise_rate (eta_hat; keep ratio 1 - eta_hat), ramp_steps (0 = no ramp), curriculum,
    selection ("peer" | "self")};
  model.* (ModelConfig; "bt"/"crm" need "reward" in model.heads, "gpm" uses the trunk only);
  tokenizer.{name, path};
  data.{source ("task" | "jsonl"), task, task_kwargs (PREFERENCE_TASKS), jsonl_path,
    eval_jsonl_path, seq_len, batch_size};
  centering.{enabled, reference_jsonl_path (prompt/response JSONL; default: the task's
    reference responses)};
  init.checkpoint (a critic_jax workdir whose params, same tree, start the run);
  optimizer.* (train/optim.py; accum_steps > 1 only for bt/gpm), train.* (num_steps, log_every,
  eval_every, ckpt_every, keep_checkpoints, async_checkpoint, progress_bar), eval.batch_size,
  mesh.*, sharding_rules, distributed.*.
Metrics (train/ every log step, eval/ on the held-out pairs): loss, accuracy, margin (GPM:
score), chosen_reward / rejected_reward (per RM for CRM), grad_norm, lr, param_norm; for CRM
also loss_A/B, keep_ratio, num_selected, selection_overlap and, when the data knows its flipped
labels, clean_fraction_batch and clean_fraction_trains_A/B. After training: reward_bias
(reward_bias_A/B for CRM), also written to <workdir>/reward_bias.json.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from critic_jax.critics.objectives import REWARD_OBJECTIVES
from critic_jax.data import load_sft_jsonl, make_tokenizer
from critic_jax.data.preference import load_preference_jsonl
from critic_jax.data.preference_tasks import PreferenceData, make_preference_task
from critic_jax.eval.pairwise import PairwiseEvaluator, encode_pairs, score_pairs, score_responses
from critic_jax.losses import curriculum_order, reward_bias
from critic_jax.models import ModelConfig
from critic_jax.parallel import batch_sharding, host_rows, make_global_batch
from critic_jax.train.checkpoint import Checkpointer
from critic_jax.train.common import init_or_restore, model_config_from, save_config, setup_mesh
from critic_jax.train.loop import train_loop
from critic_jax.train.metrics import MetricWriter
from critic_jax.train.optim import make_optimizer
from critic_jax.train.state import TrainState

__all__ = [
  "PairFeeder",
  "make_objective",
  "make_train_step",
  "make_tx",
  "per_model_optimizer",
  "reward_centring",
  "train_and_evaluate",
]

log = logging.getLogger(__name__)


# --- optimizer and step ---------------------------------------------------------------


def per_model_optimizer(
  txs: dict[str, optax.GradientTransformation],
) -> optax.GradientTransformation:
  """Applies `txs[name]` to `params[name]` with its own state (so its own gradient clipping).

  Like `optax.multi_transform` with one label per top-level key, but the state is
  `{name: txs[name].init(params[name])}` without `MaskedNode` placeholders: those end up inside
  the params' `LogicallyPartitioned` boxes and break the logical-axis shardings of the state.
  """

  def init(params):
    return {k: tx.init(params[k]) for k, tx in txs.items()}

  def update(updates, state, params=None):
    out, new_state = {}, {}
    for k, tx in txs.items():
      out[k], new_state[k] = tx.update(updates[k], state[k], None if params is None else params[k])
    return out, new_state

  return optax.GradientTransformation(init, update)


def make_objective(config: ml_collections.ConfigDict, mcfg: ModelConfig, knows_flips: bool = False):
  """The objective `config.loss` names, with the keys of `config[config.loss]` as arguments
  (`crm.curriculum` is the trainer's: the data order)."""
  kwargs = config[config.loss].to_dict() if config.loss in config else {}
  if config.loss == "crm":
    kwargs.pop("curriculum", None)
    kwargs["knows_flips"] = knows_flips
  try:
    return REWARD_OBJECTIVES.get(config.loss)(mcfg, **kwargs)
  except TypeError as e:
    raise TypeError(f"config.{config.loss}: {e}") from None


def make_tx(objective, opt_cfg, total_steps: int):
  """(optimizer, schedule): one optimizer, or one per RM (own state and clipping) for CRM."""
  if objective.models is None:
    return make_optimizer(opt_cfg, total_steps)
  txs = {m: make_optimizer(opt_cfg, total_steps) for m in objective.models}
  return per_model_optimizer({m: t[0] for m, t in txs.items()}), txs[objective.models[0]][1]


def make_train_step(objective, tx: optax.GradientTransformation, schedule, accum_steps: int = 1):
  """One optimizer step of `objective` on a global batch of pairs (split into `accum_steps`
  equal micro-batches for BT/GPM, whose per-pair mean losses then average exactly)."""
  if accum_steps > 1 and not objective.supports_accumulation:
    raise ValueError(f"{type(objective).__name__} ranks whole batches: accum_steps must be 1")

  def step(state: TrainState, batch: dict[str, jax.Array]):
    grad_fn = jax.value_and_grad(lambda p, mb: objective.loss(p, mb, state.step), has_aux=True)
    if accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch)
    else:
      b = batch["index"].shape[0]
      if b % accum_steps:
        raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}")
      # Row i*A + m goes to micro-batch m, so every micro-batch keeps the batch sharding.
      micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape((b // accum_steps, accum_steps) + x.shape[1:]), 0, 1),
        batch,
      )
      first = jax.tree.map(lambda x: x[0], micro)
      m_shape = jax.eval_shape(lambda: grad_fn(state.params, first)[0][1])
      zeros = (jax.tree.map(jnp.zeros_like, state.params),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape))  # fmt: skip

      def body(carry, mb):
        (_, m), g = grad_fn(state.params, mb)
        return jax.tree.map(lambda a, x: a + x / accum_steps, carry, (g, m)), None

      (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {**metrics, **objective.grad_metrics(grads), "lr": schedule(state.step),
               "param_norm": optax.tree.norm(params)}  # fmt: skip
    return new_state, metrics

  return step


# --- data --------------------------------------------------------------------------


class PairFeeder:
  """Global batches of preference pairs in epoch order, resumable, with an optional curriculum.

  Epoch 0 is a random permutation of the pairs. Each later epoch is a fresh random
  permutation, or, with `reorder`, the permutation `reorder()` returns when the epoch starts
  (CRM: easy to hard by the RMs' current margins). An epoch yields N // B batches (the
  remainder of the order is skipped). The JSON state saved with checkpoints holds the epoch,
  the position and the order itself, so a resumed run continues the same order.
  """

  def __init__(self, data: PreferenceData, tokenizer, *, seq_len: int, batch_size: int, mesh,
               seed: int, state: dict | None = None,
               reorder: Callable[[], np.ndarray] | None = None):  # fmt: skip
    n = len(data)
    if n < batch_size:
      raise ValueError(f"{n} training pairs are fewer than one batch of {batch_size}")
    self.data, self.tok, self.seq_len, self.batch_size = data, tokenizer, seq_len, batch_size
    self.mesh, self.seed, self.reorder = mesh, seed, reorder
    self.rows = host_rows(batch_size)
    if state:
      self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
      self.order = np.asarray(state["order"], np.int64)
    else:
      self.epoch, self.pos, self.order = 0, 0, self._shuffled(0)

  def _shuffled(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

  def _next_epoch(self) -> None:
    self.epoch += 1
    self.pos = 0
    order = self.reorder() if self.reorder is not None else self._shuffled(self.epoch)
    self.order = np.asarray(order, np.int64)
    if sorted(self.order.tolist()) != list(range(len(self.data))):
      raise ValueError("reorder() must return a permutation of the training pairs")

  def next(self) -> tuple[dict[str, jax.Array], int]:
    """(global batch, number of real tokens in it)."""
    if self.pos + self.batch_size > len(self.order):
      self._next_epoch()
    idx = self.order[self.pos : self.pos + self.batch_size]
    self.pos += self.batch_size
    local = encode_pairs(
      self.data.examples, idx[self.rows], self.tok, self.seq_len, self.data.flipped
    )
    tokens = int(
      np.sum(local["chosen_segment_ids"] != 0) + np.sum(local["rejected_segment_ids"] != 0)
    )
    return make_global_batch(local, self.mesh), tokens

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos, "order": self.order.tolist()}


def _data(config, tokenizer) -> tuple[PreferenceData, PreferenceData, list]:
  """(train pairs, held-out pairs, reference responses for reward centring)."""
  d = config.data
  template = getattr(tokenizer, "apply_chat_template", None)
  refs: list = []
  if d.source == "task":
    task = make_preference_task(d.task, **d.task_kwargs)
    train, evals = task.train_data(config.seed), task.eval_data(config.seed)
    if config.centering.enabled and hasattr(task, "reference_examples"):
      refs = task.reference_examples()
  elif d.source == "jsonl":
    if not d.jsonl_path:
      raise ValueError("config.data.source='jsonl' needs config.data.jsonl_path")
    train = PreferenceData(load_preference_jsonl(d.jsonl_path, template))
    evals = PreferenceData(
      load_preference_jsonl(d.eval_jsonl_path, template) if d.eval_jsonl_path else []
    )
  else:
    raise ValueError(f"config.data.source must be 'task' or 'jsonl', got {d.source!r}")
  if config.centering.enabled and config.centering.reference_jsonl_path:
    refs = load_sft_jsonl(config.centering.reference_jsonl_path, template)
  return train, evals, refs


def reward_centring(
  objective, params, refs, tokenizer, *, seq_len: int, batch_size: int, mesh
) -> dict[str, float]:
  """Stiennon et al.'s bias b = mean r(x, y_ref) over reference responses, per scalar RM
  (`reward_bias`, or `reward_bias_A`/`_B` for CRM); {} for a GPM or without references."""
  if not refs or not objective.scalar_rewards:
    return {}
  rewards = score_responses(
    jax.jit(objective.sequence_rewards), params, refs, tokenizer, seq_len=seq_len,
    batch_size=batch_size, mesh=mesh,
  )  # fmt: skip
  return {"reward_bias" + k[len("reward") :]: float(reward_bias(jnp.asarray(v)))
          for k, v in rewards.items()}  # fmt: skip


# --- the trainer --------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a reward model as `config` says, checkpointing into `workdir`; returns final
  metrics (train/*, eval/* and, with references, reward_bias*)."""
  # --- mesh -----------------------------------------------------------------
  mesh, rules = setup_mesh(config)
  save_config(config, workdir)

  # --- data -----------------------------------------------------------------
  tokenizer = make_tokenizer(config.tokenizer.name, config.tokenizer.get("path") or None)
  train, evals, refs = _data(config, tokenizer)
  seq_len, batch_size = config.data.seq_len, config.data.batch_size
  log.info("%d training pairs, %d held-out pairs, %d references", len(train), len(evals), len(refs))

  # --- model and optimizer ----------------------------------------------------
  mcfg = model_config_from(config, tokenizer.vocab_size)
  objective = make_objective(config, mcfg, knows_flips=train.flipped is not None)
  total_steps = config.train.num_steps
  tx, schedule = make_tx(objective, config.optimizer, total_steps)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # --- sharded init or resume ------------------------------------------------
    ckpt = Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
      async_save=config.train.async_checkpoint,
    )  # fmt: skip
    state, shardings, data_state = init_or_restore(
      objective.init_params, tx, config.seed, mesh, rules, ckpt, config.get("init"), mcfg
    )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("reward model (%s): %s parameters; starting at step %d of %d", config.loss,
             f"{n_params:,}", int(jax.device_get(state.step)), total_steps)  # fmt: skip

    # --- the jitted step ----------------------------------------------------
    template = encode_pairs(train.examples, [0], tokenizer, seq_len)
    batch_shardings = {k: batch_sharding(mesh, v.ndim) for k, v in template.items()}
    step_fn = jax.jit(
      make_train_step(objective, tx, schedule, config.optimizer.accum_steps),
      in_shardings=(shardings, batch_shardings), out_shardings=(shardings, None),
      donate_argnums=(0,),
    )  # fmt: skip
    latest = [state]  # the newest state, for the curriculum's margins at epoch starts

    def step(st, batch):
      st, metrics = step_fn(st, batch)
      latest[0] = st
      return st, metrics

    # --- evaluation and the curriculum -------------------------------------------
    score_fn = jax.jit(objective.scores)
    eval_batch = config.eval.batch_size
    reorder = None
    if config.loss == "crm" and config.crm.curriculum:

      def reorder():
        margins = score_pairs(
          score_fn, latest[0].params, train.examples, tokenizer, seq_len=seq_len,
          batch_size=eval_batch, mesh=mesh,
        )["margin"]  # fmt: skip
        return np.asarray(curriculum_order(jnp.asarray(margins)))

    feeder = PairFeeder(
      train, tokenizer, seq_len=seq_len, batch_size=batch_size, mesh=mesh, seed=config.seed,
      state=data_state, reorder=reorder,
    )  # fmt: skip
    evaluator = PairwiseEvaluator(
      score_fn, evals.examples, tokenizer, seq_len=seq_len, batch_size=eval_batch, mesh=mesh
    )

    # --- loop -------------------------------------------------------------------
    state, final = train_loop(
      state=state, step_fn=step, next_batch=feeder.next, data_state=feeder.get_state,
      evaluate=(lambda st: evaluator(st.params)) if evaluator.examples else None, ckpt=ckpt,
      writer=MetricWriter(workdir, start_step=int(jax.device_get(state.step))),
      train_cfg=config.train, desc=f"reward_{config.loss}",
    )  # fmt: skip

    # --- reward centring (Stiennon et al.) ------------------------------------------
    bias = reward_centring(
      objective, state.params, refs, tokenizer, seq_len=seq_len, batch_size=eval_batch, mesh=mesh
    )
    if bias:
      log.info("reward centring over %d references: %s", len(refs), bias)
      final.update(bias)
      if jax.process_index() == 0:
        with open(os.path.join(workdir, "reward_bias.json"), "w") as f:
          json.dump({**bias, "step": final["step"], "num_references": len(refs)}, f)
    return final
