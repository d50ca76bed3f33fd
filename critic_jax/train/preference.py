"""Offline preference optimisation: the DPO family and Chain of Hindsight.

    python scripts/train.py --config=configs/dpo_arith.py --workdir=runs/dpo

`config.loss` picks the objective:
  "dpo": DPO (Rafailov et al., arXiv 2305.18290) and, through `config.loss_kwargs`,
    IPO (`loss_type="ipo"`), SLiC hinge (`"hinge"`), conservative DPO
    (`label_smoothing`) and DPO + SFT (`sft_weight`).
  "dno_prct": DNO-Prct (Rosset et al., arXiv 2404.03715). With `config.dno.pairs="given"`
    (or no `config.dno`): DPO against the previous iterate (`config.reference`), one
    iteration on given pairs. With `config.dno.pairs="on_policy"`: `config.dno.iterations`
    rounds of sampling from pi_t, scoring, large-margin pair selection and DPO against pi_t
    (`critic_jax.train.preference_dno`).
  "d2o": D2O (Duan et al., arXiv 2403.03419) from negatives only, the positive side K
    samples of the reference (`critic_jax.train.preference_d2o`).
  "coh": Chain of Hindsight (Liu et al., arXiv 2302.02676): pairs become feedback
    sequences trained by next-token loss on the answers, with the forgetful causal mask.

The reference log-probs are computed once before training and cached in the
workdir (`config.reference.mode="precompute"`), or computed every step from a
frozen copy of the initial weights (`"online"`, which also reports the exact
per-token KL to the reference).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from critic_jax.data import make_task, make_tokenizer
from critic_jax.data.preference import (
  PreferenceExample,
  load_preference_jsonl,
  preference_dataset,
)
from critic_jax.data.task_pairs import task_pairs
from critic_jax.losses import LOSSES, build_coh_example, forgetful_causal_mask, token_logprobs
from critic_jax.losses.common import align_to_logits
from critic_jax.models import Transformer
from critic_jax.parallel import batch_sharding, to_host
from critic_jax.train.checkpoint import Checkpointer
from critic_jax.train.common import (
  BatchFeeder,
  build_model,
  fresh_state,
  maybe_restore,
  model_config_from,
  save_config,
  setup_mesh,
)
from critic_jax.train.evaluate import GreedyTaskEval
from critic_jax.train.loop import train_loop
from critic_jax.train.metrics import MetricWriter
from critic_jax.train.optim import make_optimizer
from critic_jax.train.state import TrainState

__all__ = [
  "apply_update",
  "load_pairs",
  "scalars",
  "task_accuracy",
  "token_kl",
  "response_logps",
  "make_dpo_step",
  "make_coh_step",
  "reference_logps",
  "implicit_reward_accuracy",
  "train_and_evaluate",
]

log = logging.getLogger(__name__)
SIDES = ("chosen", "rejected")


def response_logps(model: Transformer, params, rows: dict[str, jax.Array], attn_mask=None):
  """Summed log-probs of the response tokens of each row.

  Args:
    rows: tokens, positions, segment_ids, loss_mask, all `[N, T]`; one right-padded
      sequence per row (segment ids 1, then 0), as `critic_jax.data.preference` builds them.
  Returns:
    (logps `[N]`, response token counts `[N]`, logits `[N, T-1, V]`, mask `[N, T-1]`).
  """
  out = model.apply(
    {"params": params}, rows["tokens"], positions=rows["positions"],
    segment_ids=rows["segment_ids"], packed=False, attn_mask=attn_mask, heads=("lm",),
  )  # fmt: skip
  seg = rows["segment_ids"]
  mask = rows["loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  # Log-probs over all T logits (see `align_to_logits`); the returned logits[:, :-1] is
  # only materialised for a caller that uses it (e.g. `token_kl`).
  lp = token_logprobs(out.logits, align_to_logits(rows["tokens"][:, 1:]))
  logps = jnp.sum(jnp.where(align_to_logits(mask), lp, 0.0), -1)
  return logps, jnp.sum(mask, -1), out.logits[:, :-1], mask


def _both_sides(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Chosen rows then rejected rows: `[2B, T]`, one forward pass for the pair."""
  keys = ("tokens", "positions", "segment_ids", "loss_mask")
  return {k: jnp.concatenate([batch[f"{s}_{k}"] for s in SIDES], axis=0) for k in keys}


def token_kl(logits, ref_logits, mask):
  """Mean over response tokens of KL(pi(.|ctx) || pi_ref(.|ctx)), exact over the vocabulary."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  lq = jax.nn.log_softmax(ref_logits.astype(jnp.float32), -1)
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
  return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def scalars(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The scalar entries of a loss's metrics (the ones logged)."""
  return {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}


