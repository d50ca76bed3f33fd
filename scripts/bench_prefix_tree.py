"""Prefix-tree (TEMPO) advantages: the jitted kernel vs the plain-Python trie, one run.

    python scripts/bench_prefix_tree.py                  # the three issue shapes
    python scripts/bench_prefix_tree.py --forward-seqs 0 # skip the model forward pass

For each (B, G, T) it times, on the same token batch:

* `prefix_tree_advantages` (production "lcp" kernel, jitted, compile excluded,
  min and median of --reps calls), with all its diagnostics;
* `trie_prefix_tree`, the dict-of-dicts trie a researcher writes first (min of
  --trie-reps runs; without its optional pairwise-LCP loop, which would only
  slow it further);
* the kernel on the worst case for it: every response of every group identical
  and full length, so no pair ever diverges and the chunk loop runs over all of T;
* one forward pass of a small model (the `tiny` preset: 2 layers, d_model 128,
  4 heads, MLP 512, vocab 256; 0.59M parameters) over the same B*G*T tokens
  (token ids taken mod the vocabulary). It runs on --forward-seqs of the B*G
  sequences in jitted micro-batches and is scaled linearly to B*G (the cost of a
  forward pass is linear in the number of sequences); --forward-seqs 0 skips it.

The token batches are tree-shaped like sampled groups: responses share a prefix
with an earlier response of the group with probability 0.7 (length geometric,
mean T/16: a preamble), short responses (<= T/8) are sometimes exact
duplicates, lengths are uniform in [T/8, T] with 10% cut at T, EOS ends each
response and the rest is padding. The kernel's advantages are checked against
the trie's on every shape.

Targets (issue): >= 100x the Python trie at (32, 16, 1024), and <= 5% of the
forward pass, on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from critic_jax.advantages import prefix_tree_advantages, trie_prefix_tree  # noqa: E402

SHAPES = ((32, 8, 512), (32, 16, 1024), (8, 64, 4096))
TARGET_SHAPE = (32, 16, 1024)
EOS, VOCAB = 2, 32000


def sample_groups(rng: np.random.Generator, num_b: int, num_g: int, num_t: int):
  """Tree-shaped token groups (see the module docstring); returns tokens, mask, rewards."""
  tokens = rng.integers(3, VOCAB, size=(num_b, num_g, num_t)).astype(np.int32)
  lengths = rng.integers(max(1, num_t // 8), num_t + 1, size=(num_b, num_g))
  lengths[rng.random((num_b, num_g)) < 0.1] = num_t
  for b in range(num_b):
    for i in range(1, num_g):
      src = rng.integers(0, i)
      if lengths[b, src] <= num_t // 8 and rng.random() < 0.3:
        tokens[b, i], lengths[b, i] = tokens[b, src], lengths[b, src]
      elif rng.random() < 0.7:
        shared = min(rng.geometric(16.0 / num_t), lengths[b, src] - 1)
        tokens[b, i, :shared] = tokens[b, src, :shared]
        lengths[b, i] = max(lengths[b, i], shared + 1)
  mask = np.arange(num_t) < lengths[..., None]
  last = np.arange(num_t) == (lengths - 1)[..., None]
  tokens = np.where(last, EOS, np.where(mask, tokens, 0)).astype(np.int32)
  rewards = (rng.random((num_b, num_g)) < 0.5).astype(np.float32)
  return tokens, mask, rewards


def time_calls(fn, reps: int) -> tuple[float, float, float]:
  """(compile + first call, min, median of reps calls) in seconds; fn returns device arrays."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return first, min(times), statistics.median(times)


