"""General Preference Model (GPM) scores and losses, and the GPO regression loss.

Paper: Zhang et al., "General Preference Modeling with Preference Representations for Aligning
Language Models", arXiv 2410.02197 (ICML 2025); official code general-preference/
general-preference-model (`models/loss.py`, `gpm_example_usage.py`).
Spec: `shared/specs/preference-and-reward.md` §3.

Every response is embedded once as v in R^{2k}; a pair is scored by the skew-symmetric form
  s(y_i > y_j | x) = <R(x) v_i, v_j> = sum_l lambda_l (v_i[2l] v_j[2l+1] - v_i[2l+1] v_j[2l]),
R(x) = blockdiag(lambda_1 J, ..., lambda_k J), J = [[0, -1], [1, 0]]. This can represent
cyclic preferences that no scalar (Bradley-Terry) reward can.

Functions here take the raw head outputs: the embedding u (L2-normalised inside when
`normalize=True`, as in the released models) and the prompt-head gate logits (soft-maxed inside).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from critic_jax.losses.common import masked_mean
from critic_jax.losses.registry import LOSSES

__all__ = [
  "gpm_embed",
  "gpm_gate",
  "gpm_loss",
  "gpm_operator",
  "gpm_policy_score",
  "gpm_prob",
  "gpm_score",
  "gpm_score_table",
  "gpo_loss",
  "gpo_select",
]


def gpm_embed(emb: jax.Array, *, normalize: bool = True, eps: float = 1e-12) -> jax.Array:
  """v = u / ||u||_2 over the last axis (identity when `normalize=False`).

  The released GPM models normalise; the training script can turn it off ("no_l2" runs).
  """
  if emb.shape[-1] % 2:
    raise ValueError(f"gpm: embedding size must be even (2k), got {emb.shape[-1]}")
  if not normalize:
    return emb
  sq = jnp.sum(jnp.square(emb), axis=-1, keepdims=True)
  return emb * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def gpm_gate(gate_logits: jax.Array, *, scale: float = 1.0, temperature: float = 1.0) -> jax.Array:
  """Eigenvalue gate lambda(x) = scale * softmax(gate_logits / temperature), `[..., k]`.

  The released example uses a plain softmax (scale = temperature = 1, the default). [U] Other
  code paths multiply by k (`scale=k`) or divide the logits by sqrt(hidden)
  (`temperature=sqrt(hidden)`); both are kept behind these arguments.
  """
  return scale * jax.nn.softmax(gate_logits / temperature, axis=-1)


def gpm_operator(k: int, gate: jax.Array | None = None) -> jax.Array:
  """The explicit skew-symmetric block operator R, `[..., 2k, 2k]`.

  R[2l+1, 2l] = lambda_l, R[2l, 2l+1] = -lambda_l, zeros elsewhere, so that
  s(i > j) = v_j^T R v_i. For tests and inspection; the scores never build it.

  Args:
    k: number of 2-D blocks.
    gate: optional `[..., k]` block weights lambda (already normalised); ones when omitted.
  """
  lam = jnp.ones((k,), jnp.float32) if gate is None else gate
  if lam.shape[-1] != k:
    raise ValueError(f"gpm_operator: gate {lam.shape} does not have k={k} entries")
  j = jnp.array([[0.0, -1.0], [1.0, 0.0]], jnp.float32)
  eye = jnp.eye(k, dtype=jnp.float32)
  blocks = lam[..., :, None, None] * j  # [..., k, 2, 2]
  # Block-diagonal assembly: R[2l+a, 2m+b] = eye[l, m] * blocks[l, a, b].
  r = jnp.einsum("lm,...lab->...lamb", eye, blocks)
  return r.reshape(*lam.shape[:-1], 2 * k, 2 * k)


def _block_scores(vi: jax.Array, vj: jax.Array) -> jax.Array:
  """Per-block cross products vi[2l] vj[2l+1] - vi[2l+1] vj[2l], `[..., k]`."""
  vi = vi.reshape(*vi.shape[:-1], -1, 2)
  vj = vj.reshape(*vj.shape[:-1], -1, 2)
  return vi[..., 0] * vj[..., 1] - vi[..., 1] * vj[..., 0]


def _gate_or_none(gate_logits, k, gate_scale, gate_temperature):
  if gate_logits is None:
    return None
  if gate_logits.shape[-1] != k:
    raise ValueError(f"gpm: gate_logits {gate_logits.shape} must have k={k} entries")
  return gpm_gate(gate_logits, scale=gate_scale, temperature=gate_temperature)


def gpm_score(
  emb_i: jax.Array,
  emb_j: jax.Array,
  *,
  gate_logits: jax.Array | None = None,
  normalize: bool = True,
  gate_scale: float = 1.0,
  gate_temperature: float = 1.0,
) -> jax.Array:
  """Preference score s(y_i > y_j | x), skew-symmetric in (i, j) and 0 on the diagonal.

  Args:
    emb_i: `[..., 2k]` raw embedding u of y_i.
    emb_j: `[..., 2k]` raw embedding of y_j.
    gate_logits: optional `[..., k]` prompt-head logits (no gate, i.e. lambda = 1, if omitted).
    normalize: L2-normalise the embeddings first.
    gate_scale, gate_temperature: see `gpm_gate` ([U] variants; defaults = plain softmax).
  Returns:
    `[...]` scores. With unit vectors and a softmax gate, |s| <= max_l lambda_l <= 1.
  """
  if emb_i.shape != emb_j.shape:
    raise ValueError(f"gpm_score: embeddings differ in shape: {emb_i.shape} vs {emb_j.shape}")
  vi = gpm_embed(emb_i, normalize=normalize)
  vj = gpm_embed(emb_j, normalize=normalize)
  per_block = _block_scores(vi, vj)
  gate = _gate_or_none(gate_logits, per_block.shape[-1], gate_scale, gate_temperature)
  if gate is None:
    return jnp.sum(per_block, axis=-1)
  return jnp.sum(gate * per_block, axis=-1)


def gpm_prob(
  emb_i: jax.Array,
  emb_j: jax.Array,
  *,
  tau: float = 0.1,
  gate_logits: jax.Array | None = None,
  normalize: bool = True,
  gate_scale: float = 1.0,
  gate_temperature: float = 1.0,
) -> jax.Array:
  """P(y_i > y_j | x) = sigma(s(y_i > y_j | x) / tau); P(i > j) + P(j > i) = 1."""
  s = gpm_score(
    emb_i,
    emb_j,
    gate_logits=gate_logits,
    normalize=normalize,
    gate_scale=gate_scale,
    gate_temperature=gate_temperature,
  )
  return jax.nn.sigmoid(s / tau)


@LOSSES.register("gpm")
def gpm_loss(
  *,
  chosen_emb: jax.Array,
  rejected_emb: jax.Array,
  gate_logits: jax.Array | None = None,
  margin: jax.Array | float | None = None,
  mask: jax.Array | None = None,
  tau: float = 0.1,
  normalize: bool = True,
  gate_scale: float = 1.0,
  gate_temperature: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GPM loss  L = -mean_b log sigma((s(y_w > y_l | x) - m) / tau)  (official `loss.py`).

  Args:
    chosen_emb: `[B, 2k]` raw embeddings of the chosen responses.
    rejected_emb: `[B, 2k]` raw embeddings of the rejected responses.
    gate_logits: optional `[B, k]` prompt-head logits (hidden state at the last prompt token
      of the chosen sequence through W_g).
    margin: optional `[B]` (or scalar) margin m.
    mask: optional `[B]` bool.
    tau: temperature (0.1 for GPM in the paper's runs).
    normalize, gate_scale, gate_temperature: see `gpm_score`.
  Returns:
    (loss, metrics) with `per_example_loss`, `score` s, `prob` sigma((s - m)/tau) (as in the
    official code), `accuracy` = mean(s > 0), `score_mean`.
  """
  if chosen_emb.ndim != 2 or chosen_emb.shape != rejected_emb.shape:
    raise ValueError(
      f"gpm_loss: embeddings must both be [B, 2k], got {chosen_emb.shape}, {rejected_emb.shape}"
    )
  b = chosen_emb.shape[0]
  if mask is not None and mask.shape != (b,):
    raise ValueError(f"gpm_loss: mask {mask.shape} must be [{b}]")
  if gate_logits is not None and gate_logits.shape != (b, chosen_emb.shape[1] // 2):
    raise ValueError(f"gpm_loss: gate_logits {gate_logits.shape} must be [B, k]")
  valid = jnp.ones((b,), bool) if mask is None else mask.astype(bool)
  s = gpm_score(
    chosen_emb,
    rejected_emb,
    gate_logits=gate_logits,
    normalize=normalize,
    gate_scale=gate_scale,
    gate_temperature=gate_temperature,
  )
  logits = (s if margin is None else s - margin) / tau
  per = -jax.nn.log_sigmoid(logits)
  loss = masked_mean(per, valid)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "score": s,
    "prob": jax.nn.sigmoid(logits),
    "accuracy": masked_mean((s > 0).astype(jnp.float32), valid),
    "score_mean": masked_mean(s, valid),
  }
  return loss, metrics


