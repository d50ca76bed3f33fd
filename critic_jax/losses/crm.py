"""Collaborative Reward Modeling (CRM): peer review between two BT reward models.

Paper: Zhang et al. 2025, "Two Minds Better Than One: Collaborative Reward Modeling for LLM
Alignment", arXiv 2505.10597. No official code was found; the recipe comes from public review
text of the submission ([S]) and unconfirmed details are marked [U].
Spec: `shared/specs/preference-and-reward.md` §4.

Each RM a in {A, B} has per-pair margins m_a(i) = r_a(y_w,i) - r_a(y_l,i) and BT loss
l_a(i) = -log sigma(m_a(i)). RM A selects the ceil(rho * B) pairs it finds easiest (lowest loss,
i.e. largest margin) and those train RM B, and vice versa. Selection never carries gradient.

CRM-DPO [S/U]: with two policies, pass their implicit-reward margins
beta [(logp_w - logp_ref_w) - (logp_l - logp_ref_l)] (`dpo_loss` metrics["reward_margins"]) as
margins_A / margins_B to `crm_select`, and train each policy with `dpo_loss(..., mask=...)` on
the pairs its peer selected.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from critic_jax.losses.common import masked_mean
from critic_jax.losses.registry import LOSSES

__all__ = [
  "crm_bt_loss",
  "crm_keep_ratio",
  "crm_loss",
  "crm_select",
  "curriculum_order",
]

# ceil(keep_ratio * n) is taken after subtracting this tolerance, in both the Python and the
# traced path, so that float error such as 0.07 * 100 = 7.000000000000001 does not add a sample.
_CEIL_TOL = 1e-3


def _num_keep(keep_ratio, n):
  """|S| = ceil(keep_ratio * n) (see _CEIL_TOL), at least 1 when keep_ratio * n > 0."""
  if isinstance(keep_ratio, (int, float)) and isinstance(n, int):
    if not 0.0 <= keep_ratio <= 1.0:
      raise ValueError(f"crm: keep_ratio must be in [0, 1], got {keep_ratio}")
    k = min(n, max(0, math.ceil(keep_ratio * n - _CEIL_TOL)))
    return max(k, 1) if keep_ratio > 0 and n > 0 else k
  kr = jnp.asarray(keep_ratio, jnp.float32)
  n = jnp.asarray(n, jnp.float32)
  k = jnp.clip(jnp.ceil(kr * n - _CEIL_TOL), 0.0, n)
  return jnp.where((kr > 0) & (n > 0), jnp.maximum(k, 1.0), k).astype(jnp.int32)


def _select_sorted(scores, valid, keep_ratio, n_valid):
  """Mask of the top-|S| valid scores; a stable sort sends ties to the lower index."""
  b = scores.shape[0]
  key = jnp.where(valid, -scores, jnp.inf)
  order = jnp.argsort(key, stable=True)
  rank = jnp.zeros((b,), jnp.int32).at[order].set(jnp.arange(b, dtype=jnp.int32))
  return (rank < _num_keep(keep_ratio, n_valid)) & valid


def crm_select(
  *,
  margins_A: jax.Array,
  margins_B: jax.Array,
  keep_ratio: float | jax.Array,
  mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Peer selection: each RM picks its easiest pairs for the *other* RM.

    S_A = the ceil(rho * n) pairs with the largest margins under A (smallest BT loss l_A),
    S_B = likewise under B,   mask_for_A = 1[i in S_B],   mask_for_B = 1[i in S_A].

  Ties are broken deterministically by index (lower index first), so permuting the batch
  permutes the masks the same way except among exactly tied margins. keep_ratio rho = 1 - the
  prior noise-rate estimate ([S]); rho = 1 keeps every valid pair (two independent BT RMs).
  Margins pass through `stop_gradient`.

  Args:
    margins_A: `[B]` margins r_A(y_w) - r_A(y_l).
    margins_B: `[B]` margins under RM B.
    keep_ratio: rho in [0, 1] (Python float, or a traced scalar for a ramp; see
      `crm_keep_ratio`).
    mask: optional `[B]` bool of valid (non-padded) pairs; n = number of valid pairs.
  Returns:
    mask_for_A `[B]` bool (selected by B, trains A), mask_for_B `[B]` bool (selected by A).
  """
  if margins_A.ndim != 1 or margins_A.shape != margins_B.shape:
    raise ValueError(
      f"crm_select: margins must both be [B], got {margins_A.shape} and {margins_B.shape}"
    )
  if mask is not None and mask.shape != margins_A.shape:
    raise ValueError(f"crm_select: mask {mask.shape} != margins {margins_A.shape}")
  valid = jnp.ones(margins_A.shape, bool) if mask is None else mask.astype(bool)
  n_valid = margins_A.shape[0] if mask is None else jnp.sum(valid).astype(jnp.int32)
  sel_by_a = _select_sorted(jax.lax.stop_gradient(margins_A), valid, keep_ratio, n_valid)
  sel_by_b = _select_sorted(jax.lax.stop_gradient(margins_B), valid, keep_ratio, n_valid)
  return sel_by_b, sel_by_a


