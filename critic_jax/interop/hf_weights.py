"""Safetensors checkpoints of transformers models -> critic_jax params, sharded or not.

Every leaf is read through its `View` (critic_jax.interop.hf_tensors). With a
mesh, each leaf is built by `jax.make_array_from_callback`: a device's callback
maps its index through the view and reads only that region of the file
(safetensors `get_slice`, memory-mapped), so no device ever holds, and no host
ever reads, a whole sharded tensor; devices holding the same (replicated) block
share one read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from critic_jax.interop.hf_config import (
  RUNTIME_FIELDS,
  HFInteropError,
  HFLayout,
  hf_layout,
  hf_to_model_config,
  read_hf_config,
)
from critic_jax.interop.hf_tensors import Path, View, base_prefix, tensor_views
from critic_jax.models import ModelConfig, Transformer
from critic_jax.models.transformer import ScalarHead
from critic_jax.parallel import DEFAULT_RULES, logical_to_sharding, strip_boxes

__all__ = ["HEADS_FILE", "SafetensorsCheckpoint", "load_hf_params", "abstract_params"]

log = logging.getLogger(__name__)

# Our heads that HF classes cannot hold (value head, a causal LM's reward head,
# a reward model's bias) are saved beside the HF weights in this file.
HEADS_FILE = "critic_jax_heads.safetensors"
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias")
_DROPPABLE_HEADS = ("lm_head.weight", "score.weight")


class SafetensorsCheckpoint:
  """Lazy, memory-mapped reader of `model.safetensors` or a sharded index in a folder."""

  def __init__(self, folder: str | os.PathLike):
    self.folder = os.fspath(folder)
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, Any] = {}
    index = os.path.join(self.folder, "model.safetensors.index.json")
    single = os.path.join(self.folder, "model.safetensors")
    if os.path.isfile(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFInteropError(
          f"{index}: not a safetensors index with a 'weight_map' ({e})"
        ) from None
      missing = sorted({f for f in weight_map.values() if not self._exists(f)})
      if missing:
        raise HFInteropError(
          f"{index} lists shard file(s) {', '.join(missing)} that are not in {self.folder!r}"
        )
      self.weight_map = dict(weight_map)
      for file in sorted(set(weight_map.values())):
        have = set(self._open(file).keys())
        lost = [k for k, v in weight_map.items() if v == file and k not in have]
        if lost:
          raise HFInteropError(
            f"{index} maps {lost[:5]} to {file}, but that file does not hold them"
          )
    elif os.path.isfile(single):
      self.weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
    else:
      found = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
      hint = ""
      if any(f.endswith(".bin") or f.endswith(".bin.index.json") for f in found):
        hint = (
          " It holds PyTorch pickles (*.bin): critic_jax reads only safetensors; convert with "
          "`AutoModelForCausalLM.from_pretrained(p).save_pretrained(p)` (safetensors by default)."
        )
      raise HFInteropError(
        f"no model.safetensors or model.safetensors.index.json in {self.folder!r} "
        f"(found: {', '.join(found[:20]) or 'nothing'}).{hint}"
      )

  def _exists(self, file: str) -> bool:
    return os.path.isfile(os.path.join(self.folder, file))

  def _open(self, file: str):
    if file not in self._handles:
      from safetensors import safe_open

      path = os.path.join(self.folder, file)
      try:
        self._handles[file] = self._stack.enter_context(safe_open(path, framework="numpy"))
      except Exception as e:  # safetensors raises its own error types for bad headers
        raise HFInteropError(f"cannot read safetensors file {path}: {e}") from None
    return self._handles[file]

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def file_of(self, key: str) -> str:
    return os.path.join(self.folder, self.weight_map[key])

  def _slice(self, key: str):
    return self._open(self.weight_map[key]).get_slice(key)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._slice(key).get_shape())

  def dtype(self, key: str) -> str:
    return self._slice(key).get_dtype()

  def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
    """The region `index` of tensor `key` (only those bytes are read from disk)."""
    return np.asarray(self._slice(key)[index])

  def close(self) -> None:
    self._stack.close()
    self._handles.clear()

  def __enter__(self) -> SafetensorsCheckpoint:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def abstract_params(cfg: ModelConfig) -> Any:
  """Boxed ShapeDtypeStructs of `Transformer(cfg)`'s params (logical axes included)."""
  tokens = np.zeros((1, 1), np.int32)
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), tokens))["params"]


