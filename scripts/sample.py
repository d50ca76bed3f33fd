"""Samples from a policy: a critic_jax training workdir's checkpoint, or a Hugging Face folder.

    python scripts/sample.py --workdir=runs/sft_arith --prompt="12+34=" --num-samples=4
    python scripts/sample.py --workdir=runs/sft_arith --task-eval=200 --method=greedy
    python scripts/sample.py --hf=path/to/hf_folder --prompts-file=prompts.jsonl \
        --method=top_p --top-p=0.9 --max-new-tokens=256 --output=samples.jsonl

Prompts come from --prompt (repeatable), --prompts-file (.txt: one per line;
.jsonl: a "prompt" field per line) or, for a workdir trained on a task,
--task-eval=N held-out task problems, which are then scored by the task's
verifier in a `RewardPool` (accuracy printed). From a workdir the latest
checkpoint (or --step) is restored: only its params, sharded over the mesh.
Results go to --output as JSONL (one line per sample) and the first few are
printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a critic_jax training workdir (config.json + checkpoints/)")
  src.add_argument("--hf", help="a local Hugging Face model folder (config.json, safetensors)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts-file", default="", help=".txt (one per line) or .jsonl ('prompt')")
  p.add_argument("--task-eval", type=int, default=0, help="N held-out problems of the task")
  p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (G)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--method", default="temperature", help="greedy|temperature|top_k|top_p|min_p")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--min-p", type=float, default=0.0)
  p.add_argument("--batch-size", type=int, default=64, help="prompts per device batch")
  p.add_argument(
    "--kv-chunk", type=int, default=0,
    help="generated-KV chunk in slots (0: GenerationConfig's 'auto')",
  )  # fmt: skip
  p.add_argument("--dtype", default="", help="compute dtype override (float32|bfloat16)")
  p.add_argument("--mesh", default="data=-1", help="e.g. data=2,fsdp=2,tensor=2")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--verifier-timeout", type=float, default=5.0)
  p.add_argument("--output", default="", help="write one JSON line per sample here")
  p.add_argument("--show", type=int, default=5, help="print this many samples")
  return p.parse_args(argv)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    with open(args.prompts_file) as f:
      if args.prompts_file.endswith(".jsonl"):
        for i, line in enumerate(f):
          if line.strip():
            row = json.loads(line)
            if "prompt" not in row:
              raise SystemExit(f"{args.prompts_file}:{i + 1}: no 'prompt' field")
            prompts.append(row["prompt"])
      else:
        prompts.extend(line.rstrip("\n") for line in f if line.strip())
  return prompts


def load_workdir(args, mesh, rules_default):
  """(model config, tokenizer, sharded params, train config) from a training workdir."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import orbax.checkpoint as ocp

  from critic_jax.data import make_tokenizer
  from critic_jax.models import Transformer
  from critic_jax.parallel import logical_to_sharding, rules_from_config, strip_boxes
  from critic_jax.train.common import model_config_from

  with open(os.path.join(args.workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tok_cfg = config.tokenizer
  tokenizer = make_tokenizer(tok_cfg.name, tok_cfg.get("path") or None)
  mcfg = model_config_from(config, tokenizer.vocab_size)
  if args.dtype:
    mcfg = mcfg.replace(dtype=args.dtype)
  rules = (
    rules_from_config(config.get("sharding_rules", None))
    if rules_default is None
    else rules_default
  )
  model = Transformer(mcfg)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  )
  shardings = logical_to_sharding(abstract, mesh, rules)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    strip_boxes(abstract),
    shardings,
  )
  mngr = ocp.CheckpointManager(os.path.join(args.workdir, "checkpoints"), item_names=("state",))
  step = args.step if args.step is not None else mngr.latest_step()
  if step is None:
    raise SystemExit(f"no checkpoint in {args.workdir}/checkpoints")
  restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
  out = mngr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
      )
    ),
  )
  mngr.close()
  print(f"restored params of step {step} from {args.workdir}")
  return mcfg, tokenizer, out["state"]["params"], config, rules


