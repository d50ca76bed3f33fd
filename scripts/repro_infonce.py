"""InfoNCE temperature sweep: the uniformity-tolerance dilemma (Wang & Liu, CVPR 2021,
arXiv 2012.09740; spec preference-and-reward.md §11f).

    python scripts/repro_infonce.py     # ~1-2 minutes on 2 CPU cores

Data: a mixture of K = 10 classes on the unit sphere S^31 (class means uniform on the sphere,
samples normalize(mu_k + 0.6 eps)). Two views of a sample add small noise (0.15 eps) and
renormalise. An MLP encoder 32 -> 128 -> 16 with L2-normalised output is trained with in-batch
InfoNCE (`info_nce_loss`, 2B - 2 negatives) at each temperature tau, from the same init and
the same batches (all temperatures in one vmapped run). On held-out samples we report
  uniformity  L_unif = log E exp(-2 ||f(x) - f(y)||^2)     (lower = more uniform)
  tolerance   T = E_{same class} <f(x), f(y)>              (higher = classes kept together)
and the accuracy of a nearest-class-mean probe. Claim: lower tau gives lower L_unif and lower
tolerance. Below tau ~ 0.1 both saturate: the embedding is then about as uniform as points
drawn uniformly on S^15 (printed as the floor), so smaller temperatures cannot improve it.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from critic_jax.losses.contrastive import info_nce_loss, tolerance, uniformity  # noqa: E402

TAUS = (0.07, 0.1, 0.2, 0.3, 0.5, 1.0)
D_IN, HIDDEN, D_OUT, K = 32, 128, 16, 10


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def sample(key, means, n):
  """n samples `[n, D_IN]` on the sphere and their class labels `[n]`."""
  k1, k2 = jax.random.split(key)
  labels = jax.random.randint(k1, (n,), 0, K)
  return _normalize(means[labels] + 0.6 * jax.random.normal(k2, (n, D_IN))), labels


def encoder_init(key):
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN), "b1": jnp.zeros(HIDDEN),
    "w2": jax.random.normal(k2, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
  }  # fmt: skip


def encode(params, x):
  return _normalize(jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"])


def train(taus, *, steps: int = 3000, batch: int = 256, lr: float = 1e-3, seed: int = 0):
  """Trains one encoder per temperature (same init, same batches); returns params [tau, ...]."""
  key = jax.random.key(seed)
  k_means, k_init, k_data = jax.random.split(key, 3)
  means = _normalize(jax.random.normal(k_means, (K, D_IN)))
  opt = optax.adam(lr)

  def run(tau):
    params = encoder_init(k_init)

    def step(carry, k):
      p, st = carry
      ks, k1, k2 = jax.random.split(k, 3)
      x, _ = sample(ks, means, batch)
      v1 = _normalize(x + 0.15 * jax.random.normal(k1, x.shape))
      v2 = _normalize(x + 0.15 * jax.random.normal(k2, x.shape))
      loss_fn = lambda q: info_nce_loss(anchors=encode(q, v1), positives=encode(q, v2), tau=tau)[0]
      loss, g = jax.value_and_grad(loss_fn)(p)
      upd, st = opt.update(g, st, p)
      return (optax.apply_updates(p, upd), st), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                       jax.random.split(k_data, steps))  # fmt: skip
    return params, losses

  params, losses = jax.jit(jax.vmap(run))(jnp.asarray(taus, jnp.float32))
  return params, losses, means


def evaluate(params, means, *, n: int = 2000, seed: int = 1) -> dict[str, float]:
  x, labels = sample(jax.random.key(seed), means, n)
  f = encode(params, x)
  centers = _normalize(jnp.stack([jnp.mean(f[labels == c], axis=0) for c in range(K)]))
  probe = float(jnp.mean(jnp.argmax(f @ centers.T, axis=-1) == labels))
  return {
    "uniformity": float(uniformity(f, t=2.0)), "tolerance": float(tolerance(f, labels)),
    "probe_accuracy": probe,
  }  # fmt: skip


def main(argv=None) -> dict[float, dict[str, float]]:
  del argv
  t0 = time.time()
  params, losses, means = train(TAUS)
  raw = evaluate(encoder_init(jax.random.key(123)), means)
  print(f"random encoder: L_unif {raw['uniformity']:.3f}  tolerance {raw['tolerance']:.3f}")
  print("  tau   final loss   L_unif   tolerance   NCM probe acc")
  out = {}
  for i, tau in enumerate(TAUS):
    m = evaluate(jax.tree.map(lambda x, i=i: x[i], params), means)
    out[tau] = m
    print(f"  {tau:<5g} {float(losses[i, -100:].mean()):>10.3f}   {m['uniformity']:.3f}   "
          f"{m['tolerance']:>8.3f}   {m['probe_accuracy']:.3f}")  # fmt: skip
  sphere = _normalize(jax.random.normal(jax.random.key(7), (2000, D_OUT)))
  print(f"uniform on S^{D_OUT - 1}: L_unif {float(uniformity(sphere, t=2.0)):.3f} (the floor)")
  main_taus = [t for t in TAUS if t >= 0.1]
  unif = [out[t]["uniformity"] for t in main_taus]
  tol = [out[t]["tolerance"] for t in main_taus]
  print(f"for tau in {main_taus}: L_unif increases with tau: {bool(np.all(np.diff(unif) > 0))}; "
        f"tolerance increases with tau: {bool(np.all(np.diff(tol) > 0))}")  # fmt: skip
  print(f"({time.time() - t0:.0f}s)")
  return out


if __name__ == "__main__":
  main()
