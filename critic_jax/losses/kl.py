"""Per-token KL(pi_theta || pi_ref) estimators k1, k2, k3 (spec `rl-critics-search.md` §1b, §2b).

With samples y ~ pi_theta and Delta = log pi_ref(y) - log pi_theta(y)
(J. Schulman, "Approximating KL Divergence", 2020):

  k1 = -Delta                    unbiased, high variance, can be negative
  k2 = Delta^2 / 2               biased, low variance, >= 0
  k3 = exp(Delta) - Delta - 1    unbiased, low variance, >= 0 (GRPO's KL term)

These are elementwise estimates, not losses: a loss multiplies them by its
coefficient and aggregates them with `critic_jax.losses.common.agg_loss`. So
they are exported but not registered in `LOSSES`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["KL_ESTIMATORS", "kl_estimate", "kl_k1", "kl_k2", "kl_k3"]

KL_ESTIMATORS = ("k1", "k2", "k3")

# verl's `low_var_kl` clips Delta to this range before exp() (float32 exp overflows past ~88).
_K3_DELTA_CLIP = 20.0


def _delta(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  if logp.shape != ref_logp.shape:
    raise ValueError(
      f"logp and ref_logp must have the same shape, got {logp.shape}, {ref_logp.shape}"
    )
  return ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)


def _apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return x
  if mask.shape != x.shape:
    raise ValueError(f"mask must have shape {x.shape}, got {mask.shape}")
  return jnp.where(mask, x, 0.0)


def kl_k1(*, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """k1 = log pi_theta - log pi_ref, elementwise; 0 where `mask` is false.

  Args:
    logp: `[...]` log-probs of the sampled tokens under the policy.
    ref_logp: `[...]` log-probs of the same tokens under the reference.
    mask: optional `[...]` bool.
  """
  return _apply_mask(-_delta(logp, ref_logp), mask)


def kl_k2(*, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """k2 = (log pi_theta - log pi_ref)^2 / 2, elementwise; same arguments as `kl_k1`."""
  return _apply_mask(0.5 * jnp.square(_delta(logp, ref_logp)), mask)


def kl_k3(
  *,
  logp: jax.Array,
  ref_logp: jax.Array,
  mask: jax.Array | None = None,
  clamp: float | None = None,
) -> jax.Array:
  """k3 = exp(Delta) - Delta - 1 with Delta = log pi_ref - log pi_theta (GRPO, spec §2b).

  Its gradient with respect to logp is 1 - pi_ref/pi_theta.

  Args:
    logp, ref_logp, mask: as in `kl_k1`.
    clamp: None (default) gives the plain formula. A number reproduces verl's
      `low_var_kl` [S]: Delta clipped to [-20, 20] before the exp and the result
      clipped to [-clamp, clamp] (verl uses 10).
  """
  delta = _delta(logp, ref_logp)
  if clamp is not None:
    delta = jnp.clip(delta, -_K3_DELTA_CLIP, _K3_DELTA_CLIP)
  k3 = jnp.expm1(delta) - delta
  if clamp is not None:
    k3 = jnp.clip(k3, -clamp, clamp)
  return _apply_mask(k3, mask)


def kl_estimate(
  *,
  logp: jax.Array,
  ref_logp: jax.Array,
  kind: str = "k3",
  mask: jax.Array | None = None,
) -> jax.Array:
  """The estimator named `kind` ("k1", "k2" or "k3"), elementwise."""
  if kind == "k1":
    return kl_k1(logp=logp, ref_logp=ref_logp, mask=mask)
  if kind == "k2":
    return kl_k2(logp=logp, ref_logp=ref_logp, mask=mask)
  if kind == "k3":
    return kl_k3(logp=logp, ref_logp=ref_logp, mask=mask)
  raise ValueError(f"unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")
