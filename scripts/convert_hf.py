"""Converts between Hugging Face checkpoint folders and critic_jax.

    # HF folder -> critic_jax params (orbax) + critic_jax_model.json
    python scripts/convert_hf.py to_jax --hf=/models/qwen2-0.5b --out=/ckpt/qwen_jax \
        [--heads=lm,value] [--param_dtype=bfloat16]
    # a trainer's workdir (latest checkpoint, or --step) -> HF folder for from_pretrained
    python scripts/convert_hf.py to_hf --workdir=runs/sft --out=runs/sft/hf \
        [--kind=causal_lm|sequence_classification] [--dtype=bfloat16] [--family=qwen2] \
        [--tokenizer=/models/qwen2-0.5b|char|none] [--step=1000]
    # a to_jax folder -> HF folder
    python scripts/convert_hf.py to_hf --params=/ckpt/qwen_jax --out=/export/qwen_hf

For a workdir, the model config is `config.model` from its config.json, with the
architecture taken from `config.init.hf_path` when the run started from an HF
folder (or from --hf_config). The tokenizer defaults to the run's own
(`config.tokenizer`; the char tokenizer is converted to an HF one).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from critic_jax.interop import (  # noqa: E402
  HFInteropError,
  hf_family,
  hf_to_model_config,
  load_hf_params,
  model_config_from_hf,
  save_hf,
)
from critic_jax.interop.hf_export import EXPORT_DTYPES  # noqa: E402
from critic_jax.interop.hf_weights import abstract_params  # noqa: E402
from critic_jax.models import ModelConfig  # noqa: E402
from critic_jax.parallel import strip_boxes  # noqa: E402

MODEL_FILE = "critic_jax_model.json"
log = logging.getLogger("convert_hf")


def _config_dict(cfg: ModelConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d["heads"] = list(cfg.heads)
  return d


def hf_to_jax(hf: str, out: str, heads: tuple[str, ...] | None = None, param_dtype=None) -> None:
  """HF folder -> `out/params` (orbax) and `out/critic_jax_model.json`."""
  import orbax.checkpoint as ocp

  overrides = {}
  if heads:
    overrides["heads"] = tuple(heads)
  if param_dtype:
    overrides["param_dtype"] = param_dtype
  cfg = hf_to_model_config(hf, **overrides)
  params = load_hf_params(hf, cfg)
  os.makedirs(out, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(os.path.join(out, "params")), params, force=True)
  ckptr.wait_until_finished()
  meta = {"model_config": _config_dict(cfg), "hf_family": hf_family(hf), "hf_path": hf}
  with open(os.path.join(out, MODEL_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  print(f"wrote critic_jax params of {hf} to {out}")


def _restore_params_dir(folder: str) -> tuple[dict, ModelConfig, str | None]:
  import orbax.checkpoint as ocp

  file = os.path.join(folder, MODEL_FILE)
  if not os.path.isfile(file):
    raise HFInteropError(f"{folder!r} has no {MODEL_FILE}; was it written by `to_jax`?")
  with open(file) as f:
    meta = json.load(f)
  cfg = ModelConfig.from_dict(meta["model_config"])
  target = strip_boxes(abstract_params(cfg))
  params = ocp.StandardCheckpointer().restore(
    os.path.abspath(os.path.join(folder, "params")), target
  )
  return params, cfg, meta.get("hf_family")


def _workdir_model(workdir: str, hf_config: str | None) -> tuple[ModelConfig, str | None, dict]:
  file = os.path.join(workdir, "config.json")
  if not os.path.isfile(file):
    raise HFInteropError(f"{workdir!r} has no config.json; is it a critic_jax trainer workdir?")
  with open(file) as f:
    run = json.load(f)
  hf_path = hf_config or (run.get("init") or {}).get("hf_path") or ""
  if hf_path:
    if not os.path.exists(hf_path):
      raise HFInteropError(
        f"the run started from HF folder {hf_path!r}, which is gone; pass --hf_config=<a folder "
        "with the same config.json>"
      )
    return model_config_from_hf(hf_path, run["model"]), hf_family(hf_path), run
  return ModelConfig.from_dict(run["model"], where="config.model"), None, run


def _restore_workdir(workdir: str, step: int | None) -> tuple[dict, int]:
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  mngr = ocp.CheckpointManager(directory, item_names=("state", "data"))
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise HFInteropError(
      f"no checkpoint {'' if step is None else step} in {directory} "
      f"(have steps {list(mngr.all_steps())})"
    )
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return state["params"], step


def _tokenizer(spec: str | None, run: dict | None):
  from critic_jax.data import make_tokenizer

  if spec == "none":
    return None
  if spec == "char":
    return make_tokenizer("char")
  if spec:
    return spec  # a local folder
  tok = (run or {}).get("tokenizer") or {}
  if tok.get("name") == "hf" and tok.get("path"):
    return tok["path"]
  if tok.get("name") == "char":
    return make_tokenizer("char")
  return None


def jax_to_hf(
  out: str,
  *,
  workdir: str | None = None,
  params_dir: str | None = None,
  step: int | None = None,
  kind: str = "causal_lm",
  dtype: str | None = None,
  family: str | None = None,
  tokenizer: str | None = None,
  hf_config: str | None = None,
  max_shard_size: str = "5GB",
) -> str:
  """A trainer workdir or a `to_jax` folder -> an HF folder; returns the architecture."""
  if (workdir is None) == (params_dir is None):
    raise HFInteropError("give exactly one of --workdir and --params")
  run = None
  if workdir is not None:
    cfg, fam, run = _workdir_model(workdir, hf_config)
    params, step = _restore_workdir(workdir, step)
    log.info("exporting step %d of %s", step, workdir)
  else:
    params, cfg, fam = _restore_params_dir(params_dir)
  arch = save_hf(
    out, params, cfg, kind, dtype=dtype, family=family or fam, tokenizer=_tokenizer(tokenizer, run),
    max_shard_size=max_shard_size,
  )  # fmt: skip
  print(f"wrote {arch} to {out}")
  return arch


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to_jax", help="HF folder -> critic_jax params")
  a.add_argument("--hf", required=True, help="local HF checkpoint folder")
  a.add_argument("--out", required=True)
  a.add_argument("--heads", default="", help="comma-separated heads, e.g. lm,value")
  a.add_argument("--param_dtype", default=None, choices=["float32", "bfloat16"])
  b = sub.add_parser("to_hf", help="critic_jax checkpoint -> HF folder")
  src = b.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a trainer workdir (config.json + checkpoints/)")
  src.add_argument("--params", help="a folder written by to_jax")
  b.add_argument("--out", required=True)
  b.add_argument("--step", type=int, default=None)
  b.add_argument("--kind", default="causal_lm", choices=["causal_lm", "sequence_classification"])
  b.add_argument("--dtype", default=None, choices=list(EXPORT_DTYPES))
  b.add_argument("--family", default=None, choices=["llama", "mistral", "qwen2", "qwen3", "gpt2"])
  b.add_argument("--tokenizer", default=None, help="tokenizer folder, 'char' or 'none'")
  b.add_argument("--hf_config", default=None, help="HF folder giving the architecture")
  b.add_argument("--max_shard_size", default="5GB")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  if args.cmd == "to_jax":
    heads = tuple(h for h in args.heads.split(",") if h) or None
    hf_to_jax(args.hf, args.out, heads, args.param_dtype)
  else:
    jax_to_hf(
      args.out, workdir=args.workdir, params_dir=args.params, step=args.step, kind=args.kind,
      dtype=args.dtype, family=args.family, tokenizer=args.tokenizer, hf_config=args.hf_config,
      max_shard_size=args.max_shard_size,
    )  # fmt: skip


if __name__ == "__main__":
  main()
