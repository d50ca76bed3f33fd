"""Seeded synthetic preference data (numpy only) for the small-scale reproductions.

* `noisy_bt_pairs`: pairs ordered by a hidden ground-truth score, with symmetric label flips
  at a known rate (and which labels were flipped), for BT / CRM (spec §1, §4).
* `random_skew_target`, `rock_paper_scissors_target`, `cyclic_preference_pairs`: intransitive
  preferences over N items, for GPM vs BT and DNO (spec §3, §8).
* `negatives_only_data`: prompts with human-labelled negatives only (plus reference
  self-samples), for D2O (spec §6).

Every generator takes `rng`: an int seed or a `numpy.random.Generator`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
  "NegativesOnlyData",
  "PreferencePairs",
  "cyclic_preference_pairs",
  "negatives_only_data",
  "noisy_bt_pairs",
  "random_skew_target",
  "rock_paper_scissors_target",
]


def _rng(rng) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


class PreferencePairs(NamedTuple):
  """Labelled pairs over items 0..N-1.

  Attributes:
    chosen: `[P]` int64 item labelled preferred.
    rejected: `[P]` int64 item labelled dispreferred.
    flipped: `[P]` bool, true where the label disagrees with the ground truth.
    scores: `[N]` float64 hidden ground-truth scores (BT generator; None for cyclic data).
    features: `[N, D]` float64 item features with scores = features @ weights (or None).
    weights: `[D]` float64 hidden linear scorer (or None).
  """

  chosen: np.ndarray
  rejected: np.ndarray
  flipped: np.ndarray
  scores: np.ndarray | None = None
  features: np.ndarray | None = None
  weights: np.ndarray | None = None


def _distinct_pairs(rng: np.random.Generator, num_items: int, num_pairs: int):
  """Uniform ordered pairs (i, j) with i != j."""
  i = rng.integers(num_items, size=num_pairs)
  j = (i + rng.integers(1, num_items, size=num_pairs)) % num_items
  return i, j


def _flip_mask(rng: np.random.Generator, n: int, noise_rate: float, mode: str) -> np.ndarray:
  if not 0.0 <= noise_rate <= 1.0:
    raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
  if mode == "exact":
    flipped = np.zeros(n, bool)
    flipped[rng.permutation(n)[: int(round(noise_rate * n))]] = True
    return flipped
  if mode == "bernoulli":
    return rng.random(n) < noise_rate
  raise ValueError(f"unknown flip mode {mode!r}; known: exact, bernoulli")


def noisy_bt_pairs(
  *,
  num_items: int,
  num_pairs: int,
  noise_rate: float,
  rng,
  dim: int | None = None,
  scores: np.ndarray | None = None,
  flip_mode: str = "exact",
) -> PreferencePairs:
  """Pairs ordered by a hidden score, with symmetric label noise.

  Each pair is two distinct items drawn uniformly; the true winner has the higher score (the
  lower index on an exact tie). A label is then flipped (chosen <-> rejected) for exactly
  round(noise_rate * P) random pairs (`flip_mode="exact"`) or independently with probability
  noise_rate (`"bernoulli"`).

  Args:
    num_items: N.
    num_pairs: P.
    noise_rate: flip rate eta.
    rng: seed or Generator.
    dim: if given, items get features `[N, dim]` ~ N(0, 1) and scores = features @ w with
      w ~ N(0, I) (a linear RM can represent the truth).
    scores: explicit `[N]` ground-truth scores (overrides `dim`).
    flip_mode: "exact" or "bernoulli".
  Returns:
    `PreferencePairs` with `flipped` marking the noisy labels.
  """
  if num_items < 2:
    raise ValueError(f"noisy_bt_pairs: need num_items >= 2, got {num_items}")
  g = _rng(rng)
  features = weights = None
  if scores is not None:
    scores = np.asarray(scores, np.float64)
    if scores.shape != (num_items,):
      raise ValueError(f"noisy_bt_pairs: scores {scores.shape} must be [{num_items}]")
  elif dim is not None:
    features = g.standard_normal((num_items, dim))
    weights = g.standard_normal(dim)
    scores = features @ weights
  else:
    scores = g.standard_normal(num_items)
  i, j = _distinct_pairs(g, num_items, num_pairs)
  i_wins = (scores[i] > scores[j]) | ((scores[i] == scores[j]) & (i < j))
  win = np.where(i_wins, i, j)
  lose = np.where(i_wins, j, i)
  flipped = _flip_mask(g, num_pairs, noise_rate, flip_mode)
  chosen = np.where(flipped, lose, win)
  rejected = np.where(flipped, win, lose)
  return PreferencePairs(chosen, rejected, flipped, scores, features, weights)


def random_skew_target(num_items: int, rng, *, scale: float = 1.0) -> np.ndarray:
  """Random skew-symmetric target T (T = -T^T, zero diagonal), upper entries ~ N(0, scale^2).

  T[i, j] > 0 means item i is preferred to item j; P(i > j) = sigma(T[i, j]) is a consistent
  (generally intransitive) preference table.
  """
  g = _rng(rng)
  upper = np.triu(g.standard_normal((num_items, num_items)) * scale, k=1)
  return upper - upper.T


def rock_paper_scissors_target(num_items: int = 3) -> np.ndarray:
  """Balanced cyclic tournament: item i beats items i+1, ..., i+(N-1)/2 (mod N), N odd.

  N = 3 is rock-paper-scissors (0 beats 1, 1 beats 2, 2 beats 0). Every item wins exactly
  (N-1)/2 of its games, so no scalar score orders more than a transitive fraction of pairs
  correctly (2/3 for N = 3). Returns the `[N, N]` skew-symmetric sign matrix.
  """
  if num_items < 3 or num_items % 2 == 0:
    raise ValueError(f"rock_paper_scissors_target: num_items must be odd and >= 3, got {num_items}")
  t = np.zeros((num_items, num_items))
  for i in range(num_items):
    for d in range(1, (num_items - 1) // 2 + 1):
      t[i, (i + d) % num_items] = 1.0
      t[(i + d) % num_items, i] = -1.0
  return t


def cyclic_preference_pairs(
  target: np.ndarray,
  *,
  num_pairs: int | None = None,
  rng=None,
  stochastic: bool = False,
  temperature: float = 1.0,
) -> PreferencePairs:
  """Labelled pairs from a skew-symmetric target.

  With `num_pairs=None`, every unordered pair {i, j} with T[i, j] != 0 appears once, oriented by
  sign(T) (deterministic, no rng needed). Otherwise `num_pairs` ordered pairs i != j are drawn
  uniformly and labelled by sign(T[i, j]) (pairs with T = 0 are labelled by index), or, with
  `stochastic=True`, by a draw with P(i > j) = sigma(T[i, j] / temperature); `flipped` marks
  draws that disagree with sign(T).

  Args:
    target: `[N, N]` skew-symmetric.
    num_pairs, rng, stochastic, temperature: see above.
  Returns:
    `PreferencePairs` (scores/features None).
  """
  target = np.asarray(target, np.float64)
  n = target.shape[0]
  if target.shape != (n, n) or not np.allclose(target, -target.T):
    raise ValueError("cyclic_preference_pairs: target must be a square skew-symmetric matrix")
  if num_pairs is None:
    i, j = np.triu_indices(n, k=1)
    nz = target[i, j] != 0
    i, j = i[nz], j[nz]
    i_wins = target[i, j] > 0
    chosen, rejected = np.where(i_wins, i, j), np.where(i_wins, j, i)
    return PreferencePairs(chosen, rejected, np.zeros(len(chosen), bool))
  g = _rng(rng)
  i, j = _distinct_pairs(g, n, num_pairs)
  t = target[i, j]
  truth = (t > 0) | ((t == 0) & (i < j))
  if stochastic:
    i_wins = g.random(num_pairs) < 1.0 / (1.0 + np.exp(-t / temperature))
  else:
    i_wins = truth
  chosen, rejected = np.where(i_wins, i, j), np.where(i_wins, j, i)
  return PreferencePairs(chosen, rejected, i_wins != truth)


class NegativesOnlyData(NamedTuple):
  """Negatives-only alignment data for D2O on a tabular action space.

  Attributes:
    prompts: `[P]` int64 prompt ids 0..num_prompts-1 (each repeated negatives_per_prompt times).
    negatives: `[P]` int64 human-labelled negative actions (all in the harmful set).
    self_samples: `[P, K]` int64 reference self-samples (K = 0 gives shape [P, 0]).
    harmful: `[A]` bool mask of harmful actions.
  """

  prompts: np.ndarray
  negatives: np.ndarray
  self_samples: np.ndarray
  harmful: np.ndarray


def negatives_only_data(
  *,
  num_prompts: int,
  harmful: np.ndarray,
  rng,
  ref_probs: np.ndarray | None = None,
  negatives_per_prompt: int = 1,
  num_self_samples: int = 0,
) -> NegativesOnlyData:
  """Prompts paired only with harmful (negative) responses, plus reference self-samples.

  Negatives are drawn from pi_ref restricted to the harmful set and renormalised (what the
  reference does that is bad; uniform over the harmful set without `ref_probs`). The K
  self-samples per row are drawn from pi_ref over all actions, once, before training, as in
  D2O (positives are never human-labelled).

  Args:
    num_prompts: number of prompts.
    harmful: `[A]` bool mask, or an int array of harmful action ids (then A = max id + 1
      unless `ref_probs` gives A).
    rng: seed or Generator.
    ref_probs: optional `[A]` reference policy probabilities.
    negatives_per_prompt: negatives per prompt.
    num_self_samples: K.
  Returns:
    `NegativesOnlyData`.
  """
  g = _rng(rng)
  harmful = np.asarray(harmful)
  if harmful.dtype != bool:
    a = len(ref_probs) if ref_probs is not None else int(harmful.max()) + 1
    mask = np.zeros(a, bool)
    mask[harmful] = True
    harmful = mask
  a = harmful.shape[0]
  if not harmful.any():
    raise ValueError("negatives_only_data: the harmful set is empty")
  if ref_probs is None:
    ref_probs = np.full(a, 1.0 / a)
  ref_probs = np.asarray(ref_probs, np.float64)
  if ref_probs.shape != (a,):
    raise ValueError(f"negatives_only_data: ref_probs {ref_probs.shape} must be [{a}]")
  bad = np.where(harmful, ref_probs, 0.0)
  if bad.sum() <= 0:
    raise ValueError("negatives_only_data: pi_ref puts no mass on the harmful set")
  p = num_prompts * negatives_per_prompt
  prompts = np.repeat(np.arange(num_prompts), negatives_per_prompt)
  negatives = g.choice(a, size=p, p=bad / bad.sum())
  self_samples = g.choice(a, size=(p, num_self_samples), p=ref_probs / ref_probs.sum())
  return NegativesOnlyData(prompts, negatives, self_samples, harmful)
