"""Decoder-only transformer trunk with LM, value and reward heads (Flax Linen).

Used purely functionally: `params = model.init(rng, tokens)["params"]`, then
`model.apply({"params": params}, tokens, ...)`. The same module trains (full
sequences, optional packing) and decodes, either with a per-row `KVCache` that
the call updates, or with a `DecodeContext` (a prompt cache shared by G samples,
plus their generated keys/values in chunks, into whose last chunk the call
writes in place before attending; `critic_jax.sampler` decodes this way).
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from critic_jax.models.attention import (
  CACHE_AXES,
  VALUE_CACHE_AXES,
  Attention,
  causal_mask,
  write_cache,
)
from critic_jax.models.config import ModelConfig
from critic_jax.models.layers import Linear, Mlp, Norm, constrain, rope_cos_sin, rope_inv_freq

__all__ = [
  "Transformer",
  "ModelOutput",
  "KVCache",
  "DecodeContext",
  "fuse_projections",
  "last_token_index",
]

_STACKED_K_AXES = (None,) + CACHE_AXES
_STACKED_V_AXES = (None,) + VALUE_CACHE_AXES


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values for decoding.

  The layout is kv-head major, keys transposed (`critic_jax.models.attention`),
  so attention reads the cache as stored.

  Attributes:
    k: `[L, B, K, H, S]` keys (S = cache length, K = kv heads, H = head dim).
    v: `[L, B, K, S, H]` values.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def init(cls, config: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    v_shape = (
      config.num_layers, batch, config.num_kv_heads, length, config.resolved_head_dim,
    )  # fmt: skip
    dtype = dtype or config.compute_dtype
    k_shape = v_shape[:3] + (v_shape[4], v_shape[3])
    return cls(k=jnp.zeros(k_shape, dtype), v=jnp.zeros(v_shape, dtype))

  @property
  def length(self) -> int:
    return self.k.shape[4]


@flax.struct.dataclass
class DecodeContext:
  """Cached keys/values for decoding: a shared prompt prefix and generated chunks.

  Rows are samples; the G = B / Bp consecutive samples b*G .. b*G+G-1 share prompt
  row b, whose keys/values are stored once (no G-fold copy, no G-fold prefill).
  Generated keys/values live in chunks so that a step reads only the chunks that
  hold tokens (the caller passes a prefix of the chunk list). A decode call
  writes its T tokens' keys/values in place into the *last* chunk it is given,
  at generated index num_generated (they must fit in that chunk), attends over
  the prompt and every generated slot up to its own, and returns the updated
  context in `ModelOutput.context`.

  With one sample per prompt (B = Bp) the prompt's keys/values can instead sit in
  the first `prompt_slots` slots of chunk 0 (`prompt_slots` > 0, `prefix_k` and
  `prefix_v` empty): attention then reads the same slots as one segment instead of
  two, saving a segment's own small matmuls, mask, max and sum per layer.

  Attributes:
    prefix_k: L-tuple of `[Bp, K, H, P]` prompt keys, transposed (P = padded prompt length);
      () when the prompt sits in chunk 0.
    prefix_v: L-tuple of `[Bp, K, P, H]` prompt values (or ()).
    prefix_len: `[Bp]` int32 real tokens per prompt; slots >= prefix_len are masked.
    k: L-tuple (layers) of tuples (chunks) of `[B, K, H, C_j]` keys of generated
      tokens; chunk j holds generated tokens sum(C_<j) .. sum(C_<=j) - 1 (chunk 0
      after its `prompt_slots` prompt slots).
    v: values, the same structure with `[B, K, C_j, H]` chunks.
    num_generated: `[]` int32 generated tokens already stored (later slots are
      masked). The new tokens sit at positions prefix_len + num_generated + t.
    prompt_slots: static; P when the prompt sits in chunk 0, else 0.
  """

  prefix_k: tuple
  prefix_v: tuple
  prefix_len: jax.Array
  k: tuple
  v: tuple
  num_generated: jax.Array
  prompt_slots: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def num_prompts(self) -> int:
    return self.prefix_len.shape[0]

  @property
  def prompt_len(self) -> int:
    """P, the padded prompt length (in chunk 0 or in the prefix)."""
    return self.prompt_slots or self.prefix_k[0].shape[3]

  @property
  def chunk_sizes(self) -> tuple[int, ...]:
    """Generated-token slots per chunk given (chunk 0's prompt slots not counted)."""
    sizes = [c.shape[3] for c in self.k[0]]
    sizes[0] -= self.prompt_slots
    return tuple(sizes)

  @property
  def last_chunk_start(self) -> int:
    """Generated index of the last given chunk's first generated slot."""
    return sum(self.chunk_sizes[:-1])

  @property
  def write_slot(self) -> jax.Array:
    """`[]` int32 slot of the last given chunk that the next generated token goes to."""
    offset = self.prompt_slots if len(self.k[0]) == 1 else 0
    return self.num_generated - self.last_chunk_start + offset


@flax.struct.dataclass
class ModelOutput:
  """What the trunk and heads return.

  Attributes:
    hidden: `[B, T, D]` final (normed) hidden states.
    logits: `[B, T, V]` next-token logits in the compute dtype, or None.
    values: `[B, T]` float32 per-token values V(s_t), or None.
    rewards: `[B]` float32 sequence rewards read at the last non-pad token, or None.
    cache: the updated `KVCache` when one was passed in, else None.
    kv: a `KVCache` of this call's own keys `[L, B, K, H, T]` and values
      `[L, B, K, T, H]` when `return_kv=True` (or a cache was passed), else None.
    context: the `DecodeContext` passed in, with this call's keys/values written
      into its last chunk and num_generated advanced by T; else None.
  """

  hidden: jax.Array
  logits: jax.Array | None = None
  values: jax.Array | None = None
  rewards: jax.Array | None = None
  cache: KVCache | None = None
  kv: KVCache | None = None
  context: DecodeContext | None = None


def last_token_index(segment_ids: jax.Array) -> jax.Array:
  """Index `[B]` of the last non-pad (segment id != 0) position of each row (0 if none)."""
  idx = jnp.arange(segment_ids.shape[1])
  return jnp.max(jnp.where(segment_ids != 0, idx, 0), axis=1)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x)).

  `fused`: q/k/v and SwiGLU gate/up as one matmul each (see `fuse_projections`).
  """

  config: ModelConfig
  fused: bool = False

  @nn.compact
  def __call__(self, x, context, context_masks, rope, mask, lengths, write_at):
    cfg = self.config
    dt, pdt = cfg.compute_dtype, cfg.params_dtype
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    norm = dict(kind=cfg.norm, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    h, kv = Attention(
      num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
      qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
      init_std=cfg.init_std, out_init_std=out_std, implementation=cfg.resolved_attention_impl,
      block=cfg.attention_block, dtype=dt, param_dtype=pdt, grad=cfg.resolved_matmul_grad,
      fused_qkv=self.fused, name="attn",
    )(
      Norm(**norm, name="attn_norm")(x), mask=mask, rope=rope, context=context,
      context_masks=context_masks, lengths=lengths, write_at=write_at,
    )  # fmt: skip
    x = x + h
    h = Mlp(
      kind=cfg.mlp, mlp_dim=cfg.mlp_dim, use_bias=cfg.resolved_mlp_bias, init_std=cfg.init_std,
      out_init_std=out_std, dtype=dt, param_dtype=pdt, grad=cfg.resolved_matmul_grad,
      fused=self.fused, recompute=cfg.swiglu_recompute, name="mlp",
    )(Norm(**norm, name="mlp_norm")(x))  # fmt: skip
    x = constrain(x + h, ("act_batch", "act_length", "act_embed"))
    return x, kv


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
    positions: `[B, T]` int32 positions (default: arange per row, cache_index + t
      with a cache, prefix_len + num_generated + t with a context; packed rows pass
      positions that restart per segment).
    segment_ids: `[B, T]` int32; 0 marks padding, equal ids attend to each other
      (packing). Default: all ones. Ignored when decoding.
    packed: whether a row may hold several segments (static; default True). False
      promises that every row is one segment followed by padding (ids 1..1 0..0), which
      lets `attention_impl="cudnn"` use cuDNN's causal + padding masks (sequence
      lengths) and "blocked" its causal mask alone instead of an explicit mask (outputs
      at padded positions then differ; those at real tokens do not); with True (or any
      `attn_mask`) both get the explicit segment mask, so packed rows never attend
      across segments.
    attn_mask: optional `[B, T, T]` bool AND-ed into the causal mask (training only).
    cache: optional `KVCache`; new keys/values are written at slots
      `cache_index[b] + t` and attention spans the cache slots before them.
    cache_index: `[B]` int32 write offsets (required with `cache`).
    context: optional `DecodeContext` (prompt keys/values shared by G samples per
      prompt, plus generated keys/values in chunks): the call writes its tokens'
      keys/values into the last chunk given, in place under donation, attends, and
      returns the updated context in `ModelOutput.context`.
    return_kv: also return this call's keys/values in `ModelOutput.kv` (prefill).
    heads: which heads to compute this call (default: all configured heads).

  `fused_projections=True` is the decode layout: each block computes q/k/v with one
  `qkv` kernel and the SwiGLU gate/up with one `gate_up` kernel (`fuse_projections`
  converts a trained model's params; same math, fewer and larger matmuls per decoded
  token). Training, checkpoints and Hugging Face interop use the separate kernels.
  """

  config: ModelConfig
  fused_projections: bool = False

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
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.fused_projections, name="layers")
    else:
      self.layers = [
        block(cfg, self.fused_projections, name=f"layer_{i}") for i in range(cfg.num_layers)
      ]
    self.final_norm = Norm(
      kind=cfg.norm, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype
    )
    if "lm" in cfg.heads and not cfg.tie_embeddings:
      self.lm_head = Linear(
        (cfg.vocab_size,), ("embed", "vocab"), std=cfg.init_std, dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype, grad=cfg.resolved_matmul_grad,
      )  # fmt: skip
    if "value" in cfg.heads:
      self.value_head = ScalarHead(cfg.scalar_head_init, cfg.params_dtype)
    if "reward" in cfg.heads:
      self.reward_head = ScalarHead(cfg.scalar_head_init, cfg.params_dtype)

  def lm_logits(self, hidden: jax.Array) -> jax.Array:
    """Next-token logits `[B, T, V]` (compute dtype) from final hidden states `[B, T, D]`.

    Apply with `method="lm_logits"` to project only the positions one needs
    (e.g. the last prompt token after a prefill with `heads=()`).
    """
    if "lm" not in self.config.heads:
      raise ValueError(f"head 'lm' is not on this model (model.heads={self.config.heads})")
    if self.config.tie_embeddings:
      logits = self.embed.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def _cache_masks(self, cache_index, t: int, s: int):
    """Masks for the per-row `KVCache`: slots before cache_index, and causal new tokens."""
    w = self.config.sliding_window
    slot = jnp.arange(s)
    q_slot = cache_index[:, None] + jnp.arange(t)[None, :]
    cmask = jnp.broadcast_to(
      slot[None, None, :] < cache_index[:, None, None], (len(cache_index), 1, s)
    )
    if w is not None:
      cmask = cmask & ((q_slot[:, :, None] - slot[None, None, :]) < w)
    return (cmask,), _self_mask(t, w)

  def _context_masks(self, ctx: DecodeContext, t: int):
    """Masks for a `DecodeContext`: prompt slots < prefix_len; generated slots up to
    each new token's own (the new tokens are written into the last chunk first)."""
    w = self.config.sliding_window
    n = ctx.num_generated
    slot = jnp.arange(ctx.prompt_len)
    pmask = slot[None, None, :] < ctx.prefix_len[:, None, None]  # [Bp, 1, P]
    if w is not None:
      q_pos = ctx.prefix_len[:, None] + n + jnp.arange(t)[None, :]  # [Bp, T]
      pmask = pmask & ((q_pos[:, :, None] - slot[None, None, :]) < w)
    masks, start = [], 0
    q_slot = n + jnp.arange(t)  # generated index of each new token
    for j, size in enumerate(ctx.chunk_sizes):
      g = start + jnp.arange(size)
      m = (g[None, :] <= q_slot[:, None])[None]  # [1, T, C]
      if w is not None:
        m = m & ((q_slot[:, None] - g[None, :]) < w)[None]
      if j == 0 and ctx.prompt_slots:  # chunk 0 = [prompt slots | generated slots]
        bp = ctx.num_prompts
        m = jnp.concatenate(
          [jnp.broadcast_to(pmask, (bp, t, pmask.shape[2])), jnp.broadcast_to(m, (bp, t, size))],
          axis=-1,
        )
      masks.append(m)
      start += size
    if not ctx.prompt_slots:
      masks.insert(0, pmask)
    return tuple(masks), _self_mask(t, w)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    attn_mask: jax.Array | None = None,
    packed: bool = True,
    cache: KVCache | None = None,
    cache_index: jax.Array | None = None,
    context: DecodeContext | None = None,
    return_kv: bool = False,
    heads: tuple[str, ...] | None = None,
  ) -> ModelOutput:
    cfg = self.config
    heads = cfg.heads if heads is None else tuple(heads)
    for h in heads:
      if h not in cfg.heads:
        raise ValueError(f"head {h!r} is not on this model (model.heads={cfg.heads})")
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    if cache is not None and context is not None:
      raise ValueError("pass either a KVCache (cache=) or a DecodeContext (context=), not both")
    b, t = tokens.shape
    plain_rows = positions is None and segment_ids is None and cache is None and context is None
    if cfg.position == "learned" and plain_rows and t > cfg.max_seq_len:
      raise ValueError(
        f"{t} tokens per row exceed model.max_seq_len={cfg.max_seq_len}, the learned position "
        "table's size (pass segment_ids if the tokens past it are padding)"
      )
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)

    lengths, ctx_masks, write_at = None, None, None
    if cache is not None:
      if cache_index is None:
        raise ValueError("decoding with a cache needs cache_index [B]")
      if positions is None:
        positions = cache_index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
      ctx_masks, mask = self._cache_masks(cache_index, t, cache.length)
    elif context is not None:
      if b % context.num_prompts:
        raise ValueError(
          f"{b} rows are not a multiple of the context's {context.num_prompts} prompts"
        )
      n_prefix = 0 if context.prompt_slots else cfg.num_layers
      if len(context.prefix_k) != n_prefix or len(context.k) != cfg.num_layers:
        raise ValueError(f"the context must hold {cfg.num_layers} layers of keys/values")
      if context.prompt_slots and b != context.num_prompts:
        raise ValueError(
          f"a context with the prompt in chunk 0 has one row per prompt ({context.num_prompts}),"
          f" got {b} rows"
        )
      if positions is None:
        row_len = jnp.repeat(context.prefix_len, b // context.num_prompts)
        positions = (row_len + context.num_generated)[:, None] + jnp.arange(t, dtype=jnp.int32)
      ctx_masks, mask = self._context_masks(context, t)
      write_at = context.write_slot
    else:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      impl = cfg.resolved_attention_impl
      fast = (
        impl in ("cudnn", "blocked")
        and not packed
        and attn_mask is None
        and cfg.sliding_window is None
      )
      if fast:
        # One right-padded segment per row (the caller's promise): cuDNN's causal + padding
        # masks (sequence lengths cannot express several segments per row), or the
        # blocked kernel's own causal mask alone (exact for every real token).
        mask = None
        if impl == "cudnn":
          lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
      else:
        mask = causal_mask(segment_ids, positions, cfg.sliding_window, attn_mask)

    x = self.embed(tokens)
    rope = None
    if cfg.position == "learned":
      # Padding (segment id 0) may sit past the table, whose lookup (jnp.take's "fill") gives
      # NaN rows there, and attention's zero weights times NaN spread them to real tokens; a
      # real token past the table keeps its NaN.
      past = jnp.minimum(positions, cfg.max_seq_len - 1)
      x = x + self.pos_embed(jnp.where(segment_ids > 0, positions, past))
    else:
      with jax.ensure_compile_time_eval():  # concrete, for the tables
        inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
      rope = rope_cos_sin(positions, inv_freq, cfg.resolved_rope_impl)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))

    # Per layer: the cached (k, v) segments attended before the new tokens.
    def layer_context(i):
      if cache is not None:
        return ((cache.k[i], cache.v[i]),)
      if context is not None:
        chunks = tuple(zip(context.k[i], context.v[i], strict=True))
        if context.prompt_slots:  # the prompt sits in chunk 0
          return chunks
        return ((context.prefix_k[i], context.prefix_v[i]),) + chunks
      return None

    # Per layer: keys/values returned by the blocks (this call's own, or with a
    # context the updated last chunk).
    if cfg.scan_layers:
      stacked = None
      if cache is not None:
        stacked = ((cache.k, cache.v),)
      elif context is not None:
        # nn.scan needs layer-stacked arrays: this copies the context every call;
        # the sampler decodes with an unscanned copy of the model instead.
        per_layer = [layer_context(i) for i in range(cfg.num_layers)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
      x, (ks, vs) = self.layers(x, stacked, ctx_masks, rope, mask, lengths, write_at)
      ks = [ks[i] for i in range(cfg.num_layers)] if context is not None else ks
      vs = [vs[i] for i in range(cfg.num_layers)] if context is not None else vs
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        x, (k, v) = layer(x, layer_context(i), ctx_masks, rope, mask, lengths, write_at)
        ks.append(k)
        vs.append(v)
    want_kv = return_kv or cache is not None
    if want_kv and not cfg.scan_layers:
      ks, vs = jnp.stack(ks), jnp.stack(vs)

    hidden = self.final_norm(x)
    out = ModelOutput(hidden=hidden)
    if cache is not None:
      write = jax.vmap(write_cache, in_axes=(0, 0, None, None))  # over layers; rows inside
      out = out.replace(
        cache=KVCache(
          k=constrain(write(cache.k, ks, cache_index, 2), _STACKED_K_AXES),
          v=constrain(write(cache.v, vs, cache_index, 1), _STACKED_V_AXES),
        )
      )
    if want_kv:
      out = out.replace(kv=KVCache(k=ks, v=vs))
    if context is not None:
      out = out.replace(
        context=context.replace(
          k=tuple(layer[:-1] + (k,) for layer, k in zip(context.k, ks, strict=True)),
          v=tuple(layer[:-1] + (v,) for layer, v in zip(context.v, vs, strict=True)),
          num_generated=context.num_generated + t,
        )
      )
    if "lm" in heads:
      out = out.replace(logits=self.lm_logits(hidden))
    if "value" in heads:
      out = out.replace(values=self.value_head(hidden))
    if "reward" in heads:
      last = last_token_index(segment_ids)
      h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
      out = out.replace(rewards=self.reward_head(h_last))
    return out


def _self_mask(t: int, sliding_window: int | None) -> jax.Array:
  """Causal mask `[1, 1, T, T]` among T new tokens (with the sliding window)."""
  idx = jnp.arange(t)
  diff = idx[:, None] - idx[None, :]
  mask = diff >= 0
  if sliding_window is not None:
    mask &= diff < sliding_window
  return mask[None, None]


def fuse_projections(params: Any, config: ModelConfig) -> Any:
  """Params of `Transformer(config)` -> those of `Transformer(config, fused_projections=True)`.

  Per block (`layer_i`, or the stacked `layers` of a scanned model, leading `[L]` kept):
  `attn/q [D, N, H]`, `attn/k`, `attn/v [D, K, H]` become `attn/qkv [D, K, R + 2, H]`
  (R = N / K; query head n = k * R + r sits at [:, k, r], then kv head k's key and value),
  and SwiGLU `mlp/gate`, `mlp/up [D, F]` become `mlp/gate_up [D, 2, F]`; biases likewise.
  Every other entry is passed through, and fused blocks are left as they are. Pure array
  code: jit it (under the mesh if the params are sharded).
  """
  r = config.num_heads // config.num_kv_heads

  def fuse_layer(layer):
    layer = dict(layer)
    if "qkv" in layer["attn"]:  # already fused
      return layer
    attn = dict(layer["attn"])
    q, k, v = (dict(attn.pop(n)) for n in ("q", "k", "v"))
    qkv = {}
    for leaf in q:  # "kernel" [..., D, N, H] and optionally "bias" [..., N, H]
      qs = q[leaf].reshape(q[leaf].shape[:-2] + (config.num_kv_heads, r, q[leaf].shape[-1]))
      qkv[leaf] = jnp.concatenate([qs, k[leaf][..., None, :], v[leaf][..., None, :]], axis=-2)
    attn["qkv"] = qkv
    layer["attn"] = attn
    if config.mlp == "swiglu":
      mlp = dict(layer["mlp"])
      gate, up = dict(mlp.pop("gate")), dict(mlp.pop("up"))
      mlp["gate_up"] = {leaf: jnp.stack([gate[leaf], up[leaf]], axis=-2) for leaf in gate}
      layer["mlp"] = mlp
    return layer

  out = dict(params)
  for name in out:
    if name == "layers" or name.startswith("layer_"):
      out[name] = fuse_layer(out[name])
  return out
