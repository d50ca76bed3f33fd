"""Pure loss functions: keyword-only arrays in, `(loss, metrics)` out.

Every loss is registered by name in `LOSSES` so configs can swap them.
"""

from critic_jax.losses.common import (
  AGG_MODES,
  agg_loss,
  masked_mean,
  masked_sum,
  masked_var,
  whiten,
)
from critic_jax.losses.registry import LOSSES
from critic_jax.losses.sft import next_token_loss, token_logprobs

__all__ = [
  "AGG_MODES",
  "LOSSES",
  "agg_loss",
  "masked_mean",
  "masked_sum",
  "masked_var",
  "next_token_loss",
  "token_logprobs",
  "whiten",
]