def load_hf(args, mesh, rules):
  """(model config, tokenizer, sharded params) from a Hugging Face folder."""
  from critic_jax.data import HFTokenizer
  from critic_jax.interop.hf import hf_to_model_config, load_hf_params

  overrides = {"dtype": args.dtype} if args.dtype else {}
  mcfg = hf_to_model_config(args.hf, **overrides)
  params = load_hf_params(args.hf, mcfg, mesh, rules)
  return mcfg, HFTokenizer(args.hf), params


def main(argv=None):
  args = parse_args(argv)
  from critic_jax.hostmem import keep_freed_memory

  keep_freed_memory()
  import jax
  import numpy as np
  import tqdm

  from critic_jax.data import make_task
  from critic_jax.models import Transformer
  from critic_jax.parallel import DEFAULT_RULES, make_mesh
  from critic_jax.sampler import (
    GenerationConfig,
    RewardPool,
    Sampler,
    SamplingConfig,
    generate_rollouts,
  )

  mesh_cfg = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(",") if kv)}
  mesh = make_mesh(mesh_cfg)
  config = None
  if args.workdir:
    mcfg, tokenizer, params, config, rules = load_workdir(args, mesh, None)
  else:
    rules = DEFAULT_RULES
    mcfg, tokenizer, params = load_hf(args, mesh, rules)

  prompts = read_prompts(args)
  examples, verifier = None, None
  if args.task_eval:
    if config is None or not config.task.get("name"):
      raise SystemExit("--task-eval needs a --workdir trained on a task")
    if prompts:
      raise SystemExit("--task-eval samples the task's problems: drop --prompt/--prompts-file")
    task = make_task(config.task.name, **config.task.kwargs)
    examples = task.eval_examples(args.task_eval, seed=config.seed)
    prompts = [e.prompt for e in examples]
    verifier = TaskVerifier(task)
  if not prompts:
    raise SystemExit("no prompts: pass --prompt, --prompts-file or --task-eval")

  sampling = SamplingConfig(
    args.method, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
    min_p=args.min_p,
  )  # fmt: skip
  gen = GenerationConfig(
    max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=(tokenizer.eos_id,),
    pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size, kv_chunk=args.kv_chunk or "auto",
  )  # fmt: skip
  sampler = Sampler(Transformer(mcfg), gen, mesh=mesh, rules=rules)
  pool = RewardPool(verifier, timeout_s=args.verifier_timeout) if verifier else None
  bar = tqdm.tqdm(total=len(prompts), desc="sampling", unit="prompt", dynamic_ncols=True)
  try:
    rollouts, metrics = generate_rollouts(
      sampler, params, prompts, tokenizer, jax.random.key(args.seed),
      num_samples=args.num_samples, batch_size=args.batch_size, reward_pool=pool,
      examples=examples, progress=lambda n: bar.update(n - bar.n),
    )  # fmt: skip
  finally:
    bar.close()
    if pool is not None:
      pool.close()

  lengths = rollouts.response_mask.sum(1)
  logp = (rollouts.logprobs * rollouts.response_mask).sum(1)
  rows = []
  for i in range(len(rollouts.texts)):
    row = {
      "prompt": prompts[rollouts.group[i]],
      "sample": int(i % rollouts.group_size),
      "completion": rollouts.texts[i],
      "finished": bool(rollouts.finished[i]),
      "num_tokens": int(lengths[i]),
      "logprob": float(logp[i]),
    }
    if rollouts.rewards is not None:
      row["reward"] = float(rollouts.rewards[i])
      row["reward_failed"] = bool(rollouts.reward_failed[i])
    rows.append(row)
  if args.output:
    with open(args.output, "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} samples to {args.output}")
  for row in rows[: args.show]:
    print(json.dumps(row))
  print(", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
  if verifier is not None:
    scored = np.asarray([r["reward"] for r in rows])
    print(f"task accuracy over {len(scored)} samples: {100 * scored.mean():.1f}%")


class TaskVerifier:
  """Reward 1.0 when the task's exact-match scorer accepts the completion (picklable)."""

  def __init__(self, task):
    self.task = task

  def __call__(self, prompt, completion, example) -> float:
    return float(self.task.score(example, completion))


if __name__ == "__main__":
  main()
