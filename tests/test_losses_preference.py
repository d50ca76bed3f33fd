"""DPO family, D2O, DNO and DNO-Prct (spec §5, §6, §8)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from critic_jax.losses import LOSSES
from critic_jax.losses.preference import (
  d2o_loss,
  dno_loss,
  dno_prct_loss,
  dno_select_pairs,
  dno_winrates,
  dpo_loss,
  sequence_logps,
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


def _together(*thunks):
  """Evaluates several loss calls in one compiled program (one compilation, not one per call)."""
  return jax.jit(lambda: tuple(f() for f in thunks))()


dpo = _jit(dpo_loss)
d2o = _jit(d2o_loss)
dno = _jit(dno_loss)
prct = _jit(dno_prct_loss)
select = jax.jit(dno_select_pairs)

LOG2 = math.log(2)
PW = np.array([-3.0, -5.5, -2.0, -7.0, -4.0], np.float32)
PL = np.array([-4.0, -5.0, -6.0, -6.5, -4.0], np.float32)
RW_ = np.array([-3.5, -5.0, -2.5, -6.0, -4.5], np.float32)
RL_ = np.array([-3.8, -5.2, -5.0, -7.5, -3.0], np.float32)


def _dpo(pw=PW, pl=PL, rw=RW_, rl=RL_, **kw):
  return dpo(
    policy_chosen_logps=pw,
    policy_rejected_logps=pl,
    ref_chosen_logps=rw,
    ref_rejected_logps=rl,
    **kw,
  )


def _raw_dpo(pw, pl, **kw):
  return dpo_loss(
    policy_chosen_logps=pw,
    policy_rejected_logps=pl,
    ref_chosen_logps=RW_,
    ref_rejected_logps=RL_,
    **kw,
  )


def _z(beta=0.1):
  return beta * ((np.asarray(PW) - np.asarray(RW_)) - (np.asarray(PL) - np.asarray(RL_)))


def test_registered():
  for name, fn in [
    ("dpo", dpo_loss),
    ("d2o", d2o_loss),
    ("dno", dno_loss),
    ("dno_prct", dno_prct_loss),
  ]:
    assert LOSSES.get(name) is fn


def test_sequence_logps_sum_mean_and_empty_row():
  tok = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0], [-1.0, -1.0, -1.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], bool)
  seq = jax.jit(sequence_logps, static_argnames="reduce")
  np.testing.assert_allclose(seq(tok, mask), [-6.0, -1.0, 0.0])
  np.testing.assert_allclose(seq(tok, mask, reduce="mean"), [-2.0, -0.5, 0.0])
  with pytest.raises(ValueError, match="reduce"):
    sequence_logps(tok, mask, reduce="max")


def test_policy_equals_reference_gives_log2_and_zero_margins():
  loss, m = _dpo(rw=PW, rl=PL)
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
  np.testing.assert_allclose(m["reward_margins"], 0.0)
  np.testing.assert_allclose(m["grad_weight"], 0.5)
  # cDPO at z = 0 is also log 2 whatever the smoothing.
  np.testing.assert_allclose(_dpo(rw=PW, rl=PL, label_smoothing=0.3)[0], LOG2, rtol=1e-6)


def test_hand_values_and_metrics():
  z = _z()
  loss, m = _dpo()
  np.testing.assert_allclose(m["per_example_loss"], np.log1p(np.exp(-z)), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-z))), rtol=1e-5)
  cr = 0.1 * (np.asarray(PW) - np.asarray(RW_))
  rr = 0.1 * (np.asarray(PL) - np.asarray(RL_))
  np.testing.assert_allclose(m["chosen_rewards"], cr, rtol=1e-5)
  np.testing.assert_allclose(m["rejected_rewards"], rr, rtol=1e-5)
  np.testing.assert_allclose(m["reward_accuracy"], np.mean(cr > rr))
  np.testing.assert_allclose(m["reward_margin"], np.mean(cr - rr), rtol=1e-5)


def test_shift_invariance():
  l0, _ = _dpo()
  l1, _ = _dpo(pw=PW + 2.5, pl=PL + 2.5)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)


def test_swap_gives_minus_z():
  _, m = _dpo()
  _, ms = _dpo(pw=PL, pl=PW, rw=RL_, rl=RW_)
  np.testing.assert_allclose(m["per_example_loss"] - ms["per_example_loss"], -_z(), atol=1e-6)


def test_gradient_weight_and_closed_form():
  g = jax.jit(jax.grad(lambda pw, pl: _raw_dpo(pw, pl)[0], argnums=(0, 1)))(PW, PL)
  w = 1 / (1 + np.exp(_z()))  # sigma(-z)
  np.testing.assert_allclose(g[0], -0.1 * w / 5, rtol=1e-5)
  np.testing.assert_allclose(g[1], 0.1 * w / 5, rtol=1e-5)
  _, m = _dpo(pw=PW + np.array([0.0, 0.0, 0.0, 0.0, 300.0], np.float32))
  gw = np.asarray(m["grad_weight"])
  assert np.all((gw[:4] > 0) & (gw[:4] < 1))
  assert gw[4] < 1e-12  # confidently-correct pair: vanishing weight


def test_reference_is_a_constant():
  g_ref = jax.jit(
    jax.grad(
      lambda rw, rl: dpo_loss(
        policy_chosen_logps=PW, policy_rejected_logps=PL, ref_chosen_logps=rw, ref_rejected_logps=rl
      )[0],
      argnums=(0, 1),
    )
  )(RW_, RL_)
  assert all(np.all(np.asarray(g) == 0) for g in g_ref)


def test_small_beta_limit():
  beta = 1e-3
  loss, _ = _dpo(beta=beta)
  np.testing.assert_allclose(loss, LOG2 - np.mean(_z(beta)) / 2, atol=1e-6)


def test_label_smoothing_ipo_hinge_hand_values():
  z = _z()
  eps = 0.2
  (_, m_ls), (_, m_ipo), (_, m_hinge) = _together(
    lambda: _raw_dpo(PW, PL, label_smoothing=eps),
    lambda: _raw_dpo(PW, PL, loss_type="ipo"),
    lambda: _raw_dpo(PW, PL, loss_type="hinge"),
  )
  ls = -(1 - eps) * np.log(1 / (1 + np.exp(-z))) - eps * np.log(1 / (1 + np.exp(z)))
  np.testing.assert_allclose(m_ls["per_example_loss"], ls, rtol=1e-5)
  h = z / 0.1
  np.testing.assert_allclose(m_ipo["per_example_loss"], (h - 5.0) ** 2, rtol=1e-5)
  np.testing.assert_allclose(
    m_hinge["per_example_loss"], np.maximum(0.0, 1 - z), rtol=1e-5, atol=1e-7
  )
  with pytest.raises(ValueError, match="label_smoothing"):
    _raw_dpo(PW, PL, loss_type="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="unknown loss_type"):
    _raw_dpo(PW, PL, loss_type="kto")


def test_sft_term_normalisation():
  ntok = np.array([3, 5, 2, 7, 4])
  mask = np.array([True, True, False, False, True])
  (base, _), (loss, m), (_, m_mean), (_, m_masked) = _together(
    lambda: _raw_dpo(PW, PL),
    lambda: _raw_dpo(PW, PL, sft_weight=0.5, chosen_num_tokens=ntok),
    lambda: _raw_dpo(PW, PL, sft_weight=0.5),
    lambda: _raw_dpo(PW, PL, sft_weight=1.0, chosen_num_tokens=ntok, mask=mask),
  )
  nll = -np.sum(PW) / 21.0  # token-mean over the batch
  np.testing.assert_allclose(m["sft_loss"], nll, rtol=1e-6)
  np.testing.assert_allclose(loss, base + 0.5 * nll, rtol=1e-6)
  np.testing.assert_allclose(m_mean["sft_loss"], -np.mean(PW), rtol=1e-6)
  np.testing.assert_allclose(m_masked["sft_loss"], (3.0 + 5.5 + 4.0) / 12.0, rtol=1e-6)


def test_mask_equals_slice_and_zero_gradient():
  mask = np.array([True, False, True, True, False])
  lm, _ = _dpo(mask=mask)
  ls, _ = _dpo(pw=PW[mask], pl=PL[mask], rw=RW_[mask], rl=RL_[mask])
  np.testing.assert_allclose(lm, ls, rtol=1e-6)
  g = jax.jit(jax.grad(lambda pw: _raw_dpo(pw, PL, mask=mask)[0]))(PW)
  assert np.all(np.asarray(g)[[1, 4]] == 0)


def test_check_grads_all_types():
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x, jnp.float64) for x in (PW, PL))
    for kw in ({"label_smoothing": 0.1}, {"loss_type": "ipo"}):
      f = jax.jit(lambda pw, pl, kw=kw: _raw_dpo(pw, pl, **kw)[0])
      check_grads(f, args, order=1, modes=("rev",))


def test_tabular_single_pair_moves_mass_off_loser():
  ref = jax.nn.log_softmax(jnp.array([0.5, 0.0, -0.3, 0.2]))
  w, lo = 1, 3

  def loss(logits):
    lp = jax.nn.log_softmax(logits)
    return dpo_loss(
      policy_chosen_logps=lp[w][None],
      policy_rejected_logps=lp[lo][None],
      ref_chosen_logps=ref[w][None],
      ref_rejected_logps=ref[lo][None],
      beta=0.5,
    )[0]

  run = jax.jit(lambda x: jax.lax.fori_loop(0, 50, lambda _, y: y - jax.grad(loss)(y), x))
  logits = run(ref)
  lp, ref, final = (np.asarray(x) for x in (jax.nn.log_softmax(logits), ref, jax.jit(loss)(logits)))
  assert lp[w] - ref[w] > lp[lo] - ref[lo]
  assert np.exp(lp[lo]) < np.exp(ref[lo])
  assert final < LOG2


# ----------------------------------------------------------------------------------------- D2O

NEG = np.array([-4.0, -6.0, -3.0], np.float32)
NEG_REF = np.array([-4.5, -5.0, -3.0], np.float32)
SELF = np.array(
  [[-2.0, -3.0, -2.5, -4.0], [-1.0, -1.5, -2.0, -0.5], [-3.0, -3.0, -1.0, -2.0]], np.float32
)
SELF_REF = np.array(
  [[-2.5, -2.0, -2.5, -3.0], [-1.2, -1.0, -2.5, -0.7], [-2.0, -3.5, -1.5, -2.0]], np.float32
)


def _d2o(neg=NEG, self_=SELF, neg_ref=NEG_REF, self_ref=SELF_REF, fn=d2o, **kw):
  return fn(
    policy_neg_logps=neg,
    refplus_neg_logps=neg_ref,
    policy_self_logps=self_,
    refminus_self_logps=self_ref,
    **kw,
  )


def test_d2o_log2_at_reference_and_hand_value():
  loss, _ = _d2o(neg_ref=NEG, self_ref=SELF)
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
  loss, m = _d2o(alpha=0.3, beta=0.2)
  u = 0.2 * np.mean(SELF - SELF_REF, -1) - 0.3 * (NEG - NEG_REF)
  np.testing.assert_allclose(m["u"], u, rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-u))), rtol=1e-5)


def test_d2o_permutation_and_duplication_invariance():
  l0, _ = _d2o()
  perm = np.array([2, 0, 3, 1])
  l1, _ = _d2o(self_=SELF[:, perm], self_ref=SELF_REF[:, perm])
  l2, _ = _d2o(self_=np.tile(SELF, (1, 2)), self_ref=np.tile(SELF_REF, (1, 2)))
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(l2, l0, rtol=1e-6)


def test_d2o_k1_reduces_to_dpo():
  beta = 0.25

  def both(pw, pl):
    a = _d2o(
      neg=pl,
      neg_ref=RL_,
      self_=pw[:, None],
      self_ref=RW_[:, None],
      fn=d2o_loss,
      alpha=beta,
      beta=beta,
    )[0]
    return a, _raw_dpo(pw, pl, beta=beta)[0]

  (l_d2o, l_dpo), (g_d2o, g_dpo) = jax.jit(
    lambda pw, pl: (
      both(pw, pl),
      (
        jax.grad(lambda *a: both(*a)[0], argnums=(0, 1))(pw, pl),
        jax.grad(lambda *a: both(*a)[1], argnums=(0, 1))(pw, pl),
      ),
    )
  )(PW, PL)
  np.testing.assert_allclose(l_d2o, l_dpo, rtol=1e-6)
  np.testing.assert_allclose(g_d2o[0], g_dpo[0], rtol=1e-5)
  np.testing.assert_allclose(g_d2o[1], g_dpo[1], rtol=1e-5)


def test_d2o_gradient_at_initialisation():
  alpha, beta = 0.1, 0.3
  gn, gs = jax.jit(
    jax.grad(
      lambda n, s: _d2o(
        neg=n, self_=s, neg_ref=NEG, self_ref=SELF, fn=d2o_loss, alpha=alpha, beta=beta
      )[0],
      argnums=(0, 1),
    )
  )(NEG, SELF)
  # Descent raises logp of self-samples by 0.5*beta/K each and lowers logp(y_l) by 0.5*alpha,
  # per prompt (the batch mean divides by B = 3).
  np.testing.assert_allclose(gs, np.full((3, 4), -0.5 * beta / 4 / 3), rtol=1e-5)
  np.testing.assert_allclose(gn, np.full(3, 0.5 * alpha / 3), rtol=1e-5)


def test_d2o_self_mask_equals_dropping_and_zero_gradient():
  smask = np.array(
    [[True, True, False, True], [True, True, True, True], [False, True, True, False]]
  )
  loss, m = _d2o(self_mask=smask)
  u = np.array(
    [
      0.1 * np.mean(SELF[b, r] - SELF_REF[b, r]) - 0.1 * (NEG[b] - NEG_REF[b])
      for b, r in enumerate(smask)
    ]
  )
  np.testing.assert_allclose(m["u"], u, rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-u))), rtol=1e-5)
  g = np.asarray(jax.jit(jax.grad(lambda s: _d2o(self_=s, self_mask=smask, fn=d2o_loss)[0]))(SELF))
  assert np.all(g[~smask] == 0) and np.all(g[smask] != 0)


def test_d2o_prompt_without_valid_self_samples_is_left_out():
  smask = np.array([[True] * 4, [False] * 4, [True] * 4])
  loss, _ = _d2o(self_mask=smask)
  keep = np.array([0, 2])
  ref, _ = _d2o(neg=NEG[keep], neg_ref=NEG_REF[keep], self_=SELF[keep], self_ref=SELF_REF[keep])
  np.testing.assert_allclose(loss, ref, rtol=1e-6)


# ----------------------------------------------------------------------------------------- DNO

POL2 = np.array([[-2.0, -3.0], [-1.0, -4.0], [-5.0, -2.5]], np.float32)
PREV2 = np.array([[-2.5, -2.8], [-1.0, -3.0], [-4.0, -3.0]], np.float32)
WIN = np.array([[0.9, 0.2], [0.0, 1.0], [0.5, 0.5]], np.float32)


def test_dno_log2_at_previous_iterate_for_any_label():
  loss, m = dno(policy_logps=POL2, prev_logps=POL2, winrate=WIN, eta=2.0)
  np.testing.assert_allclose(m["per_example_loss"], LOG2, rtol=1e-6)
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)


def test_dno_hand_value_soft_label_bounds_and_swap():
  loss, m = dno(policy_logps=POL2, prev_logps=PREV2, winrate=WIN, eta=2.0)
  lr = POL2 - PREV2
  d = 2.0 * (lr[:, 0] - lr[:, 1])
  q = 1 / (1 + np.exp(-(WIN[:, 0] - WIN[:, 1])))
  ls = lambda x: -np.log1p(np.exp(-x))
  expected = -(q * ls(d) + (1 - q) * ls(-d))
  np.testing.assert_allclose(m["per_example_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  # Extreme win-rates hit the bounds sigma(+-1).
  lo, hi = 1 / (1 + math.e), 1 / (1 + math.exp(-1))
  q = np.asarray(m["soft_label"])
  np.testing.assert_allclose(q[1], lo, rtol=1e-6)
  assert np.all((q >= lo - 1e-7) & (q <= hi + 1e-7))
  sw, _ = dno(
    policy_logps=POL2[:, ::-1].copy(),
    prev_logps=PREV2[:, ::-1].copy(),
    winrate=WIN[:, ::-1].copy(),
    eta=2.0,
  )
  np.testing.assert_allclose(sw, loss, rtol=1e-6)


def test_dno_winrates_average_half_under_pi_t():
  rng = np.random.default_rng(0)
  s = rng.standard_normal((5, 5))
  p = (1 / (1 + np.exp(-(s - s.T)))).astype(np.float32)  # P + P^T = 1, P_ii = 1/2
  w = rng.dirichlet(np.ones(5)).astype(np.float32)
  wr = jax.jit(dno_winrates)
  r = np.asarray(wr(p, w))
  np.testing.assert_allclose(np.sum(w * r), 0.5, rtol=1e-6)
  np.testing.assert_allclose(np.mean(wr(p)), 0.5, rtol=1e-6)
  assert np.all((r >= 0) & (r <= 1))


def test_dno_tabular_recovers_soft_policy_iteration():
  # Free logits over A = 4 responses, all 6 pairs: the minimiser is pi_t exp(r/eta) / Z.
  eta = 0.5
  pi_t = np.array([0.1, 0.4, 0.3, 0.2], np.float32)
  r = np.array([0.9, 0.2, 0.5, 0.6], np.float32)
  i, j = np.triu_indices(4, k=1)
  prev = np.log(pi_t)
  target = pi_t * np.exp(r / eta)
  target = target / target.sum()

  def loss(theta):
    lp = jax.nn.log_softmax(theta)
    return dno_loss(
      policy_logps=jnp.stack([lp[i], lp[j]], -1),
      prev_logps=np.stack([prev[i], prev[j]], -1),
      winrate=np.stack([r[i], r[j]], -1),
      eta=eta,
    )[0]

  @jax.jit
  def solve(theta0, at_target):
    g = jax.grad(loss)(at_target)
    theta = jax.lax.fori_loop(0, 1500, lambda _, th: th - 4.0 * jax.grad(loss)(th), theta0)
    return g, jax.nn.softmax(theta)

  g_at_target, pi = solve(prev, np.log(target))
  np.testing.assert_allclose(g_at_target, 0.0, atol=1e-6)
  np.testing.assert_allclose(pi, target, atol=1e-4)


def test_dno_prct_log2_and_keep_mask():
  loss, _ = prct(
    policy_chosen_logps=PW, policy_rejected_logps=PL, prev_chosen_logps=PW, prev_rejected_logps=PL
  )
  np.testing.assert_allclose(loss, LOG2, rtol=1e-6)
  keep = np.array([True, False, False, True, True])
  loss, _ = prct(
    policy_chosen_logps=PW,
    policy_rejected_logps=PL,
    prev_chosen_logps=RW_,
    prev_rejected_logps=RL_,
    keep=keep,
  )
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-_z()))[keep]), rtol=1e-5)


def test_dno_select_pairs():
  scores = np.array(
    [
      [0.2, 0.9, 0.1, 0.9, 0.5, 0.3],  # ties on the max: lowest index
      [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # all tied: never kept, even with delta = 0
      [0.1, 0.2, 0.15, 0.3, 0.25, 0.12],  # margin 0.2 < delta
    ],
    np.float32,
  )
  pos, neg, keep = select(scores, margin_threshold=0.25)
  np.testing.assert_array_equal(pos, [1, 0, 3])
  np.testing.assert_array_equal(neg, [2, 0, 0])
  np.testing.assert_array_equal(keep, [True, False, False])
  _, _, keep0 = select(scores, margin_threshold=0.0)
  np.testing.assert_array_equal(keep0, [True, False, True])
  assert not np.any(np.asarray(select(scores, margin_threshold=0.81)[2]))
  cand = np.array([[True, False, True, True, True, True]] + [[True] * 6] * 2)
  pos, neg, _ = select(scores, margin_threshold=0.0, mask=cand)
  assert int(pos[0]) == 3
  # Coarse random scores with many ties: a kept pair never has y+ == y-.
  coarse = np.random.default_rng(0).integers(0, 2, (64, 6)).astype(np.float32)
  pos, neg, keep = (np.asarray(x) for x in select(coarse, margin_threshold=0.0))
  assert keep.any() and not keep.all()
  assert np.all(pos[keep] != neg[keep])
