"""Optimizer from config: AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from critic_jax.registry import Registry

__all__ = ["OPTIMIZERS", "make_optimizer", "make_schedule"]

OPTIMIZERS: Registry = Registry("optimizer")


def make_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps`, cosine to `lr * end_lr_ratio` at `total_steps`."""
  lr = float(cfg["lr"])
  warmup = int(cfg.get("warmup_steps", 0))
  kind = cfg.get("schedule", "cosine")
  if kind not in ("cosine", "constant"):
    raise ValueError(f"config.optimizer.schedule must be 'cosine' or 'constant', got {kind!r}")
  if kind == "constant":
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [warmup]
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
    end_value=lr * float(cfg.get("end_lr_ratio", 0.0)),
  )  # fmt: skip


def _decay_mask(params):
  # Weight decay on matrices only: no decay on norms, biases and scalar heads' biases.
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


@OPTIMIZERS.register("adamw")
def _adamw(cfg, schedule):
  return optax.adamw(
    schedule, b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
    eps=float(cfg.get("eps", 1e-8)), weight_decay=float(cfg.get("weight_decay", 0.0)),
    mask=_decay_mask,
  )  # fmt: skip


@OPTIMIZERS.register("sgd")
def _sgd(cfg, schedule):
  return optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.0)) or None)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(cfg, schedule):
  return optax.rmsprop(schedule, decay=float(cfg.get("b2", 0.9)), eps=float(cfg.get("eps", 1e-8)))


def make_optimizer(
  cfg: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer with clipping, learning-rate schedule) from `config.optimizer`."""
  schedule = make_schedule(cfg, total_steps)
  tx = OPTIMIZERS.get(cfg.get("name", "adamw"))(cfg, schedule)
  clip = float(cfg.get("clip_norm", 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
