"""InfoNCE with temperature, its hardness diagnostics, and the uniformity/tolerance metrics.

Paper: Wang & Liu, "Understanding the Behaviour of Contrastive Loss", CVPR 2021, arXiv 2012.09740.
Uniformity metric: Wang & Isola 2020, arXiv 2005.10242. No official code was found; the formulas
are the standard ones (spec [M]) and are pinned by the invariants in the tests.
Spec: `shared/specs/preference-and-reward.md` §11.

For query i with positive similarity s_ii and negatives s_ik (k != i):
  L_i = -log [ exp(s_ii/tau) / (exp(s_ii/tau) + sum_k exp(s_ik/tau)) ],
  P_ij = exp(s_ij/tau) / (exp(s_ii/tau) + sum_k exp(s_ik/tau)),
  dL/ds_ii = -(1/tau) sum_k P_ik,   dL/ds_ij = (1/tau) P_ij,
  relative penalty r_i(s_ij) = |dL/ds_ij| / |dL/ds_ii| = softmax_k(s_ik/tau)_j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from critic_jax.losses.common import masked_mean
from critic_jax.losses.registry import LOSSES

__all__ = [
  "info_nce_from_similarities",
  "info_nce_loss",
  "tolerance",
  "uniformity",
]


def _l2n(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _hard_mask(neg_sim: jax.Array, valid: jax.Array, hard_k: int) -> jax.Array:
  """Keeps the hard_k most similar valid negatives per row (ties to the lower index)."""
  m = neg_sim.shape[-1]
  if not 0 < hard_k <= m:
    raise ValueError(f"info_nce: hard_k must be in [1, {m}], got {hard_k}")
  scores = jnp.where(valid, jax.lax.stop_gradient(neg_sim), -jnp.inf)
  _, idx = jax.lax.top_k(scores, hard_k)
  keep = jnp.any(idx[..., :, None] == jnp.arange(m), axis=-2)
  return keep & valid


def info_nce_from_similarities(
  *,
  pos_sim: jax.Array,
  neg_sim: jax.Array,
  neg_mask: jax.Array | None = None,
  tau: float = 0.2,
  hard_k: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE on precomputed similarities (the form the gradient identities are stated in).

  Args:
    pos_sim: `[N]` positive similarities s_ii.
    neg_sim: `[N, M]` negative similarities s_ik.
    neg_mask: optional `[N, M]` bool of valid negatives.
    tau: temperature.
    hard_k: [U] hard-negative variant: only the hard_k most similar valid negatives of each
      query enter the denominator (the paper's K or quantile is not confirmed). None = off.
  Returns:
    (loss, metrics): `per_example_loss` `[N]`, `relative_penalty` `[N, M]` (a distribution over
    the negatives that enter the loss, 0 elsewhere), `pos_prob` `[N]` = P_ii, `neg_prob` `[N, M]`
    = P_ik, and the means of the positive and hardest-negative similarities.
  """
  if pos_sim.ndim != 1 or neg_sim.ndim != 2 or neg_sim.shape[0] != pos_sim.shape[0]:
    raise ValueError(
      f"info_nce: need pos_sim [N], neg_sim [N, M]; got {pos_sim.shape}, {neg_sim.shape}"
    )
  if neg_mask is not None and neg_mask.shape != neg_sim.shape:
    raise ValueError(f"info_nce: neg_mask {neg_mask.shape} != neg_sim {neg_sim.shape}")
  if isinstance(tau, (int, float)) and tau <= 0:
    raise ValueError(f"info_nce: tau must be > 0, got {tau}")
  valid = jnp.ones(neg_sim.shape, bool) if neg_mask is None else neg_mask.astype(bool)
  if hard_k is not None:
    valid = _hard_mask(neg_sim, valid, hard_k)
  neg_logits = jnp.where(valid, neg_sim / tau, -jnp.inf)
  all_logits = jnp.concatenate([pos_sim[:, None] / tau, neg_logits], axis=-1)
  lse = jax.nn.logsumexp(all_logits, axis=-1)
  per = lse - pos_sim / tau
  probs = jnp.exp(all_logits - lse[:, None])
  neg_lse = jax.nn.logsumexp(neg_logits, axis=-1, keepdims=True)
  rel = jnp.where(valid, jnp.exp(neg_logits - neg_lse), 0.0)
  hardest = jnp.max(jnp.where(valid, neg_sim, -jnp.inf), axis=-1)
  loss = jnp.mean(per)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "relative_penalty": rel,
    "pos_prob": probs[:, 0],
    "neg_prob": probs[:, 1:],
    "pos_sim_mean": jnp.mean(pos_sim),
    "hardest_neg_sim_mean": jnp.mean(hardest),
    "num_negatives": jnp.sum(valid, axis=-1).astype(jnp.float32),
  }
  return loss, metrics


def _in_batch_indices(b: int) -> tuple[np.ndarray, np.ndarray]:
  """For 2B views [anchors; positives]: positive index [2B] and negative indices [2B, 2B-2]."""
  n = 2 * b
  pos = (np.arange(n) + b) % n
  neg = np.stack([np.setdiff1d(np.arange(n), [i, pos[i]]) for i in range(n)])
  return pos, neg.reshape(n, n - 2)


