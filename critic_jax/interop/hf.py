"""Hugging Face transformers interop: the public entry points in one place.

    cfg = hf_to_model_config("ckpt/")                    # config.json -> ModelConfig
    params = load_hf_params("ckpt/", cfg, mesh, rules)   # sharded straight from safetensors
    save_hf("out/", params, cfg, kind="causal_lm", dtype="bfloat16", tokenizer=tok)

Supported: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM`, `GPT2LMHeadModel` and the matching
`*ForSequenceClassification` (num_labels=1; `score` <-> our reward head).
Nothing here downloads: every path is a local folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from critic_jax.interop.hf_config import (
  ARCHITECTURES,
  FAMILIES,
  RUNTIME_FIELDS,
  HFInteropError,
  export_layout,
  hf_layout,
  hf_to_model_config,
  infer_family,
  model_config_from_hf,
  model_to_hf_config,
  read_hf_config,
)
from critic_jax.interop.hf_export import char_tokenizer_to_hf, save_hf
from critic_jax.interop.hf_weights import HEADS_FILE, SafetensorsCheckpoint, load_hf_params
from critic_jax.models import ModelConfig

__all__ = [
  "ARCHITECTURES",
  "FAMILIES",
  "HEADS_FILE",
  "RUNTIME_FIELDS",
  "HFInteropError",
  "SafetensorsCheckpoint",
  "char_tokenizer_to_hf",
  "export_layout",
  "hf_family",
  "hf_to_model_config",
  "infer_family",
  "init_from_hf",
  "load_hf_params",
  "model_config_from_hf",
  "model_to_hf_config",
  "read_hf_config",
  "save_hf",
]


def hf_family(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> str:
  """The family ("llama", "mistral", "qwen2", "qwen3", "gpt2") of an HF checkpoint."""
  return hf_layout(path_or_dict).family


def init_from_hf(
  hf_path: str | os.PathLike,
  model: ModelConfig | Mapping[str, Any] | None,
  mesh: Mesh | None = None,
  rules: Sequence | None = None,
  rng: jax.Array | None = None,
) -> tuple[ModelConfig, dict]:
  """What a trainer needs for `config.init.hf_path`: (model config, sharded params).

  The architecture comes from the checkpoint, the runtime fields
  (`RUNTIME_FIELDS`: heads, dtypes, remat, scan_layers, attention_impl,
  scalar_head_init) from `model` (usually `config.model`). Heads the checkpoint
  lacks (a value head, or a reward head on a causal LM) are initialised from
  `rng`.
  """
  cfg = model_config_from_hf(hf_path, model)
  return cfg, load_hf_params(hf_path, cfg, mesh, rules, rng=rng)
