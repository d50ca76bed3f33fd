"""Model configuration: one dataclass whose switches cover Llama/Mistral/Qwen2/Qwen3 and GPT-2.

A family is a set of switches, not a copy of the model code:

| family  | norm  | pos     | mlp    | qkv_bias | qk_norm | tie  |
|---------|-------|---------|--------|----------|---------|------|
| llama   | rms   | rope    | swiglu | no       | no      | opt. |
| mistral | rms   | rope    | swiglu | no       | no      | no   |
| qwen2   | rms   | rope    | swiglu | yes      | no      | opt. |
| qwen3   | rms   | rope    | swiglu | no       | yes     | opt. |
| gpt2    | layer | learned | gelu   | yes      | no      | yes  |
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from critic_jax.models.blocked_attention import DEFAULT_BLOCK
from critic_jax.models.layers import LINEAR_GRADS, ROPE_IMPLS
from critic_jax.registry import Registry

__all__ = [
  "ModelConfig",
  "MODEL_PRESETS",
  "HEADS",
  "REMAT_POLICIES",
  "ROPE_TYPES",
  "ATTENTION_IMPLS",
]

HEADS = ("lm", "value", "reward")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_TYPES = ("default", "linear", "llama3")
# The keys each rope_type reads (`layers.rope_inv_freq`; llama3's others default to Meta's).
ROPE_SCALING_KEYS = {
  "default": (),
  "linear": ("factor",),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the decoder-only transformer and its heads.

  Attributes:
    vocab_size: V.
    d_model: residual width D.
    num_layers: L.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N % K == 0; K < N is grouped-query attention).
    head_dim: per-head width H (None: d_model // num_heads).
    mlp_dim: hidden width F of the MLP.
    norm: "rms" (RMSNorm) or "layer" (LayerNorm with bias).
    norm_eps: epsilon of the norms.
    position: "rope" or "learned" (GPT-2 absolute positions, needs max_seq_len).
    max_seq_len: longest sequence for learned positions (and a documentation bound for RoPE).
    rope_theta: RoPE base.
    rope_scaling: None, or a dict {"rope_type": "linear", "factor": f} or
      {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"} (Llama 3.1).
    mlp: "swiglu" (SiLU-gated, Llama) or "gelu" (GPT-2, tanh approximation).
    qkv_bias: bias on the q/k/v projections (Qwen2, GPT-2).
    out_bias: bias on the attention output and MLP projections (GPT-2).
    mlp_bias: None (the default: as `out_bias`), or whether the MLP projections have biases
      when that differs from the attention output's (Llama's `attention_bias` /
      `mlp_bias`; Qwen3's attention bias, which its MLP lacks). A value equal to
      `out_bias` is stored as None, so equal models compare equal.
    qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
    sliding_window: attend only to the last W keys (Mistral v0.1); None = full causal.
    tie_embeddings: LM head reuses the token embedding matrix.
    heads: which heads exist on the trunk, a subset of ("lm", "value", "reward").
    scalar_head_init: init of the value/reward heads: "std" draws N(0, std=1/(D+1)),
      "var" draws N(0, var=1/(D+1)), "zeros" starts at 0. Stiennon et al. write
      N(0, 1/(D+1)) and it is unconfirmed whether that is the variance or the std;
      the default "std" follows the GPM port (spec preference-and-reward.md §1d).
    dtype: compute dtype ("float32" or "bfloat16"); params stay in param_dtype.
    param_dtype: parameter dtype.
    remat: activation checkpointing policy per layer: "none", "full", "dots"
      (save matmul outputs), "dots_no_batch" (save weight matmuls only).
    scan_layers: stack the layers with `nn.scan` (one compiled layer; params get a
      leading "layers" axis).
    attention_impl: "xla" (`jax.nn.dot_product_attention`), "cudnn" (NVIDIA GPUs,
      flash attention), "blocked" (`models.blocked_attention`: causal query blocks
      with a recomputing backward; measured fastest on CPUs) or "auto" ("blocked"
      when the default backend is the CPU, else "xla").
    attention_block: queries per block for attention_impl="blocked".
    matmul_grad: how the weight matmuls' backward pass is built: "autodiff" (JAX's rule),
      "transpose_smaller" (a custom VJP that transposes the narrower operand of each weight
      gradient explicitly; faster on XLA:CPU) or "auto" ("transpose_smaller" when the
      default backend is the CPU and remat is not a "dots" policy, which must see plain
      dot_generals to save them; else "autodiff"). Same math either way.
    rope_impl: how RoPE's cos and sin are computed (`layers.rope_cos_sin`): "direct"
      (float32 cos/sin of the angles), "tables" (angle addition over base-256 digit
      tables: no transcendental functions, faster on CPUs) or "auto" ("tables" when the
      default backend is the CPU, else "direct"). "tables" is exact to about 5e-7 for
      every int32 position; "direct" rounds the angle p * f to float32 (1.5e-5 at
      position 255, growing with the position).
    swiglu_recompute: SwiGLU's backward recomputes sigmoid(gate) as (1 + tanh(gate/2))/2
      (`layers.swiglu`), which XLA's common-subexpression elimination cannot merge with
      the forward's, so the program keeps only gate and up for that backward.
      Off (the default), XLA:CPU keeps sigmoid(gate) as a float32 `[B, T, F]` array per
      layer as well (seen in its optimised HLO; GPUs not checked). Same math (to float32
      rounding); on the 2-core CPU within noise (x0.995-1.015), on GPUs not yet measured
      (`scripts/device_checks.sh sftswiglu`).
    init_std: std of the normal initialiser of the weight matrices.
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int | None = None
  mlp_dim: int = 512
  norm: str = "rms"
  norm_eps: float = 1e-6
  position: str = "rope"
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  mlp: str = "swiglu"
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool | None = None
  qk_norm: bool = False
  sliding_window: int | None = None
  tie_embeddings: bool = False
  heads: tuple[str, ...] = ("lm",)
  scalar_head_init: str = "std"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  attention_block: int = DEFAULT_BLOCK
  matmul_grad: str = "auto"
  rope_impl: str = "auto"
  swiglu_recompute: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    def bad(field, value, allowed):
      raise ValueError(f"model.{field}={value!r} is not one of {allowed}")

    if self.norm not in ("rms", "layer"):
      bad("norm", self.norm, ("rms", "layer"))
    if self.position not in ("rope", "learned"):
      bad("position", self.position, ("rope", "learned"))
    if self.mlp not in ("swiglu", "gelu"):
      bad("mlp", self.mlp, ("swiglu", "gelu"))
    if self.remat not in REMAT_POLICIES:
      bad("remat", self.remat, REMAT_POLICIES)
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    if self.attention_block < 1:
      raise ValueError(f"model.attention_block must be >= 1, got {self.attention_block}")
    if self.matmul_grad not in ("auto",) + LINEAR_GRADS:
      bad("matmul_grad", self.matmul_grad, ("auto",) + LINEAR_GRADS)
    if self.rope_impl not in ROPE_IMPLS:
      bad("rope_impl", self.rope_impl, ROPE_IMPLS)
    if self.scalar_head_init not in ("std", "var", "zeros"):
      bad("scalar_head_init", self.scalar_head_init, ("std", "var", "zeros"))
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in _DTYPES:
        bad(f, getattr(self, f), tuple(_DTYPES))
    object.__setattr__(self, "heads", tuple(self.heads))
    for h in self.heads:
      if h not in HEADS:
        bad("heads", self.heads, HEADS)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} must be a multiple of "
        f"model.num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
        "set model.head_dim explicitly"
      )
    if self.mlp_bias is not None and bool(self.mlp_bias) == bool(self.out_bias):
      object.__setattr__(self, "mlp_bias", None)
    if self.position == "rope" and self.resolved_head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      legacy = scaling.pop("type", None)  # transformers v4's spelling of rope_type
      rtype = scaling.setdefault("rope_type", legacy)
      if rtype not in ROPE_TYPES:
        raise ValueError(
          f"model.rope_scaling has unsupported rope_type {rtype!r}; supported: {ROPE_TYPES}"
        )
      keys = ROPE_SCALING_KEYS[rtype]
      unknown = sorted(set(scaling) - set(keys) - {"rope_type"})
      if unknown:  # a misspelt key would silently fall back to its default
        raise ValueError(
          f"model.rope_scaling: unknown key(s) {unknown} for rope_type {rtype!r}; "
          f"known: {list(keys)}"
        )
      if keys and "factor" not in scaling:
        raise ValueError(f"model.rope_scaling: rope_type {rtype!r} needs a 'factor'")
      object.__setattr__(self, "rope_scaling", scaling)

  @property
  def resolved_mlp_bias(self) -> bool:
    """Whether the MLP projections have biases (`mlp_bias`, else `out_bias`)."""
    return bool(self.out_bias if self.mlp_bias is None else self.mlp_bias)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_attention_impl(self) -> str:
    """`attention_impl` with "auto" resolved for the default backend."""
    if self.attention_impl != "auto":
      return self.attention_impl
    return "blocked" if jax.default_backend() == "cpu" else "xla"

  @property
  def resolved_matmul_grad(self) -> str:
    """`matmul_grad` with "auto" resolved for the default backend (see the class doc)."""
    if self.matmul_grad != "auto":
      return self.matmul_grad
    if jax.default_backend() == "cpu" and not self.remat.startswith("dots"):
      return "transpose_smaller"
    return "autodiff"

  @property
  def resolved_rope_impl(self) -> str:
    """`rope_impl` with "auto" resolved for the default backend."""
    if self.rope_impl != "auto":
      return self.rope_impl
    return "tables" if jax.default_backend() == "cpu" else "direct"

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  def num_params(self, include_embeddings: bool = True) -> int:
    """Parameter count of the trunk and LM head (scalar heads excluded)."""
    d, h, f = self.d_model, self.resolved_head_dim, self.mlp_dim
    qkv = h * (self.num_heads + 2 * self.num_kv_heads)
    attn = d * qkv + self.num_heads * h * d
    attn += (qkv if self.qkv_bias else 0) + (d if self.out_bias else 0)
    attn += 2 * h if self.qk_norm else 0
    n_in = 2 if self.mlp == "swiglu" else 1
    mlp = (n_in + 1) * d * f + ((n_in * f + d) if self.resolved_mlp_bias else 0)
    norm = d * (2 if self.norm == "layer" else 1)
    per_layer = attn + mlp + 2 * norm
    emb = self.vocab_size * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    pos = self.max_seq_len * d if self.position == "learned" else 0
    total = self.num_layers * per_layer + head + norm
    return total + (emb + pos if include_embeddings else 0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6N (N without the input embedding) plus attention.

    PaLM's MFU definition (Chowdhery et al. 2022, appendix B), 6N + 12 L H Q T, with the
    attention term halved for the causal mask, which PaLM counts whole: the stricter count
    (llama_0.9b at 8 x 2048 on an H100, 177.2 ms/step: 49.8% MFU here, 53.6% with PaLM's
    whole attention term).
    """
    n = self.num_params(include_embeddings=False)
    attn = 12 * self.num_layers * self.num_heads * self.resolved_head_dim * seq_len / 2
    return 6 * n + attn

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "model") -> ModelConfig:
    """Builds a config from a mapping; unknown keys raise with suggestions."""
    if isinstance(d, ml_collections.ConfigDict):
      d = d.to_dict()
    d = dict(d)
    d.pop("preset", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in d:
      if k not in fields:
        close = difflib.get_close_matches(k, sorted(fields), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown key {where}.{k}.{hint} Known keys: {', '.join(sorted(fields))}")
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = dict(d["rope_scaling"])
    if "heads" in d:
      d["heads"] = tuple(d["heads"])
    return cls(**d)

  def to_configdict(self, preset: str | None = None) -> ml_collections.ConfigDict:
    """A ConfigDict of every field (so `--config.model.<field>=...` works on the CLI)."""
    d = dataclasses.asdict(self)
    d["heads"] = list(self.heads)
    # Placeholders keep the type open for None-able fields in a locked config.
    d["rope_scaling"] = ml_collections.FieldReference(
      ml_collections.ConfigDict(d["rope_scaling"]) if d["rope_scaling"] else None,
      field_type=ml_collections.ConfigDict,
    )
    d["head_dim"] = ml_collections.FieldReference(self.head_dim, field_type=int)
    d["sliding_window"] = ml_collections.FieldReference(self.sliding_window, field_type=int)
    d["mlp_bias"] = ml_collections.FieldReference(self.mlp_bias, field_type=bool)
    if preset is not None:
      d["preset"] = preset
    return ml_collections.ConfigDict(d)

  @classmethod
  def preset(cls, name: str, **overrides) -> ModelConfig:
    return MODEL_PRESETS.get(name).replace(**overrides)


MODEL_PRESETS: Registry = Registry("model preset")
# A tiny Llama-shaped model for tests and the CPU main job.
MODEL_PRESETS.register("tiny", ModelConfig())
MODEL_PRESETS.register(
  "tiny_gpt2",
  ModelConfig(
    norm="layer", norm_eps=1e-5, position="learned", max_seq_len=128, mlp="gelu",
    qkv_bias=True, out_bias=True, tie_embeddings=True,
  ),
)  # fmt: skip
MODEL_PRESETS.register(
  "tiny_qwen3", ModelConfig(num_kv_heads=2, qk_norm=True, head_dim=32, tie_embeddings=True)
)
# The 0.9B Llama shape of the GPU benchmarks (../shared/ENVIRONMENT.md: 0.886B parameters).
MODEL_PRESETS.register(
  "llama_0.9b",
  ModelConfig(
    vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, mlp_dim=5632,
    norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
  ),
)  # fmt: skip
MODEL_PRESETS.register(
  "gpt2_small",
  ModelConfig(
    vocab_size=50257, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, mlp_dim=3072,
    norm="layer", norm_eps=1e-5, position="learned", max_seq_len=1024, mlp="gelu",
    qkv_bias=True, out_bias=True, tie_embeddings=True,
  ),
)  # fmt: skip
