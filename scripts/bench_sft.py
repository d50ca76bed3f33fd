"""SFT train-step throughput: critic_jax vs a plain PyTorch + transformers loop, in one run.

    python scripts/bench_sft.py --torch                          # CPU, small Llama shape
    python scripts/bench_sft.py --torch --preset sft_arith --batch 128 --seq 12  # the main job
    python scripts/bench_sft.py --preset llama_0.9b --batch 8 --seq 2048 \
        --dtype bfloat16 --attention cudnn --remat dots_no_batch --torch   # H100

Both sides train the same Llama-shaped model (random init) with AdamW on the
same batch and sequence length; the loss covers every token. With --dtype bfloat16
critic_jax keeps float32 parameters and computes in bfloat16; PyTorch runs twice, with
bfloat16 weights and with float32 weights under `torch.autocast` (bfloat16), and the ratio
is taken to the faster of the two. Each side runs in its own child process (`--side`;
`scripts/benchlib.py`), so on a GPU JAX's preallocated pool and PyTorch's allocator never
share the device's memory, and the parent initialises neither. Prints tokens/s,
step time, model FLOPs utilisation (6N + attention FLOPs per token over the
chip's peak, when --peak_tflops is known; N without the input embedding, and again with it,
as ENVIRONMENT.md's PyTorch anchor counts) and the ratio.

On a shared CPU machine use `--interleave PAIRS` (e.g. `--steps 5 --interleave 20`): both
sides stay alive and run alternating bursts of --steps steps, and the ratio is the median
of the per-pair ratios. This VM has slow spells of several seconds (measured: a process's
steps at 48 ms for ~6 s, then 34 ms, both worker threads busy on their own cores throughout),
which separate processes run one after another (`--rounds`) put on one side only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
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

from critic_jax.hostmem import keep_freed_memory  # noqa: E402
from critic_jax.models import ModelConfig, Transformer  # noqa: E402
from critic_jax.parallel import DEFAULT_RULES, batch_sharding, make_mesh  # noqa: E402
from critic_jax.train.optim import make_optimizer  # noqa: E402
from critic_jax.train.sft import make_train_step  # noqa: E402
from critic_jax.train.state import init_train_state  # noqa: E402

SKIP = ("side", "timeout", "rounds", "autocast", "interleave", "gap")  # the parent's own flags
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument(
    "--preset", default="bench_small",
    help="model preset, bench_small, or sft_arith (the main job's model: configs/sft_arith.py)",
  )  # fmt: skip
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "blocked"])
  p.add_argument("--attention-block", type=int, default=64, help="queries per block (blocked)")
  p.add_argument("--remat", default="none")
  p.add_argument("--scan", action="store_true", help="scan over layers")
  p.add_argument(
    "--matmul-grad", default="auto", choices=["auto", "autodiff", "transpose_smaller"],
    help="model.matmul_grad: how weight-matmul backward passes are built",
  )  # fmt: skip
  p.add_argument(
    "--swiglu-recompute", action="store_true",
    help="model.swiglu_recompute: the backward recomputes SwiGLU's sigmoid (see layers.swiglu)",
  )  # fmt: skip
  p.add_argument("--torch", action="store_true", help="also run the PyTorch baseline")
  p.add_argument(
    "--no-autocast", dest="autocast", action="store_false",
    help="bfloat16: skip PyTorch's float32-weights autocast loop (run only bfloat16 weights)",
  )  # fmt: skip
  p.add_argument(
    "--peak-tflops", "--peak_tflops", dest="peak_tflops", type=float, default=None,
    help="chip peak for MFU",
  )  # fmt: skip
  p.add_argument(
    "--side", default="both", choices=("both", "jax", "torch", "autocast"),
    help="both: run each side in its own child process (the default); else run that one here",
  )  # fmt: skip
  p.add_argument("--timeout", type=float, default=1800.0, help="per side, seconds")
  add_rounds_flag(p)
  add_interleave_flags(p)
  add_profile_flag(p)
  args = p.parse_args(argv)
  if args.interleave and args.rounds > 1:
    p.error("--interleave and --rounds are two ways to repeat the comparison: pick one")
  return args


def model_config(args) -> ModelConfig:
  if args.preset == "bench_small":
    # A small Llama shape that a 2-core CPU trains in about a second per step.
    cfg = ModelConfig(
      vocab_size=2048, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, mlp_dim=704,
      norm_eps=1e-5, max_seq_len=4096,
    )  # fmt: skip
  elif args.preset == "sft_arith":
    from configs.sft_arith import get_config

    cfg = ModelConfig.from_dict(get_config().model, where="configs/sft_arith.py model")
  else:
    cfg = ModelConfig.preset(args.preset)
  return cfg.replace(
    dtype=args.dtype,
    attention_impl=args.attention,
    attention_block=args.attention_block,
    remat=args.remat,
    scan_layers=args.scan,
    matmul_grad=args.matmul_grad,
    swiglu_recompute=args.swiglu_recompute,
  )


def batch_np(args, vocab):
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, vocab, (args.batch, args.seq)).astype(np.int32)
  return {
    "tokens": tokens,
    "segment_ids": np.ones_like(tokens),
    "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1)),
    "loss_mask": np.ones(tokens.shape, bool),
  }


def time_steps(run_step, sync, warmup, steps):
  for _ in range(warmup):
    run_step()
  sync()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run_step()
    sync()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_jax(args, cfg):
  model = Transformer(cfg)
  opt = {"name": "adamw", "lr": 1e-4, "warmup_steps": 0, "clip_norm": 1.0, "weight_decay": 0.0}
  tx, sched = make_optimizer(opt, 1000)
  mesh = make_mesh({"data": -1})
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    t0 = time.perf_counter()
    state, shardings = init_train_state(
      lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], tx, jax.random.PRNGKey(0),
      mesh, DEFAULT_RULES,
    )  # fmt: skip
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    step = jax.jit(
      make_train_step(model, tx, sched, "sft", 1, packed=False),
      in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
      donate_argnums=(0,),
    )  # fmt: skip
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim))
             for k, v in batch_np(args, cfg.vocab_size).items()}  # fmt: skip
    box = {"state": state, "metrics": None}
    t0 = time.perf_counter()
    box["state"], box["metrics"] = step(box["state"], batch)
    jax.block_until_ready(box["metrics"])
    compile_s = time.perf_counter() - t0

    def run():
      box["state"], box["metrics"] = step(box["state"], batch)

    sync = lambda: jax.block_until_ready(box["metrics"])  # noqa: E731
    dt = measure(args, run, sync, args.warmup, args.steps, time_steps)
    loss = float(box["metrics"]["loss"])  # read before any traced steps: the step it reports
    if args.profile:
      profile_runs(args.profile, run, sync, args.profile_runs)
  return dt, compile_s, loss, init_s


def bench_torch(args, cfg, autocast=False):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  if dev == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = LlamaConfig(
    vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
    rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
    attn_implementation="sdpa",
  )  # fmt: skip
  # bf16 weights, or (autocast) float32 weights with bf16 matmuls as critic_jax computes.
  dtype = torch.bfloat16 if args.dtype == "bfloat16" and not autocast else torch.float32
  with torch.device(dev):  # initialised on the device: no host-side init of a large model
    model = LlamaForCausalLM(hf_cfg).to(dtype=dtype)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  tokens = torch.from_numpy(batch_np(args, cfg.vocab_size)["tokens"].astype(np.int64)).to(dev)

  box = {}

  def run():
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
      out = model(input_ids=tokens, labels=tokens)
    box["loss"] = out.loss.detach()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  # One more warm-up step than the steps timed, like the JAX side's compile step: both losses
  # are then read at the same step.
  return measure(args, run, sync, args.warmup + 1, args.steps, time_steps), float(box["loss"])


def run_side_here(args) -> dict:
  """One side, in this process (a child of `main`)."""
  keep_freed_memory()
  cfg = model_config(args)
  if args.side == "jax":
    dt, compile_s, loss, init_s = bench_jax(args, cfg)
    dev = jax.devices()[0]
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")  # GPUs; None on the CPU
    return dict(step_s=dt, compile_s=compile_s, init_s=init_s, loss=loss, peak_bytes=peak,
                device=dev.device_kind, devices=jax.device_count())  # fmt: skip
  import torch

  dt, loss = bench_torch(args, cfg, autocast=args.side == "autocast")
  return dict(step_s=dt, loss=loss, device="cuda" if torch.cuda.is_available() else "cpu")


def main():
  args = parse()
  if args.side != "both":
    print_result(run_side_here(args))
    return
  cfg = model_config(args)
  tokens = args.batch * args.seq
  flops = cfg.flops_per_token(args.seq) * tokens
  # ENVIRONMENT.md's PyTorch anchor (36% MFU) counts 6N over all parameters, the input
  # embedding's too (a lookup, no matmul); both counts are printed.
  flops_all = flops + 6 * (cfg.num_params() - cfg.num_params(include_embeddings=False)) * tokens

  def side(name, i):
    argv = forward_args(args, skip=SKIP)
    return side_or_none(i, name, lambda: run_side(__file__, name, argv, timeout=args.timeout))

  # Alternate the sides round by round, so that a slow spell of the machine hits both.
  names = ["jax"] + (["torch"] if args.torch else [])
  names += ["autocast"] if args.torch and args.dtype == "bfloat16" and args.autocast else []
  per_pair = []
  if args.interleave:
    argv = forward_args(args, skip=SKIP)
    results, per_pair = interleave_sides(
      __file__, names, argv, pairs=args.interleave, per=args.steps, gap=args.gap,
      timeout=args.timeout,
    )  # fmt: skip
    rounds = [results]
  else:
    rounds = [{n: side(n, i) for n in names} for i in range(args.rounds)]
  exit_if_failed(rounds)
  ours = rounds[0]["jax"]
  peak = args.peak_tflops
  if peak is None:
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in ours["device"]), None)
  print(
    f"device: {ours['device']} x{ours['devices']}; model: {cfg.num_params() / 1e6:.1f}M "
    f"params, batch {args.batch} x {args.seq} tokens, {args.dtype}, attention {args.attention}"
  )

  def line(name, dt, loss=None):
    mfu = ""
    if peak:
      mfu = (
        f", MFU {100 * flops / dt / (peak * 1e12):.1f}% "
        f"({100 * flops_all / dt / (peak * 1e12):.1f}% counting embeddings)"
      )
    done = args.warmup + 1 + args.steps * (args.interleave or 1)
    end = "" if loss is None else f", loss {loss:.3f} after {done} steps"
    print(
      f"{name:>10}: {dt * 1e3:9.1f} ms/step, {tokens / dt:10.0f} tokens/s, "
      f"{flops / dt / 1e12:.3f} TFLOP/s{mfu}{end}"
    )

  labels = {"jax": "critic_jax", "torch": "pytorch", "autocast": "autocast"}
  ratios = []
  for i, r in enumerate(rounds):
    if args.rounds > 1:
      print(f"round {i + 1} of {args.rounds}:")
    j = r["jax"]
    mem = f"; device peak {j['peak_bytes'] / 2**30:.2f} GiB" if j.get("peak_bytes") else ""
    print(
      f"critic_jax compile + first step {j['compile_s']:.1f} s (state initialised in "
      f"{j['init_s']:.1f} s; process {j['process_s']:.0f} s{mem})"
    )
    for n in names:
      line(labels[n], r[n]["step_s"], r[n].get("loss"))
    if args.torch:  # bfloat16: the ratio is to the faster PyTorch loop
      ratios.append(min(r[n]["step_s"] for n in names[1:]) / r["jax"]["step_s"])
      print(f"ratio (critic_jax tokens/s over PyTorch tokens/s): {ratios[-1]:.2f}x")
  if args.interleave and args.torch:
    pair_ratios = [min(m[n] for n in names[1:]) / m["jax"] for m in per_pair]
    q = statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) > 1 else pair_ratios * 3
    print(
      f"interleaved: {args.interleave} pairs of {args.steps}-step bursts per side (order "
      f"flipping every pair; the lines above: the median of every timed step); per-pair ratio "
      f"median {statistics.median(pair_ratios):.2f}x, quartiles {q[0]:.2f}-{q[2]:.2f}x, range "
      f"{min(pair_ratios):.2f}-{max(pair_ratios):.2f}x; critic_jax faster in "
      f"{sum(r > 1 for r in pair_ratios)} of {len(pair_ratios)} pairs"
    )
  if args.rounds > 1:
    med = {n: statistics.median(r[n]["step_s"] for r in rounds) for n in names}
    print(f"median of {args.rounds} rounds:")
    for n in names:
      line(labels[n], med[n])
    if ratios:
      print(
        f"ratio over {args.rounds} rounds: median {statistics.median(ratios):.2f}x, "
        f"range {min(ratios):.2f}-{max(ratios):.2f}x"
      )


if __name__ == "__main__":
  main()
