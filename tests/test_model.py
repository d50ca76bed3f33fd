"""The decoder: shapes, causality, caching, padding, packing, family switches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.models import KVCache, ModelConfig, Transformer, fuse_projections, layers
from critic_jax.models.layers import rope_cos_sin, rope_inv_freq

FAMILIES = ["tiny", "tiny_gpt2", "tiny_qwen3"]


def _init(cfg, tokens, seed=0):
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), tokens))["params"]
  return model, params


def _tokens(b=2, t=10, v=256, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(4, v, (b, t)), jnp.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_heads(family):
  cfg = ModelConfig.preset(family, heads=("lm", "value", "reward"))
  tok = _tokens()
  model, params = _init(cfg, tok)
  out = model.apply({"params": params}, tok)
  assert out.logits.shape == (2, 10, cfg.vocab_size)
  assert out.values.shape == (2, 10) and out.values.dtype == jnp.float32
  assert out.rewards.shape == (2,)
  assert out.hidden.shape == (2, 10, cfg.d_model)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == cfg.num_params() + 2 * (cfg.d_model + 1)  # two scalar heads
  # Only the requested heads are computed.
  only_v = model.apply({"params": params}, tok, heads=("value",))
  assert only_v.logits is None and only_v.rewards is None
  np.testing.assert_allclose(only_v.values, out.values, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
  cfg = ModelConfig.preset(family)
  tok = _tokens()
  model, params = _init(cfg, tok)
  base = model.apply({"params": params}, tok).logits
  changed = model.apply({"params": params}, tok.at[:, 6].set(5)).logits
  np.testing.assert_allclose(base[:, :6], changed[:, :6], atol=1e-6)
  assert np.abs(np.asarray(base[:, 6:] - changed[:, 6:])).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_full_forward_equals_cached_steps(family):
  cfg = ModelConfig.preset(family)
  tok = _tokens()
  model, params = _init(cfg, tok)
  full = model.apply({"params": params}, tok).logits
  # Prefill 4 tokens, then one token at a time.
  cache = KVCache.init(cfg, 2, 16)
  out = model.apply(
    {"params": params}, tok[:, :4], cache=cache, cache_index=jnp.zeros(2, jnp.int32)
  )
  steps = [out.logits]
  cache = out.cache
  for t in range(4, 10):
    o = model.apply(
      {"params": params}, tok[:, t : t + 1], cache=cache, cache_index=jnp.full((2,), t, jnp.int32)
    )
    steps.append(o.logits)
    cache = o.cache
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5)


def test_right_padding_and_reward_read_at_last_token():
  cfg = ModelConfig.preset("tiny", heads=("lm", "reward"))
  tok = _tokens(b=1, t=6)
  model, params = _init(cfg, tok)
  ref = model.apply({"params": params}, tok)
  padded = jnp.concatenate([tok, jnp.full((1, 4), 7, jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 6 + [0] * 4], jnp.int32)
  out = model.apply({"params": params}, padded, segment_ids=seg)
  np.testing.assert_allclose(out.logits[:, :6], ref.logits, atol=1e-5)
  np.testing.assert_allclose(out.rewards, ref.rewards, atol=1e-5)
  # Pad token ids have no effect anywhere that counts.
  out2 = model.apply({"params": params}, padded.at[:, 7:].set(99), segment_ids=seg)
  np.testing.assert_allclose(out2.logits[:, :6], ref.logits, atol=1e-5)
  np.testing.assert_allclose(out2.rewards, ref.rewards, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(out2.logits)))


def test_packed_rows_equal_separate_sequences():
  cfg = ModelConfig.preset("tiny")
  a, b = _tokens(b=1, t=5, seed=1), _tokens(b=1, t=4, seed=2)
  model, params = _init(cfg, a)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3], jnp.int32)
  out = model.apply({"params": params}, packed, segment_ids=seg, positions=pos).logits
  np.testing.assert_allclose(out[:, :5], model.apply({"params": params}, a).logits, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:9], model.apply({"params": params}, b).logits, atol=1e-5)


def test_cudnn_config_keeps_packed_segments_apart(monkeypatch):
  """attention_impl="cudnn" uses sequence lengths only for rows promised unpacked.

  cuDNN is not available on the CPU, so its calls run through XLA here: what is checked
  is which masks the model hands to the kernel (lengths, or the explicit segment mask).
  """
  real = jax.nn.dot_product_attention
  calls = []

  def on_cpu(*args, implementation=None, **kw):
    calls.append("lengths" if kw.get("query_seq_lengths") is not None else "mask")
    return real(*args, implementation="xla" if implementation == "cudnn" else implementation, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
  cfg = ModelConfig.preset("tiny", attention_impl="xla")
  a, b = _tokens(b=1, t=5, seed=1), _tokens(b=1, t=4, seed=2)
  model, params = _init(cfg, a)
  cudnn = Transformer(cfg.replace(attention_impl="cudnn"))
  tokens = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(4)) + [0] * 3], jnp.int32)
  kw = dict(segment_ids=seg, positions=pos)
  ref = model.apply({"params": params}, tokens, **kw).logits
  calls.clear()
  out = cudnn.apply({"params": params}, tokens, **kw).logits  # packed=True, the default
  assert set(calls) == {"mask"}
  np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_allclose(out[:, 5:9], model.apply({"params": params}, b).logits, atol=1e-5)
  # The same row through the lengths path would let segment 2 attend segment 1.
  wrong = cudnn.apply({"params": params}, tokens, packed=False, **kw).logits
  assert np.max(np.abs(np.asarray(wrong[:, 5:9] - ref[:, 5:9]))) > 1e-3
  # One right-padded segment per row: packed=False takes the lengths path, same logits.
  one = jnp.asarray([[1] * 9 + [0] * 3], jnp.int32)
  calls.clear()
  fast = cudnn.apply({"params": params}, tokens, segment_ids=one, packed=False).logits
  assert set(calls) == {"lengths"}
  slow = model.apply({"params": params}, tokens, segment_ids=one).logits
  np.testing.assert_allclose(fast[:, :9], slow[:, :9], atol=1e-5)


def test_scan_and_remat_match_unrolled():
  cfg = ModelConfig.preset("tiny", num_layers=3)
  tok = _tokens()
  model, params = _init(cfg, tok)
  ref = model.apply({"params": params}, tok).logits
  scan_cfg = cfg.replace(scan_layers=True, remat="full")
  scan_model = Transformer(scan_cfg)
  stacked = {k: v for k, v in params.items() if not k.startswith("layer_")}
  stacked["layers"] = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[params[f"layer_{i}"] for i in range(3)]
  )
  shapes = jax.eval_shape(lambda: nn.unbox(scan_model.init(jax.random.key(0), tok))["params"])
  assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
  out = scan_model.apply({"params": stacked}, tok).logits
  np.testing.assert_allclose(out, ref, atol=1e-5)

  def loss(m, p):
    return jnp.mean(m.apply({"params": p}, tok).logits ** 2)

  g_ref = jax.grad(lambda p: loss(model, p))(params)["layer_1"]["mlp"]["up"]["kernel"]
  g_scan = jax.grad(lambda p: loss(scan_model, p))(stacked)["layers"]["mlp"]["up"]["kernel"][1]
  np.testing.assert_allclose(g_scan, g_ref, atol=1e-6)


@pytest.mark.parametrize(
  "preset,overrides",
  [("tiny", dict(num_kv_heads=2)), ("tiny_gpt2", {}), ("tiny_qwen3", dict(scan_layers=True))],
)
def test_fused_projections_give_the_same_model(preset, overrides):
  """The decode layout (one qkv and one gate_up kernel per block) computes the same model
  from `fuse_projections(params)`; its params have the fused model's own shapes."""
  cfg = ModelConfig.preset(preset, **overrides)
  tok = _tokens(v=cfg.vocab_size)
  model, params = _init(cfg, tok)
  fused_model = Transformer(cfg, fused_projections=True)
  fused = fuse_projections(params, cfg)

  def shapes(tree):
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  want = jax.eval_shape(lambda: nn.unbox(fused_model.init(jax.random.key(0), tok))["params"])
  assert shapes(fused) == shapes(want)
  assert shapes(fuse_projections(fused, cfg)) == shapes(want)  # idempotent
  np.testing.assert_allclose(
    fused_model.apply({"params": fused}, tok).logits,
    model.apply({"params": params}, tok).logits,
    atol=2e-6,
  )
  # The layout by hand: [D, K, R + 2, H] holds query head k * R + r at [:, k, r], then kv
  # head k's key and value; gate_up [D, 2, F] holds gate then up.
  layer = "layers" if cfg.scan_layers else "layer_0"
  attn, r = params[layer]["attn"], cfg.num_heads // cfg.num_kv_heads
  qkv = fused[layer]["attn"]["qkv"]["kernel"]
  for k in range(cfg.num_kv_heads):
    np.testing.assert_array_equal(qkv[..., k, r, :], attn["k"]["kernel"][..., k, :])
    np.testing.assert_array_equal(qkv[..., k, r + 1, :], attn["v"]["kernel"][..., k, :])
    for j in range(r):
      np.testing.assert_array_equal(qkv[..., k, j, :], attn["q"]["kernel"][..., k * r + j, :])
  if cfg.mlp == "swiglu":
    gate_up = fused[layer]["mlp"]["gate_up"]["kernel"]
    np.testing.assert_array_equal(gate_up[..., 0, :], params[layer]["mlp"]["gate"]["kernel"])
    np.testing.assert_array_equal(gate_up[..., 1, :], params[layer]["mlp"]["up"]["kernel"])
  else:
    assert "up" in fused[layer]["mlp"] and "gate_up" not in fused[layer]["mlp"]


