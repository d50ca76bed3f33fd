"""Grouped-query causal self-attention with an optional KV cache.

Training and decoding run the same code: with a cache, the new keys/values are
written at slot `cache_index[b] + t` of each row and the queries attend over the
whole cache under a mask built by `decode_mask`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from critic_jax.models.layers import Linear, Norm, apply_rope, constrain

__all__ = ["Attention", "causal_mask", "decode_mask", "write_cache"]


def causal_mask(
  segment_ids: jax.Array,
  positions: jax.Array,
  sliding_window: int | None = None,
  extra: jax.Array | None = None,
) -> jax.Array:
  """Self-attention mask `[B, 1, T, T]` for (possibly packed, right-padded) rows.

  Query t attends key s iff s <= t, both lie in the same segment, the key is not
  padding (segment id 0) and, with a sliding window W, pos[t] - pos[s] < W. `extra`
  (`[B, T, T]` bool) is AND-ed in (e.g. a forgetful causal mask). Every query also
  attends to itself so that fully padded rows never produce NaN.
  """
  t = segment_ids.shape[1]
  idx = jnp.arange(t)
  mask = idx[None, :] <= idx[:, None]
  mask = mask[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  mask &= (segment_ids != 0)[:, None, :]
  if sliding_window is not None:
    mask &= (positions[:, :, None] - positions[:, None, :]) < sliding_window
  if extra is not None:
    mask &= extra.astype(bool)
  mask |= jnp.eye(t, dtype=bool)[None]
  return mask[:, None]


def decode_mask(
  cache_index: jax.Array, num_new: int, cache_size: int, sliding_window: int | None = None
) -> jax.Array:
  """Mask `[B, 1, T, S]` for T new tokens written at slots cache_index[b] + t.

  A query at slot q attends cache slots s <= q (slots hold consecutive positions
  of the row, so slot differences are position differences).
  """
  q_slot = cache_index[:, None] + jnp.arange(num_new)[None, :]
  s = jnp.arange(cache_size)
  mask = s[None, None, :] <= q_slot[:, :, None]
  if sliding_window is not None:
    mask &= (q_slot[:, :, None] - s[None, None, :]) < sliding_window
  return mask[:, None]


def write_cache(cache: jax.Array, new: jax.Array, cache_index: jax.Array) -> jax.Array:
  """Writes `new [B, T, K, H]` into `cache [B, S, K, H]` at row offsets `cache_index [B]`."""

  def one(c, n, i):
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (i, 0, 0))

  return jax.vmap(one)(cache, new, cache_index)


class Attention(nn.Module):
  """Multi-head attention with GQA, optional QKV bias, q/k norm, RoPE and KV cache.

  Shapes: x `[B, T, D]`; q `[B, T, N, H]`; k, v `[B, T, K, H]`; cache k/v
  `[B, S, K, H]`; mask `[B, 1, T, S]` bool.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  init_std: float = 0.02
  out_init_std: float = 0.02
  implementation: str = "xla"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, mask, rope=None, layer_cache=None, cache_index=None, lengths=None):
    """Attends with `mask [B,1,T,S]`; `mask=None` means plain causal attention over
    right-padded rows of `lengths [B]` real tokens (the cuDNN flash-attention path)."""

    def proj(heads, name, axes):
      return Linear(
        (heads, self.head_dim), ("embed",) + axes, use_bias=self.qkv_bias, std=self.init_std,
        dtype=self.dtype, param_dtype=self.param_dtype, name=name,
      )(x)  # fmt: skip

    q = proj(self.num_heads, "q", ("heads", "head_dim"))
    k = proj(self.num_kv_heads, "k", ("kv_heads", "head_dim"))
    v = proj(self.num_kv_heads, "v", ("kv_heads", "head_dim"))
    if self.qk_norm:
      norm = dict(kind="rms", eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
      q = Norm(**norm, axis_name="head_dim", name="q_norm")(q)
      k = Norm(**norm, axis_name="head_dim", name="k_norm")(k)
    if rope is not None:
      q = apply_rope(q, *rope)
      k = apply_rope(k, *rope)
    q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))

    new_cache = None
    if layer_cache is not None:
      ck, cv = layer_cache
      ck = write_cache(ck, k, cache_index)
      cv = write_cache(cv, v, cache_index)
      new_cache = (ck, cv)
      k, v = ck.astype(self.dtype), cv.astype(self.dtype)
      k = constrain(k, ("act_batch", "act_cache_length", "act_kv_heads", "act_head_dim"))
      v = constrain(v, ("act_batch", "act_cache_length", "act_kv_heads", "act_head_dim"))

    if mask is None:
      out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=self.implementation,
      )  # fmt: skip
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
    out = constrain(out, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    out = Linear(
      (x.shape[-1],), ("heads", "head_dim", "embed"), in_dims=2, use_bias=self.out_bias,
      std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype, name="o",
    )(out)  # fmt: skip
    return out, new_cache
