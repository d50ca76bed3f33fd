"""Tajwar et al. bandit: pi_ref, rewards, per-method losses, sampling loop (spec §13)."""

import functools
import math

import jax
import numpy as np
import pytest

from critic_jax.losses import LOSSES
from critic_jax.losses.bandit import (
  ALIGNED_REWARD,
  MISALIGNED_REWARD,
  best_of_n_loss,
  bump_reward,
  expected_reward,
  forward_kl_loss,
  kl_to_ref,
  pairwise_preference_loss,
  reverse_kl_loss,
  run_bandit,
  rwr_loss,
  sequence_bump_reward,
  sft_init_logits,
  tanh_cauchy_ref_probs,
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


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return (
    x
    - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True))
    - x.max(-1, keepdims=True)
  )


def _together(*thunks):
  """Evaluates several loss calls in one compiled program (one compilation, not one per call)."""
  return jax.jit(lambda: tuple(f() for f in thunks))()


REF = np.asarray(jax.jit(tanh_cauchy_ref_probs)())
REF_LOGP = np.log(REF)
rwr = _jit(rwr_loss)


def test_registered():
  assert LOSSES.get("bandit_best_of_n") is best_of_n_loss
  assert LOSSES.get("bandit_rwr") is rwr_loss
  assert LOSSES.get("bandit_pairwise") is pairwise_preference_loss


def test_pi_ref_invariants():
  p = REF.astype(np.float64)
  assert p.shape == (100,)
  np.testing.assert_allclose(p.sum(), 1.0, atol=1e-6)
  assert np.all(p > 0)
  assert 12 <= 5 + int(np.argmax(p[5:95])) <= 22
  assert p[20] / p[70] > 5
  # The numbers the spec quotes from its own numeric check.
  np.testing.assert_allclose([p[20], p[70], p[0], p[99]], [0.024, 0.002, 0.078, 0.042], atol=6e-4)


def test_pi_ref_matches_the_official_histogram_construction():
  # ContinuousSampledCategorical: histogram of tanh(Cauchy(-0.7, 0.4)) samples, 100 bins on [-1, 1].
  rng = np.random.default_rng(0)
  x = np.tanh(-0.7 + 0.4 * rng.standard_cauchy(400_000))
  hist, _ = np.histogram(x, range=(-1.0, 1.0), bins=100)
  # Binomial standard error of a bin with p <= 0.08 at n = 4e5 is below 5e-4.
  np.testing.assert_allclose(REF, hist / len(x), atol=2e-3)


def test_rewards():
  a = np.arange(100)
  rewards = jax.jit(
    lambda a, seq: (
      [
        bump_reward(a, center=c, sigma=s)
        for c, s in (ALIGNED_REWARD, MISALIGNED_REWARD, (70.0, 20.0))
      ],
      sequence_bump_reward(seq, center=70.0),
    )
  )
  bumps, seq = rewards(a, np.array([[70, 70, 70], [70, 80, 60]]))
  for r, (c, s) in zip(bumps, (ALIGNED_REWARD, MISALIGNED_REWARD, (70.0, 20.0)), strict=True):
    r = np.asarray(r)
    assert int(np.argmax(r)) == int(c) and r[int(c)] == 1.0
    np.testing.assert_allclose(r[int(c) + 10], math.exp(-((10 / s) ** 2)), rtol=1e-6)
  np.testing.assert_allclose(seq, [1.0, math.exp(-1.0) * 2 / 3 + 1 / 3], rtol=1e-6)


def test_sft_init_has_zero_kl_and_exact_expected_reward():
  table = np.exp(-(((np.arange(100) - 70.0) / 10.0) ** 2)).astype(np.float32)

  @jax.jit
  def check(ref, ref_logp, table):
    logits = sft_init_logits(ref, 3)
    return logits, kl_to_ref(logits, ref_logp), expected_reward(logits, table)

  logits, kl, er = check(REF, REF_LOGP, table)
  assert logits.shape == (3, 100)
  np.testing.assert_allclose(kl, 0.0, atol=1e-6)
  np.testing.assert_allclose(er, np.sum(REF * table), rtol=1e-5)


# Two states, four actions, N = 4 samples each.
LOGITS = np.array([[0.2, -0.1, 0.4, 0.0], [0.0, 0.3, -0.2, 0.1]], np.float32)
ACTIONS = np.array([[0, 2, 3, 2], [1, 1, 0, 3]], np.int32)
REWARDS = np.array([[0.1, 0.9, 0.4, 0.9], [0.5, 0.2, 0.8, 0.1]], np.float32)
SMALL_REF = _log_softmax([1.0, -2.0, 0.5, 0.3]).astype(np.float32)
# best: (state 0) index 1 = action 2 (first of the tied 0.9s); (state 1) index 2 = action 0.
# worst: (state 0) index 0 = action 0; (state 1) index 3 = action 3.


