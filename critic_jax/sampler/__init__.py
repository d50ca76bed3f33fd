"""Sampling: jitted prefill/decode pieces over a KV cache, the host loop, rollouts and rewards."""

from critic_jax.sampler.decode import decode_step, greedy_generate, prefill
from critic_jax.sampler.generate import (
  DEFAULT_PROMPT_BUCKETS,
  GenerationConfig,
  SampleOutput,
  Sampler,
  SampleState,
  decode_model,
  decode_params,
  generate_on_device,
  shard_params,
  unscan_params,
)
from critic_jax.sampler.rewards import RewardFuture, RewardPool, RewardResult
from critic_jax.sampler.rollouts import Rollouts, generate_rollouts
from critic_jax.sampler.sampling import SAMPLERS, SamplingConfig, process_logits, sample_tokens

__all__ = [
  "DEFAULT_PROMPT_BUCKETS",
  "SAMPLERS",
  "GenerationConfig",
  "RewardFuture",
  "RewardPool",
  "RewardResult",
  "Rollouts",
  "SampleOutput",
  "SampleState",
  "Sampler",
  "SamplingConfig",
  "decode_model",
  "decode_params",
  "decode_step",
  "generate_on_device",
  "generate_rollouts",
  "greedy_generate",
  "prefill",
  "process_logits",
  "sample_tokens",
  "shard_params",
  "unscan_params",
]