def apply_update(tx, schedule, state: TrainState, grads, metrics):
  """One optimizer update; adds grad_norm and lr to `metrics`. Returns (state, metrics)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_dpo_step(model: Transformer, tx, schedule, loss_kwargs: dict, online_ref: bool):
  """(state, batch, ref_params) -> (state, metrics) for the DPO family.

  With `online_ref` the reference log-probs come from `ref_params` (frozen); else
  from the batch (`ref_chosen_logps`, `ref_rejected_logps`, `[B]`).
  """
  loss_fn = LOSSES.get("dpo")

  def step(state: TrainState, batch, ref_params):
    rows = _both_sides(batch)
    b = batch["chosen_tokens"].shape[0]
    ref_logits = None
    if online_ref:
      ref_lp, _, ref_logits, _ = response_logps(model, ref_params, rows)
      ref_lp, ref_logits = jax.lax.stop_gradient((ref_lp, ref_logits))
    else:
      ref_lp = jnp.concatenate([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])

    def objective(params):
      lp, n, logits, mask = response_logps(model, params, rows)
      loss, m = loss_fn(
        policy_chosen_logps=lp[:b], policy_rejected_logps=lp[b:], ref_chosen_logps=ref_lp[:b],
        ref_rejected_logps=ref_lp[b:], mask=batch["has_chosen"], chosen_num_tokens=n[:b],
        **loss_kwargs,
      )  # fmt: skip
      if ref_logits is not None:
        m = {**m, "kl_token": token_kl(logits, ref_logits, mask)}
      return loss, scalars(m)

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return apply_update(tx, schedule, state, grads, metrics)

  return step


def make_coh_step(model: Transformer, tx, schedule, fcm_min: float, fcm_max: float):
  """(state, batch) -> (state, metrics): next-token loss on CoH answers with the FCM mask."""
  loss_fn = LOSSES.get("coh")

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    keep = forgetful_causal_mask(rng, batch["segment_ids"] != 0, fcm_min=fcm_min, fcm_max=fcm_max)

    def objective(params):
      out = model.apply(
        {"params": params}, batch["tokens"], positions=batch["positions"],
        segment_ids=batch["segment_ids"], attn_mask=keep, heads=("lm",),
      )  # fmt: skip
      loss, m = loss_fn(
        logits=out.logits, targets=align_to_logits(batch["tokens"][:, 1:]),
        loss_mask=align_to_logits(batch["loss_mask"][:, 1:]),
      )  # fmt: skip
      return loss, scalars(m)

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return apply_update(tx, schedule, state, grads, metrics)

  return step


def _pad_examples(examples: list, multiple: int) -> list:
  n = int(math.ceil(len(examples) / multiple) * multiple)
  return examples + [examples[-1]] * (n - len(examples))


def reference_logps(
  model: Transformer, params, examples: list[PreferenceExample], tokenizer, seq_len: int,
  batch_size: int, mesh,
) -> np.ndarray:  # fmt: skip
  """Log-probs `[N, 2]` (chosen, rejected) of every pair's responses under `params`."""
  fn = jax.jit(lambda p, batch: response_logps(model, p, _both_sides(batch))[0])
  padded = _pad_examples(list(examples), batch_size)
  ds = preference_dataset(
    padded, tokenizer, seq_len=seq_len, batch_size=batch_size, shuffle=False, num_epochs=1
  )
  out = []
  for batch in ds:
    arrays = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    lp = to_host(fn(params, arrays))
    out.append(lp.reshape(2, -1).T)
  return np.concatenate(out)[: len(examples)]


def implicit_reward_accuracy(
  policy_logps: np.ndarray, ref_logps: np.ndarray, beta: float, has_chosen=None
) -> dict[str, float]:
  """Held-out pairwise accuracy of the implicit reward r = beta * (log pi - log pi_ref).

  Args:
    policy_logps, ref_logps: `[N, 2]` (chosen, rejected) sequence log-probs.
  Returns:
    accuracy = mean(r_w > r_l) (ties count as wrong), margin = mean(r_w - r_l).
  """
  r = beta * (np.asarray(policy_logps) - np.asarray(ref_logps))
  valid = np.ones(len(r), bool) if has_chosen is None else np.asarray(has_chosen, bool)
  margin = r[valid, 0] - r[valid, 1]
  return {
    "implicit_reward_accuracy": float(np.mean(margin > 0)),
    "reward_margin": float(margin.mean()),
  }


