"""More in-process A/B experiments on the SFT train step (this session's), on top of
`../cpu-epyc-2026-11-28d/ab.py` (same harness, same output line):

    python ab_more.py EXPERIMENT --preset sft_arith --batch 128 --seq 12   # PAIRS=16 PER=5

  fused   Transformer(..., fused_projections=True) for training (one qkv and one gate_up
          matmul per layer): x1.034, faster in 4 of 12 pairs
  binner  the blocked attention's softmax with the batch as the innermost axis (the logits
          transposed to [K, R, T, S, B] and back; one block, no mask): x0.987, 13 of 16
  nosig   SwiGLU without its sigmoid (gate * up; wrong model, for the cost only): x0.973,
          9 of 12
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "cpu-epyc-2026-11-28d"))

import functools  # noqa: E402

import ab  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from critic_jax.models import Transformer, attention, layers  # noqa: E402
from critic_jax.models import blocked_attention as BA  # noqa: E402


def _binner_scores(qs, km):
  s = jnp.einsum("bkrth,bksh->bkrts", qs, km, preferred_element_type=jnp.float32)
  tb, e = s.shape[-2:]
  st = jnp.transpose(s, (1, 2, 3, 4, 0))  # [K, R, T, S, B]
  keep = (np.arange(e)[None, :] <= np.arange(tb)[:, None])[None, None, :, :, None]
  return jnp.where(keep, st, jnp.float32(BA._BIG_NEG))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _binner(q, k, v, scale):
  return _binner_fwd(q, k, v, scale)[0]


def _binner_fwd(q, k, v, scale):
  qs = BA._split_heads(q, k.shape[2])
  km, vm = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  st = _binner_scores(qs, km)
  top = jnp.max(st, axis=3, keepdims=True)
  w = jnp.exp((st - top) * jnp.float32(scale))
  total = jnp.sum(w, axis=3, keepdims=True)  # [K, R, T, 1, B]
  wb = jnp.transpose(w, (4, 0, 1, 2, 3))
  o = jnp.einsum("bkrts,bksh->bkrth", wb.astype(v.dtype), vm, preferred_element_type=jnp.float32)
  tot_b = jnp.transpose(total, (4, 0, 1, 2, 3))  # [B, K, R, T, 1]
  o = o / tot_b
  lse = top * jnp.float32(scale) + jnp.log(total)
  return BA._merge_heads(o).astype(q.dtype), (q, k, v, lse)


def _binner_bwd(scale, res, d_out):
  q, k, v, lse = res
  kh = k.shape[2]
  qs = BA._split_heads(q, kh)
  km, vm = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  dos = BA._split_heads(d_out, kh)
  st = _binner_scores(qs, km)
  p = jnp.exp(st * jnp.float32(scale) - lse)  # [K, R, T, S, B]
  pb = jnp.transpose(p, (4, 0, 1, 2, 3))
  f32 = jnp.float32
  dv = jnp.einsum("bkrts,bkrth->bksh", pb.astype(dos.dtype), dos, preferred_element_type=f32)
  dp = jnp.einsum("bkrth,bksh->bkrts", dos, vm, preferred_element_type=jnp.float32)
  dpt = jnp.transpose(dp, (1, 2, 3, 4, 0))
  corr = jnp.sum(p * dpt, axis=3, keepdims=True)
  dst = p * (dpt - corr)
  ds = jnp.transpose(dst, (4, 0, 1, 2, 3)).astype(q.dtype)
  dq = jnp.einsum("bkrts,bksh->bkrth", ds, km, preferred_element_type=f32) * f32(scale)
  dk = jnp.einsum("bkrts,bkrth->bksh", ds, qs, preferred_element_type=f32) * f32(scale)
  return (
    BA._merge_heads(dq).astype(q.dtype),
    jnp.swapaxes(dk, 1, 2).astype(k.dtype),
    jnp.swapaxes(dv, 1, 2).astype(v.dtype),
  )


_binner.defvjp(_binner_fwd, _binner_bwd)


def _binner_attention(q, k, v, mask=None, *, block=64, scale=None):
  assert mask is None and q.shape[1] <= block
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _binner(q, k, v, scale)


_base_variant = ab.variant


def variant(name, cfg):
  none = ab.contextlib.nullcontext
  if name == "fused":  # B's config is its own object; the harness builds both models
    cfg_b = cfg.replace()
    ab.Transformer = lambda c: Transformer(c, fused_projections=c is cfg_b)
    return none, cfg_b, None, None
  if name == "binner":
    patch = lambda: ab.setattr_during(attention, "blocked_attention", _binner_attention)  # noqa: E731
    return patch, cfg, None, None
  if name == "nosig":
    plain = lambda g, u, r=False: g * u  # noqa: E731
    return (lambda: ab.setattr_during(layers, "swiglu", plain)), cfg, None, None
  return _base_variant(name, cfg)


if __name__ == "__main__":
  ab.variant = variant
  ab.main()
