"""The sampler: exact log-probs, cache == no cache, stop tokens, RNG, groups, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from critic_jax.data import CharTokenizer, encode_prompts
from critic_jax.losses import token_logprobs
from critic_jax.models import ModelConfig, Transformer
from critic_jax.models.attention import attend
from critic_jax.models.transformer import DecodeContext
from critic_jax.parallel import DEFAULT_RULES, make_mesh
from critic_jax.sampler import (
  SAMPLERS,
  GenerationConfig,
  Sampler,
  SamplingConfig,
  greedy_generate,
  process_logits,
  sample_tokens,
  shard_params,
)
from critic_jax.sampler.generate import auto_kv_chunk
from critic_jax.sampler.sampling import inverse_cdf_draw, processing_is_identity, row_keys

TOK = CharTokenizer()  # 100 ids; the model's vocabulary (128) is padded past it
CFG = ModelConfig.preset("tiny", vocab_size=128, d_model=32, mlp_dim=64)
PROMPTS = ["12+3=", "a", "hello world!", "7*8", "xyz"]
T = 10
# The main sampling rule: temperature and nucleus together, so the processed
# distribution differs from the policy's.
TOP_P = SamplingConfig("top_p", temperature=1.3, top_p=0.9)


def _random_params(model, std=0.2, seed=0):
  """Normal(0, std) weights (norm scales 1, biases 0) of the model's shapes, without
  compiling `model.init` (seconds of XLA compile for nothing the tests need)."""
  shapes = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  )
  rng = np.random.RandomState(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(s.shape, s.dtype)
    if "bias" in name:
      return np.zeros(s.shape, s.dtype)
    return (std * rng.standard_normal(s.shape)).astype(s.dtype)

  return jax.device_put(jax.tree_util.tree_map_with_path(leaf, shapes))


@pytest.fixture(scope="module")
def tiny():
  model = Transformer(CFG)
  return model, _random_params(model)


@pytest.fixture(scope="module")
def prompts():
  enc = encode_prompts(PROMPTS, TOK)
  return enc["tokens"], enc["lengths"]


def _gen(**kw):
  base = dict(max_new_tokens=T, vocab_limit=TOK.vocab_size, pad_id=TOK.pad_id)
  base.update(kw)
  return GenerationConfig(**base)


@pytest.fixture(scope="module")
def sampler(tiny):
  """The shared compiled sampler (host loop): batches padded to 8 prompts, so tests reuse it."""
  cfg = _gen(sampling=TOP_P, processed_logprobs=True)
  return Sampler(tiny[0], cfg, batch_multiple=8, loop="host")


@pytest.fixture(scope="module")
def forward(tiny):
  model = tiny[0]
  return jax.jit(lambda p, x, s: model.apply({"params": p}, x, segment_ids=s).logits)


def _teacher_forced(forward, params, prompts, out):
  """Log-probs and logits of each sampled response under the training forward (no cache)."""
  tokens, lengths = prompts
  rows = out.prompt_index
  width = tokens.shape[1] + T
  seqs = np.zeros((len(rows), width), np.int32)
  seg = np.zeros_like(seqs)
  for r, b in enumerate(rows):
    n, m = lengths[b], out.lengths[r]
    seqs[r, :n] = tokens[b, :n]
    seqs[r, n : n + m] = out.tokens[r, :m]
    seg[r, : n + m] = 1
  logits = np.asarray(forward(params, jnp.asarray(seqs), jnp.asarray(seg)))
  lp = np.asarray(token_logprobs(jnp.asarray(logits[:, :-1]), jnp.asarray(seqs[:, 1:])))
  ref_lp = np.zeros(out.tokens.shape, np.float32)
  ref_logits = np.zeros(out.tokens.shape + (logits.shape[-1],), np.float32)
  for r, b in enumerate(rows):
    n, m = lengths[b], out.lengths[r]
    ref_lp[r, :m] = lp[r, n - 1 : n - 1 + m]
    ref_logits[r, :m] = logits[r, n - 1 : n - 1 + m]
  return ref_lp, ref_logits


def _np_processed(logits, cfg: SamplingConfig, vocab_limit):
  """Reference processed log-probs `[V]` in float64, written independently of the library."""
  x = np.asarray(logits, np.float64).copy()
  x[vocab_limit:] = -np.inf
  if cfg.method == "greedy":
    y = np.full_like(x, -np.inf)
    y[np.argmax(x)] = 0.0
    return y
  x = x / cfg.temperature

  def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()

  if cfg.method == "top_k":
    x[x < np.sort(x)[-cfg.top_k]] = -np.inf
  elif cfg.method == "top_p":
    p = softmax(x)
    order = np.argsort(-x)
    before = np.cumsum(p[order]) - p[order]
    x[x < x[order[before < cfg.top_p]].min()] = -np.inf
  elif cfg.method == "min_p":
    p = softmax(x)
    x[p < cfg.min_p * p.max()] = -np.inf
  return x - np.log(np.sum(np.exp(x[np.isfinite(x)] - x.max()))) - x.max()


# --- the sampling rules, by hand --------------------------------------------------
def test_sampling_rules_keep_the_right_tokens():
  probs = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
  logits = jnp.asarray(np.log(np.maximum(probs, 1e-30))[None].repeat(2, 0), jnp.float32)
  logits = logits.at[:, 4].set(10.0)  # id 4 is past the vocab limit: never kept
  cases = {
    "greedy": (SamplingConfig("greedy"), {0}),
    "temperature": (SamplingConfig("temperature"), {0, 1, 2, 3}),
    "top_k=2": (SamplingConfig("top_k", top_k=2), {0, 1}),
    # top-p keeps a token while the mass before it is < p: 0 | 0.5 | 0.75 | 0.9.
    "top_p=0.5": (SamplingConfig("top_p", top_p=0.5), {0}),
    "top_p=0.75": (SamplingConfig("top_p", top_p=0.75), {0, 1}),
    "top_p=0.76": (SamplingConfig("top_p", top_p=0.76), {0, 1, 2}),
    "top_p=0.01": (SamplingConfig("top_p", top_p=0.01), {0}),
    "top_p=1": (SamplingConfig("top_p", top_p=1.0), {0, 1, 2, 3}),
    # min-p keeps p >= min_p * 0.5.
    "min_p=0.3": (SamplingConfig("min_p", min_p=0.3), {0, 1, 2}),
    "min_p=0.31": (SamplingConfig("min_p", min_p=0.31), {0, 1}),
    "t=2": (SamplingConfig("temperature", temperature=2.0), {0, 1, 2, 3}),
  }
  outs = jax.jit(lambda x: {k: process_logits(x, c, vocab_limit=4) for k, (c, _) in cases.items()})(
    logits
  )
  for name, (_, want) in cases.items():
    kept = set(np.flatnonzero(np.isfinite(np.asarray(outs[name][0]))).tolist())
    assert kept == want, name
  # Temperature divides the logits: the processed distribution is p^(1/t) renormalised.
  want = np.sqrt(probs[:4]) / np.sqrt(probs[:4]).sum()
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(outs["t=2"][0]))[:4], want, rtol=1e-5)


def test_top_p_one_keeps_a_large_vocabulary_whole():
  """float32's cumulative sum over 32,000 sorted probabilities reaches 1 before the tail:
  top_p=1 must not drop the tail's tokens (it did: 31,264-31,760 of 32,000 kept)."""
  logits = 3.0 * jax.random.normal(jax.random.key(0), (4, 32000))
  out = process_logits(logits, SamplingConfig("top_p", top_p=1.0))
  assert np.isfinite(np.asarray(out)).all()