def test_grouped_query_attention_equals_repeated_kv_heads():
  gqa = ModelConfig.preset("tiny", num_heads=4, num_kv_heads=2)
  mha = gqa.replace(num_kv_heads=4)
  tok = _tokens()
  m_gqa, p_gqa = _init(gqa, tok)
  m_mha = Transformer(mha)
  p_mha = jax.tree.map(lambda x: x, p_gqa)
  for i in range(gqa.num_layers):
    attn = p_mha[f"layer_{i}"]["attn"]
    for name in ("k", "v"):
      attn[name]["kernel"] = jnp.repeat(attn[name]["kernel"], 2, axis=1)
  np.testing.assert_allclose(
    m_mha.apply({"params": p_mha}, tok).logits, m_gqa.apply({"params": p_gqa}, tok).logits,
    atol=1e-5,
  )  # fmt: skip


def test_sliding_window():
  cfg = ModelConfig.preset("tiny", sliding_window=3)
  tok = _tokens(t=8)
  model, params = _init(cfg, tok)
  base = model.apply({"params": params}, tok).logits
  # With one layer the receptive field is exactly the window; with two it is 2*(W-1)+1.
  far = model.apply({"params": params}, tok.at[:, 2].set(5)).logits
  np.testing.assert_allclose(base[:, 7], far[:, 7], atol=1e-6)
  near = model.apply({"params": params}, tok.at[:, 4].set(5)).logits
  assert np.abs(np.asarray(base[:, 7] - near[:, 7])).max() > 1e-4
  # The cached path applies the same window.
  cache = KVCache.init(cfg, 2, 8)
  out = model.apply({"params": params}, tok, cache=cache, cache_index=jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(out.logits, base, atol=1e-5)


def test_bf16_compute_keeps_fp32_params():
  cfg = ModelConfig.preset("tiny", dtype="bfloat16")
  tok = _tokens()
  model, params = _init(cfg, tok)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out = model.apply({"params": params}, tok)
  assert out.logits.dtype == jnp.bfloat16
  ref = Transformer(cfg.replace(dtype="float32")).apply({"params": params}, tok).logits
  np.testing.assert_allclose(out.logits.astype(jnp.float32), ref, atol=0.05)


def test_rope_scaling():
  base = rope_inv_freq(16, 10000.0)
  np.testing.assert_allclose(base, 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)
  lin = rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0})
  np.testing.assert_allclose(lin, base / 4, rtol=1e-6)
  # Llama 3: high frequencies (short wavelengths) kept, low frequencies divided by factor.
  l3 = rope_inv_freq(
    16, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
  )  # fmt: skip
  b3 = rope_inv_freq(16, 500000.0)
  wavelen = 2 * np.pi / np.asarray(b3)
  np.testing.assert_allclose(np.asarray(l3)[wavelen < 2048], np.asarray(b3)[wavelen < 2048])
  np.testing.assert_allclose(np.asarray(l3)[wavelen > 8192], np.asarray(b3)[wavelen > 8192] / 8)
  with pytest.raises(ValueError, match="yarn"):
    ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['low_freq_factr'\]"):
    ModelConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factr": 1.0})
  with pytest.raises(ValueError, match="needs a 'factor'"):
    ModelConfig(rope_scaling={"rope_type": "linear"})


