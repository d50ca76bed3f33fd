"""Sampler variants timed in one process, alternating call by call (a shared, noisy CPU
moves separate runs by 30-50%; alternating in one process cancels the slow drifts).

    python benchmarks/cpu-epyc-2026-11-28/ab_sampler.py \
        '{"before": {"merge_prompt": False, "kv_chunk": None}, "after": {}}' --rounds 100
    python benchmarks/cpu-epyc-2026-11-28/ab_sampler.py \
        '{"before": {"merge_prompt": False, "kv_chunk": None}, "after": {}}' --rounds 50 \
        -- --new-tokens 128

The first argument maps a variant name to `GenerationConfig` overrides (a Python literal);
arguments after `--` go to `scripts/bench_sampler.py`'s parser (model shape, batch, prompt
and generation lengths, G). Each variant gets its own `Sampler` (device loop) over the same
params and prompts; every round calls each variant's `generate` once, in turn. Prints the
median, 25th percentile and minimum wall time per call, the median process CPU time, and
each median relative to the first variant's.
"""

import argparse
import ast
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import bench_sampler  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from critic_jax.hostmem import keep_freed_memory  # noqa: E402
from critic_jax.models import Transformer  # noqa: E402
from critic_jax.sampler import GenerationConfig, Sampler, SamplingConfig  # noqa: E402


def main():
  argv = sys.argv[1:]
  rest = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("variants", help="{name: {GenerationConfig field: value}} as a Python literal")
  p.add_argument("--rounds", type=int, default=50)
  args = p.parse_args(argv)
  variants = ast.literal_eval(args.variants)
  bench = bench_sampler.parse_args(rest)
  keep_freed_memory()
  cfg = bench_sampler.model_config(bench, jax.devices()[0].platform)
  model = Transformer(cfg)
  params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
    jax.random.key(0)
  )
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (bench.batch, bench.prompt_len)).astype(np.int32)
  lengths = np.full((bench.batch,), bench.prompt_len, np.int32)
  base = GenerationConfig(
    max_new_tokens=bench.new_tokens, sampling=SamplingConfig("temperature", temperature=1.0)
  )
  samplers = {}
  for name, overrides in variants.items():
    gen = dataclasses.replace(base, **overrides)
    samplers[name] = Sampler(model, gen, loop="device")
    samplers[name].generate(
      params, tokens, lengths, jax.random.key(1), num_samples=bench.num_samples
    )
    print(f"{name}: {overrides} (KV chunk {gen.chunk_size} slots)")
  wall = {n: [] for n in samplers}
  cpu = {n: [] for n in samplers}
  for r in range(args.rounds):
    for name, sampler in samplers.items():
      c0, t0 = time.process_time(), time.perf_counter()
      sampler.generate(
        params, tokens, lengths, jax.random.key(2 + r), num_samples=bench.num_samples
      )
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  first = statistics.median(next(iter(wall.values())))
  print(f"{args.rounds} rounds; batch {bench.batch} x {bench.num_samples}, prompt "
        f"{bench.prompt_len}, {bench.new_tokens} new tokens, {bench.dtype}")  # fmt: skip
  for name, t in wall.items():
    med = statistics.median(t)
    print(
      f"{name:12s} median {med * 1e3:7.1f} ms  p25 {np.percentile(t, 25) * 1e3:7.1f}  "
      f"min {min(t) * 1e3:7.1f}  CPU {statistics.median(cpu[name]) * 1e3:7.1f} ms  "
      f"x{med / first:.3f}"
    )


if __name__ == "__main__":
  main()
