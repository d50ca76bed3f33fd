"""Offline preference losses on sequence log-probs: the DPO family, D2O, DNO and DNO-Prct.

All losses take sequence log-probabilities `[B]` (sums over response tokens unless the
caller chose per-token means; see `sequence_logps`) and never see a model.

Papers:
  DPO: Rafailov et al. 2023, arXiv 2305.18290; as used by Ivison et al. 2024, arXiv 2406.09279.
  IPO: Azar et al. 2023, arXiv 2310.12036. Hinge (SLiC): Zhao et al. 2023, arXiv 2305.10425.
  cDPO label smoothing: Mitchell 2023 (note "A note on DPO with noisy preferences").
  D2O: Duan et al. 2024, arXiv 2403.03419.
  DNO / DNO-Prct: Rosset et al. 2024, arXiv 2404.03715.
Spec: `shared/specs/preference-and-reward.md` sections 5, 6 and 8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from critic_jax.losses.common import masked_mean, masked_sum
from critic_jax.losses.registry import LOSSES

__all__ = [
  "DPO_LOSS_TYPES",
  "d2o_loss",
  "dno_loss",
  "dno_prct_loss",
  "dno_select_pairs",
  "dno_winrates",
  "dpo_loss",
  "sequence_logps",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _check_shapes(name: str, expected: tuple[int, ...], **arrays) -> None:
  for key, value in arrays.items():
    if value is not None and tuple(value.shape) != tuple(expected):
      raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}, expected {tuple(expected)}")


def _valid(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  return jnp.ones(shape, bool) if mask is None else mask.astype(bool)


def sequence_logps(token_logps: jax.Array, mask: jax.Array, *, reduce: str = "sum") -> jax.Array:
  """Sequence log-probability from per-token log-probs.

  `sum`:  logp(y|x) = sum_t mask[t] * logp_t (the DPO convention, spec §0).
  `mean`: the same divided by the number of unmasked tokens (length-normalised, as in
  SimPO or TRL's IPO); a row with an empty mask gives 0.

  Args:
    token_logps: `[B, T]` float per-token log-probs of the response tokens.
    mask: `[B, T]` bool, true on response tokens (EOS included), false on prompt/padding.
    reduce: "sum" or "mean".
  Returns:
    `[B]` float sequence log-probs.
  """
  if token_logps.shape != mask.shape or token_logps.ndim != 2:
    raise ValueError(
      f"sequence_logps: token_logps {token_logps.shape} and mask {mask.shape} must both be [B, T]"
    )
  mask = mask.astype(bool)
  if reduce == "sum":
    return masked_sum(token_logps, mask, axis=-1)
  if reduce == "mean":
    return masked_mean(token_logps, mask, axis=-1)
  raise ValueError(f"sequence_logps: unknown reduce {reduce!r}; known: sum, mean")


@LOSSES.register("dpo")
def dpo_loss(
  *,
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  mask: jax.Array | None = None,
  chosen_num_tokens: jax.Array | None = None,
  beta: float = 0.1,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
  sft_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO and its IPO / hinge / conservative (cDPO) / DPO+SFT variants (arXiv 2305.18290).

  With per-pair log-ratio difference
    h = (logp(y_w) - logp_ref(y_w)) - (logp(y_l) - logp_ref(y_l)),   z = beta * h,
  the per-pair loss is
    sigmoid: -(1 - eps) log sigma(z) - eps log sigma(-z)   (eps = label_smoothing; cDPO form:
             the label is flipped with probability eps; eps = 0 is plain DPO)
    ipo:     (h - 1/(2 beta))^2                              (Azar et al., arXiv 2310.12036)
    hinge:   max(0, 1 - z)                                   (SLiC-style, as in TRL)
  averaged over the valid pairs. Gradient of plain DPO:
    grad L = -beta * sigma(-z) * (grad logp(y_w) - grad logp(y_l)).

  DPO + SFT (`sft_weight` = lambda > 0) adds lambda * NLL(y_w), normalised per token:
    * with `chosen_num_tokens` (and `*_logps` given as sequence sums), the NLL is the
      batch token-mean  -sum_b logp(y_w,b) / sum_b n_b  -- the same normaliser as
      `critic_jax.losses.sft.next_token_loss`;
    * without it, the NLL is -mean_b policy_chosen_logps[b]; pass per-token means
      (`sequence_logps(..., reduce="mean")`) to get the sequence-mean-token-mean form.

  Args:
    policy_chosen_logps: `[B]` log pi_theta(y_w|x).
    policy_rejected_logps: `[B]` log pi_theta(y_l|x).
    ref_chosen_logps: `[B]` log pi_ref(y_w|x) (a constant: stop_gradient is applied).
    ref_rejected_logps: `[B]` log pi_ref(y_l|x).
    mask: optional `[B]` bool, false for pairs to leave out (padding, filtered pairs).
    chosen_num_tokens: optional `[B]` number of response tokens of y_w (for the SFT term).
    beta: KL strength (0.1 in Tulu-2 / Ivison et al.).
    loss_type: one of `DPO_LOSS_TYPES`.
    label_smoothing: cDPO flip probability in [0, 0.5); only for loss_type="sigmoid".
    sft_weight: weight of the chosen NLL term (0 disables it).
  Returns:
    (loss, metrics). Metrics hold per-pair `per_example_loss`, `logits` (z),
    `chosen_rewards`/`rejected_rewards` (implicit rewards beta * log-ratio), `reward_margins`,
    `grad_weight` (sigma(-z)), and batch means `reward_accuracy`, `reward_margin`, ...
  """
  shape = tuple(policy_chosen_logps.shape)
  if len(shape) != 1:
    raise ValueError(f"dpo_loss: log-probs must be [B], got {shape}")
  _check_shapes(
    "dpo_loss",
    shape,
    policy_rejected_logps=policy_rejected_logps,
    ref_chosen_logps=ref_chosen_logps,
    ref_rejected_logps=ref_rejected_logps,
    mask=mask,
    chosen_num_tokens=chosen_num_tokens,
  )
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(
      f"dpo_loss: unknown loss_type {loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}"
    )
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
  if label_smoothing > 0 and loss_type != "sigmoid":
    raise ValueError(
      f"dpo_loss: label_smoothing is defined for loss_type='sigmoid' only, got {loss_type!r}"
    )
  if isinstance(beta, (int, float)) and beta <= 0:
    raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
  valid = _valid(mask, shape)

  # The reference is frozen: its log-probs are constants of the loss.
  chosen_logratios = policy_chosen_logps - jax.lax.stop_gradient(ref_chosen_logps)
  rejected_logratios = policy_rejected_logps - jax.lax.stop_gradient(ref_rejected_logps)
  h = chosen_logratios - rejected_logratios
  z = beta * h
  if loss_type == "sigmoid":
    eps = label_smoothing
    per_pair = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  elif loss_type == "ipo":
    per_pair = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    per_pair = jax.nn.relu(1.0 - z)
  pref_loss = masked_mean(per_pair, valid)

  chosen_rewards = beta * chosen_logratios
  rejected_rewards = beta * rejected_logratios
  margins = chosen_rewards - rejected_rewards
  metrics = {
    "per_example_loss": per_pair,
    "logits": z,
    "chosen_rewards": chosen_rewards,
    "rejected_rewards": rejected_rewards,
    "reward_margins": margins,
    "grad_weight": jax.nn.sigmoid(-z),
    "pref_loss": pref_loss,
    "reward_accuracy": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), valid),
    "reward_margin": masked_mean(margins, valid),
    "chosen_rewards_mean": masked_mean(chosen_rewards, valid),
    "rejected_rewards_mean": masked_mean(rejected_rewards, valid),
    "policy_chosen_logps_mean": masked_mean(policy_chosen_logps, valid),
    "policy_rejected_logps_mean": masked_mean(policy_rejected_logps, valid),
  }
  loss = pref_loss
  if not (isinstance(sft_weight, (int, float)) and sft_weight == 0):
    if chosen_num_tokens is None:
      sft = masked_mean(-policy_chosen_logps, valid)
    else:
      ntok = masked_sum(chosen_num_tokens.astype(jnp.float32), valid)
      sft = masked_sum(-policy_chosen_logps, valid) / jnp.maximum(ntok, 1.0)
    metrics["sft_loss"] = sft
    loss = loss + sft_weight * sft
  metrics["loss"] = loss
  return loss, metrics