def gpm_score_table(
  emb: jax.Array,
  *,
  gate_logits: jax.Array | None = None,
  normalize: bool = True,
  gate_scale: float = 1.0,
  gate_temperature: float = 1.0,
) -> jax.Array:
  """K x K table S[..., i, j] = s(y_i > y_j | x) for K responses to one prompt.

  O(K) embeddings give all K^2 scores; the table is skew-symmetric with a zero diagonal.

  Args:
    emb: `[..., K, 2k]` raw embeddings.
    gate_logits: optional `[..., k]` (one gate per prompt, shared by its K responses).
  Returns:
    `[..., K, K]`.
  """
  if emb.ndim < 2:
    raise ValueError(f"gpm_score_table: emb must be [..., K, 2k], got {emb.shape}")
  v = gpm_embed(emb, normalize=normalize)
  per_block = _block_scores(v[..., :, None, :], v[..., None, :, :])  # [..., K, K, k]
  gate = _gate_or_none(gate_logits, per_block.shape[-1], gate_scale, gate_temperature)
  if gate is None:
    return jnp.sum(per_block, axis=-1)
  return jnp.sum(gate[..., None, None, :] * per_block, axis=-1)


def gpm_policy_score(table: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Policy-level score s_hat(y_i) = (1/K) sum_j s(y_i > y_j), an estimate of s(y_i > pi).

  The diagonal term s(y_i > y_i) = 0 is part of the average, as in the spec's estimator.
  Note: the official GPO script builds its target from table[i][j] - table[j][i], which is
  2 * s for a skew-symmetric table; that factor can be folded into `gpo_loss`'s beta.

  Args:
    table: `[..., K, K]` from `gpm_score_table`.
    mask: optional `[..., K]` bool of valid responses; the mean runs over valid j only.
  Returns:
    `[..., K]`.
  """
  if table.ndim < 2 or table.shape[-1] != table.shape[-2]:
    raise ValueError(f"gpm_policy_score: table must be [..., K, K], got {table.shape}")
  if mask is None:
    return jnp.mean(table, axis=-1)
  cols = jnp.broadcast_to(mask[..., None, :].astype(bool), table.shape)
  return masked_mean(table, cols, axis=-1)


def gpo_select(s_hat: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """GPO pair: y_w = argmax_k s_hat, y_l = argmin_k s_hat (ties to the lowest index).

  Args:
    s_hat: `[B, K]` policy-level scores.
    mask: optional `[B, K]` bool of valid responses.
  Returns:
    idx_w `[B]`, idx_l `[B]` int32.
  """
  if s_hat.ndim != 2:
    raise ValueError(f"gpo_select: s_hat must be [B, K], got {s_hat.shape}")
  valid = jnp.ones(s_hat.shape, bool) if mask is None else mask.astype(bool)
  idx_w = jnp.argmax(jnp.where(valid, s_hat, -jnp.inf), axis=-1).astype(jnp.int32)
  idx_l = jnp.argmin(jnp.where(valid, s_hat, jnp.inf), axis=-1).astype(jnp.int32)
  return idx_w, idx_l


@LOSSES.register("gpo")
def gpo_loss(
  *,
  policy_logps: jax.Array,
  prev_logps: jax.Array,
  s_hat: jax.Array,
  mask: jax.Array | None = None,
  beta: float = 0.001,
  baseline: float = 0.0,
  target_clamp: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GPO (SPPO-style) square-loss regression of the log-ratio onto the GPM score.

    L = mean_b sum_{y in {y_w, y_l}} ( log(pi_theta(y|x) / pi_t(y|x)) - (s_hat(y) - c) / beta )^2

  [S/U] Built on the SPPO trainer; the loss file is not in the official repository. Behind
  flags, with the spec's defaults:
    * `baseline` c = 0: the target is the score itself because s(pi_t > pi_t) = 0; SPPO's
      original target uses win-probabilities with c = 1/2.
    * `target_clamp` = None: the scripts pass CLAMP_THRES (1000 by default) to the trainer;
      when set, the target (s_hat - c)/beta is clipped to [-clamp, clamp].
  eta = 1/beta with beta_SPPO = 0.001 in the scripts.

  Args:
    policy_logps: `[B, 2]` log pi_theta of (y_w, y_l).
    prev_logps: `[B, 2]` log pi_t of (y_w, y_l) (constants, like the target: stop_gradient).
    s_hat: `[B, 2]` policy-level scores of (y_w, y_l) (see `gpm_policy_score`, `gpo_select`).
    mask: optional `[B]` bool.
    beta: SPPO beta.
    baseline: c above.
    target_clamp: optional clip of the target.
  Returns:
    (loss, metrics) with per-prompt `per_example_loss`, `logratio` `[B, 2]`, `target` `[B, 2]`.
  """
  if policy_logps.ndim != 2 or policy_logps.shape[-1] != 2:
    raise ValueError(f"gpo_loss: policy_logps must be [B, 2], got {policy_logps.shape}")
  if prev_logps.shape != policy_logps.shape or s_hat.shape != policy_logps.shape:
    raise ValueError(
      f"gpo_loss: prev_logps {prev_logps.shape} and s_hat {s_hat.shape} must match "
      f"policy_logps {policy_logps.shape}"
    )
  b = policy_logps.shape[0]
  if mask is not None and mask.shape != (b,):
    raise ValueError(f"gpo_loss: mask {mask.shape} must be [{b}]")
  if isinstance(beta, (int, float)) and beta <= 0:
    raise ValueError(f"gpo_loss: beta must be > 0, got {beta}")
  valid = jnp.ones((b,), bool) if mask is None else mask.astype(bool)
  logratio = policy_logps - jax.lax.stop_gradient(prev_logps)  # pi_t is frozen
  target = jax.lax.stop_gradient((s_hat - baseline) / beta)
  if target_clamp is not None:
    target = jnp.clip(target, -target_clamp, target_clamp)
  per = jnp.sum(jnp.square(logratio - target), axis=-1)
  loss = masked_mean(per, valid)
  metrics = {
    "loss": loss,
    "per_example_loss": per,
    "logratio": logratio,
    "target": target,
    "logratio_w_mean": masked_mean(logratio[:, 0], valid),
    "logratio_l_mean": masked_mean(logratio[:, 1], valid),
  }
  return loss, metrics