def test_best_of_n_hand_values():
  lp = _log_softmax(LOGITS)
  kw = dict(logits=LOGITS, actions=ACTIONS, rewards=REWARDS)
  (loss, m), (l_worst, _), (l_sum, _), (l_mean, _) = _together(
    lambda: best_of_n_loss(**kw),
    lambda: best_of_n_loss(**kw, neg_weight=0.5),
    lambda: best_of_n_loss(**kw, neg_weight=0.5, negative="sum_worse"),
    lambda: best_of_n_loss(**kw, neg_weight=0.5, negative="mean_worse"),
  )
  np.testing.assert_array_equal(m["best_index"], [1, 2])
  np.testing.assert_array_equal(m["worst_index"], [0, 3])
  np.testing.assert_allclose(loss, -(lp[0, 2] + lp[1, 0]) / 2, rtol=1e-6)
  np.testing.assert_allclose(
    l_worst, (-lp[0, 2] + 0.5 * lp[0, 0] - lp[1, 0] + 0.5 * lp[1, 3]) / 2, rtol=1e-6
  )
  worse0 = lp[0, 0] + lp[0, 3] + lp[0, 2]  # samples other than index 1 (a duplicate counts)
  worse1 = lp[1, 1] + lp[1, 1] + lp[1, 3]
  np.testing.assert_allclose(l_sum, (-lp[0, 2] - lp[1, 0] + 0.5 * (worse0 + worse1)) / 2, rtol=1e-6)
  np.testing.assert_allclose(
    l_mean, (-lp[0, 2] - lp[1, 0] + 0.5 * (worse0 + worse1) / 3) / 2, rtol=1e-6
  )
  with pytest.raises(ValueError, match="negative"):
    best_of_n_loss(**kw, negative="best")


def test_best_of_n_step_raises_best_and_lowers_worst():
  @jax.jit
  def steps(logits):
    def step(neg_weight):
      g = jax.grad(
        lambda x: best_of_n_loss(logits=x, actions=ACTIONS, rewards=REWARDS, neg_weight=neg_weight)[
          0
        ]
      )(logits)
      return jax.nn.softmax(logits - 0.5 * g)

    return jax.nn.softmax(logits), step(0.0), step(1.0)

  p0, p_plain, p_neg = (np.asarray(x) for x in steps(LOGITS))
  for p1 in (p_plain, p_neg):
    assert p1[0, 2] > p0[0, 2] and p1[1, 0] > p0[1, 0]  # pi(a_best) never decreases
  assert p_neg[0, 0] < p0[0, 0] and p_neg[1, 3] < p0[1, 3]  # negative gradient lowers a_worst
  assert p_neg[0, 0] < p_plain[0, 0] and p_neg[1, 3] < p_plain[1, 3]


def test_constrained_variant_has_same_gradient():
  f = lambda x, r: best_of_n_loss(
    logits=x, actions=ACTIONS, rewards=REWARDS, neg_weight=0.7, ref_logp=r
  )[0]
  both = jax.jit(lambda x, r: (f(x, r), f(x, None), jax.grad(f)(x, r), jax.grad(f)(x, None)))
  l_ref, l_plain, g_ref, g_plain = both(LOGITS, SMALL_REF)
  np.testing.assert_allclose(g_ref, g_plain, rtol=1e-6)
  assert abs(float(l_ref) - float(l_plain)) > 1e-3


def test_rwr_hand_value():
  lp = _log_softmax(LOGITS)
  loss, _ = rwr(logits=LOGITS, actions=ACTIONS, rewards=REWARDS, beta=0.5)
  picked = np.take_along_axis(lp, ACTIONS, -1)
  np.testing.assert_allclose(loss, -np.mean(np.exp(REWARDS / 0.5) * picked), rtol=1e-6)


def _pairs_reference(lp, ref, actions, rewards, threshold):
  """All n < m pairs per state: winner n iff r_n > r_m; keep iff |r_n - r_m| >= threshold."""
  out = []
  for s in range(actions.shape[0]):
    for n in range(actions.shape[1]):
      for m in range(n + 1, actions.shape[1]):
        w, lo = (n, m) if rewards[s, n] > rewards[s, m] else (m, n)
        if abs(rewards[s, n] - rewards[s, m]) >= threshold:
          aw, al = actions[s, w], actions[s, lo]
          out.append((lp[s, aw] - ref[aw]) - (lp[s, al] - ref[al]))
  return np.array(out)


