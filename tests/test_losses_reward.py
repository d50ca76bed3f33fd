"""Bradley-Terry RM loss, reward centring, per-token PPO rewards, BoN KL (spec §1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from critic_jax.losses import LOSSES
from critic_jax.losses.reward import (
  best_of_n_kl,
  bradley_terry_loss,
  center_rewards,
  reward_bias,
  token_rewards,
)


def _jit(fn):
  """`fn` jitted once per set of Python-scalar keyword arguments, which are made static.

  One compilation per loss is much cheaper on CPU than op-by-op dispatch of new shapes.
  """
  cache = {}

  def call(**kw):
    static = {k: v for k, v in kw.items() if v is None or isinstance(v, (bool, int, float, str))}
    key = tuple(sorted(static.items()))
    if key not in cache:
      cache[key] = jax.jit(lambda arrays, static=static: fn(**arrays, **static))
    return cache[key]({k: v for k, v in kw.items() if k not in static})

  return call


bt = _jit(bradley_terry_loss)
RW = np.array([1.0, -0.5, 2.0, 0.3, 0.0], np.float32)
RL = np.array([0.2, 0.5, -1.0, 0.3, 1.5], np.float32)


def test_registered():
  assert LOSSES.get("bt") is bradley_terry_loss


def test_equal_rewards_give_log2():
  loss, m = bt(chosen_rewards=RW, rejected_rewards=RW)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  np.testing.assert_allclose(m["per_example_loss"], np.full(5, math.log(2)), rtol=1e-6)
  assert float(m["accuracy"]) == 0.0  # ties count as wrong


def test_hand_values_margin_tau_and_accuracy():
  loss, m = bt(chosen_rewards=RW, rejected_rewards=RL, margin=0.1, tau=0.5)
  z = (RW - RL - 0.1) / 0.5
  expected = np.log1p(np.exp(-z))
  np.testing.assert_allclose(m["per_example_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["prob"], 1 / (1 + np.exp(-z)), rtol=1e-5)
  # chosen > rejected in rows 0 and 2 only (row 3 is a tie).
  np.testing.assert_allclose(m["accuracy"], 2 / 5)
  np.testing.assert_allclose(m["margin"], np.mean(RW - RL), rtol=1e-6)


def test_shift_invariance_and_centring():
  ref = np.array([0.4, 1.2, -0.3, 2.0, 100.0], np.float32)
  ref_mask = np.array([True, True, True, True, False])

  @jax.jit
  def run(rw, rl, ref, ref_mask):
    b = reward_bias(ref[:4])
    return (
      b,
      reward_bias(ref, ref_mask),
      center_rewards(ref[:4], bias=b),
      bradley_terry_loss(chosen_rewards=rw, rejected_rewards=rl),
      bradley_terry_loss(
        chosen_rewards=center_rewards(rw, bias=b), rejected_rewards=center_rewards(rl, bias=b)
      ),
      bradley_terry_loss(chosen_rewards=rw + 7.0, rejected_rewards=rl + 7.0)[0],
    )

  b, b_masked, centred, (l0, m0), (l1, m1), l2 = run(RW, RL, ref, ref_mask)
  np.testing.assert_allclose(b, ref[:4].mean(), rtol=1e-6)
  np.testing.assert_allclose(b_masked, ref[:4].mean(), rtol=1e-6)  # padded entry ignored
  np.testing.assert_allclose(np.mean(centred), 0.0, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(l2, l0, rtol=1e-6)
  assert float(m1["accuracy"]) == float(m0["accuracy"])


def test_gradient_closed_form():
  g_w, g_r = jax.jit(
    jax.grad(
      lambda w, r: bradley_terry_loss(chosen_rewards=w, rejected_rewards=r)[0], argnums=(0, 1)
    )
  )(RW, RL)
  sig = 1 / (1 + np.exp(-(RW - RL)))
  np.testing.assert_allclose(g_w, -(1 - sig) / 5, rtol=1e-5)
  np.testing.assert_allclose(g_r, -np.asarray(g_w), rtol=1e-6)


def test_check_grads_with_margin_and_tau():
  with jax.enable_x64(True):
    w, r = jnp.asarray(RW, jnp.float64), jnp.asarray(RL, jnp.float64)
    f = lambda w, r: bradley_terry_loss(chosen_rewards=w, rejected_rewards=r, margin=0.3, tau=0.7)
    check_grads(jax.jit(lambda w, r: f(w, r)[0]), (w, r), order=1, modes=("rev",))


def test_mask_equals_slice_and_zero_gradient():
  mask = np.array([True, False, True, True, False])
  lm, mm = bt(chosen_rewards=RW, rejected_rewards=RL, mask=mask)
  ls, ms = bt(chosen_rewards=RW[mask][:3], rejected_rewards=RL[mask][:3])
  np.testing.assert_allclose(lm, ls, rtol=1e-6)
  np.testing.assert_allclose(mm["accuracy"], ms["accuracy"])
  g = jax.jit(
    jax.grad(lambda w: bradley_terry_loss(chosen_rewards=w, rejected_rewards=RL, mask=mask)[0])
  )(RW)
  assert np.all(np.asarray(g)[~mask] == 0) and np.all(np.asarray(g)[mask] != 0)


def test_shape_errors():
  with pytest.raises(ValueError, match="must both be"):
    bradley_terry_loss(chosen_rewards=RW, rejected_rewards=RL[:3])
  with pytest.raises(ValueError, match="tau"):
    bradley_terry_loss(chosen_rewards=RW, rejected_rewards=RL, tau=0.0)


# Per-token rewards: row 0 full, row 1 right-padded, row 2 with a hole, row 3 empty.
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
SCORES = np.array([1.5, -0.7, 0.25, 3.0], np.float32)
POL = np.array(
  [[-1.0, -0.5, -2.0, -0.1], [-0.3, -0.9, -5.0, -5.0], [-1.1, -4.0, -0.2, -3.0], [-1.0] * 4],
  np.float32,
)
REF = np.array(
  [[-1.2, -0.4, -1.0, -0.3], [-0.5, -0.9, -1.0, -1.0], [-1.0, -1.0, -0.7, -1.0], [-2.0] * 4],
  np.float32,
)
tok_rewards = _jit(token_rewards)
bon_kl = jax.jit(best_of_n_kl)


def test_token_rewards_equal_logps_sum_to_scores():
  rew, kl = tok_rewards(scores=SCORES, policy_logps=POL, ref_logps=POL, mask=MASK, beta=0.1)
  np.testing.assert_allclose(np.sum(rew, -1), [1.5, -0.7, 0.25, 0.0], rtol=1e-6)
  np.testing.assert_allclose(kl, 0.0)


def test_token_rewards_general_identity_and_placement():
  beta = 0.1
  rew, kl = tok_rewards(scores=SCORES, policy_logps=POL, ref_logps=REF, mask=MASK, beta=beta)
  diff = np.where(MASK, POL - REF, 0.0)
  np.testing.assert_allclose(kl, diff.sum(-1), rtol=1e-6)
  expected = -beta * diff
  expected[0, 3] += 1.5  # last index of a full row
  expected[1, 1] += -0.7  # right-padded row: last unmasked index is 1
  expected[2, 2] += 0.25  # row with a hole: last unmasked index is 2
  np.testing.assert_allclose(rew, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.sum(rew, -1)[:3], SCORES[:3] - beta * diff.sum(-1)[:3], rtol=1e-6)
  assert np.all(np.asarray(rew)[3] == 0)  # empty row: no score, no penalty


def test_bon_kl():
  np.testing.assert_allclose(bon_kl(1), 0.0, atol=1e-7)
  np.testing.assert_allclose(bon_kl(2), math.log(2) - 0.5, rtol=1e-6)
  np.testing.assert_allclose(bon_kl(2), 0.19315, atol=1e-5)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_bon_kl_matches_exact_kl_of_best_of_n(n):
  # M equiprobable outcomes with distinct rewards: BoN picks rank k with probability
  # (k/M)^N - ((k-1)/M)^N. As M grows its KL to uniform tends to the analytic formula.
  m = 200_000
  k = np.arange(1, m + 1, dtype=np.float64)
  p = (k / m) ** n - ((k - 1) / m) ** n
  nz = p > 0
  kl = float(np.sum(p[nz] * np.log(p[nz] * m)))
  np.testing.assert_allclose(bon_kl(n), kl, atol=2e-4)
