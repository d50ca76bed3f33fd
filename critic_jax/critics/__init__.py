"""Reward heads on the shared trunk (Flax), reward models, and their training objectives."""

from critic_jax.critics.gpm import GPMHead, gather_positions, last_prompt_index
from critic_jax.critics.objectives import (
  REWARD_OBJECTIVES,
  BTObjective,
  CRMObjective,
  GPMObjective,
  stack_sides,
)
from critic_jax.critics.reward_model import REWARD_HEADS, RewardModel, RewardOutput

__all__ = [
  "REWARD_HEADS",
  "REWARD_OBJECTIVES",
  "BTObjective",
  "CRMObjective",
  "GPMObjective",
  "GPMHead",
  "RewardModel",
  "RewardOutput",
  "gather_positions",
  "last_prompt_index",
  "stack_sides",
]