def test_pairwise_dpo_ipo_hand_values_and_filter():
  lp = _log_softmax(LOGITS)
  h = _pairs_reference(lp, SMALL_REF, ACTIONS, REWARDS, 0.2)
  assert len(h) == 10  # 12 pairs; dropped: the 0.9 tie and the 0.1 gap of state 1
  h0 = _pairs_reference(lp, SMALL_REF, ACTIONS, REWARDS, 0.0)
  assert len(h0) == 12
  kw = dict(logits=LOGITS, actions=ACTIONS, rewards=REWARDS, ref_logp=SMALL_REF)
  (l_dpo, m), (l_ipo, _), (l_all, m_all), (l_none, m_none) = _together(
    lambda: pairwise_preference_loss(**kw, beta=0.05),
    lambda: pairwise_preference_loss(**kw, loss_type="ipo", ipo_target=10.0),
    lambda: pairwise_preference_loss(**kw, beta=0.05, reward_threshold=0.0),
    lambda: pairwise_preference_loss(**kw, reward_threshold=5.0),
  )
  assert int(m["num_pairs"]) == 10
  np.testing.assert_allclose(l_dpo, np.mean(np.log1p(np.exp(-0.05 * h))), rtol=1e-5)
  np.testing.assert_allclose(l_ipo, np.mean((h - 10.0) ** 2), rtol=1e-5)
  assert int(m_all["num_pairs"]) == 12
  np.testing.assert_allclose(l_all, np.mean(np.log1p(np.exp(-0.05 * h0))), rtol=1e-5)
  assert float(l_none) == 0.0 and int(m_none["num_pairs"]) == 0


def test_kl_objective_gradients():
  target = _log_softmax([0.0, 2.0, -1.0, 0.5]).astype(np.float32)
  logits = LOGITS[:1]
  grads = jax.jit(
    lambda x, t: (
      jax.grad(lambda y: forward_kl_loss(logits=y, target_logp=t)[0])(x),
      jax.grad(lambda y: reverse_kl_loss(logits=y, target_logp=t)[0])(x),
    )
  )
  g_fwd, g_rev = grads(logits, target)
  p = np.exp(_log_softmax(logits[0]))
  np.testing.assert_allclose(g_fwd[0], p - np.exp(target), atol=1e-6)
  d = np.log(p) - target
  np.testing.assert_allclose(g_rev[0], p * (d - np.sum(p * d)), atol=1e-6)


def test_run_bandit_loop_on_and_off_policy():
  reward_fn = functools.partial(bump_reward, center=70.0, sigma=10.0)
  loss_fn = functools.partial(best_of_n_loss, neg_weight=1.0)
  run = jax.jit(
    functools.partial(
      run_bandit,
      loss_fn=loss_fn,
      ref_probs=REF,
      reward_fn=reward_fn,
      num_states=4,
      num_rounds=6,
      num_samples=10,
      inner_steps=5,
      learning_rate=0.05,
    )
  )  # on_policy is traced: one compilation serves both settings
  table = np.exp(-(((np.arange(100) - 70.0) / 10.0) ** 2))
  r0 = float(np.sum(REF * table))
  logits, m = run(rng=jax.random.key(0), on_policy=True)
  assert logits.shape == (4, 100)
  np.testing.assert_array_equal(m["queries"], 40 * np.arange(1, 7))
  assert np.all(np.asarray(m["kl"]) >= -1e-6) and float(m["kl"][-1]) > 0
  assert float(m["expected_reward"][-1]) > r0
  pi = np.exp(_log_softmax(logits))
  np.testing.assert_allclose(m["expected_reward"][-1], np.mean(pi @ table), rtol=1e-4)
  off, m_off = run(rng=jax.random.key(0), on_policy=False)
  assert not np.allclose(off, logits)
  np.testing.assert_array_equal(m_off["queries"], m["queries"])


@pytest.mark.slow
def test_on_policy_beats_offline_at_equal_query_budget():
  """§13 benchmark shape on the misaligned reward (c = 70), 5 seeds, equal reward queries.

  Only the robust part of invariant 5 is asserted: on-policy sampling beats offline sampling
  from pi_ref, for a maximum-likelihood method (best-of-N) and a negative-gradient one (DPO).
  """
  reward_fn = functools.partial(bump_reward, center=70.0, sigma=10.0)
  keys = jax.random.split(jax.random.key(0), 5)
  methods = {
    "best_of_n": functools.partial(best_of_n_loss),
    "dpo": functools.partial(pairwise_preference_loss, ref_logp=REF_LOGP, beta=0.05),
  }
  for name, loss_fn in methods.items():
    run = jax.jit(
      jax.vmap(
        lambda key, on, loss_fn=loss_fn: run_bandit(
          rng=key,
          loss_fn=loss_fn,
          ref_probs=REF,
          reward_fn=reward_fn,
          num_states=10,
          num_rounds=30,
          num_samples=10,
          inner_steps=10,
          learning_rate=0.03,
          on_policy=on,
        )[1]["expected_reward"][-1],
        in_axes=(0, None),
      )
    )
    on, off = float(np.mean(run(keys, True))), float(np.mean(run(keys, False)))
    assert on > off + 0.2, (name, on, off)
