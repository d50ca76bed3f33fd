"""Causal attention over query blocks with a recomputing backward pass (`attention_impl="blocked"`).

`blocked_attention` equals `jax.nn.dot_product_attention(q, k, v, mask=mask)`
for a causal mask, computed differently:

* **Query blocks, truncated keys.** The T queries are split into blocks of
  `block` rows; block [a, e) attends keys [0, e) only (a causal mask admits no
  later key), so up to half of the T x T logits of a long sequence are never
  computed (for 4 blocks, 6 of 16 tiles are skipped), and each block's logits are
  smaller.
* **Flash-attention style backward** (Dao et al. 2022, arXiv:2205.14135, Alg. 4,
  untiled over keys): the forward keeps only q, k, v and the per-query
  log-sum-exp; the backward recomputes P = exp(S - lse) per block and
  forms dS = P * (dP - rowsum(P * dP)), instead of storing every softmax
  intermediate as autodiff of the plain formulation does.
* **Batched matmuls with the batch axes leading**: queries as `[B, K, R, T, H]`
  (K kv heads, R = N / K query heads per kv head), keys/values as `[B, K, S, H]`.
* **Few passes over the [Tb, E] logits**: the causal mask is built in the program
  (a constant for small blocks, iotas for large ones; never a `[B, T, T]` input), the
  caller's mask is optional (rows with one right-padded sequence need none), the scale
  is applied inside the exp, the forward normalises the `[Tb, H]` output instead of the
  weights, and the backward scales dq and dk after their matmuls.

Measured on the 2-core CPU (8 x 256 tokens, 8 heads / 4 kv heads, head dim 32,
forward + backward of one layer, alternating runs in one process, 30 each): 18.1 ms
(min; median 23.3-23.8) with or without a mask, against 21.4 (26.9) without the
fewer-passes changes above and 53.7 (61.5) for `jax.nn.dot_product_attention` (XLA);
PyTorch's CPU flash attention takes about 12.5 ms there. Scores and softmax are float32;
the matmul operands keep the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["blocked_attention", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 64  # measured on the 2-core CPU: 32, 64 and 128 within noise of each other
_BIG_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # as jax.nn.dot_product_attention
# A block's causal mask is a constant (one byte per logit in the program) up to this many
# logits, else computed from iotas. XLA:CPU's loop over a [.., 12, 12] block spent as long
# on the iota comparison as on the exp (409 against 203 us for the masked exp of the main
# job's [128, 4, 1, 12, 12] logits alone); the constant made its train step x0.985 (faster in
# 53 of 60 alternating pairs) and left the 4 M benchmark shape (64 x 256 blocks) unchanged.
_CONST_MASK_MAX = 1 << 16


def _split_heads(x: jax.Array, kv_heads: int) -> jax.Array:
  """`[B, T, N, H]` -> `[B, K, R, T, H]`."""
  b, t, n, h = x.shape
  return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _merge_heads(x: jax.Array) -> jax.Array:
  """`[B, K, R, T, H]` -> `[B, T, N, H]`."""
  b, kh, r, t, h = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * r, h)


def _blocks(t: int, block: int) -> list[tuple[int, int]]:
  return [(a, min(a + block, t)) for a in range(0, t, block)]


def _mask_block(mask, a, e):
  """The caller's mask for queries [a, e) over keys [0, e) (`[B|1, Tb, E]`), or None."""
  return None if mask is None else mask[:, 0, a:e, :e]


def _scores(qb, km, a, mask_b):
  """Unscaled float32 logits `[B, K, R, Tb, E]` of queries [a, a + Tb) over keys [0, E).

  Logits of keys after their query (the causal mask: a numpy constant for small blocks,
  else from iotas, which need no memory) and those `mask_b` (`[B|1, Tb, E]` or None)
  rejects are set to a large negative.
  """
  s = jnp.einsum("bkrth,bksh->bkrts", qb, km, preferred_element_type=jnp.float32)
  tb, e = s.shape[-2:]
  xp = np if tb * e <= _CONST_MASK_MAX else jnp
  keep = xp.arange(e)[None, :] <= a + xp.arange(tb)[:, None]
  if mask_b is not None:
    keep = keep & mask_b[:, None, None]
  return jnp.where(keep, s, jnp.float32(_BIG_NEG))


