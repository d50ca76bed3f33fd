"""The tabular bandit of Tajwar et al. (2024): reference policy, rewards, per-method losses, loops.

Paper: "Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data",
arXiv 2404.14367; official code Asap7772/understanding-rlhf (`bandit_experiment/`).
Spec: `shared/specs/preference-and-reward.md` §13.

A = 100 actions (bins of [-1, 1]); a tabular policy is `logits [S, A]` over S states (contexts
are ignored: every state shares pi_ref). Losses take (logits, actions [S, N], rewards [S, N])
and return (loss, metrics) like every loss in the package; `run_bandit` is the sampling loop
(on-policy: sample from the current policy every round; offline: sample from pi_ref).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from critic_jax.losses.common import masked_mean
from critic_jax.losses.preference import dpo_loss
from critic_jax.losses.registry import LOSSES

__all__ = [
  "ALIGNED_REWARD",
  "BON_NEGATIVE_TYPES",
  "MISALIGNED_REWARD",
  "best_of_n_loss",
  "bump_reward",
  "expected_reward",
  "forward_kl_loss",
  "kl_to_ref",
  "pairwise_preference_loss",
  "reverse_kl_loss",
  "run_bandit",
  "rwr_loss",
  "sequence_bump_reward",
  "sft_init_logits",
  "tanh_cauchy_ref_probs",
]

# (center, sigma) of the paper's rewards: peak at the reference mode, or in a low-likelihood region.
ALIGNED_REWARD = (20.0, 10.0)
MISALIGNED_REWARD = (70.0, 10.0)
BON_NEGATIVE_TYPES = ("worst", "mean_worse", "sum_worse")


def tanh_cauchy_ref_probs(
  num_bins: int = 100,
  *,
  loc: float = -0.7,
  scale: float = 0.4,
  low: float = -1.0,
  high: float = 1.0,
) -> jax.Array:
  """pi_ref as the exact bin integral of tanh(Cauchy(loc, scale)) over `num_bins` bins.

  The official code histograms 10,000 samples (`ContinuousSampledCategorical`); this is the
  noise-free limit:  pi_ref(a) = F(atanh(e_{a+1})) - F(atanh(e_a)),  with e the bin edges of
  [low, high] and F(x) = 1/2 + arctan((x - loc)/scale)/pi. On [-1, 1] it sums to 1 and every
  bin has positive mass (the Cauchy tails pile extra mass in the edge bins).

  Returns:
    `[num_bins]` float32 probabilities.
  """
  if not -1.0 <= low < high <= 1.0:
    raise ValueError(f"tanh_cauchy_ref_probs: need -1 <= low < high <= 1, got {low}, {high}")
  edges = jnp.linspace(low, high, num_bins + 1, dtype=jnp.float32)
  cdf = 0.5 + jnp.arctan((jnp.arctanh(edges) - loc) / scale) / jnp.pi
  return jnp.diff(cdf)


def bump_reward(actions: jax.Array, *, center: float, sigma: float = 10.0) -> jax.Array:
  """R_{c,sigma}(a) = exp(-((a - c)/sigma)^2); equals 1 at a = c (official `reward_4/5/8/9`)."""
  return jnp.exp(-jnp.square((jnp.asarray(actions, jnp.float32) - center) / sigma))


def sequence_bump_reward(actions: jax.Array, *, center: float, sigma: float = 10.0) -> jax.Array:
  """Sequence variant (1/n) sum_i R_{c,sigma}(a_i) over the last axis (`reward_6/7`)."""
  return jnp.mean(bump_reward(actions, center=center, sigma=sigma), axis=-1)


def sft_init_logits(ref_probs: jax.Array, num_states: int) -> jax.Array:
  """Logits of the SFT policy: log pi_ref for every state, `[S, A]`.

  The official code runs 100 Adam epochs minimising KL(pi_theta || pi_data); for a tabular
  policy the exact minimiser is log pi_data (KL = 0), which this returns directly.
  """
  return jnp.tile(jnp.log(ref_probs)[None, :], (num_states, 1))


def expected_reward(logits: jax.Array, reward_table: jax.Array) -> jax.Array:
  """Mean over states of E_{a~pi}[R(a)] = sum_a pi(a) R(a); logits `[S, A]`, table `[A]`."""
  return jnp.mean(jnp.sum(jax.nn.softmax(logits, axis=-1) * reward_table, axis=-1))


def kl_to_ref(logits: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """Mean over states of KL(pi || pi_ref); logits `[S, A]`, ref_logp `[A]`."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1))