def _flat(tree) -> list[tuple[Path, Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(str(k.key) for k in path), leaf) for path, leaf in leaves]


def _unflatten(items: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, x in items.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = x
  return out


def _check_architecture(cfg: ModelConfig, hf: Mapping[str, Any]) -> None:
  want = hf_to_model_config(hf)
  skip = set(RUNTIME_FIELDS) | {"init_std", "head_dim"}
  if cfg.position == "rope":
    skip.add("max_seq_len")  # only a documentation bound for RoPE
  diffs = [
    f"model.{f.name}={getattr(cfg, f.name)!r} but the checkpoint has {getattr(want, f.name)!r}"
    for f in dataclasses.fields(ModelConfig)
    if f.name not in skip and getattr(cfg, f.name) != getattr(want, f.name)
  ]
  if cfg.resolved_head_dim != want.resolved_head_dim:
    diffs.append(
      f"head_dim={cfg.resolved_head_dim} but the checkpoint has {want.resolved_head_dim}"
    )
  if diffs:
    raise HFInteropError(
      f"the model config does not match {hf.get('_source', 'the HF config')}: "
      + "; ".join(diffs)
      + " (build it with hf_to_model_config / model_config_from_hf)"
    )


def _validate(ckpt: SafetensorsCheckpoint, views: dict, hf_only: list, lay: HFLayout) -> None:
  used: set[str] = set()
  problems = []
  all_views = [v for x in views.values() for v in (x if isinstance(x, list) else [x])] + hf_only
  for view in all_views:
    if view.key is None or view.key in used:
      continue
    used.add(view.key)
    if view.key not in ckpt.weight_map:
      problems.append(f"missing tensor {view.key!r} (expected shape {list(view.hf_shape)})")
      continue
    shape, dtype = ckpt.shape(view.key), ckpt.dtype(view.key)
    if shape != tuple(view.hf_shape):
      problems.append(
        f"tensor {view.key!r} in {os.path.basename(ckpt.file_of(view.key))} has shape "
        f"{list(shape)}, expected {list(view.hf_shape)} from config.json"
      )
    if dtype not in _FLOAT_DTYPES:
      problems.append(f"tensor {view.key!r} has dtype {dtype}; supported: {_FLOAT_DTYPES}")
  unexpected = [
    k for k in ckpt.keys()
    if k not in used and not k.endswith(_IGNORED_SUFFIXES) and k not in _DROPPABLE_HEADS
    and not (lay.family == "gpt2" and k.endswith(".attn.bias") and ckpt.shape(k)[:2] == (1, 1))
  ]  # fmt: skip
  if unexpected:
    problems.append(
      f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:8]} "
      f"(is config.json from a different model than the weights?)"
    )
  if problems:
    raise HFInteropError(
      f"checkpoint {ckpt.folder!r} ({lay.architecture}) does not match its config: "
      + "; ".join(problems)
    )


def _open_heads(folder: str) -> dict[str, np.ndarray]:
  path = os.path.join(folder, HEADS_FILE)
  if not os.path.isfile(path):
    return {}
  from safetensors.numpy import load_file

  return dict(load_file(path))


