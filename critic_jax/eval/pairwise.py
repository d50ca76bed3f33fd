"""Pairwise evaluation of reward models on held-out preference pairs.

A score function `fn(params, batch) -> {name: [B] array}` (jitted by the caller) is run over
the pairs in fixed-size, sharded batches; keys starting with "margin" are per-pair preference
margins (r(y_w) - r(y_l) for a scalar RM, s(y_w > y_l) for GPM), from which pairwise accuracy
is computed: the fraction of pairs with margin > 0 (a tie counts as wrong, as in
`bradley_terry_loss`).

Usable from the trainer (`PairwiseEvaluator`) and from scripts (`score_pairs`,
`pairwise_accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from critic_jax.data.pipeline import pad_example, tokenize_example
from critic_jax.data.preference import PreferenceExample, tokenize_pair
from critic_jax.data.tasks import Example
from critic_jax.parallel import batch_sharding, to_host

__all__ = [
  "PairwiseEvaluator",
  "encode_pairs",
  "encode_responses",
  "pairwise_accuracy",
  "pairwise_metrics",
  "score_pairs",
  "score_responses",
]

ScoreFn = Callable[[object, dict[str, jax.Array]], Mapping[str, jax.Array]]


def pairwise_accuracy(margins: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Fraction of (valid) pairs with margin > 0; ties count as wrong; 0 for no pairs."""
  margins = np.asarray(margins, np.float64)
  valid = np.ones(margins.shape, bool) if mask is None else np.asarray(mask, bool)
  n = int(valid.sum())
  return float(np.sum((margins > 0) & valid) / n) if n else 0.0


def pairwise_metrics(scores: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Means of every per-pair score, and `accuracy{suffix}` for every `margin{suffix}`."""
  out = {}
  for k, v in scores.items():
    out[k] = float(np.mean(v)) if len(v) else 0.0
    if k.startswith("margin"):
      out["accuracy" + k[len("margin") :]] = pairwise_accuracy(v)
  return out


def encode_pairs(
  examples: Sequence[PreferenceExample],
  indices: Sequence[int],
  tokenizer,
  seq_len: int,
  flipped: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Stacked paired rows (see `critic_jax.data.preference`) for `examples[indices]`, plus
  `flipped [B]` bool (all false when `flipped` is None)."""
  rows = [tokenize_pair(examples[i], tokenizer, seq_len, i) for i in indices]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "has_chosen"}
  idx = np.asarray(indices, np.int64)
  batch["flipped"] = np.zeros(len(idx), bool) if flipped is None else np.asarray(flipped)[idx]
  return batch


def encode_responses(
  examples: Sequence[Example], indices: Sequence[int], tokenizer, seq_len: int
) -> dict[str, np.ndarray]:
  """Stacked single-sequence rows (tokens, segment_ids, positions, loss_mask) `[B, T]`."""
  rows = [
    pad_example(tokenize_example(examples[i], tokenizer, seq_len), seq_len, tokenizer.pad_id)
    for i in indices
  ]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _batch_rows(batch_size: int, mesh: Mesh) -> int:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return int(math.ceil(batch_size / shards) * shards)


def _score(
  fn: ScoreFn,
  params,
  n: int,
  rows: Callable[[range], dict[str, np.ndarray]],
  *,
  batch_size: int,
  mesh: Mesh,
) -> dict[str, np.ndarray]:
  """Runs `fn` over rows 0..n-1 in batches padded to a fixed, shardable size."""
  b = _batch_rows(min(batch_size, max(n, 1)), mesh)
  parts: dict[str, list[np.ndarray]] = {}
  for start in range(0, n, b):
    idx = range(start, min(start + b, n))
    batch = rows(idx)
    pad = b - len(idx)
    batch = {
      k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()
    }
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    for k, v in fn(params, batch).items():
      parts.setdefault(k, []).append(to_host(v)[: len(idx)])
  return {k: np.concatenate(v) for k, v in parts.items()}


def score_pairs(
  fn: ScoreFn,
  params,
  examples: Sequence[PreferenceExample],
  tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  mesh: Mesh,
) -> dict[str, np.ndarray]:
  """Per-pair outputs `{name: [N]}` of `fn` over every pair in `examples`."""
  return _score(
    fn,
    params,
    len(examples),
    lambda idx: encode_pairs(examples, idx, tokenizer, seq_len),
    batch_size=batch_size,
    mesh=mesh,
  )


def score_responses(
  fn: ScoreFn,
  params,
  examples: Sequence[Example],
  tokenizer,
  *,
  seq_len: int,
  batch_size: int,
  mesh: Mesh,
) -> dict[str, np.ndarray]:
  """Per-sequence outputs `{name: [N]}` of `fn` over (prompt, response) examples."""
  return _score(
    fn,
    params,
    len(examples),
    lambda idx: encode_responses(examples, idx, tokenizer, seq_len),
    batch_size=batch_size,
    mesh=mesh,
  )


class PairwiseEvaluator:
  """Held-out pairwise metrics of a reward model: `evaluator(params) -> {name: float}`.

  Args:
    fn: jitted `(params, paired batch) -> {name: [B]}` with at least one "margin*" key.
    examples: the held-out pairs.
    tokenizer, seq_len, batch_size, mesh: how the pairs are batched.
  """

  def __init__(
    self,
    fn: ScoreFn,
    examples: Sequence[PreferenceExample],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    mesh: Mesh,
  ):
    self.fn, self.examples, self.tokenizer = fn, list(examples), tokenizer
    self.seq_len, self.batch_size, self.mesh = seq_len, batch_size, mesh
    self.last_scores: dict[str, np.ndarray] = {}

  def scores(self, params) -> dict[str, np.ndarray]:
    return score_pairs(
      self.fn,
      params,
      self.examples,
      self.tokenizer,
      seq_len=self.seq_len,
      batch_size=self.batch_size,
      mesh=self.mesh,
    )

  def __call__(self, params) -> dict[str, float]:
    if not self.examples:
      return {}
    self.last_scores = self.scores(params)
    return pairwise_metrics(self.last_scores)