@LOSSES.register("d2o")
def d2o_loss(
  *,
  policy_neg_logps: jax.Array,
  refplus_neg_logps: jax.Array,
  policy_self_logps: jax.Array,
  refminus_self_logps: jax.Array,
  self_mask: jax.Array | None = None,
  mask: jax.Array | None = None,
  alpha: float = 0.1,
  beta: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """D2O: distributional dispreference optimisation from negatives only (arXiv 2403.03419).

    u(x) = beta * mean_{i valid} log(pi_theta(y_i|x) / pi_{r-}(y_i|x))
           - alpha * log(pi_theta(y_l|x) / pi_{r+}(y_l|x)),
    L = -mean_x log sigma(u(x)),

  where y_1..y_K are self-samples drawn once from the reference (the positive side) and y_l is
  the human-labelled negative. The K-average is over the valid self-samples (`self_mask`), i.e.
  it divides by the valid count rather than K, so duplicating every sample leaves the loss
  unchanged. A prompt with no valid self-sample is left out of the batch mean (its u would be
  gradient ascent on the negative alone, the collapse D2O is built to avoid).
  Gradient: -sigma(-u) * [(beta/K) sum_i grad logp(y_i) - alpha grad logp(y_l)].
  With K = 1, alpha = beta and pi_{r+} = pi_{r-} = pi_ref this is DPO with y_w = y_1.

  Args:
    policy_neg_logps: `[B]` log pi_theta(y_l|x).
    refplus_neg_logps: `[B]` log pi_{r+}(y_l|x) ("more helpful" reference; the SFT model).
      Reference log-probs are constants of the loss (stop_gradient).
    policy_self_logps: `[B, K]` log pi_theta(y_i|x) of the self-samples.
    refminus_self_logps: `[B, K]` log pi_{r-}(y_i|x) ("more harmful" reference; the SFT model).
    self_mask: optional `[B, K]` bool, true for valid self-samples.
    mask: optional `[B]` bool, false for padded prompts.
    alpha: weight of the negative term (0.1 in the paper).
    beta: weight of the self-sample term (0.1 in the paper).
  Returns:
    (loss, metrics) with per-prompt `per_example_loss`, `u`, `self_logratio`, `neg_logratio`,
    `grad_weight` (sigma(-u)) and their batch means.
  """
  shape = tuple(policy_neg_logps.shape)
  if len(shape) != 1 or policy_self_logps.ndim != 2 or policy_self_logps.shape[0] != shape[0]:
    raise ValueError(
      f"d2o_loss: expected policy_neg_logps [B] and policy_self_logps [B, K], got {shape} and "
      f"{tuple(policy_self_logps.shape)}"
    )
  _check_shapes("d2o_loss", shape, refplus_neg_logps=refplus_neg_logps, mask=mask)
  _check_shapes(
    "d2o_loss",
    tuple(policy_self_logps.shape),
    refminus_self_logps=refminus_self_logps,
    self_mask=self_mask,
  )
  smask = _valid(self_mask, tuple(policy_self_logps.shape))
  valid = _valid(mask, shape) & jnp.any(smask, axis=-1)

  refminus_self_logps = jax.lax.stop_gradient(refminus_self_logps)  # frozen references
  self_logratio = masked_mean(policy_self_logps - refminus_self_logps, smask, axis=-1)
  neg_logratio = policy_neg_logps - jax.lax.stop_gradient(refplus_neg_logps)
  u = beta * self_logratio - alpha * neg_logratio
  per = -jax.nn.log_sigmoid(u)
  loss = masked_mean(per, valid)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "u": u,
    "self_logratio": self_logratio,
    "neg_logratio": neg_logratio,
    "grad_weight": jax.nn.sigmoid(-u),
    "u_mean": masked_mean(u, valid),
    "self_logratio_mean": masked_mean(self_logratio, valid),
    "neg_logratio_mean": masked_mean(neg_logratio, valid),
    "num_valid_self": jnp.sum(smask, axis=-1).astype(jnp.float32),
  }
  return loss, metrics