def load_hf_params(
  path: str | os.PathLike,
  model_config: ModelConfig,
  mesh: Mesh | None = None,
  rules: Sequence | None = None,
  *,
  scan_layers: bool | None = None,
  rng: jax.Array | None = None,
  init_missing_heads: bool = True,
) -> dict:
  """Loads an HF checkpoint folder into the params of `Transformer(model_config)`.

  Args:
    path: folder with config.json and model.safetensors (or a sharded index).
    model_config: must match the checkpoint's architecture (build it with
      `hf_to_model_config` or `model_config_from_hf`); its `heads`, dtypes and
      `scan_layers` are free.
    mesh: with a mesh, every leaf is a global array sharded by `rules`
      (logical axes -> mesh axes) and each device reads only its own shard.
      Without one, leaves are single-device arrays.
    rules: logical sharding rules (default `DEFAULT_RULES`).
    scan_layers: override `model_config.scan_layers` (stacked "layers" tree).
    rng: key for heads the checkpoint lacks (default `PRNGKey(0)`).
    init_missing_heads: a value/reward head the checkpoint lacks (neither in
      the HF weights nor in `critic_jax_heads.safetensors`) is freshly
      initialised as `model_config.scalar_head_init` says; False raises instead.

  Returns:
    The unboxed params tree, in `model_config.param_dtype`. A reward head read
    from a `score` weight gets bias 0 (HF score heads have none).

  Raises:
    HFInteropError: unsupported architecture, config mismatch, missing files,
      missing/unexpected/mis-shaped tensors, naming what was found and expected.
  """
  folder = os.fspath(path)
  cfg = model_config if scan_layers is None else model_config.replace(scan_layers=scan_layers)
  hf = read_hf_config(folder)
  lay = hf_layout(hf)
  _check_architecture(cfg, hf)
  abstract = abstract_params(cfg)
  shapes = _flat(strip_boxes(abstract))
  shardings = None
  if mesh is not None:
    shardings = dict(_flat(logical_to_sharding(abstract, mesh, rules or DEFAULT_RULES)))
  dtype = cfg.params_dtype
  rng = jax.random.PRNGKey(0) if rng is None else rng
  side = _open_heads(folder)
  out: dict[Path, jax.Array] = {}
  with SafetensorsCheckpoint(folder) as ckpt:
    views, hf_only = tensor_views(cfg, lay, base_prefix(lay, ckpt.keys()))
    _validate(ckpt, views, hf_only, lay)
    fresh = {}
    for p, leaf in shapes:
      src = views.get(p)
      name = "/".join(p)
      first = src[0] if isinstance(src, list) else src
      if first is not None and first.key is not None:
        read = _view_reader(ckpt, src)
      elif name in side:
        arr = side[name]
        if arr.shape != tuple(leaf.shape):
          raise HFInteropError(
            f"{HEADS_FILE}: {name} has shape {list(arr.shape)}, expected {list(leaf.shape)}"
          )
        read = _array_reader(arr)
      elif src is not None:  # a zero view: a bias HF does not have
        read = _zeros_reader()
      elif p[0] in ("value_head", "reward_head") and init_missing_heads:
        if p[0] not in fresh:
          log.warning("%s: the checkpoint has no %s; initialising it (%s)", folder, p[0],
                      cfg.scalar_head_init)  # fmt: skip
          key = jax.random.fold_in(rng, 1 + ("value_head", "reward_head").index(p[0]))
          head = ScalarHead(cfg.scalar_head_init, dtype)
          # ScalarHead's `init` field shadows Module.init, hence the unbound call.
          init = nn.Module.init(head, key, jnp.zeros((1, cfg.d_model)))
          fresh[p[0]] = dict(_flat(nn.unbox(init["params"])))
        read = _array_reader(np.asarray(fresh[p[0]][p[1:]]))
      else:
        what = "an LM head ('lm_head.weight')" if p[0] == "lm_head" else f"a {p[0]}"
        raise HFInteropError(
          f"{folder}: the checkpoint ({lay.architecture}) lacks {what} for model param {name}; "
          "drop that head from model.heads or use a checkpoint that has it"
        )
      out[p] = _materialise(read, tuple(leaf.shape), dtype, shardings and shardings[p])
  return _unflatten(out)


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


def _view_reader(ckpt: SafetensorsCheckpoint, src: View | list[View]):
  if isinstance(src, View):
    return lambda b: src.read(ckpt, b)

  def stacked(b):  # one view per layer under a leading "layers" axis
    return np.stack([src[i].read(ckpt, b[1:]) for i in range(*b[0])])

  return stacked


def _array_reader(arr: np.ndarray):
  return lambda b: arr[tuple(slice(*x) for x in b)]


def _zeros_reader():
  return lambda b: np.zeros([hi - lo for lo, hi in b], np.float32)


def _materialise(read, shape, dtype, sharding) -> jax.Array:
  if sharding is None:
    return jnp.asarray(read(_bounds((), shape)).astype(dtype))
  cache: dict = {}

  def cb(index):
    b = _bounds(index, shape)
    if b not in cache:  # devices that hold the same (replicated) block share one read
      cache[b] = np.ascontiguousarray(read(b).astype(dtype))
    return cache[b]

  return jax.make_array_from_callback(shape, sharding, cb)
