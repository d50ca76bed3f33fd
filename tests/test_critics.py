"""GPM head and reward models on the trunk: init, logical axes, what each head reads."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.critics import GPMHead, RewardModel, gather_positions, last_prompt_index
from critic_jax.models import ModelConfig, Transformer, last_token_index

CFG = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_layers=1, mlp_dim=64,
                         heads=("reward",))  # fmt: skip


def _rows(b=3, t=9, seed=0):
  rng = np.random.RandomState(seed)
  lengths = np.array([9, 6, 4])[:b]
  seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  tokens = rng.randint(4, 64, (b, t)).astype(np.int32) * seg
  prompt_len = np.array([3, 2, 1])[:b]
  loss_mask = (np.arange(t)[None] >= prompt_len[:, None]) & (seg == 1)
  pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  return jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(loss_mask)


def test_index_helpers_by_hand():
  mask = jnp.array([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(last_prompt_index(mask), [1, 0, 0])
  h = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  np.testing.assert_array_equal(gather_positions(h, jnp.array([2, 0])), [[4, 5], [6, 7]])


def test_gpm_head_reads_last_and_prompt_tokens_with_gpm_init():
  d, k = 400, 25
  head = GPMHead(k=k, gate=True)
  hidden = jax.random.normal(jax.random.key(0), (2, 5, d))
  last, prompt = jnp.array([4, 2]), jnp.array([1, 0])
  boxed = head.init(jax.random.key(1), hidden, last, prompt)["params"]
  # Logical axes on both bias-free kernels; N(0, std = 1/(D+1)) as the official GPM code.
  assert set(boxed) == {"value", "prompt"} and set(boxed["value"]) == {"kernel"}
  assert boxed["value"]["kernel"].names == ("embed", "head_out")
  assert boxed["prompt"]["kernel"].names == ("embed", "head_out")
  params = nn.unbox(boxed)
  w_v, w_g = params["value"]["kernel"], params["prompt"]["kernel"]
  assert w_v.shape == (d, 2 * k) and w_g.shape == (d, k)
  np.testing.assert_allclose(np.std(np.asarray(w_v)), 1 / (d + 1), rtol=0.05)
  emb, gate = head.apply({"params": params}, hidden, last, prompt)
  np.testing.assert_allclose(emb, np.stack([hidden[0, 4], hidden[1, 2]]) @ w_v, rtol=1e-5)
  np.testing.assert_allclose(gate, np.stack([hidden[0, 1], hidden[1, 0]]) @ w_g, rtol=1e-5)
  # Without a gate there is no prompt head, and the representation is the same.
  emb2, none = GPMHead(k=k).apply({"params": {"value": params["value"]}}, hidden, last)
  assert none is None
  np.testing.assert_allclose(emb2, emb)
  with pytest.raises(ValueError, match="needs prompt_index"):
    head.apply({"params": params}, hidden, last)


def test_scalar_reward_model_is_the_transformer_reward_head():
  tokens, seg, pos, mask = _rows()
  rm = RewardModel(CFG, "scalar")
  params = nn.unbox(jax.jit(rm.init)(jax.random.key(0)))
  # Same parameter tree as a plain Transformer with a reward head (loadable either way).
  dummy = jnp.zeros((1, 8), jnp.int32)
  ref = nn.unbox(jax.eval_shape(lambda: Transformer(CFG).init(jax.random.key(0), dummy))["params"])
  assert jax.tree.structure(params) == jax.tree.structure(ref)

  @jax.jit
  def run(p, toks):
    out = rm.apply(p, toks, positions=pos, segment_ids=seg)
    hidden = Transformer(CFG).apply({"params": p}, toks, segment_ids=seg, heads=()).hidden
    return out, hidden[jnp.arange(3), last_token_index(seg)]

  out, h_last = run(params, tokens)
  assert out.emb is None and out.rewards.shape == (3,)
  w = params["reward_head"]["Dense_0"]
  np.testing.assert_allclose(out.rewards, h_last @ w["kernel"][:, 0] + w["bias"][0], rtol=1e-5)
  # Right padding is invisible: garbage in padded slots changes nothing.
  noisy, _ = run(params, jnp.where(seg == 0, 7, tokens))
  np.testing.assert_allclose(noisy.rewards, out.rewards, rtol=1e-5)


def test_gpm_reward_model_on_a_headless_trunk():
  tokens, seg, pos, mask = _rows()
  cfg = CFG.replace(heads=())  # an empty head set works on the trunk
  rm = RewardModel(cfg, "gpm", gpm_k=2, gpm_gate=True)
  params = nn.unbox(jax.jit(rm.init)(jax.random.key(0)))
  assert set(params) == {"trunk", "gpm_head"}
  assert "reward_head" not in params["trunk"] and "lm_head" not in params["trunk"]

  @jax.jit
  def run(p):
    out = rm.apply(p, tokens, positions=pos, segment_ids=seg, loss_mask=mask)
    return out, Transformer(cfg).apply({"params": p["trunk"]}, tokens, segment_ids=seg,
                                       heads=()).hidden  # fmt: skip

  out, h = run(params)
  assert out.rewards is None and out.emb.shape == (3, 4) and out.gate_logits.shape == (3, 2)
  w_v = params["gpm_head"]["value"]["kernel"]
  w_g = params["gpm_head"]["prompt"]["kernel"]
  np.testing.assert_allclose(out.emb, h[jnp.arange(3), jnp.array([8, 5, 3])] @ w_v, rtol=1e-5)
  # Last prompt tokens: prompts of 3, 2, 1 tokens end at 2, 1, 0.
  np.testing.assert_allclose(out.gate_logits, h[jnp.arange(3), jnp.array([2, 1, 0])] @ w_g,
                             rtol=1e-5)  # fmt: skip
  with pytest.raises(ValueError, match="needs loss_mask"):
    jax.eval_shape(lambda: rm.apply(params, tokens, positions=pos, segment_ids=seg))


def test_reward_model_argument_errors():
  with pytest.raises(ValueError, match="needs 'reward' in model.heads"):
    RewardModel(CFG.replace(heads=("lm",)), "scalar")
  with pytest.raises(ValueError, match="head must be one of"):
    RewardModel(CFG, "pairwise")
