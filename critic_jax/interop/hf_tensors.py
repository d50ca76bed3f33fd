"""The layout table between transformers checkpoints and critic_jax params.

Each of our leaves is a *view* of one HF tensor,

    ours = transpose(unflatten(hf[..., offset : offset + n * h, ...], (n, h)), perm)

which covers Linear weights (`[out, in]`, transposed), GPT-2's Conv1D weights
(`[in, out]`, kept), the head split of q/k/v/o (`[N*H, D] -> [D, N, H]`) and
GPT-2's fused `c_attn` (q, k and v at offsets 0, N*H and 2*N*H). The same table
reads (`View.read`: any region of our leaf from the matching region of the file)
and writes (`View.to_hf`). Biases one side has and the other lacks are zeros:
`ZERO` views on import, `hf_only` tensors on export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from critic_jax.interop.hf_config import HFInteropError, HFLayout
from critic_jax.models import ModelConfig

__all__ = ["Path", "View", "ZERO", "base_prefix", "tensor_views"]

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class View:
  """One of our leaves as a view of the HF tensor `key` (see the module docstring).

  Attributes:
    key: HF tensor name, or None for a tensor HF does not have (read as zeros).
    hf_shape: full shape of the HF tensor.
    split: (hf_axis, n, h): that axis holds n blocks of h (heads x head_dim),
      starting at `offset`; None when no axis is unflattened.
    offset: start of our block along the split axis (GPT-2's fused q/k/v).
    perm: our axis i is axis perm[i] of the unflattened HF tensor.
  """

  key: str | None
  hf_shape: tuple[int, ...] = ()
  split: tuple[int, int, int] | None = None
  offset: int = 0
  perm: tuple[int, ...] | None = None

  def read(self, ckpt: Any, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
    """Our region `bounds` ((start, stop) per our axis) via `ckpt.read(key, index)`,
    which is asked for only the region of the HF tensor that holds it."""
    perm = self.perm or tuple(range(len(bounds)))
    u = [None] * len(bounds)
    for i, p in enumerate(perm):
      u[p] = bounds[i]
    index, post, j = [], None, 0
    for axis in range(len(self.hf_shape)):
      if self.split is not None and axis == self.split[0]:
        (n0, n1), (h0, h1) = u[j], u[j + 1]
        h = self.split[2]
        index.append(slice(self.offset + n0 * h, self.offset + n1 * h))
        post = (axis, n1 - n0, h, slice(h0, h1))
        j += 2
      else:
        index.append(slice(*u[j]))
        j += 1
    x = ckpt.read(self.key, tuple(index))
    if post is not None:
      axis, n, h, hs = post
      x = x.reshape(x.shape[:axis] + (n, h) + x.shape[axis + 1 :])
      x = x[(slice(None),) * (axis + 1) + (hs,)]
    return np.transpose(x, perm)

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    """Our full array -> its block of the HF tensor (the inverse of `read`)."""
    perm = self.perm or tuple(range(ours.ndim))
    u = np.transpose(ours, np.argsort(perm))
    if self.split is not None:
      a, n, h = self.split
      u = u.reshape(u.shape[:a] + (n * h,) + u.shape[a + 2 :])
    return u

  def region(self) -> tuple[slice, ...]:
    """Where `to_hf` goes inside the HF tensor."""
    index = [slice(None)] * len(self.hf_shape)
    if self.split is not None:
      a, n, h = self.split
      index[a] = slice(self.offset, self.offset + n * h)
    return tuple(index)


ZERO = View(None)


def base_prefix(layout: HFLayout, keys: Sequence[str] | None = None) -> str:
  """Prefix of the trunk's tensor names ("model." / "transformer.", or "" in old files)."""
  std, embed = (
    ("transformer.", "wte.weight") if layout.family == "gpt2" else ("model.", "embed_tokens.weight")
  )
  if keys is None:
    return std
  keys = set(keys)
  for p in (std, ""):
    if p + embed in keys:
      return p
  raise HFInteropError(
    f"no token embedding ({std + embed!r}) among the checkpoint's tensors "
    f"(e.g. {sorted(keys)[:5]}); is this a {layout.architecture} checkpoint?"
  )


def _bias(entries, ours: Path | None, has_ours: bool, view: View, has_hf: bool) -> None:
  if has_ours and has_hf:
    entries.append((ours, view))
  elif has_ours:
    entries.append((ours, ZERO))
  elif has_hf:
    entries.append((None, view))  # written as zeros on export


def _layer_entries(cfg: ModelConfig, lay: HFLayout, i: int, prefix: str) -> list:
  """(our path inside a layer or None, View) for every tensor of layer i."""
  d, n, k, h, f = (
    cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.mlp_dim,
  )  # fmt: skip
  e: list = []
  if lay.family == "gpt2":
    p = f"{prefix}h.{i}."
    for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      e.append(((norm, "scale"), View(p + ln + ".weight", (d,))))
      e.append(((norm, "bias"), View(p + ln + ".bias", (d,))))
    for j, name in enumerate("qkv"):
      e.append((("attn", name, "kernel"),
                View(p + "attn.c_attn.weight", (d, 3 * d), (1, n, h), j * n * h)))  # fmt: skip
      bias = View(p + "attn.c_attn.bias", (3 * d,), (0, n, h), j * n * h)
      _bias(e, ("attn", name, "bias"), cfg.qkv_bias, bias, True)
    e.append((("attn", "o", "kernel"), View(p + "attn.c_proj.weight", (n * h, d), (0, n, h))))
    _bias(e, ("attn", "o", "bias"), cfg.out_bias, View(p + "attn.c_proj.bias", (d,)), True)
    e.append((("mlp", "up", "kernel"), View(p + "mlp.c_fc.weight", (d, f))))
    _bias(e, ("mlp", "up", "bias"), cfg.resolved_mlp_bias, View(p + "mlp.c_fc.bias", (f,)), True)
    e.append((("mlp", "down", "kernel"), View(p + "mlp.c_proj.weight", (f, d))))
    down_bias = View(p + "mlp.c_proj.bias", (d,))
    _bias(e, ("mlp", "down", "bias"), cfg.resolved_mlp_bias, down_bias, True)
    return e
  p = f"{prefix}layers.{i}."
  a = p + "self_attn."
  e.append((("attn_norm", "scale"), View(p + "input_layernorm.weight", (d,))))
  e.append((("mlp_norm", "scale"), View(p + "post_attention_layernorm.weight", (d,))))
  for name, heads in (("q", n), ("k", k), ("v", k)):
    w = a + f"{name}_proj."
    e.append(
      (("attn", name, "kernel"), View(w + "weight", (heads * h, d), (0, heads, h), 0, (2, 0, 1)))
    )
    _bias(
      e,
      ("attn", name, "bias"),
      cfg.qkv_bias,
      View(w + "bias", (heads * h,), (0, heads, h)),
      lay.qkv_bias,
    )
  e.append(
    (("attn", "o", "kernel"), View(a + "o_proj.weight", (d, n * h), (1, n, h), 0, (1, 2, 0)))
  )
  _bias(e, ("attn", "o", "bias"), cfg.out_bias, View(a + "o_proj.bias", (d,)), lay.o_bias)
  if lay.qk_norm:
    e.append((("attn", "q_norm", "scale"), View(a + "q_norm.weight", (h,))))
    e.append((("attn", "k_norm", "scale"), View(a + "k_norm.weight", (h,))))
  for name, shape, perm in (
    ("gate", (f, d), (1, 0)),
    ("up", (f, d), (1, 0)),
    ("down", (d, f), (1, 0)),
  ):
    w = p + f"mlp.{name}_proj."
    e.append((("mlp", name, "kernel"), View(w + "weight", shape, None, 0, perm)))
    mlp_bias = View(w + "bias", shape[:1])
    _bias(e, ("mlp", name, "bias"), cfg.resolved_mlp_bias, mlp_bias, lay.mlp_bias)
  return e


def tensor_views(
  cfg: ModelConfig, lay: HFLayout, prefix: str | None = None
) -> tuple[dict[Path, View | list[View]], list[View]]:
  """The layout table: (our path -> View (or one View per layer when scanned),
  HF tensors with no counterpart in `cfg`, written as zeros on export)."""
  prefix = base_prefix(lay) if prefix is None else prefix
  views: dict[Path, Any] = {}
  hf_only: list[View] = []
  d, v = cfg.d_model, cfg.vocab_size
  per_layer = [_layer_entries(cfg, lay, i, prefix) for i in range(cfg.num_layers)]
  for i, entries in enumerate(per_layer):
    for ours, view in entries:
      if ours is None:
        hf_only.append(view)
      elif cfg.scan_layers:
        views.setdefault(("layers",) + ours, []).append(view)
      else:
        views[(f"layer_{i}",) + ours] = view
  if lay.family == "gpt2":
    views[("embed", "embedding")] = View(prefix + "wte.weight", (v, d))
    views[("pos_embed", "embedding")] = View(prefix + "wpe.weight", (cfg.max_seq_len, d))
    views[("final_norm", "scale")] = View(prefix + "ln_f.weight", (d,))
    views[("final_norm", "bias")] = View(prefix + "ln_f.bias", (d,))
  else:
    views[("embed", "embedding")] = View(prefix + "embed_tokens.weight", (v, d))
    views[("final_norm", "scale")] = View(prefix + "norm.weight", (d,))
  if lay.kind == "causal_lm" and not lay.tie_embeddings:
    views[("lm_head", "kernel")] = View("lm_head.weight", (v, d), None, 0, (1, 0))
  if lay.kind == "sequence_classification":
    views[("reward_head", "Dense_0", "kernel")] = View("score.weight", (1, d), None, 0, (1, 0))
    views[("reward_head", "Dense_0", "bias")] = ZERO
  return views, hf_only
