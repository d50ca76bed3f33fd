"""Sampler throughput: critic_jax's `Sampler` vs transformers `generate` (PyTorch), one run.

    python scripts/bench_sampler.py --loop=both              # CPU default (small Llama shape)
    python scripts/bench_sampler.py --loop=both --threads=1  # each side on one core
    # GPU cases of the issue (run on an H100 on 2026-11-27: README, "On a GPU"):
    python scripts/bench_sampler.py --preset=llama_0.9b --dtype=bfloat16 --batch=64 \
        --prompt-len=128 --new-tokens=256 --kv-chunk=64 --repeats=2
    python scripts/bench_sampler.py --preset=llama_0.9b --dtype=bfloat16 --batch=256 \
        --prompt-len=128 --new-tokens=256 --kv-chunk=64 --repeats=2

Both sides get the same Llama-shaped random-init model config, batch, prompt
length and number of new tokens, sample with temperature 1 (no top-k/top-p) and
never stop early (no EOS), so they do the same work; with --num-samples=G both
return G samples per prompt (ours prefills each prompt once and shares its
cache, `generate` repeats the prompt G times). Each side runs in its own
subprocess (so PyTorch and JAX do not share threads or GPU memory); the parent
prints a table and the ratio. Reported per side: prefill time and tokens/s
(prompt tokens), decode time per step and tokens/s (new tokens), end-to-end new
tokens/s, and peak memory (device allocator peak on a GPU; peak RSS of the
process on a CPU, runtime included). On a GPU it also reports the decode step
against the memory-bandwidth roofline: bytes of weights plus the KV cache that
a step must read (prompt + tokens so far, averaged over the steps) over the step
time, against `--peak-bw` (3e12 B/s, an H100's HBM3).

`--interleave PAIRS` keeps both sides alive and times whole calls in alternating bursts of
--repeats calls (the ratio: the median of the per-pair ratios), so that the machine's slow
spells (seconds long) hit both sides of a pair; see `scripts/bench_sft.py`.

On a shared CPU machine use --threads=1: with two OpenMP threads and other
processes on the cores, PyTorch's spin-waiting threads can slow `generate` by
10x or more (measured: 20 s instead of 1.6 s at batch 64), which would flatter
the ratio. Each side then pins itself to one core (the first it may use) and runs
single-threaded ops, and the "tok per CPU-s" column compares the work done.

Targets (issue): >= 3x `generate` on the CPU; on an H100 with llama_0.9b in
bf16, >= 20x at batch 64 and >= 50% of the roofline at batch 256.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchlib import (  # noqa: E402
  add_interleave_flags,
  add_profile_flag,
  add_rounds_flag,
  exit_if_failed,
  forward_args,
  interleave_sides,
  measure,
  print_result,
  profile_runs,
  run_side,
  side_or_none,
)

# The CPU default: a small Llama shape where neither side is dominated by start-up.
CPU_DEFAULT = dict(
  vocab_size=2048, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=688
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="", help="model preset (default: a small CPU Llama shape)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument(
    "--num-samples",
    type=int,
    default=1,
    help="G samples per prompt (transformers: num_return_sequences)",
  )
  p.add_argument(
    "--kv-chunk", type=int, default=0,
    help="generated-KV chunk in slots (0: the sampler's default, GenerationConfig.kv_chunk "
    "'auto': chunks of about sqrt(8 T) slots on a CPU, one chunk on a GPU)",
  )  # fmt: skip
  p.add_argument(
    "--loop",
    default="auto",
    choices=("auto", "host", "device", "both"),
    help="our decode loop (auto: device loop on a CPU, host loop on a GPU)",
  )
  p.add_argument(
    "--fused",
    default="on",
    choices=("on", "off", "both"),
    help="decode with fused q/k/v and gate/up matmuls (GenerationConfig.fused_projections)",
  )
  p.add_argument(
    "--attention-impl",
    default="auto",
    choices=("auto", "xla", "cudnn", "blocked"),
    help="prefill attention (auto: cudnn on a GPU, else the model's auto: blocked on a CPU)",
  )
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--peak-bw", type=float, default=3.0e12, help="bytes/s for the roofline")
  p.add_argument(
    "--threads",
    type=int,
    default=0,
    choices=(0, 1),
    help="1: each side on one core, single-threaded (robust on a shared machine)",
  )
  p.add_argument("--side", default="both", choices=("both", "ours", "hf"))
  p.add_argument("--timeout", type=float, default=1200.0, help="per side, seconds")
  add_rounds_flag(p)
  add_interleave_flags(p)
  add_profile_flag(p)
  args = p.parse_args(argv)
  if args.interleave and args.rounds > 1:
    p.error("--interleave and --rounds are two ways to repeat the comparison: pick one")
  return args


def model_config(args, platform: str = "cpu"):
  from critic_jax.models import ModelConfig

  impl = args.attention_impl
  if impl == "auto" and platform == "gpu":
    impl = "cudnn"

  if args.preset:
    cfg = ModelConfig.preset(args.preset)
  else:
    cfg = ModelConfig(**CPU_DEFAULT)
  if cfg.position != "rope" or cfg.mlp != "swiglu" or cfg.norm != "rms" or cfg.qkv_bias:
    raise SystemExit("the benchmark compares Llama-shaped models (rope, swiglu, rms, no bias)")
  return cfg.replace(
    dtype=args.dtype, param_dtype=args.dtype, attention_impl=impl,
    max_seq_len=max(cfg.max_seq_len, args.prompt_len + args.new_tokens),
  )  # fmt: skip


def kv_bytes_per_step(cfg, args, itemsize: int, chunk: int) -> tuple[float, float]:
  """(needed, read) KV-cache bytes per decode step, averaged over the steps.

  needed: prompt + tokens generated so far; read: what our step attends (whole
  chunks of `chunk` slots), with the prompt read once per prompt (shared by its G samples).
  """
  n = args.new_tokens
  per_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * itemsize
  b, g = args.batch, args.num_samples
  steps = range(1, n)
  needed = statistics.mean(b * g * (args.prompt_len + s) * per_tok for s in steps)
  read = statistics.mean(
    (b * args.prompt_len + b * g * ((s - 1) // chunk + 1) * chunk) * per_tok for s in steps
  )
  return needed, read


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- ours -------------------------------------------------------------------------
def run_ours(args) -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from critic_jax.models import Transformer
  from critic_jax.sampler import GenerationConfig, Sampler, SamplingConfig

  cfg = model_config(args, jax.devices()[0].platform)
  model = Transformer(cfg)
  t0 = time.perf_counter()
  # Initialised by XLA:CPU and then moved: the same values (threefry is the same on every
  # backend), without compiling the init's one-off random-fill kernels for the accelerator,
  # the likely cost of the ~100 s our H100 runs spent before their first call (not
  # profiled; `init_s` will tell).
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
      jax.random.key(0)
    )
  params = jax.block_until_ready(jax.device_put(params, jax.devices()[0]))
  init_s = time.perf_counter() - t0
  n_params = sum(x.size for x in jax.tree.leaves(params))
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  lengths = np.full((args.batch,), args.prompt_len, np.int32)
  gen = GenerationConfig(
    max_new_tokens=args.new_tokens, sampling=SamplingConfig("temperature", temperature=1.0),
    kv_chunk=args.kv_chunk or "auto",
  )  # fmt: skip
  loops = ("host", "device") if args.loop == "both" else (args.loop,)
  if args.loop == "auto":
    loops = ("device",) if jax.devices()[0].platform == "cpu" else ("host",)
  fused_opts = {"on": (True,), "off": (False,), "both": (True, False)}[args.fused]
  variants = [
    (loop + ("" if len(fused_opts) == 1 else f" {'fused' if f else 'unfused'}"), loop, f)
    for loop in loops
    for f in fused_opts
  ]
  results, samplers = {}, {}
  for name, loop, fused in variants:
    sampler = Sampler(model, dataclasses.replace(gen, fused_projections=fused), loop=loop)
    samplers[name] = sampler
    t0 = time.perf_counter()
    sampler.generate(params, tokens, lengths, jax.random.key(1), num_samples=args.num_samples)
    compile_s = time.perf_counter() - t0
    prefill, total, cpu = [], [], []
    for r in range(args.repeats):
      c0 = time.process_time()
      sampler.generate(
        params, tokens, lengths, jax.random.key(2 + r), num_samples=args.num_samples,
        timing=loop == "host",
      )  # fmt: skip
      cpu.append(time.process_time() - c0)
      total.append(sampler.last_timing["total_s"])
      if loop == "host":
        prefill.append(sampler.last_timing["prefill_s"])
    res = {"compile_s": compile_s, "total_s": statistics.median(total), "cpu_s": min(cpu)}
    if loop == "device":
      # The device loop is one executable: time the prefill piece on its own.
      init = sampler._init_fn(args.num_samples)
      dparams = sampler.decode_params(params)  # what generate() hands the compiled pieces
      put = jnp.asarray
      ids = put(np.arange(args.batch, dtype=np.int32))
      for r in range(args.repeats + 1):
        t0 = time.perf_counter()
        st = init(dparams, put(tokens), put(lengths), ids, jax.random.key(9))
        jax.block_until_ready(st)
        if r:
          prefill.append(time.perf_counter() - t0)
        del st
    res["prefill_s"] = statistics.median(prefill)
    results[name] = res
  best = min(results, key=lambda k: results[k]["total_s"])
  if args.profile:  # generate() returns host arrays: each call has synced already

    def run():
      key = jax.random.key(5)
      samplers[best].generate(params, tokens, lengths, key, num_samples=args.num_samples)

    profile_runs(args.profile, run, lambda: None, args.profile_runs)
  if args.serve:  # --interleave: whole calls of the fastest variant, timed in bursts
    sampler = samplers[best]
    key = jax.random.key(2)
    served_s = measure(
      args, lambda: sampler.generate(params, tokens, lengths, key, num_samples=args.num_samples),
      lambda: None, 0, 0, None,
    )  # fmt: skip
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform == "gpu" else None
  peak = stats["peak_bytes_in_use"] if stats else peak_rss_bytes()
  out = dict(results[best])
  out.update(
    side="critic_jax", loop=best, loops=results, init_s=init_s, device=dev.device_kind,
    platform=dev.platform,
    params=n_params, weight_bytes=weight_bytes, peak_bytes=peak,
    peak_kind="device allocator peak" if stats else "process peak RSS",
    itemsize=jnp.dtype(cfg.compute_dtype).itemsize, kv_chunk=gen.chunk_size,
  )  # fmt: skip
  if args.serve:
    out["served_total_s"] = served_s
  return out


# --- transformers -------------------------------------------------------------------
def run_hf(args) -> dict:
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  if args.threads:
    torch.set_num_threads(args.threads)
  # Random-init activations decay into denormals, which x86 runs ~100x slower unless
  # flushed; XLA flushes them by default, so flush them for PyTorch too (a trained
  # model would not have them). Per thread: exact with --threads=1.
  torch.set_flush_denormal(True)
  cfg = model_config(args)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  hf_cfg = LlamaConfig(
    vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
    rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    attn_implementation="sdpa",
  )  # fmt: skip
  torch.manual_seed(0)
  with torch.device(device):  # initialised on the device: no host-side init of a large model
    model = LlamaForCausalLM(hf_cfg).to(dtype=dtype).eval()
  n_params = sum(p.numel() for p in model.parameters())
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).to(device)
  attn = torch.ones_like(ids)

  def gen(n):
    with torch.inference_mode():
      out = model.generate(
        input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0,
        num_return_sequences=args.num_samples,
      )  # fmt: skip
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  cpu = []

  def timed(n):
    t0, c0 = time.perf_counter(), time.process_time()
    out = gen(n)
    dt = time.perf_counter() - t0
    if n == args.new_tokens:
      cpu.append(time.process_time() - c0)
    assert out.shape == (args.batch * args.num_samples, args.prompt_len + n), out.shape
    return dt

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  gen(args.new_tokens)
  warm = time.perf_counter() - t0
  total = statistics.median(timed(args.new_tokens) for _ in range(args.repeats))
  prefill = statistics.median(timed(1) for _ in range(args.repeats))
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
  extra = {}
  if args.serve:  # --interleave: whole calls, timed in bursts
    extra["served_total_s"] = measure(args, lambda: gen(args.new_tokens), lambda: None, 0, 0, None)
  return dict(**extra,
    side="transformers", compile_s=warm, total_s=total, prefill_s=prefill, cpu_s=min(cpu),
    device=device,
    params=n_params, peak_bytes=peak,
    peak_kind="torch allocator peak" if device == "cuda" else "process peak RSS",
    versions=f"torch {torch.__version__}",
  )  # fmt: skip


# --- driver -------------------------------------------------------------------------
def side_env(args) -> dict:
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if args.threads == 1:  # and the side pins itself to one core (`one_core`)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
  return env


def child(args, side: str) -> dict:
  return run_side(__file__, side, forward_args(args), env=side_env(args), timeout=args.timeout)


def rates(r: dict, args) -> dict:
  b, g, n = args.batch, args.num_samples, args.new_tokens
  decode_s = max(r["total_s"] - r["prefill_s"], 1e-9)
  return dict(
    prefill_ms=1e3 * r["prefill_s"],
    prefill_tok_s=b * args.prompt_len / r["prefill_s"],
    step_ms=1e3 * decode_s / max(n - 1, 1),
    decode_tok_s=b * g * (n - 1) / decode_s,
    total_tok_s=b * g * n / r["total_s"],
    cpu_tok_s=b * g * n / r["cpu_s"],
    peak_gib=r["peak_bytes"] / 2**30,
  )


def one_core() -> None:
  """Pins this process to one core (the first it may use), before JAX or PyTorch start.

  XLA:CPU sizes its thread pools (YNNPACK's matmuls included) from the cores the process may
  run on, so this is what makes its ops single-threaded; XLA flags such as
  `--xla_cpu_multi_thread_eigen=false` leave the matmuls on two threads (measured: CPU time
  1.6x the wall time with them, 1.0x pinned). PyTorch gets `torch.set_num_threads(1)` too.
  """
  if not hasattr(os, "sched_setaffinity"):
    raise SystemExit("--threads=1 pins each side to one core, which needs Linux")
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def main(argv=None):
  args = parse_args(argv)
  from critic_jax.hostmem import keep_freed_memory

  keep_freed_memory()  # in each side's child process (both sides get it)
  if args.side != "both":
    if args.threads == 1:
      one_core()
    res = run_ours(args) if args.side == "ours" else run_hf(args)
    res["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print_result(res)
    return
  cfg = model_config(args)

  # Alternate the sides round by round, so that a slow spell of the machine hits both, and
  # which goes first: `generate` first in odd rounds, so a one-round run under an outer time
  # limit (scripts/device_checks.sh) has the baseline even if our side's start-up overruns.
  order = (("hf", "ours"), ("ours", "hf"))
  per_pair = []
  if args.interleave:
    results, per_pair = interleave_sides(
      __file__, ["hf", "ours"], forward_args(args), pairs=args.interleave, per=args.repeats,
      gap=args.gap, timeout=args.timeout, env=side_env(args),
    )  # fmt: skip
    rounds = [results]
  else:
    rounds = [
      {n: side_or_none(i, n, lambda n=n: child(args, n)) for n in order[i % 2]}
      for i in range(args.rounds)
    ]
  exit_if_failed(rounds)
  rounds = [(r["ours"], r["hf"]) for r in rounds]
  rated = [(rates(o, args), rates(h, args)) for o, h in rounds]
  (ours, hf), (ro, rh) = rounds[0], rated[0]
  print(
    f"model: {args.preset or 'cpu-default'} {cfg.num_layers}L d{cfg.d_model} "
    f"{cfg.num_heads}h/{cfg.num_kv_heads}kv V{cfg.vocab_size}, {ours['params'] / 1e6:.1f}M params, "
    f"{args.dtype}; batch {args.batch} x {args.num_samples} samples, prompt {args.prompt_len}, "
    f"{args.new_tokens} new tokens (our KV chunk: {ours.get('kv_chunk')} slots); "
    f"device: {ours['device']} / {hf['device']}"
  )
  loops = ", ".join(
    f"{k} loop {1e3 * v['total_s']:.1f} ms (CPU {1e3 * v['cpu_s']:.1f} ms)"
    for k, v in ours["loops"].items()
  )
  print(
    f"ours: fastest {ours['loop']} loop, compile+first run {ours['compile_s']:.1f}s; {loops}; "
    f"params initialised in {ours['init_s']:.1f}s, process {ours['process_s']:.0f}s"
  )
  print(
    f"transformers: {hf['versions']}, first run {hf['compile_s']:.1f}s, "
    f"process {hf['process_s']:.0f}s"
  )
  head = ["", "prefill ms", "prefill tok/s", "decode ms/step", "decode tok/s", "total tok/s",
          "tok per CPU-s", "peak GiB"]  # fmt: skip
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for i, (o, h) in enumerate(rated):
    tag = f" (round {i + 1})" if args.rounds > 1 else ""
    for name, r in (("critic_jax", o), ("transformers", h)):
      print(
        f"| {name}{tag} | {r['prefill_ms']:.1f} | {r['prefill_tok_s']:,.0f} | "
        f"{r['step_ms']:.2f} | {r['decode_tok_s']:,.0f} | {r['total_tok_s']:,.0f} | "
        f"{r['cpu_tok_s']:,.0f} | {r['peak_gib']:.2f} |"
      )
  print(f"peak memory: {ours['peak_kind']} / {hf['peak_kind']}")
  print(
    f"ratio (ours / transformers): total {ro['total_tok_s'] / rh['total_tok_s']:.1f}x, "
    f"prefill {ro['prefill_tok_s'] / rh['prefill_tok_s']:.1f}x, "
    f"decode {ro['decode_tok_s'] / rh['decode_tok_s']:.1f}x; per CPU-second "
    f"{ro['cpu_tok_s'] / rh['cpu_tok_s']:.1f}x" + (" (round 1)" if args.rounds > 1 else "")
  )
  if args.rounds > 1:
    totals = [o["total_tok_s"] / h["total_tok_s"] for o, h in rated]
    each = ", ".join(f"{t:.1f}x" for t in totals)
    print(
      f"total ratio over {args.rounds} rounds: median {statistics.median(totals):.1f}x, "
      f"range {min(totals):.1f}-{max(totals):.1f}x ({each})"
    )
  if per_pair:
    calls = [m["hf"] / m["ours"] for m in per_pair]
    q = statistics.quantiles(calls, n=4) if len(calls) > 1 else calls * 3
    served = ", ".join(
      f"{k} {1e3 * r['served_total_s']:.1f} ms" for k, r in (("ours", ours), ("generate", hf))
    )
    print(
      f"interleaved: {args.interleave} pairs of {args.repeats}-call bursts per side (order "
      f"flipping every pair); median call over all bursts: {served}; per-pair ratio (whole "
      f"calls) median {statistics.median(calls):.1f}x, quartiles {q[0]:.1f}-{q[2]:.1f}x, range "
      f"{min(calls):.1f}-{max(calls):.1f}x; ours faster in {sum(c > 1 for c in calls)} of "
      f"{len(calls)} pairs"
    )
  cores = f"cores each side may use: ours {ours.get('cores')}, transformers {hf.get('cores')}"
  threads = "1 (single-threaded ops)" if args.threads == 1 else "framework default"
  print(f"threads: {threads}; {cores}")
  if ours["platform"] == "gpu":
    needed, read = kv_bytes_per_step(cfg, args, ours["itemsize"], ours["kv_chunk"])
    step_s = ro["step_ms"] / 1e3
    for label, kv in (("needed (weights + filled KV)", needed), ("read (whole chunks)", read)):
      by = ours["weight_bytes"] + kv
      print(
        f"roofline, {label}: {by / 1e9:.2f} GB/step -> {by / step_s / 1e12:.2f} TB/s = "
        f"{100 * by / step_s / args.peak_bw:.0f}% of {args.peak_bw / 1e12:.1f} TB/s"
      )


if __name__ == "__main__":
  main()