@LOSSES.register("info_nce")
def info_nce_loss(
  *,
  anchors: jax.Array,
  positives: jax.Array,
  negatives: jax.Array | None = None,
  neg_mask: jax.Array | None = None,
  tau: float = 0.2,
  normalize: bool = True,
  symmetric: bool = True,
  hard_k: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE with temperature on features, s = <f(x_i), f(x_j)> (cosine when `normalize`).

  Negatives:
    * explicit `negatives [B, M, D]`: query i is anchor i, its positive is positives[i]; N = B.
    * in-batch (default, SimCLR / NT-Xent): the 2B views [anchors; positives] each act as a
      query whose positive is its pair and whose 2B - 2 negatives are all other views; N = 2B
      (`symmetric=False` keeps only the B anchor queries, still with 2B - 2 negatives).

  Args:
    anchors: `[B, D]` features f(x_i).
    positives: `[B, D]` features of the positive views.
    negatives: optional `[B, M, D]` explicit negatives.
    neg_mask: optional `[B, M]` bool of valid explicit negatives.
    tau: temperature (the paper studies 0.07 to 1.0).
    normalize: L2-normalise features first.
    symmetric: in-batch mode only, see above.
    hard_k: [U] hard-negative variant (see `info_nce_from_similarities`); None = off.
  Returns:
    `info_nce_from_similarities` (loss, metrics) over the N queries.
  """
  if anchors.ndim != 2 or anchors.shape != positives.shape:
    raise ValueError(
      f"info_nce_loss: anchors {anchors.shape} and positives {positives.shape} must be [B, D]"
    )
  if normalize:
    anchors, positives = _l2n(anchors), _l2n(positives)
  b, d = anchors.shape
  if negatives is not None:
    if negatives.ndim != 3 or negatives.shape[0] != b or negatives.shape[2] != d:
      raise ValueError(f"info_nce_loss: negatives must be [B, M, D], got {negatives.shape}")
    if normalize:
      negatives = _l2n(negatives)
    pos_sim = jnp.sum(anchors * positives, axis=-1)
    neg_sim = jnp.einsum("bd,bmd->bm", anchors, negatives)
    return info_nce_from_similarities(
      pos_sim=pos_sim, neg_sim=neg_sim, neg_mask=neg_mask, tau=tau, hard_k=hard_k
    )
  if neg_mask is not None:
    raise ValueError("info_nce_loss: neg_mask is only for explicit negatives")
  if b < 2:
    raise ValueError("info_nce_loss: in-batch negatives need B >= 2")
  views = jnp.concatenate([anchors, positives], axis=0)
  sims = views @ views.T
  pos_idx, neg_idx = _in_batch_indices(b)
  pos_sim = sims[np.arange(2 * b), pos_idx]
  neg_sim = jnp.take_along_axis(sims, jnp.asarray(neg_idx), axis=-1)
  if not symmetric:
    pos_sim, neg_sim = pos_sim[:b], neg_sim[:b]
  return info_nce_from_similarities(pos_sim=pos_sim, neg_sim=neg_sim, tau=tau, hard_k=hard_k)


def uniformity(
  features: jax.Array, *, t: float = 2.0, mask: jax.Array | None = None, normalize: bool = True
) -> jax.Array:
  """L_unif = log mean_{i != j} exp(-t ||f_i - f_j||^2) (Wang & Isola; lower = more uniform).

  Identical embeddings give 0, the maximum.

  Args:
    features: `[N, D]`.
    t: 2 in the paper.
    mask: optional `[N]` bool of valid rows.
    normalize: L2-normalise first.
  Returns:
    scalar.
  """
  if features.ndim != 2:
    raise ValueError(f"uniformity: features must be [N, D], got {features.shape}")
  f = _l2n(features) if normalize else features
  n = f.shape[0]
  sq = jnp.sum(jnp.square(f[:, None, :] - f[None, :, :]), axis=-1)
  pair = ~jnp.eye(n, dtype=bool)
  if mask is not None:
    pair = pair & mask[:, None] & mask[None, :]
  logits = jnp.where(pair, -t * sq, -jnp.inf)
  return jax.nn.logsumexp(logits) - jnp.log(jnp.maximum(jnp.sum(pair), 1))


def tolerance(features: jax.Array, labels: jax.Array, *, normalize: bool = True) -> jax.Array:
  """T = mean over same-label pairs i != j of s(x_i, x_j); 1 when each class is one point.

  Args:
    features: `[N, D]`.
    labels: `[N]` int class labels.
    normalize: L2-normalise first (s is then the cosine similarity).
  Returns:
    scalar (0 when no class has two members).
  """
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(
      f"tolerance: need features [N, D] and labels [N]; got {features.shape}, {labels.shape}"
    )
  f = _l2n(features) if normalize else features
  sims = f @ f.T
  same = (labels[:, None] == labels[None, :]) & ~jnp.eye(f.shape[0], dtype=bool)
  return masked_mean(sims, same)
