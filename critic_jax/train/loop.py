"""The training loop every trainer shares: step, log, evaluate, checkpoint, stop on SIGTERM.

Metrics stay on device between log steps (JAX dispatch runs ahead of the host);
at a log step they are fetched once, with the wall time and token throughput
since the previous log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import tqdm

from critic_jax.train.checkpoint import Checkpointer, PreemptionGuard
from critic_jax.train.metrics import MetricWriter, StepTimer

__all__ = ["train_loop"]

log = logging.getLogger(__name__)


def train_loop(
  *,
  state: Any,
  step_fn: Callable[[Any, Any], tuple[Any, dict]],
  next_batch: Callable[[], tuple[Any, int]],
  data_state: Callable[[], dict],
  evaluate: Callable[[Any], dict[str, float]] | None,
  ckpt: Checkpointer,
  writer: MetricWriter,
  train_cfg,
  desc: str,
) -> tuple[Any, dict[str, Any]]:
  """Runs `step_fn` until `train_cfg.num_steps`, resuming from `state.step`.

  Args:
    state: the train state (its `step` says where to start).
    step_fn: (state, batch) -> (state, metrics); jitted, state donated.
    next_batch: () -> (batch, number of real tokens in it).
    data_state: () -> the JSON state of the data iterator (saved with checkpoints).
    evaluate: state -> held-out metrics, or None.
    train_cfg: `config.train` (num_steps, log_every, eval_every, ckpt_every, progress_bar).
  Returns:
    (final state, final metrics incl. "step" and "preempted" when stopped by a signal).
  """
  for key, least in (("log_every", 1), ("ckpt_every", 1), ("eval_every", 0), ("num_steps", 0)):
    if int(train_cfg[key]) < least:
      raise ValueError(f"config.train.{key} must be >= {least}, got {train_cfg[key]}")
  total = train_cfg.num_steps
  step = int(jax.device_get(state.step))
  final: dict[str, Any] = {"step": step}
  timer = StepTimer()
  pbar = tqdm.tqdm(
    total=total, initial=step, desc=desc, dynamic_ncols=True,
    disable=jax.process_index() != 0 or not train_cfg.progress_bar,
  )  # fmt: skip
  evaluated = False
  eval_every = train_cfg.eval_every if evaluate is not None else 0
  with PreemptionGuard() as guard:
    while step < total:
      batch, n_tokens = next_batch()
      state, metrics = step_fn(state, batch)
      step += 1
      timer.tick(n_tokens)
      pbar.update(1)
      last = step == total
      if step % train_cfg.log_every == 0 or last:
        vals = writer.write(step, {**metrics, **timer.rates()}, prefix="train/")
        pbar.set_postfix(loss=f"{vals['train/loss']:.4f}")
        final.update(vals)
      if eval_every and (step % eval_every == 0 or last):
        ev = writer.write(step, evaluate(state), prefix="eval/")
        final.update(ev)
        evaluated = True
        pbar.write(f"{desc} step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items()))
      if step % train_cfg.ckpt_every == 0 or last or guard.requested:
        ckpt.save(step, state, data_state())
      if guard.requested:
        log.warning("stopping at step %d after SIGTERM; checkpoint saved", step)
        final["preempted"] = True
        break
  if eval_every and not evaluated and step == total:
    # Resumed at the last step: report the held-out metrics anyway.
    final.update({f"eval/{k}": float(v) for k, v in evaluate(state).items()})
  pbar.close()
  ckpt.close()
  writer.close()
  final["step"] = step
  return state, final
