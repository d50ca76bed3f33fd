"""GRPO, Dr. GRPO and RLOO group advantages (spec `rl-critics-search.md` §2b, §2e items 1-3)."""

import numpy as np
import pytest

from critic_jax.advantages import ADVANTAGES
from critic_jax.advantages.group import (
  dr_grpo_advantages,
  group_normalize,
  grpo_advantages,
  rloo_advantages,
)

MASK = np.arange(5) < np.array([[5, 3, 1, 4]])[..., None]  # [1, 4, 5]


def test_spec_values_both_std_modes():
  r = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
  np.testing.assert_allclose(
    group_normalize(r, std_mode="population"), 0.999998 * np.array([[1, -1, 1, -1]]), atol=1e-6
  )
  unbiased = group_normalize(r, std_mode="unbiased")
  sign = np.array([[1, -1, 1, -1]])
  np.testing.assert_allclose(unbiased, 0.5 / (np.sqrt(1 / 3) + 1e-6) * sign, atol=1e-6)
  np.testing.assert_allclose(
    unbiased, 0.866025 * sign, atol=2e-6
  )  # the spec's number, eps left out
  np.testing.assert_allclose(group_normalize(r, std_mode="none"), [[0.5, -0.5, 0.5, -0.5]])


def test_grpo_broadcasts_over_tokens_and_sums_to_zero():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(3, 4)).astype(np.float32)
  mask = np.broadcast_to(MASK, (3, 4, 5))
  adv = np.asarray(grpo_advantages(rewards=r, mask=mask))
  norm = (r - r.mean(-1, keepdims=True)) / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(adv, norm[..., None] * mask, atol=1e-5)
  np.testing.assert_allclose(adv[..., 0].sum(-1), 0.0, atol=1e-5)  # all responses have t = 0


@pytest.mark.parametrize("value", [1.0, 0.7, -3.1])
def test_equal_rewards_give_exact_zero(value):
  r = np.full((2, 6), value, np.float32)
  mask = np.ones((2, 6, 3), bool)
  for std_mode in ("unbiased", "population", "none"):
    np.testing.assert_array_equal(group_normalize(r, std_mode=std_mode), 0.0)
  for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
    np.testing.assert_array_equal(fn(rewards=r, mask=mask), 0.0)


def test_invalid_responses_equal_slicing_them_out():
  rng = np.random.default_rng(1)
  r = rng.normal(size=(1, 6)).astype(np.float32)
  valid = np.array([[True, False, True, True, False, True]])
  junk = np.where(valid, r, 1e3).astype(np.float32)
  keep = valid[0]
  for std_mode in ("unbiased", "population", "none"):
    full = np.asarray(group_normalize(junk, valid_resp=valid, std_mode=std_mode))
    sliced = np.asarray(group_normalize(r[:, keep], std_mode=std_mode))
    np.testing.assert_allclose(full[:, keep], sliced, atol=1e-6)
    np.testing.assert_array_equal(full[:, ~keep], 0.0)
  mask = np.ones((1, 6, 2), bool)
  for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
    full = np.asarray(fn(rewards=junk, mask=mask, valid_resp=valid))
    np.testing.assert_allclose(full[:, keep], fn(rewards=r[:, keep], mask=mask[:, keep]), atol=1e-6)
    np.testing.assert_array_equal(full[:, ~keep], 0.0)


def test_single_response_keeps_raw_reward():
  r = np.array([[0.3, 9.0, 9.0]], np.float32)
  valid = np.array([[True, False, False]])
  mask = np.ones((1, 3, 2), bool)
  np.testing.assert_allclose(group_normalize(r, valid_resp=valid), [[0.3, 0, 0]])
  for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
    np.testing.assert_allclose(fn(rewards=r, mask=mask, valid_resp=valid)[0, :, 0], [0.3, 0, 0])
  empty = np.zeros((1, 3), bool)
  np.testing.assert_array_equal(grpo_advantages(rewards=r, mask=mask, valid_resp=empty), 0.0)


def test_dr_grpo_hand_computed():
  r = np.array([[2.0, 0.0, 1.0, 1.0]], np.float32)
  adv = dr_grpo_advantages(rewards=r, mask=MASK)
  np.testing.assert_allclose(adv[0, :, 0], [1.0, -1.0, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(adv)[~MASK], 0.0)


def test_rloo_hand_computed_and_leave_one_out_loop():
  r = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32)
  # A_0 = 1 - (0 + 0 + 1)/3 = 2/3; A_1 = 0 - (1 + 0 + 1)/3 = -2/3
  adv = rloo_advantages(rewards=r, mask=MASK)
  np.testing.assert_allclose(adv[0, :, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3], atol=1e-6)
  rng = np.random.default_rng(2)
  r = rng.normal(size=(3, 5)).astype(np.float32)
  adv = np.asarray(rloo_advantages(rewards=r, mask=np.ones((3, 5, 1), bool)))[..., 0]
  for b in range(3):
    for i in range(5):
      others = np.delete(r[b], i)
      np.testing.assert_allclose(adv[b, i], r[b, i] - others.mean(), atol=1e-5)


def test_registry_and_shape_errors():
  assert ADVANTAGES.get("grpo") is grpo_advantages
  assert ADVANTAGES.get("dr_grpo") is dr_grpo_advantages
  assert ADVANTAGES.get("rloo") is rloo_advantages
  with pytest.raises(ValueError, match=r"rewards must be \[B, G\]"):
    grpo_advantages(rewards=np.zeros(4), mask=np.ones((1, 4, 2), bool))
  with pytest.raises(ValueError, match=r"mask must be \[B, G, T\]"):
    rloo_advantages(rewards=np.zeros((1, 4)), mask=np.ones((1, 3, 2), bool))
  with pytest.raises(ValueError, match="valid_resp must have the shape of rewards"):
    dr_grpo_advantages(
      rewards=np.zeros((1, 4)), mask=np.ones((1, 4, 2), bool), valid_resp=np.ones(4, bool)
    )
  with pytest.raises(ValueError, match="std_mode must be one of"):
    group_normalize(np.zeros((1, 4)), std_mode="sample")
