"""Token-level GAE and discounted returns (spec `rl-critics-search.md` §1b).

Both work on any leading shape `[..., T]` (PPO's `[N, T]` or a group layout
`[B, G, T]`) with a reverse `lax.scan` over T whose carry has the leading shape.

Masks: positions where `mask` is false are skipped, not treated as zero-reward
steps. The recursion passes straight through them (the next value and the
running advantage are carried over), and their outputs are 0. For right-padded
responses this is the usual "values past the mask are zeroed, V_L = 0"; for
masks with holes (for example tool output inside a multi-turn response) it is
verl's `compute_gae_advantage_return` with a response mask: the hole is as if
it were cut out of the sequence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from critic_jax.advantages.registry import ADVANTAGES

__all__ = ["discounted_returns", "gae_advantages"]


def _check(name: str, x: jax.Array, shape: tuple[int, ...]) -> None:
  if x.shape != shape:
    raise ValueError(f"{name} must have shape {shape} (that of rewards), got {x.shape}")


def _bootstrap(bootstrap_value, shape, name="bootstrap_value"):
  if bootstrap_value is None:
    return jnp.zeros(shape, jnp.float32)
  bootstrap_value = jnp.asarray(bootstrap_value, jnp.float32)
  if bootstrap_value.shape != shape:
    raise ValueError(
      f"{name} must have shape {shape} (rewards without T), got {bootstrap_value.shape}"
    )
  return bootstrap_value


@ADVANTAGES.register("gae")
@jax.jit
def gae_advantages(
  *,
  rewards: jax.Array,
  values: jax.Array,
  mask: jax.Array,
  gamma: float = 1.0,
  lam: float = 0.95,
  bootstrap_value: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over tokens.

  Schulman et al., "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation" (arXiv 1506.02438)::

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t            (the value target, before any whitening)

  where t+1 is the next *masked* position, and after the last one V = the
  bootstrap value (0 by default: the response ended with EOS) and A = 0.
  Whitening the advantages is a separate step (`critic_jax.losses.common.whiten`).

  Args:
    rewards: `[..., T]` per-token rewards (e.g. -beta*kl_t plus the score on the
      last token).
    values: `[..., T]` V(s_t), the critic's value before emitting token t.
    mask: `[..., T]` bool, true on the tokens that count.
    gamma: discount.
    lam: GAE lambda.
    bootstrap_value: optional `[...]` value of the state after the last masked
      token, for truncated responses; default 0.

  Returns:
    (advantages, returns), both `[..., T]` float32 and 0 where `mask` is false.
  """
  if rewards.ndim < 1:
    raise ValueError(f"rewards must be [..., T], got shape {rewards.shape}")
  _check("values", values, rewards.shape)
  _check("mask", mask, rewards.shape)
  last_value = _bootstrap(bootstrap_value, rewards.shape[:-1])
  rewards = rewards.astype(jnp.float32)
  values = values.astype(jnp.float32)
  mask = mask.astype(bool)

  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = delta + gamma * lam * next_adv
    carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
    return carry, jnp.where(m, adv, 0.0)

  xs = tuple(jnp.moveaxis(x, -1, 0) for x in (rewards, values, mask))
  init = (last_value, jnp.zeros_like(last_value))
  _, adv = lax.scan(step, init, xs, reverse=True)
  adv = jnp.moveaxis(adv, 0, -1)
  returns = jnp.where(mask, adv + values, 0.0)
  return adv, returns


@ADVANTAGES.register("discounted_returns")
@jax.jit
def discounted_returns(
  *,
  rewards: jax.Array,
  mask: jax.Array,
  gamma: float = 1.0,
  bootstrap_value: jax.Array | None = None,
) -> jax.Array:
  """Reward-to-go G_t = r_t + gamma * G_{t+1} over the masked positions (REINFORCE).

  Equal to `gae_advantages` with lam = 1 and V = 0. Masked-out positions are
  skipped as in GAE and get 0.

  Args:
    rewards: `[..., T]` per-token rewards.
    mask: `[..., T]` bool.
    gamma: discount.
    bootstrap_value: optional `[...]` value after the last masked token; default 0.

  Returns:
    `[..., T]` float32 returns.
  """
  if rewards.ndim < 1:
    raise ValueError(f"rewards must be [..., T], got shape {rewards.shape}")
  _check("mask", mask, rewards.shape)
  init = _bootstrap(bootstrap_value, rewards.shape[:-1])
  mask = mask.astype(bool)

  def step(next_ret, xs):
    r, m = xs
    ret = r + gamma * next_ret
    return jnp.where(m, ret, next_ret), jnp.where(m, ret, 0.0)

  xs = (jnp.moveaxis(rewards.astype(jnp.float32), -1, 0), jnp.moveaxis(mask, -1, 0))
  _, ret = lax.scan(step, init, xs, reverse=True)
  return jnp.moveaxis(ret, 0, -1)