def test_learned_positions_padding_past_the_table_stays_finite():
  """GPT-2 rows padded past max_seq_len: the padding's positions have no table row (the
  lookup would give NaN, which attention's zero weights would spread to the real tokens), so
  they are clamped; the real tokens equal the unpadded row. Unpadded rows that long raise."""
  cfg = ModelConfig.preset("tiny_gpt2", max_seq_len=8)
  model, params = _init(cfg, _tokens(1, 8))
  tokens = _tokens(1, 10)
  seg = jnp.asarray([[1] * 6 + [0] * 4], jnp.int32)
  padded = model.apply({"params": params}, tokens, segment_ids=seg).logits
  alone = model.apply({"params": params}, tokens[:, :6]).logits
  np.testing.assert_allclose(padded[:, :6], alone, atol=1e-5, rtol=0)
  assert np.isfinite(np.asarray(padded)).all()
  with pytest.raises(ValueError, match="10 tokens per row exceed model.max_seq_len=8"):
    model.apply({"params": params}, tokens)


def test_rope_scaling_legacy_type_key_and_mlp_bias_switch():
  """transformers v4's {"type": ...} is stored as rope_type (an export writes one key);
  mlp_bias equal to out_bias is stored as None, so equal models compare equal."""
  cfg = ModelConfig(rope_scaling={"type": "linear", "factor": 4.0})
  assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
  assert ModelConfig(out_bias=True, mlp_bias=True) == ModelConfig(out_bias=True)
  qwen3_bias = ModelConfig.preset("tiny_qwen3", qkv_bias=True, out_bias=True, mlp_bias=False)
  d = qwen3_bias.to_configdict()
  assert ModelConfig.from_dict(d) == qwen3_bias
  d.mlp_bias = True  # a typed placeholder: settable from the command line
  assert ModelConfig.from_dict(d).resolved_mlp_bias
  params = _init(qwen3_bias, _tokens(1, 4))[1]
  assert "bias" in params["layer_0"]["attn"]["o"]
  assert all("bias" not in params["layer_0"]["mlp"][k] for k in ("gate", "up", "down"))
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == qwen3_bias.num_params()