def test_learned_positions_with_a_prompt_bucket_past_the_table():
  """GPT-2-style positions, max_seq_len 48, a 33-token prompt (bucket 64): the prefill's
  padding sits past the position table. Its NaN rows used to reach every real token through
  attention (all log-probs NaN, token 0 sampled); now the samples equal those of an exact
  bucket and the teacher-forced log-probs."""
  cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=32, mlp_dim=64, num_layers=2,
                           position="learned", max_seq_len=48)  # fmt: skip
  model = Transformer(cfg)
  params = _random_params(model)
  prompt = np.random.RandomState(0).randint(4, 64, (1, 33)).astype(np.int32)
  gen = GenerationConfig(max_new_tokens=8, sampling=SamplingConfig("greedy"))
  out = Sampler(model, gen).generate(params, prompt, np.array([33]), jax.random.key(0))
  exact = Sampler(model, gen, prompt_buckets=(33,))
  ref = exact.generate(params, prompt, np.array([33]), jax.random.key(0))
  assert np.isfinite(out.logprobs).all()
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  seq = jnp.asarray(np.concatenate([prompt, out.tokens], axis=1))
  logits = model.apply({"params": params}, seq).logits[:, 32:-1]
  np.testing.assert_allclose(out.logprobs, token_logprobs(logits, seq[:, 33:]), atol=1e-5)