def load_pairs(config, tokenizer) -> tuple[list, list, Any]:
  """(train pairs, eval pairs, task or None) from `config.data` (a task or JSONL files)."""
  d = config.data
  if d.source == "task":
    task = make_task(config.task.name, **config.task.kwargs)
    train = task_pairs(task, d.num_train_examples, seed=config.seed)
    evals = task_pairs(task, config.eval.num_examples, seed=config.seed, heldout=True)
    return train, evals, task
  if d.source == "jsonl":
    if not d.jsonl_path:
      raise ValueError("config.data.source='jsonl' needs config.data.jsonl_path")
    template = getattr(tokenizer, "apply_chat_template", None)
    train = load_preference_jsonl(d.jsonl_path, template)
    evals = load_preference_jsonl(d.eval_jsonl_path, template) if d.eval_jsonl_path else []
    return train, evals, None
  raise ValueError(f"config.data.source must be 'task' or 'jsonl', got {d.source!r}")


def _coh_rows(examples, tokenizer, seq_len: int, template: str, seed: int) -> list[dict]:
  """One CoH sequence per pair, order drawn from {p, n, pn, np} (deterministic per seed)."""
  rng = np.random.default_rng(seed)
  rows = []
  for ex in examples:
    order = ("p", "n", "pn", "np")[int(rng.integers(4))]
    tokens, mask = build_coh_example(
      prompt=ex.prompt, good=ex.chosen, bad=ex.rejected, order=order, encode=tokenizer.encode,
      eos_id=tokenizer.eos_id, template=template,
    )  # fmt: skip
    n = min(len(tokens), seq_len)
    row = {
      "tokens": np.full(seq_len, tokenizer.pad_id, np.int32),
      "segment_ids": np.zeros(seq_len, np.int32),
      "positions": np.zeros(seq_len, np.int32),
      "loss_mask": np.zeros(seq_len, bool),
    }
    row["tokens"][:n] = tokens[:n]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    row["loss_mask"][:n] = np.asarray(mask[:n]) > 0
    rows.append(row)
  return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a policy on preference pairs as `config` says; returns the final metrics."""
  import grain

  if config.loss not in ("dpo", "dno_prct", "coh", "d2o"):
    raise ValueError(
      f"config.loss={config.loss!r} is not a preference-trainer loss; use 'dpo', 'dno_prct', "
      "'d2o' or 'coh' here (reward models: trainer 'reward_model')"
    )
  if config.loss == "d2o":
    from critic_jax.train import preference_d2o

    return preference_d2o.train_and_evaluate(config, workdir)
  if config.loss == "dno_prct" and _dno_on_policy(config):
    from critic_jax.train import preference_dno

    return preference_dno.train_and_evaluate(config, workdir)

  # --- mesh -----------------------------------------------------------------
  mesh, rules = setup_mesh(config)
  save_config(config, workdir)

  # --- data -----------------------------------------------------------------
  tokenizer = make_tokenizer(config.tokenizer.name, config.tokenizer.get("path") or None)
  train_pairs, eval_pairs, task = load_pairs(config, tokenizer)
  d = config.data

  # --- model and optimizer ----------------------------------------------------
  mcfg = model_config_from(config, tokenizer.vocab_size)
  model, init_params = build_model(mcfg)
  tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
  kwargs = dict(config.loss_kwargs)
  online = reference_online(config)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ckpt, state, data_state, shardings, ref_params = policy_and_reference(
      config, workdir, init_params, tx, mesh, rules, mcfg
    )

    # --- data pipeline (with cached reference log-probs) -------------------------
    extra = None
    if config.loss == "coh":
      rows = _coh_rows(train_pairs, tokenizer, d.seq_len, config.coh.template, config.seed)
      ds = grain.MapDataset.source(rows).seed(config.seed).shuffle().repeat(None)
      dataset = ds.to_iter_dataset().batch(d.batch_size, drop_remainder=True)
    else:
      dataset = preference_dataset(
        train_pairs, tokenizer, seq_len=d.seq_len, batch_size=d.batch_size, seed=config.seed
      )
      if not online:
        ref = _cached_reference(
          os.path.join(workdir, "reference_logps.npy"), model, ref_params, train_pairs,
          tokenizer, config, mesh,
        )  # fmt: skip

        def extra(batch, ref=ref):
          idx = np.asarray(batch["index"])
          return {"ref_chosen_logps": ref[idx, 0], "ref_rejected_logps": ref[idx, 1]}

    feeder = BatchFeeder(dataset, mesh, d.batch_size, data_state, extra)

    # --- the jitted step ----------------------------------------------------
    bs = None  # batches arrive as global arrays already sharded over the batch axes
    if config.loss == "coh":
      step = make_coh_step(model, tx, schedule, config.coh.fcm_min, config.coh.fcm_max)
      jitted = jax.jit(step, in_shardings=(shardings, bs), out_shardings=(shardings, None),
                       donate_argnums=(0,))  # fmt: skip
    else:
      step = make_dpo_step(model, tx, schedule, kwargs, online)
      jitted = jax.jit(
        step, in_shardings=(shardings, bs, shardings.params), out_shardings=(shardings, None),
        donate_argnums=(0,),
      )  # fmt: skip
      jitted = (lambda f: lambda st, batch: f(st, batch, ref_params))(jitted)

    # --- evaluation: implicit-reward accuracy on held-out pairs ------------------
    evaluate = None
    if eval_pairs and config.loss != "coh":
      beta = float(kwargs.get("beta", 0.1))
      eval_ref = reference_logps(
        model, ref_params, eval_pairs, tokenizer, d.seq_len, config.eval.batch_size, mesh
      )

      def evaluate(st):
        pol = reference_logps(
          model, st.params, eval_pairs, tokenizer, d.seq_len, config.eval.batch_size, mesh
        )
        return implicit_reward_accuracy(pol, eval_ref, beta)

    state, final = train_loop(
      state=state, step_fn=jitted, next_batch=feeder.next, data_state=feeder.get_state,
      evaluate=evaluate, ckpt=ckpt, train_cfg=config.train,
      writer=MetricWriter(workdir, start_step=int(jax.device_get(state.step))),
      desc=config.loss,
    )  # fmt: skip
    if task is not None and config.eval.generate:
      final["eval/task_accuracy"] = task_accuracy(
        config, model, tokenizer, task, state.params, mesh
      )
    return final


def reference_online(config) -> bool:
  """True for `config.reference.mode="online"`, False for "precompute"; raises otherwise."""
  mode = config.reference.mode
  if mode not in ("online", "precompute"):
    raise ValueError(f"config.reference.mode must be 'online' or 'precompute', got {mode!r}")
  return mode == "online"


def policy_and_reference(config, workdir, init_params, tx, mesh, rules, mcfg):
  """Sharded init or resume of the policy, and a frozen copy of its *initial* params.

  Returns (checkpointer, state, data-iterator state or None, shardings, reference params).
  The reference is the initial policy (fresh, or `config.init`), never the resumed one.
  Call inside the mesh and logical-axis-rules context.
  """
  ckpt = Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
    async_save=config.train.async_checkpoint,
  )  # fmt: skip
  init, shardings = fresh_state(init_params, tx, config.seed, mesh, rules, config.get("init"), mcfg)
  ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(
    init.params
  )
  state, data_state = maybe_restore(init, shardings, ckpt)
  return ckpt, state, data_state, shardings, ref_params


def _dno_on_policy(config) -> bool:
  """True for iterative on-policy DNO-Prct (`config.dno.pairs="on_policy"`)."""
  dno = config.get("dno")
  pairs = dno.get("pairs", "given") if dno is not None else "given"
  if pairs not in ("given", "on_policy"):
    raise ValueError(f"config.dno.pairs must be 'given' or 'on_policy', got {pairs!r}")
  if pairs == "given" and dno is not None and int(dno.get("iterations", 1)) > 1:
    raise ValueError(
      "config.dno.iterations > 1 needs config.dno.pairs='on_policy' (each iteration samples "
      "new pairs from the current policy); given pairs allow one iteration"
    )
  return pairs == "on_policy"


def _cached_reference(path, model, ref_params, pairs, tokenizer, config, mesh) -> np.ndarray:
  """Reference log-probs of the training pairs, computed once and kept in the workdir."""
  if os.path.exists(path):
    ref = np.load(path)
    if ref.shape == (len(pairs), 2):
      return ref
    log.warning("%s has shape %s, expected %s: recomputing", path, ref.shape, (len(pairs), 2))
  ref = reference_logps(
    model, ref_params, pairs, tokenizer, config.data.seq_len, config.eval.batch_size, mesh
  )
  if jax.process_index() == 0:
    tmp = path + ".tmp.npy"
    np.save(tmp, ref)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache
  return ref


def task_accuracy(config, model, tokenizer, task, params, mesh) -> float:
  """Greedy exact-match accuracy of `params` on the task's held-out problems."""
  examples = task.eval_examples(config.eval.num_examples, seed=config.seed)
  ev = GreedyTaskEval(
    model, tokenizer, task, examples, mesh, batch_size=config.eval.batch_size,
    max_new_tokens=config.eval.max_new_tokens,
  )  # fmt: skip
  return ev.accuracy(params)[0]
