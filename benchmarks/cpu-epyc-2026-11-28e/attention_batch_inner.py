"""The attention of the main job's shape as broadcast multiplies and reductions with the batch
as the innermost axis ([K, R, T, H, B]), against the blocked kernel, forward and forward +
backward, in isolation: `python attention_batch_inner.py` (default B T N K H = 128 12 4 4 32).
Measured: blocked 497 us / 2,688 us; batch-inner 2,756 us / 106,609 us (XLA:CPU's reductions).
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from critic_jax.models.blocked_attention import _BIG_NEG, blocked_attention  # noqa: E402


def to_inner(x, kh):  # [B,T,N,H] -> [K,R,T,H,B]
  b, t, n, h = x.shape
  return x.reshape(b, t, kh, n // kh, h).transpose(2, 3, 1, 4, 0)


def from_inner(x):  # [K,R,T,H,B] -> [B,T,N,H]
  k, r, t, h, b = x.shape
  return x.transpose(4, 2, 0, 1, 3).reshape(b, t, k * r, h)


def kv_inner(x):  # [B,S,K,H] -> [K,S,H,B]
  return x.transpose(2, 1, 3, 0)


def kv_outer(x):
  return x.transpose(3, 1, 0, 2)


def scores(qt, kt):  # [K,R,T,H,B],[K,S,H,B] -> [K,R,T,S,B]
  s = jnp.sum(qt[:, :, :, None] * kt[:, None, None], axis=4)
  t, e = s.shape[2], s.shape[3]
  keep = (np.arange(e)[None, :] <= np.arange(t)[:, None])[None, None, :, :, None]
  return jnp.where(keep, s, jnp.float32(_BIG_NEG))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def att(q, k, v, scale):
  return fwd(q, k, v, scale)[0]


def fwd(q, k, v, scale):
  kh = k.shape[2]
  qt, kt, vt = to_inner(q, kh), kv_inner(k), kv_inner(v)
  s = scores(qt, kt)
  top = jnp.max(s, axis=3, keepdims=True)
  w = jnp.exp((s - top) * jnp.float32(scale))
  tot = jnp.sum(w, axis=3, keepdims=True)  # [K,R,T,1,B]
  o = jnp.sum(w[:, :, :, :, None] * vt[:, None, None], axis=3)  # [K,R,T,H,B]
  o = o / tot
  lse = top * jnp.float32(scale) + jnp.log(tot)
  return from_inner(o).astype(q.dtype), (q, k, v, lse)


def bwd(scale, res, do):
  q, k, v, lse = res
  kh = k.shape[2]
  qt, kt, vt, dot = to_inner(q, kh), kv_inner(k), kv_inner(v), to_inner(do, kh)
  s = scores(qt, kt)
  p = jnp.exp(s * jnp.float32(scale) - lse)  # [K,R,T,S,B]
  dv = jnp.sum(p[:, :, :, :, None] * dot[:, :, :, None], axis=(1, 2))  # [K,S,H,B]
  dp = jnp.sum(dot[:, :, :, None] * vt[:, None, None], axis=4)  # [K,R,T,S,B]
  corr = jnp.sum(p * dp, axis=3, keepdims=True)
  ds = p * (dp - corr)
  dq = jnp.sum(ds[:, :, :, :, None] * kt[:, None, None], axis=3) * jnp.float32(scale)  # [K,R,T,H,B]
  dk = jnp.sum(ds[:, :, :, :, None] * qt[:, :, :, None], axis=(1, 2)) * jnp.float32(
    scale
  )  # [K,S,H,B]
  return from_inner(dq).astype(q.dtype), kv_outer(dk).astype(k.dtype), kv_outer(dv).astype(v.dtype)


att.defvjp(fwd, bwd)


def inner_attention(q, k, v, mask=None, *, block=64, scale=None):
  assert mask is None
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return att(q, k, v, scale)


def bench(f, *args, n=200):
  for _ in range(5):
    out = f(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return np.median(times) * 1e6


def main():
  b, t, n, kh, h = [int(x) for x in sys.argv[1:6]] if len(sys.argv) > 5 else (128, 12, 4, 4, 32)
  r = np.random.RandomState(0)
  q = jnp.asarray(r.randn(b, t, n, h).astype(np.float32))
  k, v = (jnp.asarray(r.randn(b, t, kh, h).astype(np.float32)) for _ in range(2))
  grads = {}
  for name, fn in (("blocked", blocked_attention), ("inner", inner_attention)):
    loss = lambda q, k, v, fn=fn: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
    g = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    print(name, f"{bench(jax.jit(fn), q, k, v):.0f} us fwd, {bench(g, q, k, v):.0f} us fwd+bwd")
    grads[name] = g(q, k, v)[1]
  diff = [float(jnp.max(jnp.abs(a - c))) for a, c in zip(*grads.values(), strict=True)]
  print("max |grad difference| (q, k, v):", diff)


if __name__ == "__main__":
  main()
