"""`attention_impl="blocked"`: outputs and gradients equal `jax.nn.dot_product_attention`."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.models import ModelConfig, Transformer
from critic_jax.models import blocked_attention as blocked_module
from critic_jax.models.attention import causal_mask
from critic_jax.models.blocked_attention import blocked_attention


@pytest.fixture(params=["const_mask", "iota_mask"])
def causal_from(request, monkeypatch):
  """Runs a test with the kernel's causal mask as a constant (small blocks, the default
  at these sizes) and as iotas (what large blocks use)."""
  if request.param == "iota_mask":
    monkeypatch.setattr(blocked_module, "_CONST_MASK_MAX", 0)
  return request.param


def _inputs(b, t, n, kh, h, seed=0):
  rs = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rs.standard_normal(s), jnp.float32)
             for s in [(b, t, n, h), (b, t, kh, h), (b, t, kh, h)])  # fmt: skip
  return q, k, v, rs


def _value_and_grads(attn, q, k, v, cotangent):
  def loss(q, k, v):
    return jnp.sum(attn(q, k, v) * cotangent)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_same(got, want, atol):
  (lg, gg), (lw, gw) = got, want
  np.testing.assert_allclose(lg, lw, rtol=1e-5, atol=atol)
  for a, b, name in zip(gg, gw, "qkv", strict=True):
    np.testing.assert_allclose(a, b, atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize(
  "case",
  [
    dict(b=3, t=50, n=4, kh=2, h=8, block=16, packed=True, window=None),  # 4 blocks, last short
    dict(b=2, t=24, n=4, kh=4, h=8, block=5, packed=False, window=7),  # sliding window, MHA
    dict(b=2, t=9, n=6, kh=2, h=4, block=64, packed=True, window=None),  # one block
  ],
  ids=["packed_gqa", "sliding_window", "one_block"],
)
def test_blocked_attention_equals_dot_product_attention(case, causal_from):
  """Packed rows (two segments + padding), GQA, a sliding window, T not a multiple of
  the block: the output and the gradients for q, k, v match `jax.nn` (XLA)."""
  b, t = case["b"], case["t"]
  q, k, v, rs = _inputs(b, t, case["n"], case["kh"], case["h"])
  idx = np.tile(np.arange(t), (b, 1))
  seg, pos = np.ones((b, t), np.int32), idx
  if case["packed"]:  # segment 1, then segment 2 (positions restart), then padding
    cut = rs.randint(2, t - 3, b)[:, None]
    end = rs.randint(t - 3, t + 1, b)[:, None]
    seg = np.where(idx < cut, 1, np.where(idx < end, 2, 0))
    pos = np.where(seg == 2, idx - cut, idx)
  mask = causal_mask(jnp.asarray(seg), jnp.asarray(pos), case["window"])
  cot = jnp.asarray(rs.standard_normal(q.shape), jnp.float32)
  want = _value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
                          q, k, v, cot)  # fmt: skip
  got = _value_and_grads(lambda q, k, v: blocked_attention(q, k, v, mask, block=case["block"]),
                         q, k, v, cot)  # fmt: skip
  _assert_same(got, want, atol=2e-5)


@pytest.mark.parametrize("block", [64, 256], ids=["four_blocks", "one_block"])
def test_blocked_attention_at_training_size_with_a_broadcast_cotangent(block):
  """8 x 256 tokens, 8 heads over 4 kv heads, and a cotangent that is a broadcast
  vector (sum(out * w)). With the correction term written as rowsum(dO * O),
  XLA:CPU's YNNPACK fusion miscompiled the one-block backward (dq off by 1.4, dk
  by 0.8; exact op by op); the shipped rowsum(P * dP) form is exact in both."""
  q, k, v, _ = _inputs(8, 256, 8, 4, 32, seed=1)
  mask = causal_mask(jnp.ones((8, 256), jnp.int32), jnp.tile(jnp.arange(256), (8, 1)))
  cot = jnp.cos(jnp.arange(32, dtype=jnp.float32))
  want = _value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
                          q, k, v, cot)  # fmt: skip
  got = _value_and_grads(lambda q, k, v: blocked_attention(q, k, v, mask, block=block),
                         q, k, v, cot)  # fmt: skip
  _assert_same(got, want, atol=2e-4)


@pytest.mark.parametrize("block", [16, 64], ids=["four_blocks_last_short", "one_block"])
def test_blocked_attention_without_a_mask_is_causal_attention(block, causal_from):
  """mask=None: the causal mask alone, built inside the kernel (both ways), gives
  `jax.nn`'s causal attention and gradients (GQA, T not a multiple of the block)."""
  q, k, v, rs = _inputs(3, 50, 4, 2, 8, seed=2)
  cot = jnp.asarray(rs.standard_normal(q.shape), jnp.float32)
  want = _value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                          q, k, v, cot)  # fmt: skip
  got = _value_and_grads(lambda q, k, v: blocked_attention(q, k, v, None, block=block),
                         q, k, v, cot)  # fmt: skip
  _assert_same(got, want, atol=2e-5)