def _check(q, k, v, mask):
  b, t, n, h = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != h:
    raise ValueError(f"blocked attention needs self-attention shapes, got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")  # fmt: skip
  if n % k.shape[2]:
    raise ValueError(f"{n} query heads are not a multiple of {k.shape[2]} kv heads")
  if mask is not None and (mask.shape != (mask.shape[0], 1, t, t) or mask.shape[0] not in (1, b)):
    raise ValueError(f"mask must be [B or 1, 1, T, T] with T={t}, got {mask.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, block):
  return _forward(q, k, v, mask, scale, block)[0]


def _forward(q, k, v, mask, scale, block):
  qs = _split_heads(q, k.shape[2])
  km, vm = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
  outs, lses = [], []
  for a, e in _blocks(q.shape[1], block):
    s = _scores(qs[:, :, :, a:e], km[:, :, :e], a, _mask_block(mask, a, e))
    top = jnp.max(s, axis=-1, keepdims=True)
    w = jnp.exp((s - top) * jnp.float32(scale))  # softmax(scale * s), unnormalised
    total = jnp.sum(w, axis=-1, keepdims=True)
    # Normalising the [Tb, H] output instead of the [Tb, E] weights saves a pass over them.
    o = jnp.einsum("bkrts,bksh->bkrth", w.astype(v.dtype), vm[:, :, :e],
                   preferred_element_type=jnp.float32)  # fmt: skip
    outs.append(o / total)
    lses.append(top * jnp.float32(scale) + jnp.log(total))
  out = _merge_heads(jnp.concatenate(outs, axis=3)).astype(q.dtype)
  return out, (q, k, v, mask, tuple(lses))


def _backward(scale, block, res, d_out):
  q, k, v, mask, lses = res
  kh, s_len = k.shape[2], k.shape[1]
  qs = _split_heads(q, kh)
  km, vm = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  dos = _split_heads(d_out, kh)
  dqs, dk, dv = [], jnp.zeros(km.shape, jnp.float32), jnp.zeros(vm.shape, jnp.float32)
  for (a, e), lse in zip(_blocks(q.shape[1], block), lses, strict=True):
    s = _scores(qs[:, :, :, a:e], km[:, :, :e], a, _mask_block(mask, a, e))
    p = jnp.exp(s * jnp.float32(scale) - lse)  # masked logits give exactly 0
    do_b = dos[:, :, :, a:e]
    dv_b = jnp.einsum("bkrts,bkrth->bksh", p.astype(do_b.dtype), do_b,
                      preferred_element_type=jnp.float32)  # fmt: skip
    dp = jnp.einsum("bkrth,bksh->bkrts", do_b, vm[:, :, :e], preferred_element_type=jnp.float32)
    # The softmax backward's correction rowsum(P * dP) (= rowsum(dO * O), which the
    # flash-attention paper uses; that form, a reduction of dO against O, was
    # miscompiled by XLA:CPU's YNNPACK fusion at T = 256 in one block).
    corr = jnp.sum(p * dp, axis=-1, keepdims=True)
    ds = (p * (dp - corr)).astype(q.dtype)  # dL/d(logits) / scale
    dq_b = jnp.einsum("bkrts,bksh->bkrth", ds, km[:, :, :e], preferred_element_type=jnp.float32)
    dqs.append(dq_b * jnp.float32(scale))
    dk_b = jnp.einsum("bkrts,bkrth->bksh", ds, qs[:, :, :, a:e], preferred_element_type=jnp.float32)
    pad = ((0, 0), (0, 0), (0, s_len - e), (0, 0))
    dk, dv = dk + jnp.pad(dk_b * jnp.float32(scale), pad), dv + jnp.pad(dv_b, pad)
  dq = _merge_heads(jnp.concatenate(dqs, axis=3)).astype(q.dtype)
  return dq, jnp.swapaxes(dk, 1, 2).astype(k.dtype), jnp.swapaxes(dv, 1, 2).astype(v.dtype), None


_attention.defvjp(_forward, _backward)


def blocked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  *,
  block: int = DEFAULT_BLOCK,
  scale: float | None = None,
) -> jax.Array:
  """Causal self-attention by query blocks, with a recomputing backward pass.

  Args:
    q: `[B, T, N, H]` queries; head n uses kv head n // (N / K).
    k, v: `[B, T, K, H]` keys and values of the same T tokens.
    mask: `[B or 1, 1, T, T]` bool, query t may attend key s, AND-ed with the causal
      mask; it must itself be causal (never admit s > t), as every mask from
      `causal_mask` is: keys after a block's last query are not read. None: the
      causal mask alone (no `[B, T, T]` mask is read), which is exact for the real
      tokens of rows holding one right-padded sequence each (a real query never
      reaches the padding after it); padded queries then attend the tokens before
      them, and their outputs are the caller's to ignore.
    block: queries per block (static).
    scale: logit scale (default 1/sqrt(H)).
  Returns:
    `[B, T, N, H]` in q's dtype.
  """
  _check(q, k, v, mask)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  mask = None if mask is None else mask.astype(bool)
  return _attention(q, k, v, mask, scale, int(block))
