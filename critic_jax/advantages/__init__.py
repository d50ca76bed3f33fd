"""Advantage estimators (pure JAX), registered by name in `ADVANTAGES`.

Registered: "gae", "discounted_returns" (token level, `[..., T]`); "grpo",
"dr_grpo", "rloo" (group outcome advantages, `[B, G]` rewards); "tempo",
"tree_mc" (prefix-tree advantages over `[B, G, T]` tokens).
"""

from critic_jax.advantages.gae import discounted_returns, gae_advantages
from critic_jax.advantages.group import (
  STD_MODES,
  dr_grpo_advantages,
  group_normalize,
  grpo_advantages,
  rloo_advantages,
)
from critic_jax.advantages.prefix_tree import (
  PrefixTreeOutput,
  lcp_matrix,
  prefix_tree_advantages,
  tempo_advantages,
  tree_mc_advantages,
)
from critic_jax.advantages.registry import ADVANTAGES
from critic_jax.advantages.trie_reference import trie_prefix_tree

__all__ = [
  "ADVANTAGES",
  "STD_MODES",
  "PrefixTreeOutput",
  "discounted_returns",
  "dr_grpo_advantages",
  "gae_advantages",
  "group_normalize",
  "grpo_advantages",
  "lcp_matrix",
  "prefix_tree_advantages",
  "rloo_advantages",
  "tempo_advantages",
  "tree_mc_advantages",
  "trie_prefix_tree",
]
