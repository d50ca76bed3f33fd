"""Pure loss functions: keyword-only arrays in, `(loss, metrics)` out.

Every loss is registered by name in `LOSSES` so configs can swap them.
"""

from critic_jax.losses import bandit
from critic_jax.losses.bandit import best_of_n_loss, pairwise_preference_loss, rwr_loss
from critic_jax.losses.coh import (
  COH_TEMPLATES,
  CoHTemplate,
  build_coh_batch,
  build_coh_example,
  coh_inference_prompt,
  coh_loss,
  forgetful_causal_mask,
)
from critic_jax.losses.common import (
  AGG_MODES,
  agg_loss,
  masked_mean,
  masked_sum,
  masked_var,
  whiten,
)
from critic_jax.losses.contrastive import (
  info_nce_from_similarities,
  info_nce_loss,
  tolerance,
  uniformity,
)
from critic_jax.losses.crm import (
  crm_bt_loss,
  crm_keep_ratio,
  crm_loss,
  crm_select,
  curriculum_order,
)
from critic_jax.losses.gpm import (
  gpm_loss,
  gpm_policy_score,
  gpm_prob,
  gpm_score,
  gpm_score_table,
  gpo_loss,
  gpo_select,
)
from critic_jax.losses.kl import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3
from critic_jax.losses.preference import (
  d2o_loss,
  dno_loss,
  dno_prct_loss,
  dno_select_pairs,
  dno_winrates,
  dpo_loss,
  sequence_logps,
)
from critic_jax.losses.registry import LOSSES
from critic_jax.losses.reward import (
  best_of_n_kl,
  bradley_terry_loss,
  center_rewards,
  reward_bias,
  token_rewards,
)
from critic_jax.losses.sft import next_token_loss, token_logprobs

__all__ = [
  "AGG_MODES",
  "COH_TEMPLATES",
  "KL_ESTIMATORS",
  "LOSSES",
  "CoHTemplate",
  "agg_loss",
  "bandit",
  "best_of_n_kl",
  "best_of_n_loss",
  "bradley_terry_loss",
  "build_coh_batch",
  "build_coh_example",
  "center_rewards",
  "coh_inference_prompt",
  "coh_loss",
  "crm_bt_loss",
  "crm_keep_ratio",
  "crm_loss",
  "crm_select",
  "curriculum_order",
  "d2o_loss",
  "dno_loss",
  "dno_prct_loss",
  "dno_select_pairs",
  "dno_winrates",
  "dpo_loss",
  "forgetful_causal_mask",
  "gpm_loss",
  "gpm_policy_score",
  "gpm_prob",
  "gpm_score",
  "gpm_score_table",
  "gpo_loss",
  "gpo_select",
  "info_nce_from_similarities",
  "info_nce_loss",
  "kl_estimate",
  "kl_k1",
  "kl_k2",
  "kl_k3",
  "masked_mean",
  "masked_sum",
  "masked_var",
  "next_token_loss",
  "pairwise_preference_loss",
  "reward_bias",
  "rwr_loss",
  "sequence_logps",
  "token_logprobs",
  "token_rewards",
  "tolerance",
  "uniformity",
  "whiten",
]
