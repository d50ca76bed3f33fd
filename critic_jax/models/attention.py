"""Grouped-query causal self-attention, with cached keys/values for decoding.

Training runs, by `attention_impl`, `jax.nn.dot_product_attention` over the
sequence ("xla", or "cudnn": the cuDNN flash-attention kernel on GPUs) or
`blocked_attention` ("blocked", the CPU default). Decoding attends the new tokens over cached
key/value *segments* (a per-row cache, or a prompt cache shared by G samples
plus the samples' own generated keys/values, see `attend`) without
concatenating them.

Cache layout: keys transposed `[B, K, H, S]`, values `[B, K, S, H]` (K kv heads,
S slots, H head dim), so each contraction is a batched matmul in the standard
operand layout: (queries `[M, H]`) x (keys `[H, S]`) and (probabilities `[M, S]`)
x (values `[S, H]`), batched over (kv row, kv head) with the batch axes leading
in both operands, where the M rows are every query that reads that kv head. On
a 2-core CPU (XLA with YNNPACK, one core, 16 rows x 4 kv heads x 2 query heads
per kv head, 63 slots) the logits took 14 us this way against 56 us as a
multiply-and-sum fusion, and about 140 us as matmuls with the batch axes not
leading (the layout before: keys `[B, K, S, H]`, values `[B, K, H, S]`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from critic_jax.models.blocked_attention import DEFAULT_BLOCK, blocked_attention
from critic_jax.models.layers import Linear, Norm, apply_rope, constrain

__all__ = ["Attention", "attend", "causal_mask", "decode_mask", "write_cache"]

CACHE_AXES = ("act_batch", "act_kv_heads", "act_head_dim", "act_cache_length")
VALUE_CACHE_AXES = ("act_batch", "act_kv_heads", "act_cache_length", "act_head_dim")


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


def write_cache(
  cache: jax.Array, new: jax.Array, cache_index: jax.Array, seq_axis: int = 1
) -> jax.Array:
  """Writes `new` into `cache` at per-row slots `cache_index [B]` along `seq_axis`.

  Keys (transposed): `new [B, K, H, T]` into `cache [B, K, H, S]` (seq_axis=2 of a
  row); values: `[B, K, T, H]` into `[B, K, S, H]` (seq_axis=1). A batched
  `dynamic_update_slice`: in place when `cache` is a donated buffer.
  """

  def one(c, n, i):
    start = [0] * c.ndim
    start[seq_axis] = i
    return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), tuple(start))

  return jax.vmap(one)(cache, new, cache_index)


def _group_mask(mask: jax.Array, b: int, bk: int) -> jax.Array:
  """`[Bm, T|1, S]` mask -> `[Bk, 1, G|1, T|1, 1, S]` for the logits `[Bk, K, G, T, R, S]`."""
  if mask.ndim != 3:
    raise ValueError(f"segment masks must be [B, T, S], got shape {mask.shape}")
  bm = mask.shape[0]
  if bm in (1, bk):
    m = mask[:, None]
  elif bm == b:
    m = mask.reshape((bk, b // bk) + mask.shape[1:])
  else:
    raise ValueError(f"segment mask batch {bm} is none of 1, {bk} (kv rows) or {b} (queries)")
  return m[:, None, :, :, None, :]


def attend(
  q: jax.Array,
  segments: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
  scale: float | None = None,
) -> jax.Array:
  """Softmax attention of `q` over the union of several key/value segments.

  Equals `dot_product_attention` over the keys/values concatenated along the
  sequence axis (with the concatenated mask), without concatenating them:
  logits are computed per segment, one softmax runs over all of them (float32,
  masked logits set to the same large negative value as `jax.nn`), and the
  per-segment weighted values are summed. Both contractions are batched matmuls
  over (kv row, kv head) whose M rows are the G * T * R queries that read that
  kv head (G rows sharing a prompt, T new tokens, R = N / K query heads per kv
  head), reading each cached key/value once, in place.

  Args:
    q: `[B, T, N, H]` queries; head n uses kv head n // (N / K).
    segments: `(k, v, mask)` triples: keys transposed `[Bk, K, H, S]`, values
      `[Bk, K, S, H]`, with B % Bk == 0; query row b reads kv row b // (B / Bk),
      so G = B / Bk consecutive rows (the samples of one prompt) share a prompt's
      keys without copying them. mask: `[Bm, T or 1, S]` bool, Bm in {1, Bk, B}.
    scale: logit scale (default 1/sqrt(H)).
  Returns:
    `[B, T, N, H]` in the value dtype.
  """
  b, t, n, h = q.shape
  kh = segments[0][0].shape[1]
  if n % kh:
    raise ValueError(f"{n} query heads are not a multiple of {kh} kv heads")
  r = n // kh
  scale = h**-0.5 if scale is None else scale
  big_neg = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)

  def rows(x, bk, g):  # [Bk, K, G, T, R] -> [B, K, T, R]
    return jnp.swapaxes(x, 1, 2).reshape(b, kh, t, r)

  def grouped(x, bk, g):  # [B, K, T, R] -> [Bk, K, G, T, R]
    return jnp.swapaxes(x.reshape(bk, g, kh, t, r), 1, 2)

  logits, row_groups = [], []
  for k, v, mask in segments:
    bk = k.shape[0]
    if b % bk or k.shape[1] != kh or k.shape[2] != h or v.shape != k.shape[:2] + (k.shape[3], h):
      raise ValueError(f"segment k {k.shape} / v {v.shape} does not fit queries {q.shape}")
    g = b // bk
    qm = q.reshape(bk, g, t, kh, r, h).transpose(0, 3, 1, 2, 4, 5).reshape(bk, kh, g * t * r, h)
    lg = jnp.einsum("bkmh,bkhs->bkms", qm, k, preferred_element_type=jnp.float32)
    lg = lg.reshape(bk, kh, g, t, r, k.shape[3])
    lg = jnp.where(_group_mask(mask, b, bk), lg * jnp.float32(scale), big_neg)
    logits.append(lg)
    row_groups.append((bk, g))
  # One softmax over all segments: a shared max and a shared normaliser [B, K, T, R].
  m = functools.reduce(
    jnp.maximum, [rows(jnp.max(lg, -1), *bg) for lg, bg in zip(logits, row_groups, strict=True)]
  )
  exps = [
    jnp.exp(lg - grouped(m, *bg)[..., None]) for lg, bg in zip(logits, row_groups, strict=True)
  ]
  denom = sum(rows(jnp.sum(e, -1), *bg) for e, bg in zip(exps, row_groups, strict=True))
  out = 0.0
  for e, (_, v, _), (bk, g) in zip(exps, segments, row_groups, strict=True):
    p = (e / grouped(denom, bk, g)[..., None]).astype(v.dtype)
    o = jnp.einsum(
      "bkms,bksh->bkmh", p.reshape(bk, kh, g * t * r, -1), v, preferred_element_type=jnp.float32
    )
    out = out + o.reshape(bk, kh, g, t, r, h).transpose(0, 2, 3, 1, 4, 5).reshape(b, t, n, h)
  return out.astype(segments[-1][1].dtype)


class Attention(nn.Module):
  """Multi-head attention with GQA, optional QKV bias, q/k norm, RoPE and cached context.

  Shapes: x `[B, T, D]`; q `[B, T, N, H]`; mask `[B, 1, T, T]` bool over the new
  tokens; context segments keys `[Bk, K, H, S]`, values `[Bk, K, S, H]`, masks
  `[Bm, T|1, S]` (see `attend`).

  `fused_qkv` computes q, k and v with one matmul against a `qkv` kernel `[D, K, R + 2, H]`
  (R = N / K query heads per kv head, then that kv head's key and value) instead of the
  separate `q [D, N, H]`, `k`, `v [D, K, H]` kernels; `fuse_projections` converts the params.
  Same math; the decode model uses it (fewer, larger matmuls per token).
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
  block: int = DEFAULT_BLOCK
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  grad: str = "autodiff"
  fused_qkv: bool = False

  @nn.compact
  def __call__(
    self, x, *, mask, rope=None, context=None, context_masks=None, lengths=None, write_at=None
  ):
    """Attends the T new tokens of `x` to `context` (if any) and to themselves.

    Args:
      x: `[B, T, D]`.
      mask: `[B, 1, T, T]` self-attention mask, or None for plain causal attention
        over rows holding one right-padded sequence each (`lengths [B]` real tokens
        for cuDNN; "blocked" needs no lengths: see `blocked_attention`).
      rope: (cos, sin) tables `[B, T, H]` or None.
      context: None, or a sequence of cached (keys, values) segments.
      context_masks: one `[Bm, T|1, S]` bool mask per context segment.
      write_at: None, or a `[]` int32 slot: the new keys/values are first written
        in place into the *last* context segment at that slot (they must fit),
        and attention then runs over the context alone (its mask must admit the
        new tokens' own slots causally). Otherwise the new tokens are attended as
        a segment of their own and the context is left untouched.
    Returns:
      (out `[B, T, D]`, kv): kv is the updated last segment (keys `[B, K, H, S]`,
      values `[B, K, S, H]`) with `write_at`, else this call's keys `[B, K, H, T]`
      and values `[B, K, T, H]` for the caller to cache.
    """

    def proj(shape, name, axes):
      return Linear(
        shape, ("embed",) + axes, use_bias=self.qkv_bias, std=self.init_std,
        dtype=self.dtype, param_dtype=self.param_dtype, grad=self.grad, name=name,
      )(x)  # fmt: skip

    if self.fused_qkv:  # one matmul; kernel [D, K, R + 2, H] (see `fuse_projections`)
      r = self.num_heads // self.num_kv_heads
      qkv = proj((self.num_kv_heads, r + 2, self.head_dim), "qkv", ("kv_heads", None, "head_dim"))
      q = qkv[..., :r, :].reshape(qkv.shape[:-3] + (self.num_heads, self.head_dim))
      k, v = qkv[..., r, :], qkv[..., r + 1, :]
    else:
      q = proj((self.num_heads, self.head_dim), "q", ("heads", "head_dim"))
      k = proj((self.num_kv_heads, self.head_dim), "k", ("kv_heads", "head_dim"))
      v = proj((self.num_kv_heads, self.head_dim), "v", ("kv_heads", "head_dim"))
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
    k_new = constrain(jnp.transpose(k, (0, 2, 3, 1)), CACHE_AXES)  # [B, K, H, T]
    v_new = constrain(jnp.swapaxes(v, 1, 2), VALUE_CACHE_AXES)  # [B, K, T, H]

    if context is not None:
      if mask is None:
        raise ValueError("attention over a cached context needs an explicit self mask")
      segments = [list(kv) for kv in context]
      if write_at is not None:
        ck, cv = segments[-1]
        ck = jax.lax.dynamic_update_slice(ck, k_new.astype(ck.dtype), (0, 0, 0, write_at))
        cv = jax.lax.dynamic_update_slice(cv, v_new.astype(cv.dtype), (0, 0, write_at, 0))
        segments[-1] = [constrain(ck, CACHE_AXES), constrain(cv, VALUE_CACHE_AXES)]
        written = tuple(segments[-1])
      # Each segment is read in its own dtype (a float32 cache under bfloat16 compute is
      # not converted: the matmuls promote the queries instead).
      triples = [
        (constrain(ck, CACHE_AXES), constrain(cv, VALUE_CACHE_AXES), cm)
        for (ck, cv), cm in zip(segments, context_masks, strict=True)
      ]
      if write_at is None:
        triples.append((k_new, v_new, mask[:, 0]))
      out = attend(q, triples)
    elif self.implementation == "blocked":  # mask None: the causal mask alone
      out = blocked_attention(q, k, v, mask, block=self.block)
    elif mask is None:
      out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=self.implementation,
      )  # fmt: skip
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
    out = constrain(out, ("act_batch", "act_length", "act_heads", "act_head_dim"))
    out = Linear(
      (x.shape[-1],), ("heads", "head_dim", "embed"), in_dims=2, use_bias=self.out_bias,
      std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype, grad=self.grad,
      name="o",
    )(out)  # fmt: skip
    if context is not None and write_at is not None:
      return out, written
    return out, (k_new, v_new)
