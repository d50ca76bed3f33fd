"""Building blocks of the decoder: norms, rotary embeddings, MLPs.

Every parameter names its logical axes (`nn.with_logical_partitioning`) and every
large activation is constrained to logical axes (`nn.with_logical_constraint`);
the mapping to mesh axes lives in the config (`critic_jax.parallel`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "Norm",
  "Mlp",
  "rope_inv_freq",
  "rope_cos_sin",
  "rope_tables",
  "ROPE_IMPLS",
  "apply_rope",
  "swiglu",
  "dense_init",
  "constrain",
  "Linear",
  "LINEAR_GRADS",
  "matmul",
]

LINEAR_GRADS = ("autodiff", "transpose_smaller")
ROPE_IMPLS = ("auto", "direct", "tables")


def dense_init(std: float, axes: tuple[str | None, ...]):
  """A normal(std) initialiser that tags the parameter with logical `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Constrains an activation to logical axes (a no-op without mesh rules)."""
  return nn.with_logical_constraint(x, axes)


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """`dot_general` accumulating in float32, cast back to the operands' dtype.

  XLA:CPU runs a bfloat16 dot on its AMX / YNNPACK kernels only when the dot returns float32
  (and reads both operands row-major); any other bfloat16 dot it upcasts to a float32 dot.
  Used by the "transpose_smaller" custom VJP (the CPU default), which builds its backward
  dots itself; the "autodiff" path keeps plain dots, whose transposes and remat-saved
  outputs stay in the compute dtype on GPUs and TPUs.
  """
  out = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(a, b))


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
  return _dot(x, w, (((1,), (0,)), ((), ())))


def _t(x: jax.Array) -> jax.Array:
  """`x.T` for a 2-D x; a 16-bit one materialised row-major.

  A plain transpose reaches the dot as a column-major operand, which makes XLA:CPU upcast
  a bfloat16 dot to float32; going through a 3-D transpose makes the reshape copy instead.
  A float32 dot reads the column-major operand directly (faster than copying it first).
  """
  m, k = x.shape
  if x.dtype.itemsize > 2:
    return jnp.transpose(x)
  return jnp.transpose(x.reshape(1, m, k), (2, 0, 1)).reshape(k, m)


@jax.custom_vjp
def _mm_transpose_smaller(x: jax.Array, w: jax.Array) -> jax.Array:
  return _mm(x, w)


def _mm_fwd(x, w):
  return _mm(x, w), (x, w)


def _mm_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = _dot(g, w, (((1,), (1,)), ((), ())))  # g [M, N] . w[K, N]^T
  # dW = x^T g contracts the rows of both operands, and a CPU matmul kernel wants one of them
  # transposed in memory. Transpose the narrower of the two (a plain copy of a saved
  # activation) instead of leaving the choice to XLA, which on CPU tends to fuse the transpose
  # into the producer of g (e.g. the SwiGLU backward) and run that fusion far slower.
  if x.shape[1] <= g.shape[1]:
    dw = _mm(_t(x), g)
  else:
    # The barrier keeps XLA from folding the transpose of the small [N, K] product into the
    # dot: XLA:CPU runs the folded dot (a [K, N] output from rows of g and x) on its generic
    # path at half the speed (one core, main job's SwiGLU down-projection: 3.7 against
    # 1.9 ms); measured on two cores, main job's model in float32: steps 1.7% faster.
    dw = jnp.transpose(jax.lax.optimization_barrier(_mm(_t(g), x)))
  return dx, dw.astype(w.dtype)


_mm_transpose_smaller.defvjp(_mm_fwd, _mm_bwd)


def matmul(x: jax.Array, w: jax.Array, grad: str = "autodiff") -> jax.Array:
  """`x [M, K] @ w [K, N]`; `grad` picks how the backward pass is built.

  "autodiff": JAX's transpose rule (XLA places the transposes; best under remat policies
  that save dot outputs, which see a plain `dot_general`). "transpose_smaller": a custom VJP
  whose weight gradient transposes the narrower of x and the output gradient explicitly
  (measured on a 2-core CPU: a SwiGLU MLP's backward 35% faster). Same math either way.
  """
  if grad == "autodiff":
    return _mm(x, w)
  if grad == "transpose_smaller":
    return _mm_transpose_smaller(x, w)
  raise ValueError(f"matmul grad={grad!r} is not one of {LINEAR_GRADS}")


class Linear(nn.Module):
  """y = x @ W (+ b) contracting `in_dims` trailing dims of x into `out_shape`.

  The kernel is created with its full shape (`[*in, *out]`) so its logical axis
  names (`axes`) match every dimension, e.g. `("embed", "heads", "head_dim")`.
  `grad` ("autodiff" or "transpose_smaller") is how the backward pass is built
  (see `matmul`); with "transpose_smaller" x and the kernel are flattened to 2-D.
  """

  out_shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  in_dims: int = 1
  use_bias: bool = False
  std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  grad: str = "autodiff"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.in_dims :]
    kernel = self.param(
      "kernel", dense_init(self.std, self.axes), in_shape + tuple(self.out_shape), self.param_dtype
    )
    xc, kc = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.grad == "autodiff":
      y = jax.lax.dot_general(
        xc, kc,
        ((tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims))), ((), ())),
      )  # fmt: skip
    else:
      k_in, k_out = math.prod(in_shape), math.prod(self.out_shape)
      lead = x.shape[: x.ndim - self.in_dims]
      y = matmul(xc.reshape(-1, k_in), kc.reshape(k_in, k_out), self.grad)
      y = y.reshape(lead + tuple(self.out_shape))
    if self.use_bias:
      bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims :]),
        tuple(self.out_shape), self.param_dtype,
      )  # fmt: skip
      y = y + bias.astype(self.dtype)
    return y


class Norm(nn.Module):
  """RMSNorm (`kind="rms"`) or LayerNorm with bias (`kind="layer"`) over the last axis.

  Statistics are computed in float32 whatever the compute dtype.
  """

  kind: str = "rms"
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (d,),
      self.param_dtype,
    )  # fmt: skip
    xf = x.astype(jnp.float32)
    if self.kind == "rms":
      y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
      y = y * scale.astype(jnp.float32)
    else:
      bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)), (d,),
        self.param_dtype,
      )  # fmt: skip
      mean = jnp.mean(xf, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
      y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def rope_inv_freq(
  head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> jax.Array:
  """Inverse frequencies `[head_dim/2]` of RoPE, with optional linear or Llama-3 scaling.

  Llama 3.1 scaling (Meta's `apply_scaling`): wavelengths longer than
  `orig/low_freq_factor` are divided by `factor`, shorter than `orig/high_freq_factor`
  are kept, and the band between is interpolated smoothly.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  rtype = scaling.get("rope_type", scaling.get("type"))
  factor = float(scaling["factor"]) if "factor" in scaling else 1.0
  if rtype == "default":
    return inv_freq
  if rtype == "linear":
    return inv_freq / factor
  if rtype == "llama3":
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"unsupported rope_type {rtype!r}")


def rope_tables(inv_freq: Any) -> np.ndarray:
  """cos and sin of `digit * 256**level * inv_freq`, `[4, 2, 256, H/2]` float32.

  The four base-256 digits of an int32 position p (the top one signed, -128..127) give
  p = sum_l d_l 256^l exactly, so `rope_cos_sin(impl="tables")` recovers cos(p f) and
  sin(p f) for every int32 p by three angle additions. The angles are formed and reduced in
  float64 from the float32 `inv_freq` (the frequencies the "direct" path uses).
  """
  inv = np.asarray(inv_freq, np.float32).astype(np.float64)
  out = np.empty((4, 2, 256, inv.size), np.float32)
  digits = np.arange(256, dtype=np.float64)
  for level in range(4):
    d = digits - 128 if level == 3 else digits
    angles = np.outer(d * 256.0**level, inv)
    out[level, 0], out[level, 1] = np.cos(angles), np.sin(angles)
  return out


def rope_cos_sin(
  positions: jax.Array, inv_freq: Any, impl: str = "direct"
) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables `[B, T, H]` (rotate-half layout, as in HF Llama) in float32.

  `impl="direct"` evaluates cos and sin of the float32 angles `positions * inv_freq`.
  `impl="tables"` (needs a concrete `inv_freq`) reads them from `rope_tables` by the
  position's base-256 digits and combines them with the angle-addition formulas: gathers
  and multiplies instead of transcendental functions, which XLA fuses into every consumer
  and so evaluates again for each head of each layer, forward and backward (on a 2-core
  CPU the RoPE of a 4-layer model's training step went from 38 to 17 ms). Its values are
  closer to the exact cos(p f) than "direct" is (no float32 rounding of p f).
  """
  if impl == "direct":
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
  if impl != "tables":
    raise ValueError(f"rope impl={impl!r} is not one of {ROPE_IMPLS[1:]}")
  tables = jnp.asarray(rope_tables(inv_freq))
  p = positions.astype(jnp.int32)
  cos = sin = None
  for level in range(4):
    digit = (p >> (8 * level)) & 255 if level < 3 else (p >> 24) + 128
    c = jnp.take(tables[level, 0], digit, axis=0, mode="clip")
    s = jnp.take(tables[level, 1], digit, axis=0, mode="clip")
    cos, sin = (c, s) if cos is None else (cos * c - sin * s, sin * c + cos * s)
  return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x [B, T, N, H]` by the per-position angles (rotate-half convention)."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def swiglu(gate: jax.Array, up: jax.Array, recompute: bool = False) -> jax.Array:
  """SwiGLU's gating `silu(gate) * up` (Shazeer 2020, arXiv:2002.05202), any shape.

  Computed in float32 and cast to `gate`'s dtype. The backward pass keeps `gate` and
  `up` (the two matmuls' outputs, which exist anyway) and recomputes the sigmoid:
  d_up = dh * silu(g), d_gate = dh * u * s * (1 + g * (1 - s)) with s = sigmoid(g).
  Autodiff of the plain formula instead stores sigmoid(g) and silu(g) as well, so
  XLA writes and reads two more `[B, T, F]` arrays. Measured on the 2-core CPU (main
  job's model, 128 x 12 tokens, alternating steps in one process): the train step
  x0.967 in float32 (faster in 53 of 60 pairs), x0.944 in bfloat16 (34 of 40); the
  4 M-parameter benchmark shape x0.992 (8 of 12).

  XLA's common-subexpression elimination may merge the backward's sigmoid with the
  forward's: in the main job's compiled CPU train step it does (float32 and bfloat16
  compute), so that program keeps sigmoid(g) as a float32 `[B, T, F]` array for the
  backward after all and drops only silu(g). `recompute=True` (static; the model's
  `swiglu_recompute`) computes the backward's sigmoid as (1 + tanh(g / 2)) / 2, which
  CSE cannot merge (an optimization barrier on the residuals did not: a small gradient
  program still evaluated one sigmoid), so SwiGLU's backward keeps only gate and up. On
  the 2-core CPU that measured x0.995 (11 of 20 pairs faster) in float32 and x1.005 (8 of
  16) in bfloat16 on the main job's model, x1.015 (1 of 6) at 4 M in bfloat16, and left
  XLA:CPU's temporary memory for whole train steps unchanged; it is there for GPUs, where
  a float32 `[B, T, F]` array per layer would cost bandwidth and memory if their compile
  keeps it too (not yet measured on one).
  """
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up, recompute):
  return swiglu(gate, up, recompute), (gate, up)


