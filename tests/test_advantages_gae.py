"""GAE and discounted returns (spec `rl-critics-search.md` §1b, §1e invariants 1-2)."""

import jax
import numpy as np
import pytest

from critic_jax.advantages import ADVANTAGES
from critic_jax.advantages.gae import discounted_returns, gae_advantages


def gae_loop(rewards, values, mask, gamma, lam, bootstrap=0.0):
  """The textbook loop over one trajectory, run on the masked positions only."""
  idx = np.flatnonzero(mask)
  r, v = rewards[idx], values[idx]
  adv = np.zeros(len(idx))
  next_value, next_adv = bootstrap, 0.0
  for k in reversed(range(len(idx))):
    delta = r[k] + gamma * next_value - v[k]
    next_adv = delta + gamma * lam * next_adv
    adv[k], next_value = next_adv, v[k]
  full = np.zeros(len(mask))
  full[idx] = adv
  return full


def random_batch(seed, shape=(3, 5, 12), holes=True):
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=shape).astype(np.float32)
  values = rng.normal(size=shape).astype(np.float32)
  lengths = rng.integers(0, shape[-1] + 1, size=shape[:-1])
  mask = np.arange(shape[-1]) < lengths[..., None]
  if holes:  # masked-out stretches inside responses (tool output in multi-turn)
    mask &= rng.random(shape) > 0.2
  return rewards, values, mask


def test_spec_reference_values():
  adv, ret = gae_advantages(
    rewards=np.array([0.0, 0.0, 1.0]),
    values=np.array([0.5, 0.5, 0.5]),
    mask=np.ones(3, bool),
    gamma=1.0,
    lam=0.95,
  )
  np.testing.assert_allclose(adv, [0.45125, 0.475, 0.5], atol=1e-6)
  np.testing.assert_allclose(ret, [0.95125, 0.975, 1.0], atol=1e-6)


def test_hand_computed_with_discount_and_padding():
  # gamma = 0.9, lam = 0.5, r = [1, 0, 2], V = [1, 2, 3], then two padded steps.
  # delta = [1 + 0.9*2 - 1, 0 + 0.9*3 - 2, 2 + 0 - 3] = [1.8, 0.7, -1]
  # A_2 = -1; A_1 = 0.7 + 0.45*(-1) = 0.25; A_0 = 1.8 + 0.45*0.25 = 1.9125
  adv, ret = gae_advantages(
    rewards=np.array([1.0, 0.0, 2.0, 5.0, 5.0]),
    values=np.array([1.0, 2.0, 3.0, 9.0, 9.0]),
    mask=np.array([1, 1, 1, 0, 0], bool),
    gamma=0.9,
    lam=0.5,
  )
  np.testing.assert_allclose(adv, [1.9125, 0.25, -1.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(ret, [2.9125, 2.25, 2.0, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 1.0), (1.0, 0.0)])
def test_matches_python_loop_with_masks(gamma, lam):
  rewards, values, mask = random_batch(0)
  boot = np.random.default_rng(1).normal(size=rewards.shape[:-1]).astype(np.float32)
  adv, ret = gae_advantages(
    rewards=rewards, values=values, mask=mask, gamma=gamma, lam=lam, bootstrap_value=boot
  )
  for idx in np.ndindex(rewards.shape[:-1]):
    expected = gae_loop(rewards[idx], values[idx], mask[idx], gamma, lam, boot[idx])
    np.testing.assert_allclose(adv[idx], expected, atol=1e-5, err_msg=str(idx))
    np.testing.assert_allclose(ret[idx], np.where(mask[idx], expected + values[idx], 0), atol=1e-5)


def test_lambda_one_zero_value_is_reward_to_go_and_lambda_zero_is_delta():
  rewards, values, mask = random_batch(2, holes=False)
  adv, _ = gae_advantages(rewards=rewards, values=0 * values, mask=mask, gamma=1.0, lam=1.0)
  to_go = np.cumsum((rewards * mask)[..., ::-1], -1)[..., ::-1]
  np.testing.assert_allclose(adv, to_go * mask, atol=1e-5)
  adv0, _ = gae_advantages(rewards=rewards, values=values, mask=mask, gamma=0.9, lam=0.0)
  next_v = np.concatenate([values[..., 1:] * mask[..., 1:], np.zeros(mask.shape[:-1] + (1,))], -1)
  np.testing.assert_allclose(adv0, (rewards + 0.9 * next_v - values) * mask, atol=1e-5)


def test_padding_values_have_no_effect():
  rewards, values, mask = random_batch(3)
  adv, ret = gae_advantages(rewards=rewards, values=values, mask=mask, gamma=0.95, lam=0.9)
  junk = np.random.default_rng(4).normal(size=rewards.shape) * 100
  adv2, ret2 = gae_advantages(
    rewards=np.where(mask, rewards, junk),
    values=np.where(mask, values, -junk),
    mask=mask,
    gamma=0.95,
    lam=0.9,
  )
  np.testing.assert_array_equal(adv, adv2)
  np.testing.assert_array_equal(ret, ret2)
  assert np.all(np.asarray(adv)[~mask] == 0)


def test_discounted_returns_loop_and_gae_identity():
  rewards, values, mask = random_batch(5)
  ret = discounted_returns(rewards=rewards, mask=mask, gamma=0.9)
  for idx in np.ndindex(rewards.shape[:-1]):
    expected = gae_loop(rewards[idx], np.zeros_like(values[idx]), mask[idx], 0.9, 1.0)
    np.testing.assert_allclose(ret[idx], expected, atol=1e-5)
  adv, _ = gae_advantages(rewards=rewards, values=0 * values, mask=mask, gamma=0.9, lam=1.0)
  np.testing.assert_allclose(ret, adv, atol=1e-5)


def test_no_recompilation_and_registry():
  assert ADVANTAGES.get("gae") is gae_advantages
  assert ADVANTAGES.get("discounted_returns") is discounted_returns
  traces = []

  @jax.jit
  def f(rewards, values, mask, lam):
    traces.append(1)
    return gae_advantages(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=lam)

  for seed in (6, 7):
    f(*random_batch(seed), 0.9 + 0.01 * seed)
  assert len(traces) == 1


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(values=np.zeros((2, 4))), r"values must have shape \(2, 3\)"),
    (dict(mask=np.ones((3,), bool)), r"mask must have shape \(2, 3\)"),
    (dict(bootstrap_value=np.zeros((3,))), r"bootstrap_value must have shape \(2,\)"),
  ],
)
def test_bad_shapes_raise(kwargs, match):
  args = dict(rewards=np.zeros((2, 3)), values=np.zeros((2, 3)), mask=np.ones((2, 3), bool))
  with pytest.raises(ValueError, match=match):
    gae_advantages(**{**args, **kwargs})