def forward_seconds(num_seqs: int, num_t: int, measured_seqs: int, micro_batch: int) -> float:
  """Seconds for one forward pass of the tiny model over num_seqs sequences of num_t tokens."""
  from critic_jax.models import ModelConfig, Transformer

  model = Transformer(ModelConfig.preset("tiny"))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)
  # The XLA attention materialises [batch, heads, T, T] scores: keep them near 1 GiB.
  batch = max(1, min(micro_batch, measured_seqs, (1 << 26) // (num_t * num_t)))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, num_t), 0, 256, jnp.int32)
  jax.block_until_ready(fwd(params, tokens))  # compile
  steps = -(-measured_seqs // batch)
  start = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fwd(params, tokens))
  return (time.perf_counter() - start) * num_seqs / (steps * batch)


def bench_shape(rng, num_b: int, num_g: int, num_t: int, args) -> tuple:
  """Times the kernel (typical and worst case), the trie and the forward pass at one shape."""
  tokens, mask, rewards = sample_groups(rng, num_b, num_g, num_t)

  def kernel(tok, m):
    return prefix_tree_advantages(tokens=tok, mask=m, rewards=rewards, chunk_size=args.chunk_size)

  tok_d, mask_d = jnp.asarray(tokens), jnp.asarray(mask)
  compile_s, kernel_s, kernel_med = time_calls(lambda: kernel(tok_d, mask_d), args.reps)
  out = kernel(tok_d, mask_d)
  same = jnp.broadcast_to(tok_d[:, :1], tok_d.shape), jnp.ones_like(mask_d)
  _, worst_s, _ = time_calls(lambda: kernel(*same), args.reps)

  trie_times = []
  for _ in range(args.trie_reps):
    start = time.perf_counter()
    ref = trie_prefix_tree(tokens, mask, rewards, with_lcp=False)
    trie_times.append(time.perf_counter() - start)
  trie_s = min(trie_times)
  err = float(np.abs(np.asarray(out.adv) - ref["adv"]).max())
  lcp = np.asarray(out.lcp)
  shared = lcp[:, ~np.eye(num_g, dtype=bool)].reshape(num_b, -1).max(-1)  # per group

  fwd_s = float("nan")
  if args.forward_seqs > 0:
    fwd_s = forward_seconds(num_b * num_g, num_t, args.forward_seqs, args.micro_batch)
  print(f"  {num_b}x{num_g}x{num_t}: max |adv - trie adv| = {err:.1e}; longest shared "
        f"prefix {shared.max()} (mean over groups {shared.mean():.0f})", flush=True)  # fmt: skip
  return num_b, num_g, num_t, trie_s, kernel_s, kernel_med, worst_s, fwd_s, compile_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=20, help="timed kernel calls per shape")
  parser.add_argument("--trie-reps", type=int, default=3, help="timed trie runs per shape")
  parser.add_argument("--chunk-size", type=int, default=256)
  parser.add_argument("--forward-seqs", type=int, default=16, help="0 skips the forward pass")
  parser.add_argument("--micro-batch", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
  print(f"kernel: impl='lcp', chunk_size={args.chunk_size}, all diagnostics; "
        f"{args.reps} timed calls per shape, compile excluded")  # fmt: skip
  rng = np.random.default_rng(args.seed)
  rows = []
  for shape in SHAPES:
    rows.append(bench_shape(rng, *shape, args))
  print()
  head = ("B", "G", "T", "trie s", "kernel ms", "(median)", "speedup", "worst ms", "speedup",
          "fwd s", "kernel/fwd", "compile s")  # fmt: skip
  print("{:>3} {:>3} {:>5} {:>7} {:>10} {:>9} {:>8} {:>9} {:>8} {:>8} {:>10} {:>9}".format(*head))
  for b, g, t, trie_s, kernel_s, kernel_med, worst_s, fwd_s, compile_s in rows:
    print(
      f"{b:>3} {g:>3} {t:>5} {trie_s:>7.3f} {kernel_s * 1e3:>10.2f} {kernel_med * 1e3:>9.2f} "
      f"{trie_s / kernel_s:>7.0f}x {worst_s * 1e3:>9.2f} {trie_s / worst_s:>7.0f}x "
      f"{fwd_s:>8.2f} {100 * kernel_s / fwd_s:>9.3f}% {compile_s:>9.2f}"
    )
  print("\nTimes are the minimum over repeats (the median is shown too: this machine may be "
        "shared); 'worst': every response identical and full length, so the chunk loop never "
        "exits early; 'speedup' = trie time / kernel time.")  # fmt: skip
  if args.forward_seqs > 0:
    print(f"fwd: tiny preset (2 layers, d_model 128), measured on {args.forward_seqs} of the B*G "
          f"sequences in micro-batches of <= {args.micro_batch}, scaled to B*G.")  # fmt: skip
  for b, g, t, trie_s, kernel_s, _, _, fwd_s, _ in rows:
    if (b, g, t) == TARGET_SHAPE:
      speedup = trie_s / kernel_s
      print(f"target at {TARGET_SHAPE}: speedup {speedup:.0f}x (>= 100x: "
            f"{'met' if speedup >= 100 else 'NOT met'})", end="")  # fmt: skip
      if args.forward_seqs > 0:
        frac = 100 * kernel_s / fwd_s
        print(f"; kernel/forward {frac:.3f}% (<= 5%: {'met' if frac <= 5 else 'NOT met'})", end="")
      print()


if __name__ == "__main__":
  main()
