"""critic_jax params -> a folder transformers' `from_pretrained` loads.

Writes `config.json` (+ `generation_config.json` for causal LMs), the weights as
safetensors (one file, or `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json` past `max_shard_size`), the tokenizer when one
is given, and `critic_jax_heads.safetensors` for what the HF class cannot hold
(a value head, a causal LM's reward head, a reward head's bias), which
`load_hf_params` reads back so a round trip is exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from critic_jax.interop.hf_config import (
  HFInteropError,
  export_layout,
  model_to_hf_config,
)
from critic_jax.interop.hf_tensors import View, tensor_views
from critic_jax.interop.hf_weights import HEADS_FILE
from critic_jax.models import ModelConfig
from critic_jax.parallel import strip_boxes

__all__ = ["save_hf", "char_tokenizer_to_hf", "EXPORT_DTYPES"]

log = logging.getLogger(__name__)

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
_HEAD_PARAMS = ("value_head", "reward_head", "lm_head")
_OWN_FILES = re.compile(
  r"model\.safetensors(\.index\.json)?|model-\d+-of-\d+\.safetensors|" + re.escape(HEADS_FILE)
)


def _np_dtype(name: str):
  import ml_dtypes

  return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def _host(x) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _flat(tree) -> dict[tuple[str, ...], Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(getattr(k, "key", k)) for k in p): x for p, x in leaves}


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise HFInteropError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB'")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
  return int(float(m.group(1)) * mult[unit])


def char_tokenizer_to_hf(tokenizer):
  """A `PreTrainedTokenizerFast` with the same ids as a `CharTokenizer` (BOS prepended).

  One WordLevel token per character (`<unk>` for others); the post-processor
  prepends `<bos>` as critic_jax's pipeline does, so `HFTokenizer` on the saved
  folder encodes exactly like the char tokenizer it came from.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {s: i for i, s in enumerate(tokenizer.specials)}
  vocab.update({c: i + len(tokenizer.specials) for i, c in enumerate(tokenizer.chars)})
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  tok.decoder = decoders.Fuse()
  tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tokenizer.bos_id)]
  )
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
    unk_token="<unk>",
  )  # fmt: skip


def _hf_tokenizer(tokenizer):
  """The transformers tokenizer behind `tokenizer` (HFTokenizer, CharTokenizer, folder...)."""
  from critic_jax.data.tokenizers import CharTokenizer, HFTokenizer

  if isinstance(tokenizer, HFTokenizer):
    return tokenizer.tok
  if isinstance(tokenizer, CharTokenizer):
    return char_tokenizer_to_hf(tokenizer)
  if isinstance(tokenizer, str | os.PathLike):
    return HFTokenizer(os.fspath(tokenizer)).tok
  if hasattr(tokenizer, "save_pretrained"):
    return tokenizer
  raise HFInteropError(
    f"cannot save a tokenizer of type {type(tokenizer).__name__}; pass an HFTokenizer, a "
    "CharTokenizer, a transformers tokenizer or a local tokenizer folder"
  )


def _write_weights(folder: str, tensors: dict[str, np.ndarray], max_shard: int) -> list[str]:
  from safetensors.numpy import save_file

  names = sorted(tensors)
  shards: list[list[str]] = [[]]
  size = 0
  for k in names:
    n = tensors[k].nbytes
    if shards[-1] and size + n > max_shard:
      shards.append([])
      size = 0
    shards[-1].append(k)
    size += n
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file({k: tensors[k] for k in names}, os.path.join(folder, "model.safetensors"), meta)
    return ["model.safetensors"]
  files, weight_map = [], {}
  for i, keys in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({k: tensors[k] for k in keys}, os.path.join(folder, file), meta)
    weight_map.update({k: file for k in keys})
    files.append(file)
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}  # fmt: skip
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return files


