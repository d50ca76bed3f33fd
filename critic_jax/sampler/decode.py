"""Prefill and decode steps over a preallocated KV cache, and greedy generation.

The pieces are pure functions of (params, arrays); callers jit them. Prompts
are right-padded: row b has `lengths[b]` real tokens, and the token generated
at step t is written at cache slot `lengths[b] + t`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from critic_jax.models import KVCache, Transformer
from critic_jax.sampler.generate import GenerationConfig, generate_on_device
from critic_jax.sampler.sampling import SamplingConfig

__all__ = ["prefill", "decode_step", "greedy_generate"]


def prefill(model: Transformer, params, tokens: jax.Array, lengths: jax.Array, cache_len: int):
  """Runs the prompts `[B, P]` through the model, filling a new cache of `cache_len` slots.

  Returns:
    (last_logits `[B, V]` float32 at each row's last prompt token, cache).
  """
  b, p = tokens.shape
  if cache_len < p:
    raise ValueError(f"cache_len={cache_len} is shorter than the prompts ({p})")
  cache = KVCache.init(model.config, b, cache_len)
  out = model.apply(
    {"params": params}, tokens, cache=cache, cache_index=jnp.zeros((b,), jnp.int32), heads=("lm",)
  )
  last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return last.astype(jnp.float32), out.cache


def decode_step(model: Transformer, params, token: jax.Array, cache: KVCache, index: jax.Array):
  """Feeds one token per row `[B]` at cache slot `index [B]`; returns (logits `[B, V]`, cache)."""
  out = model.apply(
    {"params": params}, token[:, None], cache=cache, cache_index=index, heads=("lm",)
  )
  return out.logits[:, 0].astype(jnp.float32), out.cache


def greedy_generate(
  model: Transformer, params, tokens: jax.Array, lengths: jax.Array, max_new_tokens: int,
  eos_id: int, pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
  """Greedy decoding with the KV cache (jit with `max_new_tokens`, `eos_id` static).

  Runs `generate_on_device` (shared-prefix cache, in-place cache writes, early
  exit once every row has emitted EOS).

  Returns:
    (generated `[B, max_new_tokens]` int32, pad after EOS; number of tokens
    generated per row `[B]`, EOS included).
  """
  cfg = GenerationConfig(
    max_new_tokens=max_new_tokens, sampling=SamplingConfig("greedy"), stop_tokens=(eos_id,),
    pad_id=pad_id,
  )  # fmt: skip
  b = tokens.shape[0]
  state = generate_on_device(
    model, cfg, 1, params, tokens, lengths, jnp.arange(b, dtype=jnp.int32), jax.random.key(0)
  )
  return state.tokens, state.lengths