def test_rope_tables_exact_for_every_int32_position():
  # cos(p f) and sin(p f) from base-256 digit tables: against float64 for positions over the
  # whole int32 range (negative ones too), and against the float32 "direct" path.
  inv = np.asarray(rope_inv_freq(16, 10000.0))
  rng = np.random.RandomState(0)
  special = [0, 1, 255, 256, 257, 65535, 65536, 2**24 - 1, 2**24, 2**31 - 1, -1, -256, -(2**31)]
  pos = np.concatenate([special, rng.randint(-(2**31), 2**31 - 1, 51)]).astype(np.int32)
  pos = pos.reshape(4, 16)
  cos, sin = jax.jit(lambda p: rope_cos_sin(p, inv, "tables"))(jnp.asarray(pos))
  assert cos.shape == sin.shape == (4, 16, 16)
  ang = pos.astype(np.float64)[..., None] * inv.astype(np.float64)
  ang = np.concatenate([ang, ang], -1)
  np.testing.assert_allclose(cos, np.cos(ang), atol=5e-7)
  np.testing.assert_allclose(sin, np.sin(ang), atol=5e-7)
  small = jnp.asarray(np.arange(256, dtype=np.int32).reshape(2, 128))
  for a, b in zip(
    rope_cos_sin(small, inv, "tables"), rope_cos_sin(small, inv, "direct"), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=3e-5)  # "direct" rounds p f to float32
  with pytest.raises(ValueError, match="rope impl"):
    rope_cos_sin(small, inv, "fast")