def test_sampling_frequencies_match_the_processed_distribution():
  probs = np.array([0.5, 0.25, 0.15, 0.1])
  n = 10000
  logits = jnp.asarray(np.tile(np.log(probs), (n, 1)), jnp.float32)
  cases = [
    (SamplingConfig("temperature"), probs),
    (SamplingConfig("top_p", top_p=0.7), np.array([2 / 3, 1 / 3, 0, 0])),
    (SamplingConfig("top_k", top_k=3), np.array([0.5, 0.25, 0.15, 0]) / 0.9),
  ]
  draws = jax.jit(
    lambda x: [sample_tokens(row_keys(jax.random.key(0), jnp.arange(n), 0), x, c) for c, _ in cases]
  )(logits)
  for (tok, plp), (_, want) in zip(draws, cases, strict=True):
    freq = np.bincount(np.asarray(tok), minlength=4) / n
    np.testing.assert_allclose(freq, want, atol=0.02)
    np.testing.assert_allclose(np.exp(np.asarray(plp)), want[np.asarray(tok)], rtol=1e-5)


def test_inverse_cdf_draw_by_hand():
  """V = 40 -> blocks of 16 (the last one padded). Weights (unnormalised, total 8):
  token 3 -> 2, token 17 -> 4, token 39 -> 2, all others 0 (blocks 0, 1, 2 carry
  2, 4, 2). u * 8 picks the first token whose cumulative weight exceeds it."""
  w = np.zeros((1, 40), np.float32)
  w[0, [3, 17, 39]] = [2.0, 4.0, 2.0]
  cases = {0.0: 3, 0.2: 3, 0.2499: 3, 0.25: 17, 0.5: 17, 0.7499: 17, 0.75: 39, 0.9999999: 39}
  u = jnp.asarray(list(cases), jnp.float32)
  got = jax.jit(inverse_cdf_draw)(jnp.asarray(np.repeat(w, len(cases), 0)), u)
  assert np.asarray(got).tolist() == list(cases.values())
  # Rounding that leaves no cumulative weight above the target falls back to the last
  # positive-weight token, never to a zero-weight one: u = 1 is outside [0, 1).
  assert int(inverse_cdf_draw(jnp.asarray(w), jnp.ones((1,)))[0]) == 39


def test_inverse_cdf_frequencies_over_many_blocks():
  """V = 300 (blocks of 32), mass spread over blocks with zero-mass blocks between:
  frequencies of 20000 draws match the weights; zero-weight tokens never appear."""
  rs = np.random.RandomState(0)
  w = np.zeros(300, np.float32)
  support = np.array([0, 5, 31, 32, 100, 101, 200, 250, 299])
  w[support] = rs.uniform(0.5, 2.0, len(support))
  n = 20000
  u = jax.random.uniform(jax.random.key(0), (n,))
  tok = np.asarray(jax.jit(inverse_cdf_draw)(jnp.asarray(np.tile(w, (n, 1))), u))
  assert set(np.unique(tok).tolist()) <= set(support.tolist())
  freq = np.bincount(tok, minlength=300) / n
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.015)


