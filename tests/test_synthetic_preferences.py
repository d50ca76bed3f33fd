"""Seeded synthetic preference generators (numpy only)."""

import itertools

import numpy as np
import pytest

from critic_jax.data.synthetic_preferences import (
  cyclic_preference_pairs,
  negatives_only_data,
  noisy_bt_pairs,
  random_skew_target,
  rock_paper_scissors_target,
)


def test_noisy_pairs_exact_flip_rate_and_labels():
  d = noisy_bt_pairs(num_items=50, num_pairs=400, noise_rate=0.25, rng=0)
  assert d.chosen.shape == d.rejected.shape == d.flipped.shape == (400,)
  assert np.all(d.chosen != d.rejected)
  assert d.flipped.sum() == 100
  truth = d.scores[d.chosen] > d.scores[d.rejected]
  np.testing.assert_array_equal(truth, ~d.flipped)
  d2 = noisy_bt_pairs(num_items=50, num_pairs=400, noise_rate=0.25, rng=0)
  np.testing.assert_array_equal(d.chosen, d2.chosen)
  np.testing.assert_array_equal(d.flipped, d2.flipped)
  d3 = noisy_bt_pairs(num_items=50, num_pairs=400, noise_rate=0.25, rng=1)
  assert not np.array_equal(d.chosen, d3.chosen)


def test_noisy_pairs_features_bernoulli_and_explicit_scores():
  d = noisy_bt_pairs(
    num_items=30,
    num_pairs=5000,
    noise_rate=0.4,
    rng=np.random.default_rng(3),
    dim=4,
    flip_mode="bernoulli",
  )
  np.testing.assert_allclose(d.scores, d.features @ d.weights)
  assert abs(d.flipped.mean() - 0.4) < 0.03
  np.testing.assert_array_equal(d.scores[d.chosen] > d.scores[d.rejected], ~d.flipped)
  # Items drawn uniformly: every item appears.
  assert len(np.unique(np.concatenate([d.chosen, d.rejected]))) == 30
  s = np.array([0.0, 1.0, 1.0])
  e = noisy_bt_pairs(num_items=3, num_pairs=50, noise_rate=0.0, rng=0, scores=s)
  tie = (e.chosen > 0) & (e.rejected > 0)
  assert np.all(e.chosen[tie] < e.rejected[tie])  # exact ties go to the lower index
  assert np.all(e.rejected[~tie] == 0)
  with pytest.raises(ValueError, match="noise_rate"):
    noisy_bt_pairs(num_items=3, num_pairs=5, noise_rate=1.5, rng=0)


def test_rock_paper_scissors_is_balanced_and_intransitive():
  t = rock_paper_scissors_target(3)
  np.testing.assert_array_equal(t, -t.T)
  assert t[0, 1] == t[1, 2] == t[2, 0] == 1
  pairs = cyclic_preference_pairs(t)
  assert len(pairs.chosen) == 3 and not pairs.flipped.any()
  # No scalar score gets more than 2/3 of the cycle right.
  best = 0.0
  for order in itertools.permutations(range(3)):
    score = np.empty(3)
    score[list(order)] = np.arange(3)
    best = max(best, np.mean(score[pairs.chosen] > score[pairs.rejected]))
  assert best == pytest.approx(2 / 3)
  t5 = rock_paper_scissors_target(5)
  np.testing.assert_array_equal((t5 > 0).sum(1), np.full(5, 2))
  with pytest.raises(ValueError, match="odd"):
    rock_paper_scissors_target(4)


def test_random_skew_target_and_sampled_pairs():
  t = random_skew_target(6, rng=0, scale=2.0)
  np.testing.assert_allclose(t, -t.T)
  np.testing.assert_array_equal(np.diag(t), 0.0)
  all_pairs = cyclic_preference_pairs(t)
  assert len(all_pairs.chosen) == 15
  assert np.all(t[all_pairs.chosen, all_pairs.rejected] > 0)
  det = cyclic_preference_pairs(t, num_pairs=300, rng=1)
  assert np.all(t[det.chosen, det.rejected] > 0) and not det.flipped.any()
  sto = cyclic_preference_pairs(t, num_pairs=4000, rng=1, stochastic=True)
  np.testing.assert_array_equal(sto.flipped, t[sto.chosen, sto.rejected] < 0)
  # Flip frequency matches the model: mean over draws of sigma(-|T|).
  i = np.minimum(sto.chosen, sto.rejected)
  j = np.maximum(sto.chosen, sto.rejected)
  expected = np.mean(1 / (1 + np.exp(np.abs(t[i, j]))))
  assert abs(sto.flipped.mean() - expected) < 0.03
  with pytest.raises(ValueError, match="skew"):
    cyclic_preference_pairs(np.ones((3, 3)))


def test_negatives_only_data():
  harmful = np.zeros(10, bool)
  harmful[[2, 5, 7]] = True
  ref = np.arange(1, 11, dtype=np.float64)
  ref /= ref.sum()
  d = negatives_only_data(
    num_prompts=2000,
    harmful=harmful,
    rng=0,
    ref_probs=ref,
    negatives_per_prompt=2,
    num_self_samples=3,
  )
  assert d.prompts.shape == d.negatives.shape == (4000,)
  np.testing.assert_array_equal(d.prompts[:4], [0, 0, 1, 1])
  assert d.self_samples.shape == (4000, 3)
  assert np.all(harmful[d.negatives])
  # Negatives follow pi_ref restricted to the harmful set: 3 : 6 : 8.
  freq = np.bincount(d.negatives, minlength=10)[[2, 5, 7]] / 4000
  np.testing.assert_allclose(freq, np.array([3, 6, 8]) / 17, atol=0.03)
  # Self-samples follow pi_ref over all actions.
  np.testing.assert_allclose(
    np.bincount(d.self_samples.ravel(), minlength=10) / 12000, ref, atol=0.02
  )
  e = negatives_only_data(num_prompts=5, harmful=np.array([1, 3]), rng=0, ref_probs=ref)
  np.testing.assert_array_equal(np.flatnonzero(e.harmful), [1, 3])
  assert e.self_samples.shape == (5, 0)
  with pytest.raises(ValueError, match="empty"):
    negatives_only_data(num_prompts=2, harmful=np.zeros(4, bool), rng=0)
