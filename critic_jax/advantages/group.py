"""Group-relative outcome advantages: GRPO, Dr. GRPO and RLOO (spec `rl-critics-search.md` §2).

Every estimator here takes one scalar reward per response, `rewards [B, G]` (B
prompts, G responses each), turns it into a per-response advantage, and
broadcasts it over the response's tokens: `adv [B, G, T] = a[..., None] * mask`.

Padded groups: `valid_resp [B, G]` marks the responses that exist. Invalid ones
are left out of every group statistic and get advantage 0. A group with a single
valid response keeps its raw reward (verl's convention for G=1: mean 0, std 1);
a group with none gets 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from critic_jax.advantages.registry import ADVANTAGES
from critic_jax.losses.common import masked_mean, masked_var

__all__ = [
  "STD_MODES",
  "dr_grpo_advantages",
  "group_normalize",
  "grpo_advantages",
  "rloo_advantages",
]

STD_MODES = ("unbiased", "population", "none")


def _check_group_inputs(rewards, mask, valid_resp):
  """Shape checks shared by the group estimators; returns valid_resp as bool [B, G]."""
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [B, G], got shape {rewards.shape}")
  if mask is not None and (mask.ndim != 3 or mask.shape[:2] != rewards.shape):
    raise ValueError(
      f"mask must be [B, G, T] with [B, G] = rewards.shape {rewards.shape}, got {mask.shape}"
    )
  if valid_resp is None:
    return jnp.ones(rewards.shape, bool)
  if valid_resp.shape != rewards.shape:
    raise ValueError(
      f"valid_resp must have the shape of rewards {rewards.shape}, got {valid_resp.shape}"
    )
  return valid_resp.astype(bool)


def _check_std_mode(std_mode: str) -> None:
  if std_mode not in STD_MODES:
    raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")


@functools.partial(jax.jit, static_argnames=("std_mode",))
def group_normalize(
  rewards: jax.Array,
  *,
  valid_resp: jax.Array | None = None,
  std_mode: str = "unbiased",
  eps: float = 1e-6,
) -> jax.Array:
  """GRPO group normalisation r~_i = (r_i - mean_j r_j) / (std_j r_j + eps).

  DeepSeekMath (arXiv 2402.03300) does not say which std it uses; verl and TRL
  use the unbiased one, the default here [C verl].

  Args:
    rewards: `[B, G]` scalar rewards.
    valid_resp: optional `[B, G]` bool; invalid responses are excluded from the
      mean and std and get 0.
    std_mode: "unbiased" (Bessel), "population", or "none" (r_i - mean, Dr. GRPO).
    eps: added to the std (not the variance), 1e-6 as in verl.

  Returns:
    `[B, G]` float32 normalised rewards. A group with one valid response keeps
    its raw reward (verl: mean 0, std 1 when a group has one response).
  """
  _check_std_mode(std_mode)
  rewards = rewards.astype(jnp.float32)
  valid = _check_group_inputs(rewards, None, valid_resp)
  count = jnp.sum(valid, axis=-1, keepdims=True)
  # Centre on the group's largest reward first: a group of equal rewards then gives
  # exactly 0, where rewards - mean can be off by a rounding error (XLA may
  # contract it into an FMA) that the division by std + eps would blow up 1e6-fold.
  top = jnp.max(jnp.where(valid, rewards, -jnp.inf), axis=-1, keepdims=True)
  shifted = jnp.where(valid, rewards - jnp.where(count > 0, top, 0.0), 0.0)
  centred = shifted - masked_mean(shifted, valid, axis=-1)[:, None]
  if std_mode == "none":
    norm = centred
  else:
    var = jax.vmap(lambda r, m: masked_var(r, m, unbiased=std_mode == "unbiased"))(shifted, valid)
    norm = centred / (jnp.sqrt(var)[:, None] + eps)
  norm = jnp.where(count == 1, rewards, norm)
  return jnp.where(valid, norm, 0.0)


def _broadcast_to_tokens(adv: jax.Array, mask: jax.Array, valid: jax.Array) -> jax.Array:
  return jnp.where(mask & valid[..., None], adv[..., None], 0.0)


@ADVANTAGES.register("grpo")
@functools.partial(jax.jit, static_argnames=("std_mode",))
def grpo_advantages(
  *,
  rewards: jax.Array,
  mask: jax.Array,
  valid_resp: jax.Array | None = None,
  std_mode: str = "unbiased",
  eps: float = 1e-6,
) -> jax.Array:
  """GRPO outcome advantage: A_{i,t} = r~_i on every token of response i.

  Shao et al., DeepSeekMath (arXiv 2402.03300); spec §2b.

  Args:
    rewards: `[B, G]` scalar rewards.
    mask: `[B, G, T]` bool, true on response tokens (EOS included).
    valid_resp: optional `[B, G]` bool, false on padded responses.
    std_mode, eps: see `group_normalize`.

  Returns:
    `[B, G, T]` float32 advantages, 0 on padding and on invalid responses.
  """
  valid = _check_group_inputs(rewards, mask, valid_resp)
  norm = group_normalize(rewards, valid_resp=valid, std_mode=std_mode, eps=eps)
  return _broadcast_to_tokens(norm, mask.astype(bool), valid)


@ADVANTAGES.register("dr_grpo")
@jax.jit
def dr_grpo_advantages(
  *, rewards: jax.Array, mask: jax.Array, valid_resp: jax.Array | None = None
) -> jax.Array:
  """Dr. GRPO advantage: A_{i,t} = r_i - mean_j r_j, no division by the std.

  Liu et al., "Understanding R1-Zero-Like Training" (arXiv 2503.20783). The other
  half of Dr. GRPO, the constant length normaliser, is the loss aggregation
  `seq-mean-token-sum-norm` in `critic_jax.losses.common.agg_loss`.

  Args:
    rewards: `[B, G]`; mask: `[B, G, T]` bool; valid_resp: optional `[B, G]` bool.

  Returns:
    `[B, G, T]` float32 advantages.
  """
  valid = _check_group_inputs(rewards, mask, valid_resp)
  norm = group_normalize(rewards, valid_resp=valid, std_mode="none")
  return _broadcast_to_tokens(norm, mask.astype(bool), valid)


@ADVANTAGES.register("rloo")
@jax.jit
def rloo_advantages(
  *, rewards: jax.Array, mask: jax.Array, valid_resp: jax.Array | None = None
) -> jax.Array:
  """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_j r_j).

  Ahmadian et al., "Back to Basics" (arXiv 2402.14740); Kool et al. 2019. The
  mean runs over the n valid responses of the group; with n = 1 the reward is
  kept as it is (verl's `compute_rloo_outcome_advantage`).

  Args:
    rewards: `[B, G]`; mask: `[B, G, T]` bool; valid_resp: optional `[B, G]` bool.

  Returns:
    `[B, G, T]` float32 advantages.
  """
  valid = _check_group_inputs(rewards, mask, valid_resp)
  rewards = rewards.astype(jnp.float32)
  count = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
  # Shifted by the group's top reward, as in `group_normalize`: equal rewards give exactly 0.
  top = jnp.max(jnp.where(valid, rewards, -jnp.inf), axis=-1, keepdims=True)
  shifted = jnp.where(valid, rewards - jnp.where(count > 0, top, 0.0), 0.0)
  loo_mean = (jnp.sum(shifted, axis=-1, keepdims=True) - shifted) / jnp.maximum(count - 1.0, 1.0)
  adv = jnp.where(count > 1, shifted - loo_mean, rewards)
  adv = jnp.where(valid, adv, 0.0)
  return _broadcast_to_tokens(adv, mask.astype(bool), valid)
