"""Hugging Face `config.json` <-> `ModelConfig`, for Llama, Mistral, Qwen2, Qwen3 and GPT-2.

Reads the JSON directly (no transformers import), in both the transformers v5
layout (`rope_parameters: {"rope_theta", "rope_type", ...}`) and the v4 one
(top-level `rope_theta` and `rope_scaling`). Anything our model cannot compute
exactly (an unknown RoPE type, partial rotary dims, exact-erf GELU, per-layer
sliding windows, GPT-2's inverse-layer attention scaling, ...) raises
`HFInteropError` naming the field, the value found and what is supported.

Written configs carry both layouts too (`rope_parameters` for v5, `rope_theta` +
`rope_scaling` for v4), so either major version of transformers reads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from critic_jax.models import ModelConfig

__all__ = [
  "HFInteropError",
  "FAMILIES",
  "KINDS",
  "ARCHITECTURES",
  "RUNTIME_FIELDS",
  "HFLayout",
  "read_hf_config",
  "hf_layout",
  "hf_to_model_config",
  "model_config_from_hf",
  "infer_family",
  "export_layout",
  "model_to_hf_config",
]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
KINDS = ("causal_lm", "sequence_classification")
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# transformers class name -> (family, kind).
ARCHITECTURES: dict[str, tuple[str, str]] = {
  **{f"{p}ForCausalLM": (f, "causal_lm") for f, p in _CLASS_PREFIX.items()},
  **{f"{p}ForSequenceClassification": (f, "sequence_classification")
     for f, p in _CLASS_PREFIX.items()},
  "GPT2LMHeadModel": ("gpt2", "causal_lm"),
  "GPT2ForSequenceClassification": ("gpt2", "sequence_classification"),
}  # fmt: skip
_CLASS_NAME = {v: k for k, v in ARCHITECTURES.items()}
# Fields of ModelConfig that are not part of the checkpoint's architecture: they
# come from the user's config when a run starts from an HF folder.
RUNTIME_FIELDS = (
  "heads", "scalar_head_init", "dtype", "param_dtype", "remat", "scan_layers", "attention_impl",
  "attention_block", "matmul_grad", "rope_impl", "swiglu_recompute",
)  # fmt: skip
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation
_DEFAULT_THETA = 10000.0


class HFInteropError(ValueError):
  """A checkpoint folder or config that critic_jax cannot load or write exactly."""


@dataclasses.dataclass(frozen=True)
class HFLayout:
  """Which tensors a transformers checkpoint of one family holds.

  Attributes:
    family: one of FAMILIES.
    kind: "causal_lm" or "sequence_classification".
    qkv_bias: q/k/v projections have biases.
    o_bias: the attention output projection has a bias.
    mlp_bias: the MLP projections have biases.
    qk_norm: q_norm/k_norm weights (Qwen3).
    tie_embeddings: the LM head is the token embedding (no separate lm_head.weight).
  """

  family: str
  kind: str
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  qk_norm: bool
  tie_embeddings: bool

  @property
  def architecture(self) -> str:
    return _CLASS_NAME[(self.family, self.kind)]


def read_hf_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
  """The config of an HF checkpoint: a folder holding config.json, the file, or a dict."""
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.exists(path):
    raise HFInteropError(f"HF checkpoint folder {path!r} does not exist")
  if not os.path.isfile(file):
    found = ", ".join(sorted(os.listdir(path))[:20]) or "nothing"
    raise HFInteropError(
      f"no config.json in {path!r} (found: {found}); expected a transformers checkpoint folder "
      "with config.json and model.safetensors (or model.safetensors.index.json and its shards)"
    )
  try:
    with open(file, encoding="utf-8") as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise HFInteropError(f"{file}: invalid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(cfg, dict):
    raise HFInteropError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
  cfg.setdefault("_source", file)
  return cfg


def _where(hf: Mapping[str, Any]) -> str:
  return str(hf.get("_source", "config"))


def _family_kind(hf: Mapping[str, Any]) -> tuple[str, str]:
  archs = hf.get("architectures") or []
  supported = ", ".join(sorted(ARCHITECTURES))
  for a in archs:
    if a in ARCHITECTURES:
      return ARCHITECTURES[a]
  if archs:
    raise HFInteropError(
      f"{_where(hf)}: unsupported architecture {', '.join(map(str, archs))} "
      f"(model_type={hf.get('model_type')!r}); supported: {supported}"
    )
  mt = hf.get("model_type")
  if mt in FAMILIES:
    return mt, "causal_lm"
  raise HFInteropError(
    f"{_where(hf)}: no 'architectures' and unsupported model_type {mt!r}; "
    f"supported model types: {', '.join(FAMILIES)}; architectures: {supported}"
  )


def _get(hf, key, default=None):
  v = hf.get(key)
  return default if v is None else v


def hf_layout(hf_or_path: str | os.PathLike | Mapping[str, Any]) -> HFLayout:
  """The family, head kind and bias/norm layout an HF config implies."""
  hf = read_hf_config(hf_or_path)
  family, kind = _family_kind(hf)
  if family == "gpt2":
    return HFLayout(
      family, kind, True, True, True, False, bool(_get(hf, "tie_word_embeddings", True))
    )
  tie = bool(_get(hf, "tie_word_embeddings", False))
  attn_bias = bool(_get(hf, "attention_bias", False))
  if family == "llama":
    return HFLayout(
      family, kind, attn_bias, attn_bias, bool(_get(hf, "mlp_bias", False)), False, tie
    )
  if family == "mistral":
    return HFLayout(family, kind, False, False, False, False, tie)
  if family == "qwen2":
    return HFLayout(family, kind, True, False, False, False, tie)
  return HFLayout(family, kind, attn_bias, attn_bias, False, True, tie)  # qwen3


def _rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """(theta, rope_scaling for ModelConfig) from v5 `rope_parameters` or v4 keys."""
  where = _where(hf)
  params = hf.get("rope_parameters") or {}
  if any(isinstance(v, Mapping) for v in params.values()):
    raise HFInteropError(
      f"{where}: per-layer-type rope_parameters {sorted(params)} are not supported "
      "(critic_jax uses one RoPE for every layer)"
    )
  rp = {**(hf.get("rope_scaling") or {}), **params}
  theta = float(rp.get("rope_theta") or hf.get("rope_theta") or _DEFAULT_THETA)
  prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if prf is not None and float(prf) != 1.0:
    raise HFInteropError(
      f"{where}: partial_rotary_factor={prf} is not supported (RoPE must cover the whole head)"
    )
  rtype = rp.get("rope_type", "default")
  if rtype == "default" and rp.get("type") not in (None, "default"):
    # transformers reads the v4 key "type" over a "default" rope_type (folders critic_jax
    # wrote before its ModelConfig normalised the key hold both).
    rtype = rp["type"]
  if rtype == "default":
    return theta, None
  if rtype == "linear":
    return theta, {"rope_type": "linear", "factor": float(rp["factor"])}
  if rtype == "llama3":
    orig = rp.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    return theta, {
      "rope_type": "llama3", "factor": float(rp["factor"]),
      "low_freq_factor": float(rp.get("low_freq_factor", 1.0)),
      "high_freq_factor": float(rp.get("high_freq_factor", 4.0)),
      "original_max_position_embeddings": int(orig),
    }  # fmt: skip
  raise HFInteropError(
    f"{where}: unsupported RoPE type {rtype!r} (rope parameters: {rp}); "
    "supported: 'default', 'linear', 'llama3'"
  )


def _sliding_window(hf: Mapping[str, Any], family: str) -> int | None:
  where = _where(hf)
  if family == "mistral":
    w = hf.get("sliding_window")
    return int(w) if w is not None else None
  if not hf.get("use_sliding_window", False) or hf.get("sliding_window") is None:
    return None
  n = int(hf["num_hidden_layers"])
  types = hf.get("layer_types") or [
    "sliding_attention" if i >= int(_get(hf, "max_window_layers", 28)) else "full_attention"
    for i in range(n)
  ]
  if all(t == "sliding_attention" for t in types):
    return int(hf["sliding_window"])
  if all(t == "full_attention" for t in types):
    return None
  raise HFInteropError(
    f"{where}: a sliding window on some layers only (layer_types={types}) is not supported; "
    "critic_jax applies one attention pattern to every layer"
  )


def _check_act(hf: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
  act = hf.get(key, allowed[0])
  if act not in allowed:
    raise HFInteropError(f"{_where(hf)}: {key}={act!r} is not supported; supported: {allowed}")


def hf_to_model_config(
  path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides
) -> ModelConfig:
  """Maps an HF config (folder, config.json path or dict) onto a `ModelConfig`.

  Heads default to ("lm",) for `*ForCausalLM`/`GPT2LMHeadModel` and ("reward",)
  for `*ForSequenceClassification` (whose `score` becomes the reward head);
  `overrides` replace any field afterwards (e.g. `heads=("lm", "value")`,
  `param_dtype="bfloat16"`, `scan_layers=True`).

  Raises:
    HFInteropError: unsupported architecture, RoPE type, activation, sliding
      window pattern or number of labels, naming what was found.
  """
  hf = read_hf_config(path_or_dict)
  where = _where(hf)
  lay = hf_layout(hf)
  if lay.kind == "sequence_classification":
    n_labels = hf.get("num_labels") or len(hf.get("id2label") or {0: "LABEL_0"})
    if int(n_labels) != 1:
      raise HFInteropError(
        f"{where}: {lay.architecture} has {n_labels} labels; a reward model needs num_labels=1"
      )
  heads = ("lm",) if lay.kind == "causal_lm" else ("reward",)
  try:
    if lay.family == "gpt2":
      _check_act(hf, "activation_function", _GELU_TANH)
      if not _get(hf, "scale_attn_weights", True):
        raise HFInteropError(f"{where}: scale_attn_weights=false is not supported")
      for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
          raise HFInteropError(f"{where}: {flag}=true is not supported")
      d, n = int(hf["n_embd"]), int(hf["n_head"])
      cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["n_layer"]),
        num_heads=n, num_kv_heads=n, mlp_dim=int(_get(hf, "n_inner", 4 * d)), norm="layer",
        norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)), position="learned",
        max_seq_len=int(_get(hf, "n_positions", 1024)), mlp="gelu", qkv_bias=True,
        out_bias=True, tie_embeddings=lay.tie_embeddings, heads=heads,
        init_std=float(_get(hf, "initializer_range", 0.02)),
      )  # fmt: skip
    else:
      _check_act(hf, "hidden_act", ("silu",))
      d, n = int(hf["hidden_size"]), int(hf["num_attention_heads"])
      head_dim = int(_get(hf, "head_dim", d // n))
      theta, scaling = _rope(hf)
      cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]),
        num_heads=n, num_kv_heads=int(_get(hf, "num_key_value_heads", n)),
        head_dim=None if head_dim * n == d else head_dim,
        mlp_dim=int(hf["intermediate_size"]), norm="rms",
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)), position="rope",
        max_seq_len=int(_get(hf, "max_position_embeddings", 2048)), rope_theta=theta,
        rope_scaling=scaling, mlp="swiglu", qkv_bias=lay.qkv_bias,
        out_bias=lay.o_bias, mlp_bias=lay.mlp_bias, qk_norm=lay.qk_norm,
        sliding_window=_sliding_window(hf, lay.family), tie_embeddings=lay.tie_embeddings,
        heads=heads, init_std=float(_get(hf, "initializer_range", 0.02)),
      )  # fmt: skip
  except KeyError as e:
    raise HFInteropError(f"{where}: missing field {e.args[0]!r} for {lay.architecture}") from None
  return cfg.replace(**overrides) if overrides else cfg


def model_config_from_hf(
  path_or_dict: str | os.PathLike | Mapping[str, Any],
  base: ModelConfig | Mapping[str, Any] | None = None,
) -> ModelConfig:
  """The architecture from an HF config, the runtime fields (RUNTIME_FIELDS) from `base`.

  This is how a trainer started with `config.init.hf_path` builds its model
  config: `config.model` still chooses the heads, dtypes, remat, layer scan and
  attention implementation, while the shapes come from the checkpoint.
  """
  cfg = hf_to_model_config(path_or_dict)
  if base is None:
    return cfg
  if not isinstance(base, ModelConfig):
    base = ModelConfig.from_dict(base, where="config.model")
  return cfg.replace(**{f: getattr(base, f) for f in RUNTIME_FIELDS})


def infer_family(cfg: ModelConfig) -> str:
  """The HF family a ModelConfig exports to by default.

  learned positions -> gpt2; q/k norm -> qwen3; q/k/v bias without output bias
  -> qwen2; a sliding window without biases -> mistral; otherwise llama.
  """
  if cfg.position == "learned":
    return "gpt2"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.qkv_bias and not (cfg.out_bias or cfg.resolved_mlp_bias):
    return "qwen2"
  if cfg.sliding_window is not None and not (cfg.qkv_bias or cfg.out_bias or cfg.resolved_mlp_bias):
    return "mistral"
  return "llama"


def export_layout(cfg: ModelConfig, family: str | None = None, kind: str = "causal_lm") -> HFLayout:
  """The HF tensor layout `cfg` is written in, checking the family can express it.

  Biases the family has but `cfg` lacks are written as zeros; parameters `cfg`
  has but the family lacks must be zero at export time (checked by the writer).
  """
  family = family or infer_family(cfg)
  if family not in FAMILIES:
    raise HFInteropError(f"unknown HF family {family!r}; supported: {FAMILIES}")
  if kind not in KINDS:
    raise HFInteropError(f"unknown export kind {kind!r}; supported: {KINDS}")
  problems = []
  rope_family = family != "gpt2"
  want = dict(
    position="rope" if rope_family else "learned", norm="rms" if rope_family else "layer",
    mlp="swiglu" if rope_family else "gelu",
  )  # fmt: skip
  problems += [f"model.{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in want.items()
               if getattr(cfg, k) != v]  # fmt: skip
  if cfg.qk_norm != (family == "qwen3"):
    problems.append(f"model.qk_norm={cfg.qk_norm} (needs {family == 'qwen3'})")
  if family == "gpt2":
    if cfg.num_kv_heads != cfg.num_heads or cfg.resolved_head_dim * cfg.num_heads != cfg.d_model:
      problems.append("GPT-2 needs num_kv_heads == num_heads and head_dim * num_heads == d_model")
    if cfg.sliding_window is not None:
      problems.append(f"model.sliding_window={cfg.sliding_window} (GPT-2 has none)")
  if family == "llama" and cfg.sliding_window is not None:
    problems.append(f"model.sliding_window={cfg.sliding_window} (Llama has none; use mistral)")
  if problems:
    raise HFInteropError(f"cannot export this model as {family}: " + "; ".join(problems))
  if family == "gpt2":
    return HFLayout(family, kind, True, True, True, False, cfg.tie_embeddings)
  if family == "llama":
    attn = cfg.qkv_bias or cfg.out_bias
    return HFLayout(family, kind, attn, attn, cfg.resolved_mlp_bias, False, cfg.tie_embeddings)
  if family == "mistral":
    return HFLayout(family, kind, False, False, False, False, cfg.tie_embeddings)
  if family == "qwen2":
    return HFLayout(family, kind, True, False, False, False, cfg.tie_embeddings)
  attn = cfg.qkv_bias or cfg.out_bias
  return HFLayout(family, kind, attn, attn, False, True, cfg.tie_embeddings)


def model_to_hf_config(
  cfg: ModelConfig,
  layout: HFLayout,
  *,
  dtype: str = "float32",
  bos_token_id: int | None = None,
  eos_token_id: int | None = None,
  pad_token_id: int | None = None,
) -> dict[str, Any]:
  """The config.json dict (v4 and v5 keys) transformers builds `layout.architecture` from."""
  common = dict(
    architectures=[layout.architecture], model_type=layout.family, vocab_size=cfg.vocab_size,
    tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
    bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    dtype=dtype, torch_dtype=dtype, use_cache=True,
  )  # fmt: skip
  if layout.kind == "sequence_classification":
    common.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if layout.family == "gpt2":
    return dict(
      common, n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
      n_inner=cfg.mlp_dim, n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len,
      activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=True,
      scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
    )  # fmt: skip
  scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
  out = dict(
    common, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.resolved_head_dim, intermediate_size=cfg.mlp_dim, hidden_act="silu",
    rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
    rope_theta=cfg.rope_theta, rope_scaling=scaling, rope_parameters=rope_parameters,
    attention_dropout=0.0,
  )  # fmt: skip
  if layout.family == "llama":
    out.update(attention_bias=layout.qkv_bias, mlp_bias=layout.mlp_bias, pretraining_tp=1)
  elif layout.family == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  else:  # qwen2, qwen3
    sliding = cfg.sliding_window is not None
    out.update(
      use_sliding_window=sliding, sliding_window=cfg.sliding_window,
      max_window_layers=0 if sliding else cfg.num_layers,
      layer_types=[("sliding_attention" if sliding else "full_attention")] * cfg.num_layers,
    )  # fmt: skip
    if layout.family == "qwen3":
      out.update(attention_bias=layout.qkv_bias)
  return out