def test_sampling_config_errors():
  with pytest.raises(KeyError, match="Known samplers: greedy, min_p, temperature"):
    SamplingConfig("nucleus")
  with pytest.raises(ValueError, match="temperature"):
    SamplingConfig("temperature", temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig("top_p", top_p=0.0)
  assert SAMPLERS.names() == ["greedy", "min_p", "temperature", "top_k", "top_p"]


# --- segment attention ---------------------------------------------------------
@pytest.mark.parametrize("t", [1, 2], ids=["one_token", "two_tokens"])
def test_attend_equals_attention_over_concatenated_segments(t):
  """A prompt segment shared by G rows, a per-row segment and the new tokens, against
  `jax.nn.dot_product_attention` over the explicitly concatenated keys of each row;
  one new token (the decode path: multiply-and-sum) and two (batched matmuls)."""
  rs = np.random.RandomState(0)
  b, g, n, kh, h = 2, 3, 4, 2, 8
  r = b * g

  def rand(*shape):
    return jnp.asarray(rs.standard_normal(shape), jnp.float32)

  q = rand(r, t, n, h)
  # Keys transposed [rows, K, H, S]; values [rows, K, S, H].
  pk, pv = rand(b, kh, h, 5), rand(b, kh, 5, h)
  pmask = jnp.asarray(np.arange(5)[None, None, :] < np.array([3, 5])[:, None, None])  # [B,1,5]
  gk, gv = rand(r, kh, h, 4), rand(r, kh, 4, h)
  gmask = jnp.asarray(np.arange(4)[None, None, :] < np.array([[2], [3]])[None, :t])  # [1,T,4]
  sk, sv = rand(r, kh, h, t), rand(r, kh, t, h)
  smask = jnp.asarray(np.tril(np.ones((t, t), bool))[None])
  segs = [(pk, pv, pmask), (gk, gv, gmask), (sk, sv, smask)]
  out = jax.jit(attend)(q, segs)
  assert out.shape == (r, t, n, h)
  for i in range(r):
    keys = jnp.swapaxes(jnp.concatenate([pk[i // g], gk[i], sk[i]], axis=2), 1, 2)  # [K, S, H]
    vals = jnp.concatenate([pv[i // g], gv[i], sv[i]], axis=1)  # [K, S, H]
    mask = jnp.concatenate(
      [jnp.broadcast_to(pmask[i // g], (t, 5)), jnp.broadcast_to(gmask[0], (t, 4)), smask[0]], 1
    )
    want = jax.nn.dot_product_attention(
      q[i : i + 1], jnp.swapaxes(keys, 0, 1)[None], jnp.swapaxes(vals, 0, 1)[None],
      mask=mask[None, None],
    )  # fmt: skip
    np.testing.assert_allclose(out[i], want[0], atol=1e-5)


@pytest.mark.parametrize(
  "family,merged",
  [("tiny_gpt2", False), ("tiny_qwen3", False), ("window", False), ("tiny_qwen3", True),
   ("window", True)],
  ids=["gpt2", "qwen3_gqa", "sliding_window", "qwen3_gqa_merged", "sliding_window_merged"],
)  # fmt: skip
def test_decode_context_matches_full_forward(family, merged):
  """Prefill + one-token decode calls over a `DecodeContext` (two cache chunks,
  prompts of different lengths) give the full forward's logits, for learned
  positions (GPT-2), q/k norm with grouped kv heads (Qwen3) and a sliding window;
  `merged`: the prompt's keys/values sit in the first slots of chunk 0 instead of a
  separate prefix."""
  if family == "window":
    cfg = ModelConfig.preset("tiny", vocab_size=128, d_model=32, mlp_dim=64, sliding_window=3)
  else:
    cfg = ModelConfig.preset(family, vocab_size=128, d_model=32, mlp_dim=64, head_dim=8)
  model = Transformer(cfg)
  params = _random_params(model, std=0.1)
  tokens = jnp.asarray(np.random.RandomState(1).randint(4, 128, (2, 10)), jnp.int32)
  lengths = jnp.asarray([4, 6], jnp.int32)
  steps, chunk = 4, 2

  @jax.jit
  def run(params, tokens):
    full = model.apply({"params": params}, tokens).logits
    prompts = jnp.where(jnp.arange(6)[None] < lengths[:, None], tokens[:, :6], 0)
    seg = (jnp.arange(6)[None] < lengths[:, None]).astype(jnp.int32)
    out = model.apply({"params": params}, prompts, segment_ids=seg, return_kv=True)
    k = [[jnp.zeros((2, cfg.num_kv_heads, 8, chunk))] * 2 for _ in range(cfg.num_layers)]
    v = [[jnp.zeros((2, cfg.num_kv_heads, chunk, 8))] * 2 for _ in range(cfg.num_layers)]
    if merged:  # chunk 0 = [6 prompt slots | 2 generated slots]
      for i in range(cfg.num_layers):
        k[i][0] = jnp.concatenate([out.kv.k[i], k[i][0]], axis=3)
        v[i][0] = jnp.concatenate([out.kv.v[i], v[i][0]], axis=2)
    ctx = DecodeContext(
      prefix_k=() if merged else tuple(out.kv.k), prefix_v=() if merged else tuple(out.kv.v),
      prefix_len=lengths, k=tuple(map(tuple, k)), v=tuple(map(tuple, v)),
      num_generated=jnp.zeros((), jnp.int32), prompt_slots=6 if merged else 0,
    )  # fmt: skip
    got, want = [], []
    for i in range(steps):
      pos = lengths + i  # teacher forcing: feed the sequence's own next token
      tok = jnp.take_along_axis(tokens, pos[:, None], axis=1)
      j = i // chunk  # pass chunks 0..j; the token is written into chunk j
      view = ctx.replace(k=tuple(c[: j + 1] for c in ctx.k), v=tuple(c[: j + 1] for c in ctx.v))
      o = model.apply({"params": params}, tok, context=view)
      ctx = o.context.replace(
        k=tuple(a + b[j + 1 :] for a, b in zip(o.context.k, ctx.k, strict=True)),
        v=tuple(a + b[j + 1 :] for a, b in zip(o.context.v, ctx.v, strict=True)),
      )
      got.append(o.logits[:, 0])
      want.append(jnp.take_along_axis(full, pos[:, None, None], axis=1)[:, 0])
    return jnp.stack(got), jnp.stack(want), ctx.num_generated

  got, want, n = run(params, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert int(n) == steps


# --- the sampler against the training forward --------------------------------------
def test_logprobs_equal_teacher_forced(tiny, prompts, forward, sampler):
  params = tiny[1]
  out = sampler.generate(params, *prompts, jax.random.key(3), num_samples=2)
  ref_lp, ref_logits = _teacher_forced(forward, params, prompts, out)
  mask = out.mask
  assert mask.all() and out.tokens.max() < TOK.vocab_size  # no stop tokens configured
  np.testing.assert_allclose(out.logprobs, ref_lp, atol=1e-5)
  # The processed log-probs follow the rule applied to the teacher-forced logits, and
  # differ from the policy's (temperature and the nucleus filter were active).
  want = [
    _np_processed(ref_logits[r, t], TOP_P, TOK.vocab_size)[out.tokens[r, t]]
    for r, t in zip(*np.nonzero(mask), strict=True)
  ]
  np.testing.assert_allclose(out.processed_logprobs[mask], want, atol=1e-5)
  assert np.abs(out.processed_logprobs - out.logprobs).max() > 0.05
  # The G = 2 samples of a prompt differ: they are drawn independently.
  assert (out.tokens[0::2] != out.tokens[1::2]).any(axis=1).all()


@pytest.mark.parametrize("fused", [True, False])
def test_logprobs_equal_teacher_forced_at_temperature_one(tiny, prompts, forward, fused):
  """Temperature 1 without filters samples from the policy itself: the sampler reuses
  the processed log-prob as the policy log-prob, which must still equal the trainer's,
  with the decode model's fused projections (the default) and without them."""
  params = tiny[1]
  gen = _gen(sampling=SamplingConfig("temperature"), vocab_limit=None, fused_projections=fused)
  s = Sampler(tiny[0], gen)
  assert ("qkv" in s.decode_params(params)["layer_0"]["attn"]) == fused
  out = s.generate(params, *prompts, jax.random.key(5), num_samples=2)
  ref_lp, _ = _teacher_forced(forward, params, prompts, out)
  np.testing.assert_allclose(out.logprobs, ref_lp, atol=1e-5)
  assert processing_is_identity(SamplingConfig("temperature"), None, 64)
  assert not processing_is_identity(SamplingConfig("temperature"), 40, 64)
  assert not processing_is_identity(SamplingConfig("temperature", temperature=0.7), None, 64)
  assert not processing_is_identity(SamplingConfig("top_p", top_p=0.9), None, 64)


def test_cache_dtype(tiny, prompts, forward):
  """ "auto" caches keys/values in float32 on the CPU (exact above); a bfloat16 cache rounds
  them, so its log-probs move off the teacher-forced ones by bfloat16 rounding only."""
  assert _gen().resolved_cache_dtype(jnp.bfloat16) == jnp.float32  # the CPU backend
  assert _gen(cache_dtype="bfloat16").resolved_cache_dtype(jnp.float32) == jnp.bfloat16
  with pytest.raises(ValueError, match="cache_dtype"):
    _gen(cache_dtype="float16")
  params = tiny[1]
  s = Sampler(tiny[0], _gen(sampling=SamplingConfig("greedy"), cache_dtype="bfloat16"))
  out = s.generate(params, *prompts, jax.random.key(0))
  ref_lp, _ = _teacher_forced(forward, params, prompts, out)
  err = np.abs(out.logprobs - ref_lp)[out.mask]
  assert 1e-5 < err.max() < 0.05, err.max()


def test_greedy_with_cache_equals_without(tiny, prompts):
  model, params = tiny
  tokens, lengths = prompts
  width = tokens.shape[1] + T
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x).logits[0])

  def no_cache(row, vocab_limit):
    seq = list(tokens[row, : lengths[row]])
    for _ in range(T):
      buf = np.zeros((1, width), np.int32)
      buf[0, : len(seq)] = seq  # causal: the zeros after the sequence do not matter
      logits = np.asarray(fwd(params, jnp.asarray(buf)))[len(seq) - 1]
      seq.append(int(np.argmax(logits[:vocab_limit])))
    return seq[lengths[row] :]

  greedy = Sampler(model, _gen(sampling=SamplingConfig("greedy"), processed_logprobs=True))
  out = greedy.generate(params, tokens, lengths, jax.random.key(0))
  for r in range(len(PROMPTS)):
    assert out.tokens[r].tolist() == no_cache(r, TOK.vocab_size)
  assert np.all(out.processed_logprobs == 0)  # log 1: greedy is a point mass
  # The trainer's evaluator decoder (whole vocabulary, EOS stop) agrees too.
  gen, n = jax.jit(lambda p, x, n: greedy_generate(model, p, x, n, T, -1, TOK.pad_id))(
    params, jnp.asarray(tokens), jnp.asarray(lengths)
  )
  for r in range(len(PROMPTS)):
    assert np.asarray(gen[r]).tolist() == no_cache(r, None)
  assert np.all(np.asarray(n) == T)


def test_stop_tokens_chunks_and_early_exit(tiny, prompts, sampler):
  model, params = tiny
  base = sampler.generate(params, *prompts, jax.random.key(5))
  assert base.mask.all() and not base.finished.any()
  # Stop on the token each row sampled at a row-specific index (and EOS): row r ends at
  # the first stop token it meets, by index 6 at the latest.
  pick = [1, 3, 6, 5, 2]
  stops = tuple(sorted({TOK.eos_id, *(base.tokens[r, j] for r, j in enumerate(pick))}))
  first = [next(j for j in range(T) if base.tokens[r, j] in stops) for r in range(len(PROMPTS))]
  assert max(first) >= 5  # some row runs into the second cache chunk (slots 5..8)
  cfg = _gen(sampling=TOP_P, processed_logprobs=True, stop_tokens=stops, kv_chunk=5)
  # The device loop with chunks and stop tokens is covered by test_rollouts.
  stopped = Sampler(model, cfg, batch_multiple=8, loop="host")
  out = stopped.generate(params, *prompts, jax.random.key(5))
  assert len(stopped._steps) == 2  # 9 cache slots in chunks of 5: two compiled steps
  # Every row finished by index 6: the loop stopped early (one step late at most).
  assert stopped.last_timing["decode_steps"] <= max(first) + 1 < T - 1
  for r, f in enumerate(first):
    assert out.lengths[r] == f + 1 and out.finished[r]
    np.testing.assert_array_equal(out.tokens[r, : f + 1], base.tokens[r, : f + 1])
    np.testing.assert_allclose(out.logprobs[r, : f + 1], base.logprobs[r, : f + 1], atol=1e-6)
    np.testing.assert_allclose(
      out.processed_logprobs[r, : f + 1], base.processed_logprobs[r, : f + 1], atol=1e-6
    )
    assert np.all(out.tokens[r, f + 1 :] == TOK.pad_id)
    assert out.mask[r, : f + 1].all() and not out.mask[r, f + 1 :].any()
    assert np.all(out.logprobs[r, f + 1 :] == 0) and np.all(out.processed_logprobs[r, f + 1 :] == 0)


def test_merged_prompt_equals_separate_prefix(tiny, prompts, sampler):
  """With G = 1 the prompt's keys/values sit at the front of generated chunk 0 (the
  default, `merge_prompt`): the same samples and log-probs as a separate prefix segment,
  with the host loop and with the device loop over several chunks; G > 1 keeps the
  shared prefix."""
  model, params = tiny
  key = jax.random.key(11)
  base = sampler.generate(params, *prompts, key)
  kw = dict(sampling=TOP_P, processed_logprobs=True)
  separate = Sampler(model, _gen(merge_prompt=False, **kw), batch_multiple=8, loop="host")
  chunked = Sampler(model, _gen(kv_chunk=4, **kw), batch_multiple=8, loop="device")
  for other in (separate, chunked):
    out = other.generate(params, *prompts, key)
    np.testing.assert_array_equal(out.tokens, base.tokens)
    np.testing.assert_allclose(out.logprobs, base.logprobs, atol=1e-6)
    np.testing.assert_allclose(out.processed_logprobs, base.processed_logprobs, atol=1e-6)
  # The merged state: no prefix, chunk 0 holds the P prompt slots then its generated ones.
  dparams = sampler.decode_params(params)
  args = (jnp.zeros((8, 16), jnp.int32), jnp.ones((8,), jnp.int32), jnp.arange(8), key)
  merged = jax.eval_shape(sampler._init_fn(1), dparams, *args).context
  assert merged.prefix_k == () and merged.prompt_slots == 16
  assert merged.k[0][0].shape == (8, CFG.num_kv_heads, CFG.resolved_head_dim, 16 + T - 1)
  assert merged.v[0][0].shape == (8, CFG.num_kv_heads, 16 + T - 1, CFG.resolved_head_dim)
  group = jax.eval_shape(sampler._init_fn(2), dparams, *args).context
  assert group.prompt_slots == 0 and group.prefix_k[0].shape[0] == 8


def test_auto_kv_chunk():
  """ "auto" chunks on a CPU: about sqrt(8 * slots) rounded up to 32, at most 8 chunks;
  bad values raise."""
  assert [auto_kv_chunk(n) for n in (1, 9, 32, 33, 63, 127, 255, 1023, 4095)] == [
    1, 9, 32, 32, 32, 32, 64, 128, 512,
  ]  # fmt: skip
  assert jax.default_backend() == "cpu"
  assert GenerationConfig(max_new_tokens=64).chunk_size == 32  # "auto" is the default
  assert GenerationConfig(max_new_tokens=64).num_chunks == 2
  assert GenerationConfig(max_new_tokens=64, kv_chunk=None).num_chunks == 1
  assert GenerationConfig(max_new_tokens=64, kv_chunk=100).chunk_size == 63
  for bad in ("big", 0, -3, 2.5, True):
    with pytest.raises(ValueError, match="kv_chunk must be"):
      GenerationConfig(max_new_tokens=8, kv_chunk=bad)


def test_rng_determinism_and_no_recompile(tiny, prompts, sampler):
  params = tiny[1]
  tokens, lengths = prompts
  a = sampler.generate(params, tokens, lengths, jax.random.key(7), num_samples=2)
  n = sampler.compiled_count()
  b = sampler.generate(params, tokens, lengths, jax.random.key(7), num_samples=2)
  c = sampler.generate(params, tokens, lengths, jax.random.key(8), num_samples=2)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).mean() > 0.5
  # Samples are keyed by (prompt id, sample index), not batch position: splitting the
  # prompt list over two calls gives the same samples.
  first = sampler.generate(params, tokens[:2], lengths[:2], jax.random.key(7), num_samples=2)
  rest = sampler.generate(
    params, tokens[2:], lengths[2:], jax.random.key(7), num_samples=2, prompt_offset=2
  )
  np.testing.assert_array_equal(np.concatenate([first.tokens, rest.tokens]), a.tokens)
  np.testing.assert_allclose(np.concatenate([first.logprobs, rest.logprobs]), a.logprobs, atol=1e-5)
  assert sampler.compiled_count() == n  # same bucket, batch (padded to 8) and G


def test_group_samples_share_one_prefill(tiny, prompts, sampler):
  params = tiny[1]
  tokens, lengths = prompts
  g = 3
  ids = jnp.arange(8, dtype=jnp.int32)
  pad = np.zeros((8, 16), np.int32)
  params = sampler.decode_params(params)
  state = jax.eval_shape(
    sampler._init_fn(g), params, jnp.asarray(pad), jnp.ones((8,), jnp.int32), ids,
    jax.random.key(0),
  )  # fmt: skip
  # The prompt cache (the prefill's output) has one row per prompt, not one per sample,
  # and the prefill ran on [B, P] tokens.
  assert state.context.prefix_k[0].shape[0] == 8
  assert state.context.k[0][0].shape[0] == 8 * g
  jaxpr = jax.make_jaxpr(sampler._init_fn(g))(
    params, jnp.asarray(pad), jnp.ones((8,), jnp.int32), ids, jax.random.key(0)
  )
  dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) > 10  # the prefill's matmuls are in there
  assert all(8 * g not in e.outvars[0].aval.shape for e in dots)  # none over B * G rows


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, nested ones (pjit, loops) included."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, tuple | list) else (v,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _all_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _all_eqns(sub)


def test_sharded_equals_single_device(tiny, prompts, sampler):
  model, params = tiny
  tokens, lengths = prompts
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = shard_params(model, params, mesh, DEFAULT_RULES)
  kernel = sharded["layer_0"]["attn"]["q"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor", None)  # as in training
  on_mesh = Sampler(model, sampler.config, mesh=mesh, rules=DEFAULT_RULES)
  # 5 prompts over 4 batch shards (padded to 8, padding dropped), and given with more
  # right padding (another length bucket): neither changes the samples.
  wide = np.zeros((tokens.shape[0], 40), np.int32)
  wide[:, : tokens.shape[1]] = tokens
  out = on_mesh.generate(sharded, wide, lengths, jax.random.key(6), num_samples=2)
  ref = sampler.generate(params, tokens, lengths, jax.random.key(6), num_samples=2)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
  np.testing.assert_allclose(out.processed_logprobs, ref.processed_logprobs, atol=1e-5)
  # G = 1: the prompt sits in generated chunk 0 (merge_prompt), sharded the same way.
  out1 = on_mesh.generate(sharded, wide, lengths, jax.random.key(6))
  ref1 = sampler.generate(params, tokens, lengths, jax.random.key(6))
  np.testing.assert_array_equal(out1.tokens, ref1.tokens)
  np.testing.assert_allclose(out1.logprobs, ref1.logprobs, atol=1e-5)
  # The caches really are split: rows over the batch axes, kv heads over "tensor".
  # The fused decode kernels keep training's split: kv heads (and the MLP) over "tensor".
  fused = on_mesh.decode_params(sharded)
  qkv = fused["layer_0"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor", None, None)), 4)
  gate_up = fused["layer_0"]["mlp"]["gate_up"]["kernel"]
  assert gate_up.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None, "tensor")), 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    b, p = 8, 64
    state = on_mesh._init_fn(2)(
      fused, on_mesh._put(np.full((b, p), 5, np.int32)), on_mesh._put(np.full((b,), 3, np.int32)),
      on_mesh._put(np.arange(b, dtype=np.int32)), jax.random.key(0),
    )  # fmt: skip
  want = NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))
  assert state.context.prefix_k[0].sharding.is_equivalent_to(want, 4)
  assert state.context.k[1][0].sharding.is_equivalent_to(want, 4)
  assert state.tokens.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    merged = on_mesh._init_fn(1)(
      fused, on_mesh._put(np.full((b, p), 5, np.int32)), on_mesh._put(np.full((b,), 3, np.int32)),
      on_mesh._put(np.arange(b, dtype=np.int32)), jax.random.key(0),
    )  # fmt: skip
  assert merged.context.prompt_slots == p and merged.context.k[0][0].shape[3] == p + T - 1
  assert merged.context.k[0][0].sharding.is_equivalent_to(want, 4)
  assert merged.context.v[1][0].sharding.is_equivalent_to(want, 4)


def test_bad_inputs_raise(tiny, sampler):
  params = tiny[1]
  with pytest.raises(ValueError, match="prompt lengths"):
    sampler.generate(params, np.ones((2, 4), np.int32), np.array([0, 3]), jax.random.key(0))
  with pytest.raises(ValueError, match="max_new_tokens"):
    GenerationConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="fused_projections=True"):
    Sampler(Transformer(CFG, fused_projections=True), _gen(fused_projections=False))
  with pytest.raises(ValueError, match=f"pad_id={CFG.vocab_size} is not a token id"):
    Sampler(Transformer(CFG), _gen(pad_id=CFG.vocab_size))
  gpt2 = Transformer(ModelConfig.preset("tiny_gpt2", max_seq_len=16))
  with pytest.raises(ValueError, match="learned positions"):
    Sampler(gpt2, _gen()).generate({}, np.ones((1, 12), np.int32), [12], jax.random.key(0))
