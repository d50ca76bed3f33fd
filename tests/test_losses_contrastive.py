"""InfoNCE, relative penalty, uniformity and tolerance (spec §11)."""

import math

import jax
import numpy as np
import pytest

from critic_jax.losses import LOSSES
from critic_jax.losses.contrastive import (
  info_nce_from_similarities,
  info_nce_loss,
  tolerance,
  uniformity,
)

POS = np.array([0.8, 0.1, -0.2], np.float32)
NEG = np.array([[0.3, 0.9, -0.5, 0.0], [0.1, 0.2, 0.05, -0.9], [-0.1, 0.4, 0.4, 0.35]], np.float32)


def _normal(seed, shape):
  """Seeded float32 normals from numpy (cheaper than compiling jax.random op by op)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _jit(fn):
  """`fn` jitted once per set of Python-scalar keyword arguments, which are made static.

  Compiling a whole loss once is much cheaper on CPU than op-by-op dispatch of new shapes.
  """
  cache = {}

  def call(**kw):
    static = {k: v for k, v in kw.items() if v is None or isinstance(v, (bool, int, float, str))}
    key = tuple(sorted(static.items()))
    if key not in cache:
      cache[key] = jax.jit(lambda arrays, static=static: fn(**arrays, **static))
    return cache[key]({k: v for k, v in kw.items() if k not in static})

  return call


nce_sims = _jit(info_nce_from_similarities)
nce = _jit(info_nce_loss)


def _nce(pos=POS, neg=NEG, **kw):
  return nce_sims(pos_sim=pos, neg_sim=neg, **kw)


def test_registered():
  assert LOSSES.get("info_nce") is info_nce_loss


def test_hand_value_and_probabilities():
  tau = 0.2
  loss, m = _nce(tau=tau)
  logits = np.concatenate([POS[:, None], NEG], -1) / tau
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  np.testing.assert_allclose(m["per_example_loss"], -np.log(p[:, 0]), rtol=1e-5)
  np.testing.assert_allclose(loss, -np.log(p[:, 0]).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["pos_prob"], p[:, 0], rtol=1e-5)
  np.testing.assert_allclose(m["neg_prob"], p[:, 1:], rtol=1e-5)


def test_gradient_identities():
  tau = 0.3
  gp, gn = jax.jit(
    jax.grad(
      lambda p, n: info_nce_from_similarities(pos_sim=p, neg_sim=n, tau=tau)[0] * 3, argnums=(0, 1)
    )
  )(POS, NEG)  # * N: per-example gradients
  _, m = _nce(tau=tau)
  # dL/ds_ij = P_ij / tau; dL/ds_ii = -(1/tau) sum_k P_ik; they sum to zero.
  np.testing.assert_allclose(gn, np.asarray(m["neg_prob"]) / tau, rtol=1e-5)
  np.testing.assert_allclose(gp, -np.asarray(m["neg_prob"]).sum(-1) / tau, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gn).sum(-1), -np.asarray(gp), rtol=1e-5)
  # Relative penalty = |dL/ds_ij| / |dL/ds_ii|.
  np.testing.assert_allclose(m["relative_penalty"], np.abs(gn) / np.abs(gp)[:, None], rtol=1e-5)


def test_relative_penalty_limits():
  for tau in (0.05, 1.0, 1e4):
    _, m = _nce(tau=np.float32(tau))  # traced temperature: one compilation
    np.testing.assert_allclose(np.sum(m["relative_penalty"], -1), 1.0, rtol=1e-5)
  _, m = _nce(tau=np.float32(1e4))
  np.testing.assert_allclose(m["relative_penalty"], 0.25, atol=1e-4)
  _, m = _nce(tau=np.float32(1e-3))
  onehot = np.eye(4)[np.argmax(NEG, -1)]
  # Row 2 has a tie at 0.4 between negatives 1 and 2: the penalty splits evenly.
  onehot[2] = [0.0, 0.5, 0.5, 0.0]
  np.testing.assert_allclose(m["relative_penalty"], onehot, atol=1e-6)


def test_equal_similarities_give_log_m_plus_one():
  loss, m = _nce(pos=np.full(3, 0.3, np.float32), neg=np.full((3, 4), 0.3, np.float32), tau=0.07)
  np.testing.assert_allclose(m["per_example_loss"], math.log(5), rtol=1e-6)


def test_nonnegative_and_decreasing_in_positive_similarity():
  s = np.linspace(-1.0, 1.0, 21)
  losses = [float(_nce(pos=np.full(3, x, np.float32), tau=0.2)[0]) for x in s[::4]]
  assert all(x >= 0 for x in losses)
  assert all(a > b for a, b in zip(losses, losses[1:], strict=False))


def test_temperature_limits():
  tau = np.float32(0.01)  # traced: shares one compilation with the other temperatures
  pos = np.array([0.8, 0.1, 0.5], np.float32)  # row 2: correct with a margin, the loss goes to 0
  loss, m = _nce(pos=pos, tau=tau)
  hinge = np.maximum(NEG.max(-1) - np.asarray(pos), 0.0) / tau
  per = np.asarray(m["per_example_loss"])
  # hinge <= L <= hinge + log(M + 1); the slack is O(log #ties) while the hinge is O(1/tau).
  assert np.all(per >= hinge - 1e-4) and np.all(per <= hinge + math.log(5))
  np.testing.assert_allclose(per[:2], hinge[:2], rtol=1e-3)
  assert per[2] < 1e-3
  tau = 1e3
  _, m = _nce(tau=np.float32(tau))
  n = 5
  approx = math.log(n) - (n - 1) / (n * tau) * POS + NEG.sum(-1) / (n * tau)
  np.testing.assert_allclose(m["per_example_loss"], approx, atol=1e-6)


def test_explicit_negatives_mask_equals_slice():
  a, p = _normal(0, (2, 3, 8))
  n = _normal(1, (3, 5, 8))
  mask = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], bool)
  _, m = nce(
    anchors=a,
    positives=p,
    negatives=n,
    neg_mask=mask,
    tau=0.5,
  )
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  a, p, n = unit(a), unit(p), unit(n)
  for b in range(3):
    pos = a[b] @ p[b] / 0.5
    neg = n[b, mask[b]] @ a[b] / 0.5  # the sliced problem, in numpy
    expected = np.logaddexp.reduce(np.concatenate([[pos], neg])) - pos
    np.testing.assert_allclose(m["per_example_loss"][b], expected, rtol=1e-5)
  assert np.all(np.asarray(m["relative_penalty"])[~mask] == 0)


def _ntxent_reference(a, p, tau):
  z = np.concatenate([a, p], 0)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  s = z @ z.T / tau
  n = len(z)
  b = n // 2
  out = []
  for i in range(n):
    j = (i + b) % n
    others = [k for k in range(n) if k != i]
    out.append(-(s[i, j] - np.log(np.sum(np.exp(s[i, others])))))
  return np.array(out)


def test_in_batch_matches_simclr_reference():
  a = _normal(2, (4, 6))
  p = _normal(3, (4, 6))
  loss, m = nce(anchors=a, positives=p, tau=0.5)
  ref = _ntxent_reference(a, p, 0.5)
  np.testing.assert_allclose(m["per_example_loss"], ref, rtol=1e-5)
  np.testing.assert_allclose(loss, ref.mean(), rtol=1e-5)
  assert m["relative_penalty"].shape == (8, 6)  # 2B queries, 2B - 2 negatives
  _, m1 = nce(anchors=a, positives=p, tau=0.5, symmetric=False)
  np.testing.assert_allclose(m1["per_example_loss"], ref[:4], rtol=1e-5)


def test_hard_negative_variant():
  f = lambda neg, **kw: info_nce_from_similarities(pos_sim=POS, neg_sim=neg, tau=0.5, **kw)
  full, same, (_, m), g = jax.jit(
    lambda n: (
      f(n)[0],
      f(n, hard_k=4)[0],
      f(n, hard_k=1),
      jax.grad(lambda x: f(x, hard_k=2)[0])(n),
    )
  )(NEG)
  np.testing.assert_allclose(same, full, rtol=1e-6)
  hardest = NEG.max(-1)
  expected = np.logaddexp(POS / 0.5, hardest / 0.5) - POS / 0.5
  np.testing.assert_allclose(m["per_example_loss"], expected, rtol=1e-5)
  # Only the kept negatives receive gradient.
  assert np.all((np.asarray(g) != 0).sum(-1) == 2)
  with pytest.raises(ValueError, match="hard_k"):
    f(NEG, hard_k=5)


def test_uniformity():
  unif = jax.jit(uniformity)
  same = np.tile(np.array([[0.6, 0.8, 0.0]], np.float32), (4, 1))
  np.testing.assert_allclose(unif(same), 0.0, atol=1e-6)
  # Three orthonormal rows (and a masked fourth): every squared distance is 2, so
  # L_unif = log exp(-2 * 2) = -4.
  padded = np.concatenate([np.eye(3), [[1.0, 1.0, 0.0]]]).astype(np.float32)
  mask = np.array([True, True, True, False])
  np.testing.assert_allclose(unif(padded, mask=mask), -4.0, rtol=1e-6)
  assert float(unif(padded)) > -4.0  # the fourth row is closer to the others
  spread = _normal(4, (4, 3))
  assert float(unif(spread)) < 0


def test_tolerance():
  tol = jax.jit(tolerance)
  centers = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  labels = np.array([0, 0, 1, 1])
  collapsed = centers[labels] * np.array([[1.0], [2.0], [0.5], [3.0]], np.float32)
  np.testing.assert_allclose(tol(collapsed, labels), 1.0, rtol=1e-6)
  feats = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], np.float32)
  lab = np.array([0, 0, 1, 1])
  expected = np.mean([0.0, 0.0, -1 / np.sqrt(2), -1 / np.sqrt(2)])
  np.testing.assert_allclose(tol(feats, lab), expected, rtol=1e-6)