def _swiglu_bwd(recompute, res, dh):
  gate, up = res
  g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
  # sigmoid(g) = (1 + tanh(g / 2)) / 2: the same value (to float32 rounding) by other ops,
  # which common-subexpression elimination cannot merge with the forward's logistic.
  s = 0.5 + 0.5 * jnp.tanh(0.5 * g) if recompute else jax.nn.sigmoid(g)
  d_up = d * g * s
  d_gate = d * u * s * (1.0 + g * (1.0 - s))
  return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
  """SwiGLU (`down(silu(gate(x)) * up(x))`) or GELU (`down(gelu_tanh(up(x)))`) MLP.

  `fused` (SwiGLU) computes gate and up with one matmul against a `gate_up` kernel
  `[D, 2, F]` (`fuse_projections` converts the params); same math. `recompute`: see
  `swiglu`.
  """

  kind: str
  mlp_dim: int
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  grad: str = "autodiff"
  fused: bool = False
  recompute: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]

    def dense(shape, name, axes, std):
      return Linear(
        shape, axes, use_bias=self.use_bias, std=std, dtype=self.dtype,
        param_dtype=self.param_dtype, grad=self.grad, name=name,
      )  # fmt: skip

    if self.kind == "swiglu" and self.fused:
      gate_up = dense((2, self.mlp_dim), "gate_up", ("embed", None, "mlp"), self.init_std)(x)
      h = swiglu(gate_up[..., 0, :], gate_up[..., 1, :], self.recompute)
    elif self.kind == "swiglu":
      gate = dense((self.mlp_dim,), "gate", ("embed", "mlp"), self.init_std)(x)
      up = dense((self.mlp_dim,), "up", ("embed", "mlp"), self.init_std)(x)
      h = swiglu(gate, up, self.recompute)
    else:
      up = dense((self.mlp_dim,), "up", ("embed", "mlp"), self.init_std)(x)
      h = nn.gelu(up, approximate=True)
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    return dense((d,), "down", ("mlp", "embed"), self.out_init_std)(h)