@LOSSES.register("crm_bt")
def crm_bt_loss(*, margins: jax.Array, mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked BT loss on selected pairs: (1/|S|) sum_{i in S} -log sigma(m(i)).

  Unselected pairs get exactly zero gradient; an empty selection gives loss 0.

  Args:
    margins: `[B]` r(y_w) - r(y_l) of the RM being trained.
    mask: `[B]` bool selection (from the peer, see `crm_select`).
  Returns:
    (loss, metrics) with `per_example_loss` `[B]`, `num_selected`, `accuracy` on the selection.
  """
  if margins.ndim != 1 or mask.shape != margins.shape:
    raise ValueError(f"crm_bt_loss: margins {margins.shape} and mask {mask.shape} must be [B]")
  mask = mask.astype(bool)
  per = -jax.nn.log_sigmoid(margins)
  loss = masked_mean(per, mask)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "num_selected": jnp.sum(mask).astype(jnp.float32),
    "accuracy": masked_mean((margins > 0).astype(jnp.float32), mask),
  }
  return loss, metrics


@LOSSES.register("crm")
def crm_loss(
  *,
  margins_A: jax.Array,
  margins_B: jax.Array,
  keep_ratio: float | jax.Array,
  mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Both RMs' cross-selected BT losses in one scalar: L = L_A(S_B) + L_B(S_A).

  Since A's and B's parameters are disjoint, the gradient of the sum with respect to each RM
  is exactly that RM's own cross update
    theta_A <- theta_A - lr grad (1/|S_B|) sum_{i in S_B} l_A(i)   (and symmetrically for B).

  Args:
    margins_A, margins_B: `[B]` margins of the two RMs (differentiable).
    keep_ratio: rho (see `crm_select`).
    mask: optional `[B]` bool of valid pairs.
  Returns:
    (loss, metrics) with the per-RM losses, masks and clean-selection diagnostics.
  """
  mask_for_a, mask_for_b = crm_select(
    margins_A=margins_A, margins_B=margins_B, keep_ratio=keep_ratio, mask=mask
  )
  loss_a, m_a = crm_bt_loss(margins=margins_A, mask=mask_for_a)
  loss_b, m_b = crm_bt_loss(margins=margins_B, mask=mask_for_b)
  metrics = {
    "loss": loss_a + loss_b,
    "loss_A": loss_a,
    "loss_B": loss_b,
    "per_example_loss_A": m_a["per_example_loss"],
    "per_example_loss_B": m_b["per_example_loss"],
    "mask_for_A": mask_for_a,
    "mask_for_B": mask_for_b,
    "num_selected_A": m_a["num_selected"],
    "num_selected_B": m_b["num_selected"],
    "accuracy_A": m_a["accuracy"],
    "accuracy_B": m_b["accuracy"],
    "selection_overlap": jnp.sum(mask_for_a & mask_for_b).astype(jnp.float32),
  }
  return loss_a + loss_b, metrics


def crm_keep_ratio(
  step: int | jax.Array, *, noise_rate: float, ramp_steps: int | None = None
) -> jax.Array | float:
  """Keep ratio rho(t) = 1 - eta_hat * min(t / T_k, 1).

  [U] The co-teaching ramp is not confirmed for CRM; it is off by default (`ramp_steps=None`
  gives the constant rho = 1 - eta_hat, the rule the reviews describe).

  Args:
    step: training step t.
    noise_rate: prior estimate eta_hat of the label-noise rate, in [0, 1].
    ramp_steps: T_k; None disables the ramp.
  """
  if not 0.0 <= noise_rate <= 1.0:
    raise ValueError(f"crm_keep_ratio: noise_rate must be in [0, 1], got {noise_rate}")
  if ramp_steps is None:
    return 1.0 - noise_rate
  if ramp_steps <= 0:
    raise ValueError(f"crm_keep_ratio: ramp_steps must be > 0, got {ramp_steps}")
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / ramp_steps, 1.0)
  return 1.0 - noise_rate * frac


def curriculum_order(margins: jax.Array) -> jax.Array:
  """Epoch curriculum: easy to hard, i.e. a permutation with margins non-increasing.

  Difficulty is the negative reward margin (a large margin is easy). [U] Which model scores the
  margin is not confirmed; the spec's default is the mean of the two RMs' margins from the end
  of the previous epoch (pass `(margins_A + margins_B) / 2`), and a random order in epoch 1.
  Ties keep dataset order.

  Args:
    margins: `[N]` per-example margins over the training set.
  Returns:
    `[N]` int32 permutation; `margins[perm]` is non-increasing.
  """
  if margins.ndim != 1:
    raise ValueError(f"curriculum_order: margins must be [N], got {margins.shape}")
  return jnp.argsort(-margins, stable=True).astype(jnp.int32)
