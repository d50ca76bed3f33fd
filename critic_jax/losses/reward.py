"""Bradley-Terry reward modelling and the KL-penalised PPO reward (Stiennon et al. 2020).

Paper: "Learning to summarize from human feedback", arXiv 2009.01325.
Spec: `shared/specs/preference-and-reward.md` §1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from critic_jax.losses.common import masked_mean
from critic_jax.losses.registry import LOSSES

__all__ = [
  "best_of_n_kl",
  "bradley_terry_loss",
  "center_rewards",
  "reward_bias",
  "token_rewards",
]


@LOSSES.register("bt")
def bradley_terry_loss(
  *,
  chosen_rewards: jax.Array,
  rejected_rewards: jax.Array,
  margin: jax.Array | float | None = None,
  mask: jax.Array | None = None,
  tau: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Bradley-Terry pairwise reward-model loss.

    L = -mean_b log sigma((r_w - r_l - m) / tau)

  `tau = 1` and `m = 0` give the RM loss of Stiennon et al. (arXiv 2009.01325); the margin
  and temperature are those of the GPM code's BT baseline (arXiv 2410.02197). The loss is
  invariant to adding one constant to both rewards, and with m = 0, tau = 1:
    dL/dr_w = -(1 - sigma(r_w - r_l)) / B,  dL/dr_l = -dL/dr_w.

  Args:
    chosen_rewards: `[B]` RM scores of the preferred responses.
    rejected_rewards: `[B]` RM scores of the dispreferred responses.
    margin: optional `[B]` (or scalar) margin m subtracted from the difference.
    mask: optional `[B]` bool; false pairs are left out of every mean.
    tau: temperature (1 for BT in the GPM code).
  Returns:
    (loss, metrics): `per_example_loss` `[B]`, `prob` `[B]` = sigma((r_w - r_l - m)/tau),
    `accuracy` = mean(r_w > r_l) (ties count as wrong), `margin` = mean(r_w - r_l), and the
    mean chosen/rejected rewards.
  """
  if chosen_rewards.ndim != 1 or chosen_rewards.shape != rejected_rewards.shape:
    raise ValueError(
      f"bradley_terry_loss: rewards must both be [B], got {chosen_rewards.shape} and "
      f"{rejected_rewards.shape}"
    )
  if mask is not None and mask.shape != chosen_rewards.shape:
    raise ValueError(f"bradley_terry_loss: mask {mask.shape} != rewards {chosen_rewards.shape}")
  if isinstance(tau, (int, float)) and tau <= 0:
    raise ValueError(f"bradley_terry_loss: tau must be > 0, got {tau}")
  valid = jnp.ones(chosen_rewards.shape, bool) if mask is None else mask.astype(bool)
  diff = chosen_rewards - rejected_rewards
  logits = (diff if margin is None else diff - margin) / tau
  per = -jax.nn.log_sigmoid(logits)
  loss = masked_mean(per, valid)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "prob": jax.nn.sigmoid(logits),
    "accuracy": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), valid),
    "margin": masked_mean(diff, valid),
    "chosen_rewards_mean": masked_mean(chosen_rewards, valid),
    "rejected_rewards_mean": masked_mean(rejected_rewards, valid),
  }
  return loss, metrics


def reward_bias(reference_rewards: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Normalising bias b = mean r(x, y_ref) over the dataset's reference responses (§1).

  Serving r~ = r - b makes the human reference summaries score 0 on average. Shift
  invariance of the BT loss means this changes neither the loss nor the pair accuracy.

  Args:
    reference_rewards: `[N_ref]` RM scores of the reference responses.
    mask: optional `[N_ref]` bool for padded entries.
  Returns:
    scalar bias.
  """
  if mask is None:
    mask = jnp.ones(reference_rewards.shape, bool)
  return masked_mean(reference_rewards, mask.astype(bool))


def center_rewards(rewards: jax.Array, *, bias: jax.Array | float) -> jax.Array:
  """r~ = r - b (Stiennon et al.); `bias` from `reward_bias`."""
  return rewards - bias


def token_rewards(
  *,
  scores: jax.Array,
  policy_logps: jax.Array,
  ref_logps: jax.Array,
  mask: jax.Array,
  beta: float = 0.05,
) -> tuple[jax.Array, jax.Array]:
  """Per-token PPO reward: KL penalty on every response token, RM score on the last one.

    rew[b, t] = -beta * (logp_RL[b, t] - logp_SFT[b, t]) * mask[b, t]
                + score[b] * 1[t == t_last(b)],
  with t_last the last unmasked index (right padding and holes allowed), so
    sum_t rew[b, t] = score[b] - beta * kl[b],  kl[b] = sum_t mask * (logp_RL - logp_SFT).
  A row with an empty mask gets all-zero rewards. beta = 0.05 is the paper's KL coefficient.

  Args:
    scores: `[B]` (normalised) RM scores r~(x, y).
    policy_logps: `[B, T]` per-token log-probs under the RL policy.
    ref_logps: `[B, T]` per-token log-probs under the SFT policy.
    mask: `[B, T]` bool, true on response tokens.
    beta: KL coefficient.
  Returns:
    token_rewards `[B, T]` and the sampled KL estimate kl `[B]`.
  """
  if policy_logps.ndim != 2 or policy_logps.shape != ref_logps.shape:
    raise ValueError(
      f"token_rewards: logps must both be [B, T], got {policy_logps.shape}, {ref_logps.shape}"
    )
  if mask.shape != policy_logps.shape or scores.shape != policy_logps.shape[:1]:
    raise ValueError(
      f"token_rewards: mask {mask.shape} must be [B, T] and scores {scores.shape} [B] for "
      f"logps {policy_logps.shape}"
    )
  mask = mask.astype(bool)
  t = mask.shape[-1]
  kl_tok = jnp.where(mask, policy_logps - ref_logps, 0.0)
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=-1)
  at_last = (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(mask, axis=-1, keepdims=True)
  rewards = -beta * kl_tok + jnp.where(at_last, scores[:, None], 0.0)
  return rewards, jnp.sum(kl_tok, axis=-1)


def best_of_n_kl(n: int | jax.Array) -> jax.Array:
  """Analytic KL(BoN_N || pi) = log N - (N - 1)/N of best-of-N sampling (§1, [S]).

  Exact for a continuous reward with no ties; an upper bound otherwise.
  """
  n = jnp.asarray(n, jnp.float32)
  return jnp.log(n) - (n - 1.0) / n
