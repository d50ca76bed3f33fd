"""GPM scores, loss, score table, policy score; GPO regression loss (spec §3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from critic_jax.losses import LOSSES
from critic_jax.losses.gpm import (
  gpm_embed,
  gpm_gate,
  gpm_loss,
  gpm_operator,
  gpm_policy_score,
  gpm_prob,
  gpm_score,
  gpm_score_table,
  gpo_loss,
  gpo_select,
)


def _jit(fn):
  """`fn` jitted once per set of Python-scalar keyword arguments, which are made static.

  One compilation per loss is much cheaper on CPU than op-by-op dispatch of new shapes.
  """
  cache = {}

  def call(*args, **kw):
    static = {k: v for k, v in kw.items() if v is None or isinstance(v, (bool, int, float, str))}
    key = tuple(sorted(static.items()))
    if key not in cache:
      cache[key] = jax.jit(lambda args, arrays, static=static: fn(*args, **arrays, **static))
    return cache[key](args, {k: v for k, v in kw.items() if k not in static})

  return call


def _normal(seed, shape):
  """Seeded float32 normals from numpy (cheaper than compiling jax.random op by op)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


score = _jit(gpm_score)
table_fn = _jit(gpm_score_table)
loss_fn = _jit(gpm_loss)
gpo = _jit(gpo_loss)

