"""KL estimators k1, k2, k3 (spec `rl-critics-search.md` §2b, §2e item 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from critic_jax.losses import LOSSES
from critic_jax.losses.kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3

# Delta = log pi_ref - log pi_theta
DELTAS = np.array([0.0, 0.1, -0.1, 0.5], np.float32)
K3_SPEC = np.array([0.0, 0.0051709, 0.0048374, 0.1487213], np.float32)


def _logps(delta, base=-1.3):
  logp = np.full_like(delta, base)
  return logp, logp + delta


def test_k3_spec_values():
  logp, ref = _logps(DELTAS)
  np.testing.assert_allclose(kl_k3(logp=logp, ref_logp=ref), K3_SPEC, atol=1e-6)
  np.testing.assert_allclose(kl_estimate(logp=logp, ref_logp=ref), K3_SPEC, atol=1e-6)


def test_k1_k2_values():
  logp, ref = _logps(DELTAS)
  np.testing.assert_allclose(kl_k1(logp=logp, ref_logp=ref), -DELTAS, atol=1e-6)
  np.testing.assert_allclose(kl_k2(logp=logp, ref_logp=ref), 0.5 * DELTAS**2, atol=1e-6)
  np.testing.assert_allclose(
    kl_estimate(logp=logp, ref_logp=ref, kind="k2"), 0.5 * DELTAS**2, atol=1e-6
  )


def test_k2_k3_nonnegative_and_k1_k3_unbiased():
  rng = np.random.default_rng(0)
  logp = rng.normal(size=1000).astype(np.float32)
  ref = rng.normal(size=1000).astype(np.float32)
  for fn in (kl_k2, kl_k3):
    assert np.all(np.asarray(fn(logp=logp, ref_logp=ref)) >= 0)
  # Exact expectations over a small categorical: E_p[k1] = E_p[k3] = KL(p || q).
  p = jax.nn.softmax(jnp.array([0.3, -1.0, 2.0, 0.1]))
  q = jax.nn.softmax(jnp.array([-0.5, 0.4, 1.0, 0.0]))
  kl = jnp.sum(p * (jnp.log(p) - jnp.log(q)))
  for fn in (kl_k1, kl_k3):
    np.testing.assert_allclose(jnp.sum(p * fn(logp=jnp.log(p), ref_logp=jnp.log(q))), kl, rtol=1e-5)


def test_k3_gradient():
  rng = np.random.default_rng(1)
  logp = jnp.asarray(rng.normal(size=6), jnp.float32)
  ref = jnp.asarray(rng.normal(size=6), jnp.float32)
  check_grads(lambda lp: kl_k3(logp=lp, ref_logp=ref), (logp,), order=2, modes=["rev"], eps=1e-2)
  grad = jax.grad(lambda lp: kl_k3(logp=lp, ref_logp=ref).sum())(logp)
  np.testing.assert_allclose(grad, 1 - jnp.exp(ref - logp), rtol=1e-5)  # 1 - pi_ref / pi


def test_mask_and_clamp():
  logp, ref = _logps(np.array([0.1, 30.0, -30.0], np.float32))
  mask = np.array([False, True, True])
  out = kl_k3(logp=logp, ref_logp=ref, mask=mask)
  assert out[0] == 0 and out[1] > 1e12
  clamped = kl_k3(logp=logp, ref_logp=ref, clamp=10.0)  # verl low_var_kl
  np.testing.assert_allclose(clamped, [0.0051709, 10.0, 10.0], atol=1e-6)
  np.testing.assert_allclose(kl_k1(logp=logp, ref_logp=ref, mask=mask), [0.0, -30.0, 30.0])


def test_errors_and_not_a_registered_loss():
  assert KL_ESTIMATORS == ("k1", "k2", "k3")
  assert not any(name in LOSSES for name in KL_ESTIMATORS)
  with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
    kl_estimate(logp=np.zeros(2), ref_logp=np.zeros(2), kind="k4")
  with pytest.raises(ValueError, match="same shape"):
    kl_k3(logp=np.zeros(2), ref_logp=np.zeros(3))
  with pytest.raises(ValueError, match=r"mask must have shape \(2,\)"):
    kl_k1(logp=np.zeros(2), ref_logp=np.zeros(2), mask=np.ones(3, bool))