def save_hf(
  path: str | os.PathLike,
  params: Mapping[str, Any],
  model_config: ModelConfig,
  kind: str = "causal_lm",
  *,
  dtype: str | None = None,
  tokenizer: Any = None,
  family: str | None = None,
  bos_token_id: int | None = None,
  eos_token_id: int | None = None,
  pad_token_id: int | None = None,
  max_shard_size: int | str = "5GB",
) -> str:
  """Writes `params` as a transformers checkpoint folder that `from_pretrained` loads.

  Args:
    path: output folder (created; existing weight files in it are replaced).
    params: unboxed params of `Transformer(model_config)` (sharded arrays are
      gathered to the host; with several processes all must call this and
      process 0 writes).
    kind: "causal_lm" (`*ForCausalLM` / `GPT2LMHeadModel`, needs an LM head or
      tied embeddings) or "sequence_classification" (`*ForSequenceClassification`
      with num_labels=1; the reward head becomes `score`).
    dtype: "float32", "bfloat16" or "float16" for the weights and config
      (default: the params' own dtype).
    tokenizer: saved into the folder (an HFTokenizer, a CharTokenizer, which is
      converted, a transformers tokenizer or a local folder); its bos/eos/pad ids
      go into config.json unless given explicitly.
    family: "llama", "mistral", "qwen2", "qwen3" or "gpt2" (default:
      `infer_family(model_config)`).
    max_shard_size: bytes (or "5GB") per safetensors file before sharding.

  Returns:
    The HF architecture written (e.g. "Qwen2ForSequenceClassification").
  """
  folder = os.fspath(path)
  cfg = model_config
  lay = export_layout(cfg, family, kind)
  if kind == "causal_lm" and "lm" not in cfg.heads and not cfg.tie_embeddings:
    raise HFInteropError(f"kind='causal_lm' needs an LM head; model.heads={cfg.heads}")
  if kind == "sequence_classification" and "reward" not in cfg.heads:
    raise HFInteropError(
      f"kind='sequence_classification' needs a reward head; model.heads={cfg.heads}"
    )
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise HFInteropError(f"dtype={dtype!r} is not one of {EXPORT_DTYPES}")
  flat = _flat(strip_boxes(params))
  scanned = any(p[0] == "layers" for p in flat)
  views, hf_only = tensor_views(cfg.replace(scan_layers=scanned), lay)
  dtype = dtype or str(np.dtype(jax.tree.leaves(params)[0].dtype))
  np_dtype = _np_dtype(dtype)

  tensors: dict[str, np.ndarray] = {}

  def put(view: View, ours: np.ndarray | None) -> None:
    if view.key not in tensors:
      tensors[view.key] = np.zeros(view.hf_shape, np_dtype)
    if ours is not None:
      tensors[view.key][view.region()] = view.to_hf(ours).astype(np_dtype)

  side: dict[str, np.ndarray] = {}
  known = set()
  for p, src in views.items():
    if p not in flat:
      if all(v.key is None for v in (src if isinstance(src, list) else [src])):
        continue  # a slot HF does not have either
      raise HFInteropError(f"params have no {'/'.join(p)}, which {lay.architecture} needs")
    known.add(p)
    x = _host(flat[p])
    for i, view in enumerate(src if isinstance(src, list) else [src]):
      xi = x[i] if isinstance(src, list) else x
      if view.key is not None:
        put(view, xi)
      elif np.any(xi != 0):
        if p[0] in _HEAD_PARAMS:
          side["/".join(p)] = x
          log.warning(
            "%s is nonzero but %s has no such parameter: saved in %s (transformers' outputs "
            "differ from critic_jax's by it)", "/".join(p), lay.architecture, HEADS_FILE,
          )  # fmt: skip
          break
        raise HFInteropError(
          f"cannot export {'/'.join(p)} as {lay.architecture}: it is nonzero and "
          f"{lay.family} has no such parameter (choose another family)"
        )
  for view in hf_only:
    put(view, None)
  for p, x in flat.items():
    if p not in known:
      if p[0] not in _HEAD_PARAMS:
        raise HFInteropError(f"param {'/'.join(p)} has no place in {lay.architecture}")
      side["/".join(p)] = _host(x)

  ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
  hf_tok = None
  if tokenizer is not None:
    hf_tok = _hf_tokenizer(tokenizer)
    for k in ids:
      if ids[k] is None:
        ids[k] = getattr(hf_tok, k)
  if kind == "sequence_classification":
    if ids["pad_token_id"] is None:
      raise HFInteropError(
        "a sequence-classification export needs pad_token_id (transformers finds each row's "
        "last token by it): pass tokenizer= or pad_token_id="
      )
    if ids["pad_token_id"] == ids["eos_token_id"]:
      log.warning(
        "pad_token_id == eos_token_id (%s): transformers scores the last non-pad token, so a "
        "trailing EOS is skipped there but not in critic_jax; use a distinct pad token",
        ids["pad_token_id"],
      )

  if jax.process_index() != 0:
    return lay.architecture
  os.makedirs(folder, exist_ok=True)
  for f in os.listdir(folder):  # stale weights from an earlier export would mix in
    if _OWN_FILES.fullmatch(f):
      os.remove(os.path.join(folder, f))
  _write_weights(folder, tensors, _parse_size(max_shard_size))
  if side:
    from safetensors.numpy import save_file

    meta = {"format": "critic_jax", "model_config": json.dumps(_config_dict(cfg))}
    save_file({k: np.ascontiguousarray(v) for k, v in side.items()},
              os.path.join(folder, HEADS_FILE), meta)  # fmt: skip
  hf_cfg = model_to_hf_config(cfg, lay, dtype=dtype, **ids)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2, sort_keys=True)
  if kind == "causal_lm":
    gen = {k: v for k, v in ids.items() if v is not None}
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2, sort_keys=True)
  if hf_tok is not None:
    hf_tok.save_pretrained(folder)
  log.info("wrote %s (%d tensors, %s) to %s", lay.architecture, len(tensors), dtype, folder)
  return lay.architecture


def _config_dict(cfg: ModelConfig) -> dict:
  d = dataclasses.asdict(cfg)
  d["heads"] = list(cfg.heads)
  return d