def test_unpacked_rows_take_the_causal_path_and_keep_real_tokens_exact():
  """`packed=False` (one right-padded sequence per row) runs the blocked kernel without
  a mask: logits at real tokens and the gradient of a loss over them equal the
  explicit segment mask's (`packed=True`). On packed rows the causal path lets a
  segment attend the one before it, so it must differ there."""
  cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                           head_dim=8, mlp_dim=64, attention_block=4)  # fmt: skip
  rs = np.random.RandomState(3)
  tokens = jnp.asarray(rs.randint(0, 64, (4, 14)), jnp.int32)
  real = np.arange(14)[None] < np.array([14, 9, 5, 1])[:, None]
  seg = jnp.asarray(real.astype(np.int32))
  model = Transformer(cfg)
  assert cfg.resolved_attention_impl == "blocked"
  params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])

  def grad_fn(packed):  # one compilation per path, reused for both segment layouts
    def loss(p, seg):
      logits = model.apply({"params": p}, tokens, segment_ids=seg, packed=packed).logits
      return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  run = {packed: functools.partial(grad_fn(packed), params) for packed in (True, False)}
  (lw, want), gw = run[True](seg)
  (lg, got), gg = run[False](seg)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
  np.testing.assert_allclose(lg, lw, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Two segments per row: the segment mask keeps them apart, the causal path does not.
  two = jnp.asarray(np.where(np.arange(14)[None] < 6, 1, 2).repeat(4, 0), jnp.int32)
  (_, sep), _ = run[True](two)
  (_, mixed), _ = run[False](two)
  np.testing.assert_allclose(np.asarray(mixed)[:, :6], np.asarray(sep)[:, :6], atol=1e-5)
  assert np.abs(np.asarray(mixed)[:, 6:] - np.asarray(sep)[:, 6:]).max() > 1e-2


def test_blocked_attention_model_matches_xla_model():
  """A Transformer with attention_impl="blocked" gives the "xla" model's logits and
  parameter gradients (packed rows, GQA, 3 query blocks)."""
  cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                           head_dim=8, mlp_dim=64)  # fmt: skip
  rs = np.random.RandomState(0)
  tokens = jnp.asarray(rs.randint(0, 64, (4, 12)), jnp.int32)
  seg = jnp.asarray((np.arange(12)[None] < rs.randint(6, 13, 4)[:, None]).astype(np.int32))
  xla = Transformer(cfg.replace(attention_impl="xla"))
  params = nn.unbox(xla.init(jax.random.key(0), tokens)["params"])

  def run(model):
    def loss(p):
      return jnp.mean(model.apply({"params": p}, tokens, segment_ids=seg).logits ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)

  want = run(xla)
  got = run(Transformer(cfg.replace(attention_impl="blocked", attention_block=4)))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_auto_attention_is_blocked_on_cpu():
  cfg = ModelConfig.preset("tiny")
  assert cfg.attention_impl == "auto"
  assert cfg.resolved_attention_impl == ("blocked" if jax.default_backend() == "cpu" else "xla")
  assert cfg.replace(attention_impl="xla").resolved_attention_impl == "xla"


def test_blocked_attention_errors():
  q, k, v, _ = _inputs(2, 8, 4, 2, 8)
  mask = causal_mask(jnp.ones((2, 8), jnp.int32), jnp.tile(jnp.arange(8), (2, 1)))
  with pytest.raises(ValueError, match="mask must be"):
    blocked_attention(q, k, v, mask[:, :, :4])
  with pytest.raises(ValueError, match="self-attention shapes"):
    blocked_attention(q, k[:, :4], v[:, :4], mask)
  with pytest.raises(ValueError, match="attention_impl"):
    ModelConfig.preset("tiny", attention_impl="flash")


def test_jitted_model_gradient_equals_op_by_op():
  """The whole model's jitted gradient (default CPU attention, 8 x 256 tokens) equals
  the gradient computed op by op (`jax.disable_jit`), where no fusion happens: a
  guard against compiler fusion bugs in the training gradient (the one found in the
  blocked backward needed a broadcast cotangent, which the test above covers)."""
  cfg = ModelConfig.preset("tiny", vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2,
                           head_dim=16, mlp_dim=128, max_seq_len=256)  # fmt: skip
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (8, 256)), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:1, :8])["params"])

  def loss(p):
    logits = model.apply({"params": p}, tokens).logits[:, :-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

  fused = jax.jit(jax.grad(loss))(params)
  with jax.disable_jit():
    plain = jax.grad(loss)(params)
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-8)