def dno_winrates(pref_probs: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Self-play reward r_t(y_i) = E_{y'~pi_t} P(y_i > y') over K candidates (DNO, §8).

  Args:
    pref_probs: `[..., K, K]` with P[i, j] = P(y_i > y_j); a consistent table has
      P + P^T = 1 and P[i, i] = 1/2.
    weights: optional `[..., K]` probabilities of the candidates under pi_t (rows sum to 1);
      uniform 1/K (K on-policy samples) when omitted.
  Returns:
    `[..., K]` win-rates in [0, 1]. For a consistent table, sum_i w_i r_i = 1/2.
  """
  if pref_probs.ndim < 2 or pref_probs.shape[-1] != pref_probs.shape[-2]:
    raise ValueError(f"dno_winrates: pref_probs must be [..., K, K], got {pref_probs.shape}")
  k = pref_probs.shape[-1]
  if weights is None:
    return jnp.mean(pref_probs, axis=-1)
  if weights.shape[-1] != k:
    raise ValueError(f"dno_winrates: weights {weights.shape} do not match K={k}")
  return jnp.einsum("...ij,...j->...i", pref_probs, weights)


@LOSSES.register("dno")
def dno_loss(
  *,
  policy_logps: jax.Array,
  prev_logps: jax.Array,
  winrate: jax.Array,
  eta: float,
  mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DNO batched on-policy regression objective for one iteration t (arXiv 2404.03715).

    Delta = eta * [log(pi(y1)/pi_t(y1)) - log(pi(y2)/pi_t(y2))],
    q = sigma(r_t(y1) - r_t(y2)),
    L = -mean [ q log sigma(Delta) + (1 - q) log sigma(-Delta) ].

  The minimiser over a free policy is pi_{t+1} = pi_t exp(r_t/eta) / Z (soft policy
  iteration). [M] The equation is from memory of the paper (spec §8), consistent with that
  closed form. Since win-rates lie in [0, 1], q lies in [sigma(-1), sigma(1)].

  Args:
    policy_logps: `[B, 2]` log pi(y1|x), log pi(y2|x).
    prev_logps: `[B, 2]` the same under the previous iterate pi_t (a constant: stop_gradient).
    winrate: `[B, 2]` r_t(x, y1), r_t(x, y2) in [0, 1] (see `dno_winrates`).
    eta: inverse step size of the soft policy iteration (no default: not given by the paper).
    mask: optional `[B]` bool.
  Returns:
    (loss, metrics) with per-pair `per_example_loss`, `delta`, `soft_label`.
  """
  if policy_logps.ndim != 2 or policy_logps.shape[-1] != 2:
    raise ValueError(f"dno_loss: policy_logps must be [B, 2], got {policy_logps.shape}")
  shape = tuple(policy_logps.shape)
  _check_shapes("dno_loss", shape, prev_logps=prev_logps, winrate=winrate)
  _check_shapes("dno_loss", shape[:1], mask=mask)
  if isinstance(eta, (int, float)) and eta <= 0:
    raise ValueError(f"dno_loss: eta must be > 0, got {eta}")
  valid = _valid(mask, shape[:1])
  logratio = policy_logps - jax.lax.stop_gradient(prev_logps)  # pi_t is frozen
  delta = eta * (logratio[:, 0] - logratio[:, 1])
  q = jax.nn.sigmoid(winrate[:, 0] - winrate[:, 1])
  per = -(q * jax.nn.log_sigmoid(delta) + (1.0 - q) * jax.nn.log_sigmoid(-delta))
  loss = masked_mean(per, valid)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "delta": delta,
    "soft_label": q,
    "delta_mean": masked_mean(delta, valid),
    "soft_label_mean": masked_mean(q, valid),
    "accuracy": masked_mean(((delta > 0) == (q > 0.5)).astype(jnp.float32), valid),
  }
  return loss, metrics


