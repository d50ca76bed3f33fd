"""Config sections shared by every trainer's config."""

from __future__ import annotations

import ml_collections
from ml_collections import FieldReference

from critic_jax.parallel import DEFAULT_RULES

__all__ = ["mesh", "distributed", "optimizer", "train", "sharding_rules", "init"]


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 takes the remaining devices."""
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def sharding_rules():
  """Logical axis -> mesh axes (see critic_jax/parallel/mesh.py)."""
  return tuple(DEFAULT_RULES)


def distributed() -> ml_collections.ConfigDict:
  """Multi-host start-up. enabled: "auto" (cluster env detected), True or False."""
  return ml_collections.ConfigDict(
    {
      "enabled": FieldReference("auto", field_type=object),
      "coordinator_address": FieldReference(None, field_type=str),
      "num_processes": FieldReference(None, field_type=int),
      "process_id": FieldReference(None, field_type=int),
      "cpu_collectives": FieldReference(None, field_type=str),
    }
  )


def optimizer(lr: float = 3e-4, **kw) -> ml_collections.ConfigDict:
  d = dict(
    name="adamw", lr=lr, schedule="cosine", warmup_steps=100, end_lr_ratio=0.1,
    weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, accum_steps=1,
  )  # fmt: skip
  d.update(kw)
  return ml_collections.ConfigDict(d)


def train(num_steps: int, **kw) -> ml_collections.ConfigDict:
  d = dict(
    num_steps=num_steps, log_every=50, eval_every=500, ckpt_every=500, keep_checkpoints=3,
    async_checkpoint=True, progress_bar=True,
  )  # fmt: skip
  d.update(kw)
  return ml_collections.ConfigDict(d)


def init(hf_path: str = "", **kw) -> ml_collections.ConfigDict:
  """Where the weights start from.

  hf_path: a local transformers checkpoint folder (config.json + safetensors of a
  Llama/Mistral/Qwen2/Qwen3/GPT-2 causal LM, or their *ForSequenceClassification
  for a reward model) whose architecture and weights replace the random init;
  `config.model` then only chooses the runtime fields (heads, dtypes, remat,
  scan_layers, attention_impl, scalar_head_init). "" = random init. Extra
  keyword arguments add trainer-specific fields (e.g. `checkpoint=""`).
  """
  return ml_collections.ConfigDict({"hf_path": hf_path, **kw})