def test_rope_impls_give_the_same_model():
  cfg = ModelConfig.preset("tiny", rope_impl="direct")
  tok = _tokens(t=24)
  model, params = _init(cfg, tok)
  ref = model.apply({"params": params}, tok).logits
  out = Transformer(cfg.replace(rope_impl="tables")).apply({"params": params}, tok).logits
  np.testing.assert_allclose(out, ref, atol=2e-5)
  assert ModelConfig(rope_impl="auto").resolved_rope_impl == "tables"  # the CPU backend
  with pytest.raises(ValueError, match="model.rope_impl"):
    ModelConfig(rope_impl="fast")


def test_materialised_transpose():
  x = jnp.asarray(np.random.RandomState(0).randn(6, 10), jnp.bfloat16)
  np.testing.assert_array_equal(jax.jit(layers._t)(x), x.T)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_custom_vjp_equals_autodiff(dtype, recompute):
  """`layers.swiglu` (a custom VJP that recomputes the sigmoid) against autodiff of
  silu(g) * u in float32: the same output and gradients, in the inputs' dtype (gates
  out to +-12 so the sigmoid saturates), with the sigmoid recomputed either way."""
  rs = np.random.RandomState(0)
  g, u, w = (rs.standard_normal((4, 6, 40)).astype(np.float32) * s for s in (4.0, 1.0, 1.0))
  g[0, 0, :2] = (12.0, -12.0)

  def grads(fn, g, u):
    return jax.jit(jax.value_and_grad(lambda g, u: jnp.sum(fn(g, u).astype(jnp.float32) * w),
                                      argnums=(0, 1)))(g, u)  # fmt: skip

  want_v, want_g = grads(lambda g, u: jax.nn.silu(g) * u, jnp.asarray(g), jnp.asarray(u))
  dt = jnp.dtype(dtype)
  gd, ud = jnp.asarray(g, dt), jnp.asarray(u, dt)
  assert layers.swiglu(gd, ud, recompute).dtype == dt
  got_v, got_g = grads(lambda g, u: layers.swiglu(g, u, recompute), gd, ud)
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(got_v, want_v, rtol=tol)
  for a, b in zip(got_g, want_g, strict=True):
    assert a.dtype == dt
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=tol * scale)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swiglu_recompute_is_not_merged_by_cse(dtype):
  """Without `recompute` XLA merges the backward's sigmoid with the forward's: the
  compiled gradient program evaluates one (exp); with it, two (exp forward, tanh
  backward). The model's `swiglu_recompute` reaches `layers.swiglu`."""
  x = jnp.ones((16, 8), dtype)
  w = jnp.linspace(-1.0, 1.0, 16 * 24).reshape(16, 24)
  params = {k: jnp.full((8, 24), v, dtype) for k, v in (("g", 0.1), ("u", 0.2))}

  def sigmoids(recompute):
    def loss(p):  # the backward needs no h, only the sigmoid
      return jnp.sum(layers.swiglu(x @ p["g"], x @ p["u"], recompute).astype(jnp.float32) * w)

    text = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
    return text.count("exponential("), text.count("tanh(")

  assert sigmoids(False) == (1, 0)
  assert sigmoids(True) == (1, 1)
  tok = _tokens()
  for flag in (False, True):
    model, params = _init(ModelConfig.preset("tiny", num_layers=1, swiglu_recompute=flag), tok)
    grad = jax.jit(jax.grad(lambda p, m=model: jnp.sum(m.apply({"params": p}, tok).logits)))
    assert ("tanh" in grad.lower(params).as_text()) == flag


