"""Flax model code: the decoder trunk, its heads, and model configs."""

from critic_jax.models.config import HEADS, MODEL_PRESETS, ModelConfig
from critic_jax.models.transformer import (
  KVCache,
  ModelOutput,
  Transformer,
  fuse_projections,
  last_token_index,
)

__all__ = [
  "HEADS",
  "MODEL_PRESETS",
  "KVCache",
  "ModelConfig",
  "ModelOutput",
  "Transformer",
  "fuse_projections",
  "last_token_index",
]
