"""The GPM preference-representation head on the shared trunk (Flax).

Paper: Zhang et al., "General Preference Modeling with Preference Representations for Aligning
Language Models", arXiv 2410.02197; official code general-preference/general-preference-model
(`models/rw_model_general_preference.py`: `value_head` and `prompt_head`, both bias-free, both
initialised N(0, std = 1/(D+1))). Spec: `shared/specs/preference-and-reward.md` §3.

  u = W_v h[t_last]          in R^{2k}   (the response's preference representation)
  g = W_g h[t_prompt_end]    in R^k      (optional eigenvalue-gate logits)

The scores, the L2 normalisation of u and the softmax of g live in `critic_jax.losses.gpm`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["GPMHead", "gather_positions", "last_prompt_index"]


def gather_positions(hidden: jax.Array, index: jax.Array) -> jax.Array:
  """hidden `[B, T, D]`, index `[B]` int -> `[B, D]` rows hidden[b, index[b]]."""
  if hidden.ndim != 3 or index.shape != hidden.shape[:1]:
    raise ValueError(
      f"gather_positions: need hidden [B, T, D] and index [B], got {hidden.shape} and {index.shape}"
    )
  return jnp.take_along_axis(hidden, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def last_prompt_index(loss_mask: jax.Array) -> jax.Array:
  """Index `[B]` of the last prompt token: the position before the first response token.

  `loss_mask [B, T]` is true on response tokens (and EOS), as the data pipeline builds it; the
  prompt (with BOS) precedes them. A row without response tokens gives 0.
  """
  if loss_mask.ndim != 2:
    raise ValueError(f"last_prompt_index: loss_mask must be [B, T], got {loss_mask.shape}")
  first = jnp.argmax(loss_mask.astype(bool), axis=1)
  return jnp.maximum(first - 1, 0).astype(jnp.int32)


class GPMHead(nn.Module):
  """Preference representation u `[B, 2k]` and optional gate logits `[B, k]` (§3).

  Attributes:
    k: number of 2-D blocks (the representation has 2k dimensions; the paper uses 2k in
      {2, 4, 6, 8}).
    gate: add the prompt head W_g (the "eigenvalue scale gate"); off gives lambda = 1.
    param_dtype: parameter dtype; the head computes in float32.

  Call arguments:
    hidden: `[B, T, D]` final hidden states of the trunk (`Transformer(..., heads=())`).
    last_index: `[B]` int last non-pad token of each row (`last_token_index(segment_ids)`).
    prompt_index: `[B]` int last prompt token (`last_prompt_index(loss_mask)`); needed when
      `gate`.
  Returns:
    (u `[B, 2k]` float32, gate logits `[B, k]` float32 or None).
  """

  k: int
  gate: bool = False
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, last_index, prompt_index=None):
    if self.k < 1:
      raise ValueError(f"GPMHead: k must be >= 1, got {self.k}")
    d = hidden.shape[-1]
    # Logical axes: the input dim is "embed" (sharded like the trunk), the small output replicated.
    kinit = nn.with_logical_partitioning(
      nn.initializers.normal(stddev=1.0 / (d + 1)), ("embed", "head_out")
    )
    dense = dict(use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype, kernel_init=kinit)
    h_last = gather_positions(hidden, last_index).astype(jnp.float32)
    emb = nn.Dense(2 * self.k, name="value", **dense)(h_last)
    if not self.gate:
      return emb, None
    if prompt_index is None:
      raise ValueError("GPMHead(gate=True) needs prompt_index [B]")
    h_prompt = gather_positions(hidden, prompt_index).astype(jnp.float32)
    return emb, nn.Dense(self.k, name="prompt", **dense)(h_prompt)