def test_bf16_matmul_grad_modes_agree():
  # bfloat16 compute: the custom VJP (bf16 operands, float32 accumulation, transposes
  # materialised) against JAX's transpose rule, and both against float32.
  cfg = ModelConfig.preset("tiny", num_layers=2, dtype="bfloat16", matmul_grad="autodiff")
  tok = _tokens()
  model, params = _init(cfg, tok)

  def grads(c):
    m = Transformer(c)

    def loss(p):
      lp = jax.nn.log_softmax(m.apply({"params": p}, tok).logits.astype(jnp.float32))
      return jnp.mean(lp[..., 7] ** 2)

    return jax.jit(jax.grad(loss))(params)

  g_auto = grads(cfg)
  g_fast = grads(cfg.replace(matmul_grad="transpose_smaller"))
  g_f32 = grads(cfg.replace(dtype="float32"))
  for (path, a), b, c in zip(
    jax.tree_util.tree_leaves_with_path(g_f32),
    jax.tree.leaves(g_auto),
    jax.tree.leaves(g_fast),
    strict=True,
  ):
    assert b.dtype == c.dtype == jnp.float32
    scale = float(jnp.linalg.norm(a)) + 1e-12
    for other in (b, c):
      rel = float(jnp.linalg.norm(other - a)) / scale
      assert rel < 0.05, (jax.tree_util.keystr(path), rel)
    assert float(jnp.linalg.norm(b - c)) / scale < 0.05, jax.tree_util.keystr(path)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="model.norm"):
    ModelConfig(norm="batch")
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(KeyError, match="Did you mean 'num_layers'"):
    ModelConfig.from_dict({"num_layer": 2})


def test_matmul_grad_modes_give_the_same_gradients():
  # "transpose_smaller" (custom VJP) and "autodiff" are the same math: equal loss and gradient
  # for every parameter (q/k/v project into [N, H], o contracts two dims, MLP both ways round).
  cfg = ModelConfig.preset("tiny", num_layers=2, matmul_grad="autodiff")
  tok = _tokens()
  model, params = _init(cfg, tok)
  fast = Transformer(cfg.replace(matmul_grad="transpose_smaller"))

  def loss(m, p):
    return jnp.mean(jax.nn.log_softmax(m.apply({"params": p}, tok).logits)[..., 7] ** 2)

  l_ref, g_ref = jax.value_and_grad(lambda p: loss(model, p))(params)
  l_fast, g_fast = jax.value_and_grad(lambda p: loss(fast, p))(params)
  np.testing.assert_allclose(l_fast, l_ref, rtol=1e-6)
  for path, a in jax.tree_util.tree_leaves_with_path(g_ref):
    b = g_fast
    for k in path:
      b = b[k.key]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  # "auto" resolves by backend and remat policy ("dots" policies must see plain dot_generals).
  assert jax.default_backend() == "cpu"
  assert ModelConfig(matmul_grad="auto").resolved_matmul_grad == "transpose_smaller"
  assert ModelConfig(matmul_grad="auto", remat="dots").resolved_matmul_grad == "autodiff"
  with pytest.raises(ValueError, match="model.matmul_grad"):
    ModelConfig(matmul_grad="fast")
