"""Reward models on the shared trunk: a scalar (Bradley-Terry) head or the GPM head.

`RewardModel` pairs a `Transformer` with one reward head and exposes the two pure functions a
trainer needs, `init(rng) -> params` (boxed with logical axes, for sharded init) and
`apply(params, tokens, ...) -> RewardOutput`:

* head "scalar": the Transformer's own "reward" head (`w^T h[t_last]`, Stiennon et al.,
  arXiv 2009.01325), so the parameters are exactly a Transformer's and a trained RM loads into
  any Transformer with a reward (or, renamed, value) head.
* head "gpm": the trunk without heads plus `GPMHead` (arXiv 2410.02197); the parameters are
  `{"trunk": ..., "gpm_head": ...}`.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from critic_jax.critics.gpm import GPMHead, last_prompt_index
from critic_jax.models import ModelConfig, Transformer, last_token_index

__all__ = ["REWARD_HEADS", "RewardModel", "RewardOutput"]

REWARD_HEADS = ("scalar", "gpm")


@flax.struct.dataclass
class RewardOutput:
  """What a reward model returns for a batch of sequences.

  Attributes:
    rewards: `[B]` float32 scalar rewards (head "scalar"), else None.
    emb: `[B, 2k]` float32 raw GPM representations u (head "gpm"), else None.
    gate_logits: `[B, k]` float32 GPM gate logits at the last prompt token (gpm with gate),
      else None.
  """

  rewards: jax.Array | None = None
  emb: jax.Array | None = None
  gate_logits: jax.Array | None = None


class RewardModel:
  """A trunk plus a reward head, as pure `init` / `apply` functions.

  Args:
    config: the trunk's `ModelConfig`; head "scalar" needs "reward" in `config.heads`.
    head: "scalar" or "gpm".
    gpm_k: k of the GPM head (2k-dimensional representations).
    gpm_gate: add the GPM prompt gate.
  """

  def __init__(
    self, config: ModelConfig, head: str = "scalar", gpm_k: int = 1, gpm_gate: bool = False
  ):
    if head not in REWARD_HEADS:
      raise ValueError(f"RewardModel: head must be one of {REWARD_HEADS}, got {head!r}")
    if head == "scalar" and "reward" not in config.heads:
      raise ValueError(
        f"RewardModel(head='scalar') needs 'reward' in model.heads, got {config.heads}"
      )
    self.config, self.head = config, head
    self.trunk = Transformer(config)
    self.gpm = GPMHead(gpm_k, gpm_gate, config.params_dtype) if head == "gpm" else None

  def init(self, rng: jax.Array, seq_len: int = 8):
    """Boxed parameters (with logical axis names) from `rng`."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    if self.gpm is None:
      return self.trunk.init(rng, tokens)["params"]
    r_trunk, r_head = jax.random.split(rng)
    hidden = jnp.zeros((1, seq_len, self.config.d_model), self.config.compute_dtype)
    index = jnp.zeros((1,), jnp.int32)
    return {
      "trunk": self.trunk.init(r_trunk, tokens, heads=())["params"],
      "gpm_head": self.gpm.init(r_head, hidden, index, index)["params"],
    }

  def apply(
    self,
    params,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    loss_mask: jax.Array | None = None,
  ) -> RewardOutput:
    """Scores `tokens [B, T]` (right-padded; `segment_ids` 0 on padding).

    `loss_mask [B, T]` (true on response tokens) locates the last prompt token for the GPM
    gate; it is only needed for head "gpm" with a gate.
    """
    kw = dict(positions=positions, segment_ids=segment_ids, packed=False)  # one segment per row
    if self.gpm is None:
      return RewardOutput(
        rewards=self.trunk.apply({"params": params}, tokens, heads=("reward",), **kw).rewards
      )
    hidden = self.trunk.apply({"params": params["trunk"]}, tokens, heads=(), **kw).hidden
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    prompt = None
    if self.gpm.gate:
      if loss_mask is None:
        raise ValueError("RewardModel: the GPM gate needs loss_mask to find the prompt's end")
      prompt = last_prompt_index(loss_mask)
    emb, gate = self.gpm.apply(
      {"params": params["gpm_head"]}, hidden, last_token_index(segment_ids), prompt
    )
    return RewardOutput(emb=emb, gate_logits=gate)