K2 = 6  # 2k, k = 3 blocks
EI = _normal(0, (5, K2))
EJ = _normal(1, (5, K2))
GATE = _normal(2, (5, K2 // 2))


def _official_operator(lam):
  """R as built by the official `create_skew_symmetric_block_matrix` (loops over blocks)."""
  d = 2 * len(lam)
  r = np.zeros((d, d))
  for i in range(0, d, 2):
    r[i, i + 1] = -lam[i // 2]
    r[i + 1, i] = lam[i // 2]
  return r


def test_registered():
  assert LOSSES.get("gpm") is gpm_loss
  assert LOSSES.get("gpo") is gpo_loss


@pytest.mark.parametrize("normalize", [True, False])
def test_antisymmetry_and_probabilities(normalize):
  @jax.jit
  def all_scores(ei, ej, g):
    out = []
    for gate in (g, None):
      kw = dict(gate_logits=gate, normalize=normalize)
      out.append(
        (
          gpm_score(ei, ej, **kw),
          gpm_score(ej, ei, **kw),
          gpm_prob(ei, ej, tau=0.1, **kw),
          gpm_prob(ej, ei, tau=0.1, **kw),
          gpm_score(ei, ei, **kw),
        )
      )
    return out

  for s_ij, s_ji, p, q, s_ii in all_scores(EI, EJ, GATE):
    np.testing.assert_allclose(s_ij, -np.asarray(s_ji), atol=1e-6)
    np.testing.assert_allclose(np.asarray(p) + np.asarray(q), 1.0, atol=1e-6)
    np.testing.assert_allclose(s_ii, 0.0, atol=1e-6)
    assert np.all(np.abs(np.asarray(s_ij)) > 1e-4)  # the antisymmetry is not 0 = -0


def test_score_matches_official_operator_form():
  @jax.jit
  def parts(ei, ej, g):
    lam = gpm_gate(g)
    return lam, gpm_embed(ei), gpm_embed(ej), gpm_operator(3, lam), gpm_operator(2)

  lam, v_i, v_j, ops, ops2 = (np.asarray(x) for x in parts(EI, EJ, GATE))
  np.testing.assert_allclose(lam.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(v_i, axis=-1), 1.0, rtol=1e-6)
  s = np.asarray(score(EI, EJ, gate_logits=GATE))
  for b in range(5):
    r = _official_operator(lam[b])
    # Official: result = (chosen @ R^T) . rejected = v_j^T R v_i.
    np.testing.assert_allclose(s[b], (v_i[b] @ r.T) @ v_j[b], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops[b], r, atol=1e-7)
  np.testing.assert_allclose(ops2, _official_operator([1.0, 1.0]))


def test_bound_with_unit_vectors_and_softmax_gate():
  e1, e2 = _normal(3, (200, 8)), _normal(4, (200, 8))
  g = 3.0 * _normal(5, (200, 4))
  s = np.asarray(score(e1, e2, gate_logits=g))
  lam = np.exp(g) / np.exp(g).sum(-1, keepdims=True)
  assert np.all(np.abs(s) <= lam.max(-1) + 1e-6)
  assert np.abs(s).max() > 0.5 * lam.max(-1).min()  # not trivially small
  scaled = jax.jit(lambda x: gpm_gate(x, scale=4.0, temperature=2.0))(g)
  e = np.exp(g / 2.0)
  np.testing.assert_allclose(scaled, 4.0 * e / e.sum(-1, keepdims=True), rtol=1e-5)


def test_bt_is_special_case():
  r = np.array([0.3, -1.2, 2.0, 0.7], np.float32)
  c = 0.8
  v = np.stack([r, np.full_like(r, c)], axis=-1)  # v_y = (r(y), c), k = 1
  t = table_fn(v, normalize=False)
  np.testing.assert_allclose(t, c * (r[:, None] - r[None, :]), atol=1e-6)


def test_three_cycle():
  ang = np.deg2rad([0.0, 120.0, 240.0])
  v = np.stack([np.cos(ang), np.sin(ang)], -1).astype(np.float32)
  expected = math.sin(math.radians(120))
  t = np.asarray(table_fn(v))
  np.testing.assert_allclose([t[0, 1], t[1, 2], t[2, 0]], expected, rtol=1e-6)
  # The GPM loss gets all three pairs of the cycle right; no scalar reward can.
  _, m = loss_fn(chosen_emb=v, rejected_emb=np.roll(v, -1, axis=0))
  np.testing.assert_allclose(m["score"], expected, rtol=1e-6)
  assert float(m["accuracy"]) == 1.0


def test_k1_rotation_invariance():
  v = _normal(6, (4, 2))
  th = 0.7
  rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], np.float32)
  np.testing.assert_allclose(
    table_fn(v @ rot.T, normalize=False), table_fn(v, normalize=False), atol=1e-5
  )


def test_table_skew_symmetric_zero_diagonal_and_matches_pairwise():
  emb = _normal(7, (2, 4, K2))
  g = _normal(8, (2, K2 // 2))
  t = np.asarray(table_fn(emb, gate_logits=g))
  np.testing.assert_allclose(t, -np.swapaxes(t, -1, -2), atol=1e-6)
  np.testing.assert_allclose(np.diagonal(t, axis1=-2, axis2=-1), 0.0, atol=1e-7)
  shape = (2, 4, 4, K2)
  pairwise = score(
    np.broadcast_to(emb[:, :, None], shape),
    np.broadcast_to(emb[:, None, :], shape),
    gate_logits=np.broadcast_to(g[:, None, None], (2, 4, 4, K2 // 2)),
  )
  np.testing.assert_allclose(t, pairwise, atol=1e-6)


def test_policy_score_hand_and_mask():
  t = np.array([[0.0, 0.5, -0.2], [-0.5, 0.0, 0.9], [0.2, -0.9, 0.0]], np.float32)
  ps = jax.jit(gpm_policy_score)
  np.testing.assert_allclose(ps(t), [0.1, 0.4 / 3, -0.7 / 3], rtol=1e-6)
  # Third response invalid: average over the first two columns only.
  np.testing.assert_allclose(ps(t, np.array([True, True, False])), [0.25, -0.25, -0.35], rtol=1e-6)


def test_loss_hand_value_margin_tau_and_mask():
  s = np.asarray(score(EI, EJ, gate_logits=GATE))
  margin = np.array([0.0, 0.1, -0.2, 0.05, 0.3], np.float32)
  loss, m = loss_fn(chosen_emb=EI, rejected_emb=EJ, gate_logits=GATE, margin=margin, tau=0.1)
  per = np.log1p(np.exp(-(s - margin) / 0.1))
  np.testing.assert_allclose(m["per_example_loss"], per, rtol=1e-5)
  np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["accuracy"], np.mean(s > 0))
  mask = np.array([True, False, True, False, True])
  lm, _ = loss_fn(
    chosen_emb=EI, rejected_emb=EJ, gate_logits=GATE, margin=margin, mask=mask, tau=0.1
  )
  np.testing.assert_allclose(lm, per[mask].mean(), rtol=1e-5)


def test_loss_gradients():
  with jax.enable_x64(True):
    ei, ej, g = (jnp.asarray(x, jnp.float64) for x in (EI, EJ, GATE))
    f = lambda a, b, c: gpm_loss(chosen_emb=a, rejected_emb=b, gate_logits=c, margin=0.1)[0]
    check_grads(jax.jit(f), (ei, ej, g), order=1, modes=("rev",))


def test_odd_embedding_rejected():
  with pytest.raises(ValueError, match="even"):
    gpm_score(np.ones((2, 3)), np.ones((2, 3)))


def test_gpo_select_ties_to_lowest_index():
  s_hat = np.array([[0.1, 0.3, 0.3, -0.2, -0.2], [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
  sel = jax.jit(gpo_select)
  w, lo = sel(s_hat)
  np.testing.assert_array_equal(w, [1, 0])
  np.testing.assert_array_equal(lo, [3, 0])
  w, _ = sel(s_hat, np.array([[True, False, True, True, True], [True] * 5]))
  np.testing.assert_array_equal(w, [2, 0])


def test_gpo_zero_at_previous_iterate_with_zero_scores():
  lp = np.array([[-3.0, -4.0], [-1.5, -2.5]], np.float32)
  zero = np.zeros((2, 2), np.float32)
  loss, _ = gpo(policy_logps=lp, prev_logps=lp, s_hat=zero)
  g = jax.jit(jax.grad(lambda x: gpo_loss(policy_logps=x, prev_logps=lp, s_hat=zero)[0]))(lp)
  assert float(loss) == 0.0
  assert np.all(np.asarray(g) == 0)


def test_gpo_hand_value_baseline_and_clamp():
  pol = np.array([[-1.0, -2.0]], np.float32)
  prev = np.array([[-1.5, -1.5]], np.float32)
  s_hat = np.array([[0.002, -0.001]], np.float32)
  kw = dict(policy_logps=pol, prev_logps=prev, beta=0.001)
  (loss, m), (l_clamp, _), (l_base, _) = jax.jit(
    lambda: (
      gpo_loss(**kw, s_hat=s_hat),
      gpo_loss(**kw, s_hat=s_hat, target_clamp=1.5),
      gpo_loss(**kw, s_hat=s_hat + 0.5, baseline=0.5),
    )
  )()
  # log-ratios (0.5, -0.5), targets (2, -1).
  np.testing.assert_allclose(loss, (0.5 - 2.0) ** 2 + (-0.5 + 1.0) ** 2, rtol=1e-5)
  np.testing.assert_allclose(m["target"], [[2.0, -1.0]], rtol=1e-5)
  np.testing.assert_allclose(l_clamp, (0.5 - 1.5) ** 2 + (-0.5 + 1.0) ** 2, rtol=1e-5)
  np.testing.assert_allclose(l_base, (0.5 - 2.0) ** 2 + (-0.5 + 1.0) ** 2, rtol=1e-4)
