"""Supervised fine-tuning: next-token loss on response tokens, sharded, resumable.

    python scripts/train.py --config=configs/sft_arith.py --workdir=runs/sft_arith

Sections of `train_and_evaluate`: mesh, data, model and optimizer, sharded init
or resume, the jitted step, evaluation, and the loop with logging, checkpoints
and SIGTERM handling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from critic_jax.data import Example, make_task, make_tokenizer, sft_dataset
from critic_jax.data.jsonl import load_sft_jsonl
from critic_jax.losses import LOSSES
from critic_jax.losses.common import align_to_logits
from critic_jax.models import Transformer
from critic_jax.parallel import batch_sharding, to_host
from critic_jax.train.checkpoint import Checkpointer
from critic_jax.train.common import (
  BatchFeeder,
  build_model,
  init_or_restore,
  model_config_from,
  save_config,
  setup_mesh,
)
from critic_jax.train.evaluate import GreedyTaskEval, eval_batch_size
from critic_jax.train.loop import train_loop
from critic_jax.train.metrics import MetricWriter
from critic_jax.train.optim import make_optimizer
from critic_jax.train.state import TrainState

__all__ = ["make_train_step", "make_eval_step", "sft_targets", "train_and_evaluate"]

log = logging.getLogger(__name__)


def sft_targets(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(targets `[B, T-1]`, mask `[B, T-1]`): predict token t+1 from position t.

  A target counts when it is a response token (loss_mask) in the same packed
  segment as its input position.
  """
  seg = batch["segment_ids"]
  targets = batch["tokens"][:, 1:]
  mask = batch["loss_mask"][:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  return targets, mask


def _forward_loss(model: Transformer, loss_fn, params, batch, packed: bool):
  out = model.apply(
    {"params": params}, batch["tokens"], positions=batch["positions"],
    segment_ids=batch["segment_ids"], packed=packed, heads=("lm",),
  )  # fmt: skip
  targets, mask = (align_to_logits(x) for x in sft_targets(batch))  # all T logits, no slice
  return loss_fn(logits=out.logits, targets=targets, mask=mask)


def make_train_step(
  model: Transformer, tx: optax.GradientTransformation, schedule, loss_name: str = "sft",
  accum_steps: int = 1, packed: bool = True,
):  # fmt: skip
  """One optimizer step over a global batch, split into `accum_steps` micro-batches.

  The loss is the token mean over the whole batch, so accumulation gives the same
  update as one big batch: micro-batch m contributes grad(mean_m) * n_m / n. `packed`
  (static): rows may hold several segments (`Transformer`'s argument; False, for unpacked
  data only, lets cuDNN use sequence lengths and the blocked CPU kernel no mask at all).
  """
  loss_fn = LOSSES.get(loss_name)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    b = batch["tokens"].shape[0]
    if b % accum_steps:
      raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}")
    # Row i*A + m goes to micro-batch m, so every micro-batch keeps the batch sharding.
    micro = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((b // accum_steps, accum_steps) + x.shape[1:]), 0, 1),
      batch,
    )
    counts = jnp.sum(sft_targets(batch)[1].reshape(b // accum_steps, accum_steps, -1), (0, 2))
    total = jnp.maximum(jnp.sum(counts), 1)

    def micro_grad(carry, xs):
      mb, n = xs

      def weighted(p):
        loss, metrics = _forward_loss(model, loss_fn, p, mb, packed)
        return loss * n / total, metrics

      (wloss, metrics), grads = jax.value_and_grad(weighted, has_aux=True)(state.params)
      g_acc, l_acc, acc_acc = carry
      g_acc = jax.tree.map(jnp.add, g_acc, grads)
      return (g_acc, l_acc + wloss, acc_acc + metrics["token_accuracy"] * n / total), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, tok_acc), _ = jax.lax.scan(
      micro_grad, (zeros, jnp.zeros(()), jnp.zeros(())), (micro, counts)
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {
      "loss": loss,
      "token_accuracy": tok_acc,
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "lr": schedule(state.step),
      "loss_tokens": total.astype(jnp.float32),
    }
    return new_state, metrics

  return step


def make_eval_step(model: Transformer, loss_name: str = "sft", packed: bool = True):
  """(params, batch) -> summed NLL and token count over the batch's response tokens."""
  loss_fn = LOSSES.get(loss_name)

  def eval_step(params, batch):
    _, metrics = _forward_loss(model, loss_fn, params, batch, packed)
    return {"nll_sum": metrics["nll_sum"], "num_tokens": metrics["num_tokens"]}

  return eval_step


def _examples(config, task, tokenizer) -> tuple[list[Example], list[Example]]:
  d = config.data
  if d.source == "task":
    return (
      task.train_examples(d.num_train_examples, seed=config.seed),
      task.eval_examples(config.eval.num_examples, seed=config.seed),
    )
  if d.source == "jsonl":
    if not d.jsonl_path:
      raise ValueError("config.data.source='jsonl' needs config.data.jsonl_path")
    template = getattr(tokenizer, "apply_chat_template", None)
    train = load_sft_jsonl(d.jsonl_path, template)
    evals = load_sft_jsonl(d.eval_jsonl_path, template) if d.eval_jsonl_path else []
    return train, evals
  raise ValueError(f"config.data.source must be 'task' or 'jsonl', got {d.source!r}")


class Evaluator:
  """Held-out SFT loss, and exact-match accuracy of greedy decoding when a task can score it."""

  def __init__(self, config, model, tokenizer, task, examples: Sequence[Example], mesh):
    self.config, self.tok, self.task, self.mesh = config, tokenizer, task, mesh
    self.examples = list(examples)
    self.batch = eval_batch_size(config.eval.batch_size, len(self.examples), mesh)
    # Held-out rows are never packed (`loss` below pads one example per row).
    self._eval_step = jax.jit(make_eval_step(model, config.loss, packed=False))
    self.greedy = None
    if task is not None and self.examples and config.data.source == "task":
      self.greedy = GreedyTaskEval(
        model, tokenizer, task, self.examples, mesh, batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
      )  # fmt: skip

  def loss(self, params) -> dict[str, float]:
    nll, count = 0.0, 0.0
    for i in range(0, len(self.examples), self.batch):
      chunk = self.examples[i : i + self.batch]
      ds = sft_dataset(
        chunk, self.tok, seq_len=self.config.data.seq_len, batch_size=len(chunk), shuffle=False,
        num_epochs=1,
      )  # fmt: skip
      batch = next(iter(ds))
      pad = self.batch - len(chunk)
      batch = {
        k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()
      }
      put = {k: jax.device_put(v, batch_sharding(self.mesh, v.ndim)) for k, v in batch.items()}
      out = self._eval_step(params, put)
      nll += float(to_host(out["nll_sum"]))
      count += float(to_host(out["num_tokens"]))
    return {"loss": nll / max(count, 1.0)}

  def __call__(self, params) -> dict[str, float]:
    if not self.examples:
      return {}
    metrics = self.loss(params)
    if self.greedy is not None:
      metrics["accuracy"], self.last_samples = self.greedy.accuracy(params)
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains by SFT as `config` says, checkpointing into `workdir`; returns final metrics."""
  # --- mesh -----------------------------------------------------------------
  mesh, rules = setup_mesh(config)
  save_config(config, workdir)

  # --- data -----------------------------------------------------------------
  tokenizer = make_tokenizer(config.tokenizer.name, config.tokenizer.get("path") or None)
  task = make_task(config.task.name, **config.task.kwargs) if config.task.name else None
  train_examples, eval_examples = _examples(config, task, tokenizer)
  dataset = sft_dataset(
    train_examples, tokenizer, seq_len=config.data.seq_len, batch_size=config.data.batch_size,
    seed=config.seed, packing=config.data.packing,
  )  # fmt: skip

  # --- model and optimizer ----------------------------------------------------
  mcfg = model_config_from(config, tokenizer.vocab_size)
  model, init_params = build_model(mcfg)
  total_steps = config.train.num_steps
  tx, schedule = make_optimizer(config.optimizer, total_steps)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # --- sharded init or resume ------------------------------------------------
    ckpt = Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
      async_save=config.train.async_checkpoint,
    )  # fmt: skip
    state, shardings, data_state = init_or_restore(
      init_params, tx, config.seed, mesh, rules, ckpt, config.get("init"), mcfg
    )
    feeder = BatchFeeder(dataset, mesh, config.data.batch_size, data_state)
    start = int(jax.device_get(state.step))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("model: %s parameters; starting at step %d of %d", f"{n_params:,}", start, total_steps)

    # --- the jitted step ----------------------------------------------------
    step_fn = jax.jit(
      make_train_step(
        model, tx, schedule, config.loss, config.optimizer.accum_steps, config.data.packing
      ),
      in_shardings=(shardings, batch_sharding(mesh)),
      out_shardings=(shardings, None),
      donate_argnums=(0,),
    )  # fmt: skip
    evaluator = Evaluator(config, model, tokenizer, task, eval_examples, mesh)
    _, final = train_loop(
      state=state, step_fn=step_fn, next_batch=feeder.next, data_state=feeder.get_state,
      evaluate=(lambda st: evaluator(st.params)) if evaluator.examples else None, ckpt=ckpt,
      writer=MetricWriter(workdir, start_step=start), train_cfg=config.train, desc="sft",
    )  # fmt: skip
    return final
