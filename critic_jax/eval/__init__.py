"""Evaluation of critics and reward models (pairwise accuracy on held-out preferences)."""

from critic_jax.eval.pairwise import (
  PairwiseEvaluator,
  encode_pairs,
  encode_responses,
  pairwise_accuracy,
  pairwise_metrics,
  score_pairs,
  score_responses,
)

__all__ = [
  "PairwiseEvaluator",
  "encode_pairs",
  "encode_responses",
  "pairwise_accuracy",
  "pairwise_metrics",
  "score_pairs",
  "score_responses",
]