@LOSSES.register("dno_prct")
def dno_prct_loss(
  *,
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  prev_chosen_logps: jax.Array,
  prev_rejected_logps: jax.Array,
  keep: jax.Array | None = None,
  beta: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DNO-Prct: DPO against the previous iterate pi_t on selected pairs (arXiv 2404.03715).

    L_t = -mean_{kept} log sigma(beta [log(pi(y+)/pi_t(y+)) - log(pi(y-)/pi_t(y-))]),
  with pi initialised from pi_t and (y+, y-, keep) from `dno_select_pairs`.
  [U] beta is not confirmed by the paper; 0.1 is the DPO default.

  Args:
    policy_chosen_logps / policy_rejected_logps: `[B]` under the trained policy.
    prev_chosen_logps / prev_rejected_logps: `[B]` under the previous iterate.
    keep: optional `[B]` bool from the pair selector.
    beta: DPO temperature.
  Returns:
    `dpo_loss` (loss, metrics).
  """
  return dpo_loss(
    policy_chosen_logps=policy_chosen_logps,
    policy_rejected_logps=policy_rejected_logps,
    ref_chosen_logps=prev_chosen_logps,
    ref_rejected_logps=prev_rejected_logps,
    mask=keep,
    beta=beta,
  )


def dno_select_pairs(
  scores: jax.Array, *, margin_threshold: float, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """DNO-Prct pair selection: best vs worst candidate, kept only on a large margin.

  Candidates are K policy samples plus the gold (teacher) response; `scores` are their judge
  scores (e.g. win-rates). y+ = argmax, y- = argmin (ties go to the lowest index), and the
  pair is kept iff score(y+) - score(y-) >= margin_threshold and y+ != y- (an all-tied row is
  never kept). [U] The threshold delta is not confirmed by the paper.

  Args:
    scores: `[B, C]` candidate scores (C = K + 1).
    margin_threshold: delta.
    mask: optional `[B, C]` bool, false for missing candidates.
  Returns:
    idx_pos `[B]` int32, idx_neg `[B]` int32, keep `[B]` bool.
  """
  if scores.ndim != 2:
    raise ValueError(f"dno_select_pairs: scores must be [B, C], got {scores.shape}")
  _check_shapes("dno_select_pairs", tuple(scores.shape), mask=mask)
  valid = _valid(mask, tuple(scores.shape))
  hi = jnp.where(valid, scores, -jnp.inf)
  lo = jnp.where(valid, scores, jnp.inf)
  idx_pos = jnp.argmax(hi, axis=-1).astype(jnp.int32)
  idx_neg = jnp.argmin(lo, axis=-1).astype(jnp.int32)
  best = jnp.take_along_axis(scores, idx_pos[:, None], axis=-1)[:, 0]
  worst = jnp.take_along_axis(scores, idx_neg[:, None], axis=-1)[:, 0]
  keep = (idx_pos != idx_neg) & (best - worst >= margin_threshold) & (jnp.sum(valid, -1) >= 2)
  return idx_pos, idx_neg, keep