def _check(name, logits, actions, rewards):
  if logits.ndim != 2 or actions.ndim != 2 or actions.shape != rewards.shape:
    raise ValueError(
      f"{name}: need logits [S, A], actions [S, N], rewards [S, N]; got {logits.shape}, "
      f"{actions.shape}, {rewards.shape}"
    )
  if actions.shape[0] != logits.shape[0]:
    raise ValueError(f"{name}: {actions.shape[0]} action rows for {logits.shape[0]} states")


def _action_logps(logits, actions):
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, actions.astype(jnp.int32), axis=-1)


@LOSSES.register("bandit_best_of_n")
def best_of_n_loss(
  *,
  logits: jax.Array,
  actions: jax.Array,
  rewards: jax.Array,
  neg_weight: float = 0.0,
  negative: str = "worst",
  ref_logp: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Filtered best-of-N behaviour cloning, optionally with a negative gradient.

  Per state s with N samples, b = argmax_n r, w = argmin_n r (first index on ties):
    L_s = -log pi(a_b) + neg_weight * NEG_s,
    NEG_s = log pi(a_w)                       ("worst")
          = mean_{n != b} log pi(a_n)         ("mean_worse")
          = sum_{n != b} log pi(a_n)          ("sum_worse"),
  L = mean_s L_s (official `_off_policy`, whose `beta` is neg_weight). neg_weight = 0 is
  plain best-of-N. With `ref_logp`, log pi is replaced by log(pi/pi_ref) (the official
  "constrained" variants); in this tabular setting that shifts the loss by a constant and leaves
  the gradient unchanged.

  Args:
    logits: `[S, A]` policy logits.
    actions: `[S, N]` int sampled actions.
    rewards: `[S, N]` their rewards.
    neg_weight: weight of the negative-gradient term.
    negative: one of `BON_NEGATIVE_TYPES`.
    ref_logp: optional `[A]` log pi_ref.
  Returns:
    (loss, metrics) with per-state `per_example_loss` and the chosen indices.
  """
  _check("best_of_n_loss", logits, actions, rewards)
  if negative not in BON_NEGATIVE_TYPES:
    raise ValueError(
      f"best_of_n_loss: unknown negative {negative!r}; known: {', '.join(BON_NEGATIVE_TYPES)}"
    )
  lp = _action_logps(logits, actions)
  if ref_logp is not None:
    lp = lp - jnp.asarray(ref_logp)[actions]
  best = jnp.argmax(rewards, axis=-1)
  worst = jnp.argmin(rewards, axis=-1)
  pos = jnp.take_along_axis(lp, best[:, None], axis=-1)[:, 0]
  if negative == "worst":
    neg = jnp.take_along_axis(lp, worst[:, None], axis=-1)[:, 0]
  else:
    others = jnp.arange(lp.shape[-1])[None, :] != best[:, None]
    neg = jnp.sum(jnp.where(others, lp, 0.0), axis=-1)
    if negative == "mean_worse":
      neg = neg / max(lp.shape[-1] - 1, 1)
  per = -pos + neg_weight * neg
  loss = jnp.mean(per)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "best_index": best,
    "worst_index": worst,
    "best_reward_mean": jnp.mean(jnp.max(rewards, axis=-1)),
    "sample_reward_mean": jnp.mean(rewards),
  }
  return loss, metrics


@LOSSES.register("bandit_rwr")
def rwr_loss(
  *, logits: jax.Array, actions: jax.Array, rewards: jax.Array, beta: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reward-weighted regression: L = -mean_{s,n} exp(r_{s,n}/beta) log pi(a_{s,n}).

  The official code calls it AWR and weights by exp(reward / beta) without normalisation.
  [U] The paper's RWR beta is not listed in the spec; 1.0 is a placeholder default.
  """
  _check("rwr_loss", logits, actions, rewards)
  if isinstance(beta, (int, float)) and beta <= 0:
    raise ValueError(f"rwr_loss: beta must be > 0, got {beta}")
  lp = _action_logps(logits, actions)
  w = jnp.exp(rewards / beta)
  per = -w * lp
  loss = jnp.mean(per)
  return loss, {"loss": loss, "per_example_loss": per, "weight_mean": jnp.mean(w)}


def _pair_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
  i, j = np.triu_indices(n, k=1)
  return i.astype(np.int32), j.astype(np.int32)


@LOSSES.register("bandit_pairwise")
def pairwise_preference_loss(
  *,
  logits: jax.Array,
  actions: jax.Array,
  rewards: jax.Array,
  ref_logp: jax.Array,
  loss_type: str = "dpo",
  beta: float = 0.05,
  ipo_target: float = 10.0,
  reward_threshold: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO / IPO on all filtered pairs among the N samples of each state (official `dpo_utils`).

  For every pair n < m of a state, the winner is n if r_n > r_m else m; the pair is kept iff
  |r_w - r_l| >= reward_threshold (0.2 in the scripts). With h the log-ratio difference,
    dpo: -log sigma(beta h),   ipo: (h - ipo_target)^2,
  averaged over kept pairs; a batch with no kept pair gives loss 0. The official IPO code's
  "beta" (10) is the target margin, i.e. 1/(2 tau) of the IPO paper; both go through
  `critic_jax.losses.preference.dpo_loss` (IPO with beta = 1/(2 ipo_target)).

  Args:
    logits: `[S, A]`; actions, rewards: `[S, N]`; ref_logp: `[A]` log pi_ref.
    loss_type: "dpo" or "ipo".
    beta: DPO beta (0.05 default in the scripts).
    ipo_target: IPO target margin (the scripts' IPO beta = 10).
    reward_threshold: minimum reward gap of a kept pair.
  Returns:
    (loss, metrics) with per-pair `per_example_loss` `[S * N(N-1)/2]`, `keep` and the count.
  """
  _check("pairwise_preference_loss", logits, actions, rewards)
  if loss_type not in ("dpo", "ipo"):
    raise ValueError(f"pairwise_preference_loss: unknown loss_type {loss_type!r}; known: dpo, ipo")
  lp = _action_logps(logits, actions)
  ref = jnp.asarray(ref_logp)[actions]
  i, j = _pair_indices(actions.shape[-1])
  ri, rj = rewards[:, i], rewards[:, j]
  first_wins = ri > rj
  lp_w = jnp.where(first_wins, lp[:, i], lp[:, j]).reshape(-1)
  lp_l = jnp.where(first_wins, lp[:, j], lp[:, i]).reshape(-1)
  ref_w = jnp.where(first_wins, ref[:, i], ref[:, j]).reshape(-1)
  ref_l = jnp.where(first_wins, ref[:, j], ref[:, i]).reshape(-1)
  keep = (jnp.abs(ri - rj) >= reward_threshold).reshape(-1)
  if loss_type == "dpo":
    loss, m = dpo_loss(
      policy_chosen_logps=lp_w,
      policy_rejected_logps=lp_l,
      ref_chosen_logps=ref_w,
      ref_rejected_logps=ref_l,
      mask=keep,
      beta=beta,
    )
  else:
    loss, m = dpo_loss(
      policy_chosen_logps=lp_w,
      policy_rejected_logps=lp_l,
      ref_chosen_logps=ref_w,
      ref_rejected_logps=ref_l,
      mask=keep,
      beta=1.0 / (2.0 * ipo_target),
      loss_type="ipo",
    )
  metrics = {
    "loss": loss,
    "per_example_loss": m["per_example_loss"],
    "keep": keep,
    "num_pairs": jnp.sum(keep).astype(jnp.float32),
    "logratio_margin": masked_mean((lp_w - ref_w) - (lp_l - ref_l), keep),
  }
  return loss, metrics


def reverse_kl_loss(*, logits: jax.Array, target_logp: jax.Array) -> tuple[jax.Array, dict]:
  """Mode-seeking objective KL(pi_theta || p*), mean over states; logits `[S, A]`, target `[A]`.

  Gradient w.r.t. the logits: pi * (log pi - log p* - KL). Note: spec §13 invariant 6 (reverse KL
  moves the argmax to the target mode in fewer steps than forward KL) did not hold for this free
  tabular policy in our check (GD and Adam, bimodal target): forward KL got there first, so no
  test asserts it.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  per = jnp.sum(jnp.exp(logp) * (logp - target_logp), axis=-1)
  return jnp.mean(per), {"per_example_loss": per}


def forward_kl_loss(*, logits: jax.Array, target_logp: jax.Array) -> tuple[jax.Array, dict]:
  """Mode-covering objective KL(p* || pi_theta) (maximum likelihood on p*), mean over states.

  Gradient w.r.t. the logits: pi - p*.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(target_logp)
  per = jnp.sum(p * (target_logp - logp), axis=-1)
  return jnp.mean(per), {"per_example_loss": per}


def run_bandit(
  *,
  rng: jax.Array,
  loss_fn: Callable[..., tuple[jax.Array, dict]],
  ref_probs: jax.Array,
  reward_fn: Callable[[jax.Array], jax.Array],
  num_states: int,
  num_rounds: int,
  num_samples: int,
  inner_steps: int,
  learning_rate: float,
  on_policy: bool | jax.Array = True,
  init_logits: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sampling loop: `num_rounds` rounds of (sample N actions per state, query rewards,
  `inner_steps` Adam steps on `loss_fn`), as one `lax.scan`.

  On-policy samples from the current policy every round. Offline samples every round from
  pi_ref: equivalent to one dataset drawn once from pi_ref and consumed in order, so both
  settings spend the same reward-query budget, S * N per round. `inner_steps` is the official
  `num_iterations_on_same_samples`. Jit the call at the call site if it is repeated.

  Args:
    rng: PRNG key.
    loss_fn: called as `loss_fn(logits=..., actions=..., rewards=...)` -> (loss, metrics); bind
      other arguments with `functools.partial` (e.g. `ref_logp` for the pairwise loss).
    ref_probs: `[A]` pi_ref (e.g. `tanh_cauchy_ref_probs()`).
    reward_fn: actions (int array) -> rewards (same shape), traceable.
    num_states, num_rounds, num_samples, inner_steps: S, rounds, N, steps per round.
    learning_rate: Adam step size.
    on_policy: sample from pi_theta (True) or pi_ref (False); a Python or traced bool.
    init_logits: `[S, A]`; `sft_init_logits(ref_probs, S)` when omitted.
  Returns:
    final logits `[S, A]` and per-round metrics `[num_rounds]`: `expected_reward` (exact,
    under pi), `kl` (KL(pi || pi_ref)), `queries` (cumulative reward queries), `loss` (last
    inner step), `sample_reward` (mean reward of the round's samples).
  """
  ref_logp = jnp.log(ref_probs)
  num_actions = ref_probs.shape[0]
  logits0 = sft_init_logits(ref_probs, num_states) if init_logits is None else init_logits
  reward_table = reward_fn(jnp.arange(num_actions))
  opt = optax.adam(learning_rate)

  def objective(logits, actions, rewards):
    return loss_fn(logits=logits, actions=actions, rewards=rewards)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def one_round(carry, key):
    logits, opt_state, queries = carry
    # jnp.where (not a Python branch) so that on_policy may also be a traced bool.
    sample_logits = jnp.where(on_policy, logits, jnp.broadcast_to(ref_logp, logits.shape))
    actions = jax.random.categorical(
      key, sample_logits[:, None, :], axis=-1, shape=(num_states, num_samples)
    )
    rewards = reward_fn(actions)

    def inner(c, _):
      lg, st = c
      (loss, _), g = grad_fn(lg, actions, rewards)
      updates, st = opt.update(g, st, lg)
      return (optax.apply_updates(lg, updates), st), loss

    (logits, opt_state), losses = jax.lax.scan(inner, (logits, opt_state), None, length=inner_steps)
    queries = queries + num_states * num_samples
    out = {
      "expected_reward": expected_reward(logits, reward_table),
      "kl": kl_to_ref(logits, ref_logp),
      "queries": queries,
      "loss": losses[-1],
      "sample_reward": jnp.mean(rewards),
    }
    return (logits, opt_state, queries), out

  keys = jax.random.split(rng, num_rounds)
  carry = (logits0, opt.init(logits0), jnp.zeros((), jnp.int32))
  (logits, _, _), metrics = jax.lax.scan(one_round, carry, keys)
  return logits, metrics
