"""What bounds the CPU benchmarks on this machine: GEMM rates, a decode step's matmul floor,
XLA:CPU's cost per fused op, and the read bandwidth a decode step's weights stream at.

    .venv/bin/python benchmarks/cpu-epyc-2026-11-27/floors.py            # 2 cores
    taskset -c 0 .venv/bin/python benchmarks/cpu-epyc-2026-11-27/floors.py  # 1 core

Each figure is the median of repeated timed calls (loops run inside one jitted call, so
dispatch is not counted). Shapes are those of `scripts/bench_sft.py` (bench_small: 8 x 256
tokens, d 256, MLP 704, vocab 2048) and `scripts/bench_sampler.py` (the same model, 16 rows
per decode step).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn, n=20):
  fn()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def gemm_rates():
  """[M, K] x [K, N] GEMMs of the SFT step (forward and both backward products)."""
  try:
    import torch
  except ImportError:
    torch = None
  shapes = [(2048, 256, 704), (2048, 704, 256), (2048, 256, 2048), (2048, 2048, 256)]
  print("| GEMM M x K x N | dtype | JAX GFLOP/s | PyTorch GFLOP/s |")
  print("|---|---|---|---|")
  rng = np.random.default_rng(0)
  for m, k, n in shapes:
    for name, jdt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
      x = jnp.asarray(rng.standard_normal((m, k)), jdt)
      w = jnp.asarray(rng.standard_normal((k, n)), jdt)
      f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
      tj = median_time(lambda f=f, x=x, w=w: f(x, w).block_until_ready())
      tt = float("nan")
      if torch is not None:
        tdt = getattr(torch, name)
        xt, wt = torch.randn(m, k, dtype=tdt), torch.randn(k, n, dtype=tdt)
        tt = median_time(lambda xt=xt, wt=wt: xt @ wt)
      flop = 2 * m * k * n
      print(f"| {m} x {k} x {n} | {name} | {flop / tj / 1e9:.0f} | {flop / tt / 1e9:.0f} |")


def decode_matmul_floor(rows=16, steps=64):
  """The decode step's weight matmuls alone (4 layers: fused qkv, o, fused gate/up, down;
  then the LM head), chained inside one loop: what a step costs with nothing else in it."""
  d = 256
  shapes = [(256, 512), (256, 256), (256, 1376), (688, 256)] * 4 + [(256, 2048)]
  rng = np.random.default_rng(0)
  ws = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for s in shapes]
  x = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)

  @jax.jit
  def run(x, ws):
    def body(_, h):
      for w in ws:
        k = w.shape[0]
        hh = h if k == d else jnp.tile(h, (1, k // d + 1))[:, :k]
        h = jnp.tanh((hh @ w)[:, :d] + h)
      return h

    return jax.lax.fori_loop(0, steps, body, x)

  t = median_time(lambda: run(x, ws).block_until_ready()) / steps
  flop = sum(2 * rows * a * b for a, b in shapes)
  mb = sum(a * b * 4 for a, b in shapes) / 1e6
  print(
    f"decode step, weight matmuls only ({rows} rows, {mb:.1f} MB of float32 weights): "
    f"{t * 1e3:.3f} ms ({flop / t / 1e9:.0f} GFLOP/s)"
  )


def fused_op_cost(counts=(10, 50, 100, 150)):
  """A chain of N (reduce, elementwise) pairs on [16, 256]: time per fused op."""
  x = jnp.ones((16, 256), jnp.float32)
  for n in counts:

    @jax.jit
    def chain(h, n=n):
      for _ in range(n):
        s = jnp.sum(h, axis=1, keepdims=True)
        h = jax.lax.optimization_barrier(jnp.tanh(s * 1e-3 + h))
      return h

    fusions = chain.lower(x).compile().as_text().count(" fusion(")
    t = median_time(lambda chain=chain: chain(x).block_until_ready(), n=50)
    print(f"{fusions} fusions in one call: {t * 1e6:.0f} us, {t * 1e6 / fusions:.2f} us per fusion")


def read_bandwidth(sizes_mb=(1, 4, 16, 64), reps=50):
  """Summing a float32 array of S MB, repeatedly (in cache when it fits)."""
  for mb in sizes_mb:
    w = jnp.ones((mb * 1024 * 1024 // 4 // 256, 256), jnp.float32)

    @jax.jit
    def run(w):
      def body(_, acc):
        return acc + jnp.sum(w * (1.0 + acc * 1e-30), axis=0)

      return jax.lax.fori_loop(0, reps, body, jnp.zeros((256,), jnp.float32))

    t = median_time(lambda run=run, w=w: run(w).block_until_ready()) / reps
    print(f"read {mb} MB: {t * 1e6:.0f} us, {mb * 2**20 / t / 1e9:.1f} GB/s")


if __name__ == "__main__":
  gemm_rates()
  decode_matmul_floor()
  fused_op_cost()
  read_bandwidth()
