"""CRM peer selection, masked BT loss, curriculum and keep-ratio ramp (spec §4)."""

import math

import jax
import numpy as np
import pytest

from critic_jax.data.synthetic_preferences import noisy_bt_pairs
from critic_jax.losses import LOSSES
from critic_jax.losses.crm import (
  crm_bt_loss,
  crm_keep_ratio,
  crm_loss,
  crm_select,
  curriculum_order,
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


select = _jit(crm_select)
crm = _jit(crm_loss)
bt = _jit(crm_bt_loss)

# Hand-made batch with ties: A ties at 2.0 (rows 1, 2) and 0.5 (rows 0, 4); B ties at 1.0.
MA = np.array([0.5, 2.0, 2.0, -1.0, 0.5], np.float32)
MB = np.array([1.0, -0.3, 1.0, 3.0, 1.0], np.float32)


def _normal(seed, shape):
  """Seeded float32 normals from numpy (cheaper than compiling jax.random op by op)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_registered():
  assert LOSSES.get("crm") is crm_loss
  assert LOSSES.get("crm_bt") is crm_bt_loss


def test_hand_made_selection_with_ties():
  # ceil(0.6 * 5) = 3. A's top-3: 1, 2 (2.0), then the 0.5 tie goes to row 0 (lower index).
  # B's top-3: 3 (3.0), then the 1.0 tie among 0, 2, 4 keeps rows 0 and 2.
  for_a, for_b = select(margins_A=MA, margins_B=MB, keep_ratio=0.6)
  np.testing.assert_array_equal(for_b, [True, True, True, False, False])
  np.testing.assert_array_equal(for_a, [True, False, True, True, False])
  # ceil(0.2 * 5) = 1; ceil(0 * 5) = 0.
  for_a, for_b = select(margins_A=MA, margins_B=MB, keep_ratio=0.2)
  np.testing.assert_array_equal(for_b, [False, True, False, False, False])
  np.testing.assert_array_equal(for_a, [False, False, False, True, False])
  for_a, _ = select(margins_A=MA, margins_B=MB, keep_ratio=0.0)
  assert not np.any(np.asarray(for_a))
  for_a, _ = select(margins_A=MA, margins_B=MB, keep_ratio=0.01)  # a positive ratio keeps >= 1
  assert int(np.sum(for_a)) == 1


@pytest.mark.parametrize("ratio", [0.07, 0.1, 0.29, 0.5, 0.57, 0.6, 0.999, 1.0])
def test_selection_size_is_ceil(ratio):
  m = _normal(0, (100,))
  for_a, for_b = crm_select(margins_A=m, margins_B=-m, keep_ratio=ratio)
  # Eager on purpose: one set of compiled ops serves every Python ratio.
  # The exact decimal product, free of float error (0.07 * 100 = 7.000000000000001 in floats).
  expected = math.ceil(round(ratio * 100, 9))
  assert int(np.sum(for_a)) == expected == int(np.sum(for_b))


def test_traced_keep_ratio_matches_python():
  m = _normal(1, (100,))
  sel = jax.jit(lambda r: crm_select(margins_A=m, margins_B=m * 0.5 + 1.0, keep_ratio=r))
  for ratio in (0.07, 0.3, 0.55, 1.0):
    got = sel(np.float32(ratio))
    want = crm_select(margins_A=m, margins_B=m * 0.5 + 1.0, keep_ratio=ratio)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_keep_ratio_one_keeps_everything_and_matches_two_bt_losses():
  for_a, for_b = select(margins_A=MA, margins_B=MB, keep_ratio=1.0)
  assert np.all(np.asarray(for_a)) and np.all(np.asarray(for_b))
  loss, m = crm(margins_A=MA, margins_B=MB, keep_ratio=1.0)
  bt = lambda x: np.mean(np.log1p(np.exp(-np.asarray(x))))
  np.testing.assert_allclose(m["loss_A"], bt(MA), rtol=1e-6)
  np.testing.assert_allclose(loss, bt(MA) + bt(MB), rtol=1e-6)


def test_unselected_pairs_get_zero_gradient():
  ga, gb = jax.jit(
    jax.grad(lambda a, b: crm_loss(margins_A=a, margins_B=b, keep_ratio=0.6)[0], (0, 1))
  )(MA, MB)
  for_a = np.array([True, False, True, True, False])
  for_b = np.array([True, True, True, False, False])
  sig = lambda x: 1 / (1 + np.exp(-np.asarray(x)))
  np.testing.assert_allclose(ga, np.where(for_a, -(1 - sig(MA)) / 3, 0.0), rtol=1e-5)
  np.testing.assert_allclose(gb, np.where(for_b, -(1 - sig(MB)) / 3, 0.0), rtol=1e-5)
  assert np.all(np.asarray(ga)[~for_a] == 0) and np.all(np.asarray(gb)[~for_b] == 0)


def test_masked_bt_loss_hand_value_and_empty_selection():
  mask = np.array([True, False, False, True, True])
  loss, m = bt(margins=MA, mask=mask)
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-np.asarray(MA)[[0, 3, 4]]))), rtol=1e-6)
  assert float(m["num_selected"]) == 3
  loss, _ = bt(margins=MA, mask=np.zeros(5, bool))
  assert float(loss) == 0.0


def test_permutation_equivariance():
  ma = _normal(2, (12,))
  mb = _normal(3, (12,))
  perm = np.random.default_rng(4).permutation(12)
  fa, fb = select(margins_A=ma, margins_B=mb, keep_ratio=0.55)
  pa, pb = select(margins_A=ma[perm], margins_B=mb[perm], keep_ratio=0.55)
  np.testing.assert_array_equal(pa, np.asarray(fa)[perm])
  np.testing.assert_array_equal(pb, np.asarray(fb)[perm])


def test_padding_is_never_selected_and_counts_valid_only():
  valid = np.array([True, True, False, True, False])
  big = np.array([0.0, 1.0, 100.0, 2.0, 100.0], np.float32)
  for_a, for_b = select(margins_A=big, margins_B=big, keep_ratio=0.5, mask=valid)
  # 3 valid pairs -> ceil(1.5) = 2: rows 3 and 1; the padded rows 2, 4 never.
  np.testing.assert_array_equal(for_b, [False, True, False, True, False])
  np.testing.assert_array_equal(for_a, for_b)


def test_clean_fraction_exceeds_one_minus_noise():
  eta = 0.3
  data = noisy_bt_pairs(num_items=200, num_pairs=512, noise_rate=eta, rng=0)
  s = data.scores
  true_margin = s[data.chosen] - s[data.rejected]  # negative on flipped pairs
  rng = np.random.default_rng(1)
  # Two better-than-chance scorers: noisy views of the true margin of the labelled pair.
  ma = (true_margin + rng.normal(0, 1.0, 512)).astype(np.float32)
  mb = (true_margin + rng.normal(0, 1.0, 512)).astype(np.float32)
  for_a, for_b = select(margins_A=ma, margins_B=mb, keep_ratio=1 - eta)
  for sel in (np.asarray(for_a), np.asarray(for_b)):
    assert sel.sum() == math.ceil(0.7 * 512)
    assert 1 - data.flipped[sel].mean() > 1 - eta + 0.1


def test_curriculum_order_non_increasing_with_stable_ties():
  m = np.array([0.2, 1.5, -0.3, 1.5, 0.9, 0.2], np.float32)
  perm = np.asarray(jax.jit(curriculum_order)(m))
  np.testing.assert_array_equal(perm, [1, 3, 4, 0, 5, 2])
  assert np.all(np.diff(m[perm]) <= 0)


def test_keep_ratio_ramp_off_by_default():
  assert crm_keep_ratio(0, noise_rate=0.4) == pytest.approx(0.6)
  assert crm_keep_ratio(10_000, noise_rate=0.4) == pytest.approx(0.6)
  ramp = [float(crm_keep_ratio(t, noise_rate=0.4, ramp_steps=10)) for t in (0, 5, 10, 20)]
  np.testing.assert_allclose(ramp, [1.0, 0.8, 0.6, 0.6], rtol=1e-6)
  with pytest.raises(ValueError, match="noise_rate"):
    crm_keep_ratio(0, noise_rate=1.5)
