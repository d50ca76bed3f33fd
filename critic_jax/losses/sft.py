"""Supervised next-token loss on response tokens only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from critic_jax.losses.common import first_argmax, masked_mean, masked_sum
from critic_jax.losses.registry import LOSSES

__all__ = ["token_logprobs", "next_token_loss"]


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log softmax(logits)[targets] in float32.

  Args:
    logits: `[..., V]` any float dtype.
    targets: `[...]` int token ids.
  Returns:
    `[...]` float32 log-probabilities.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - lse


@LOSSES.register("sft")
def next_token_loss(
  *, logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-mean cross-entropy over the masked (response) positions.

  Args:
    logits: `[B, T, V]` predictions for `targets` (already shifted: logits[:, t]
      predicts targets[:, t]).
    targets: `[B, T]` int32 next tokens.
    mask: `[B, T]` bool, true on the tokens that count (response tokens, EOS
      included); prompt and padding positions are false.
  Returns:
    (loss, metrics): loss = -sum(m * log p) / sum(m); metrics hold the token
    count, the summed NLL and the token accuracy.
  """
  logp = token_logprobs(logits, targets)
  nll = -logp
  correct = (first_argmax(logits) == targets).astype(jnp.float32)
  loss = masked_mean(nll, mask)
  metrics = {
    "loss": loss,
    "nll_sum": masked_sum(nll, mask),
    "num_tokens": jnp.sum(mask).astype(jnp.float32),
    "token_accuracy": masked_mean(correct, mask),
  }
  return loss, metrics
