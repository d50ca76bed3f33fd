"""Decoder-only transformer trunk with LM, value and reward heads (Flax Linen).

Used purely functionally: `params = model.init(rng, tokens)["params"]`, then
`model.apply({"params": params}, tokens, ...)`. The same module trains (full
sequences, optional packing) and decodes (with a `KVCache`).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from critic_jax.models.attention import Attention, causal_mask, decode_mask
from critic_jax.models.config import ModelConfig
from critic_jax.models.layers import Linear, Mlp, Norm, constrain, rope_cos_sin, rope_inv_freq

__all__ = ["Transformer", "ModelOutput", "KVCache", "last_token_index"]


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values for decoding.

  Attributes:
    k: `[L, B, S, K, H]` keys (S = cache length, K = kv heads, H = head dim).
    v: `[L, B, S, K, H]` values.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def init(cls, config: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    shape = (
      config.num_layers, batch, length, config.num_kv_heads, config.resolved_head_dim,
    )  # fmt: skip
    dtype = dtype or config.compute_dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def length(self) -> int:
    return self.k.shape[2]


@flax.struct.dataclass
class ModelOutput:
  """What the trunk and heads return.

  Attributes:
    hidden: `[B, T, D]` final (normed) hidden states.
    logits: `[B, T, V]` next-token logits in the compute dtype, or None.
    values: `[B, T]` float32 per-token values V(s_t), or None.
    rewards: `[B]` float32 sequence rewards read at the last non-pad token, or None.
    cache: the updated `KVCache` when one was passed in, else None.
  """

  hidden: jax.Array
  logits: jax.Array | None = None
  values: jax.Array | None = None
  rewards: jax.Array | None = None
  cache: KVCache | None = None


def last_token_index(segment_ids: jax.Array) -> jax.Array:
  """Index `[B]` of the last non-pad (segment id != 0) position of each row (0 if none)."""
  idx = jnp.arange(segment_ids.shape[1])
  return jnp.max(jnp.where(segment_ids != 0, idx, 0), axis=1)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, layer_cache, rope, mask, cache_index, lengths):
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    norm = dict(kind=cfg.norm, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    h, new_cache = Attention(
      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
      qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
      init_std=cfg.init_std, out_init_std=out_std, implementation=cfg.attention_impl,
      dtype=dt, param_dtype=pdt, name="attn",
    )(
      Norm(**norm, name="attn_norm")(x), mask=mask, rope=rope, layer_cache=layer_cache,
      cache_index=cache_index, lengths=lengths,
    )  # fmt: skip
    x = x + h
    h = Mlp(
      kind=cfg.mlp, mlp_dim=cfg.mlp_dim, use_bias=cfg.out_bias, init_std=cfg.init_std,
      out_init_std=out_std, dtype=dt, param_dtype=pdt, name="mlp",
    )(Norm(**norm, name="mlp_norm")(x))  # fmt: skip
    x = constrain(x + h, ("act_batch", "act_length", "act_embed"))
    return x, new_cache


_REMAT = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ScalarHead(nn.Module):
  """Linear map `[..., D] -> [...]` in float32 (value or reward head)."""

  init: str
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    d = h.shape[-1]
    if self.init == "zeros":
      kinit = nn.initializers.zeros
    else:
      std = 1.0 / (d + 1) if self.init == "std" else (1.0 / (d + 1)) ** 0.5
      kinit = nn.initializers.normal(stddev=std)
    out = nn.Dense(
      1, dtype=jnp.float32, param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(kinit, ("embed", "head_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("head_out",)),
    )(h.astype(jnp.float32))  # fmt: skip
    return out[..., 0]


class Transformer(nn.Module):
  """The critic_jax decoder: embeddings, L blocks, final norm, and heads.

  Call arguments:
    tokens: `[B, T]` int32 token ids.
    positions: `[B, T]` int32 positions (default: arange per row, or cache_index + t
      when decoding; packed rows pass positions that restart per segment).
    segment_ids: `[B, T]` int32; 0 marks padding, equal ids attend to each other
      (packing). Default: all ones.
    attn_mask: optional `[B, T, T]` bool AND-ed into the causal mask (training only).
    cache: optional `KVCache`; new keys/values are written at slots
      `cache_index[b] + t` and attention spans the cache.
    cache_index: `[B]` int32 write offsets (required with `cache`).
    heads: which heads to compute this call (default: all configured heads).
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
      cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
      embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")
      ),
    )  # fmt: skip
    if cfg.position == "learned":
      self.pos_embed = nn.Embed(
        cfg.max_seq_len, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
        embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.01), ("pos", "embed")
        ),
      )  # fmt: skip
    block = Block
    if cfg.remat != "none":
      block = nn.remat(block, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")
    else:
      self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = Norm(
      kind=cfg.norm, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype
    )
    if "lm" in cfg.heads and not cfg.tie_embeddings:
      self.lm_head = Linear(
        (cfg.vocab_size,), ("embed", "vocab"), std=cfg.init_std, dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
      )  # fmt: skip
    if "value" in cfg.heads:
      self.value_head = ScalarHead(cfg.scalar_head_init, cfg.params_dtype)
    if "reward" in cfg.heads:
      self.reward_head = ScalarHead(cfg.scalar_head_init, cfg.params_dtype)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    attn_mask: jax.Array | None = None,
    cache: KVCache | None = None,
    cache_index: jax.Array | None = None,
    heads: tuple[str, ...] | None = None,
  ) -> ModelOutput:
    cfg = self.config
    heads = cfg.heads if heads is None else tuple(heads)
    for h in heads:
      if h not in cfg.heads:
        raise ValueError(f"head {h!r} is not on this model (model.heads={cfg.heads})")
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)

    lengths = None
    if cache is not None:
      if cache_index is None:
        raise ValueError("decoding with a cache needs cache_index [B]")
      if positions is None:
        positions = cache_index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      mask = decode_mask(cache_index, t, cache.length, cfg.sliding_window)
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      fast = cfg.attention_impl == "cudnn" and attn_mask is None and cfg.sliding_window is None
      if fast:
        # Right-padded rows without packing: cuDNN's causal + padding masks.
        mask, lengths = None, jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
      else:
        mask = causal_mask(segment_ids, positions, cfg.sliding_window, attn_mask)

    x = self.embed(tokens)
    rope = None
    if cfg.position == "learned":
      x = x + self.pos_embed(positions)
    else:
      inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
      rope = rope_cos_sin(positions, inv_freq)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))

    layer_caches = None if cache is None else (cache.k, cache.v)
    if cfg.scan_layers:
      x, new = self.layers(x, layer_caches, rope, mask, cache_index, lengths)
      new_cache = None if cache is None else KVCache(k=new[0], v=new[1])
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        lc = None if cache is None else (cache.k[i], cache.v[i])
        x, nc = layer(x, lc, rope, mask, cache_index, lengths)
        if nc is not None:
          ks.append(nc[0])
          vs.append(nc[1])
      new_cache = None if cache is None else KVCache(k=jnp.stack(ks), v=jnp.stack(vs))

    hidden = self.final_norm(x)
    out = ModelOutput(hidden=hidden, cache=new_cache)
    if "lm" in heads:
      if cfg.tie_embeddings:
        logits = self.embed.attend(hidden)
      else:
        logits = self.lm_head(hidden)
      out = out.replace(logits=constrain(logits, ("act_batch", "act_length", "act_vocab")))
    if "value" in heads:
      out = out.replace(values=self.value_head(hidden))
    if "reward" in heads:
      last = last_token_index(segment_ids)
      h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
      out = out.replace(rewards=self.reward_head(h_last))
    return out
