"""TEMPO / tree-MC prefix-tree kernels: the worked example and invariants of spec §3.

Spec: `rl-critics-search.md` §3 (arXiv 2509.18314).

Three implementations are checked against each other: the cumulative-equality
oracle (impl="cumeq"), the production LCP kernel (impl="lcp") and the
plain-Python trie (`trie_reference`). Almost every test runs at one shape,
[B, G, T] = [4, 6, 40] with `valid_resp` passed, and chunk_size 32 (two chunks,
the second padded), so the file compiles only a few programs.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.advantages import ADVANTAGES
from critic_jax.advantages.gae import gae_advantages
from critic_jax.advantages.group import grpo_advantages
from critic_jax.advantages.prefix_tree import (
  lcp_matrix,
  prefix_tree_advantages,
  tempo_advantages,
  tree_mc_advantages,
)
from critic_jax.advantages.trie_reference import trie_prefix_tree

EOS = 0
SHAPE = (4, 6, 40)
FIELDS_F = ("adv", "v_after", "delta")
FIELDS_I = ("branch", "count_after", "lcp", "num_branches")

# Spec §3e7: o1..o4 with EOS 0 and rewards [1, 0, 1, 0]. Tables for r~ = [1, -1, 1, -1]
# (population std, eps ignored); every entry scales with |r~| = 0.5 / (std + 1e-6).
EX_TOKENS = np.array([[1, 2, 3, 0], [1, 2, 4, 0], [1, 5, 6, 0], [7, 8, 9, 0]])
EX_REWARDS = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
EX_DELTA = np.array(
  [[1 / 3, -1 / 3, 1, 0], [1 / 3, -1 / 3, -1, 0], [1 / 3, 2 / 3, 0, 0], [-1, 0, 0, 0]]
)
EX_ADV = np.array(
  [[4 / 3, 2 / 3, 2, 1], [-2 / 3, -4 / 3, -2, -1], [4 / 3, 5 / 3, 1, 1], [-2, -1, -1, -1]]
)
EX_V_AFTER = np.array([[1 / 3, 0, 1, 1], [1 / 3, 0, -1, -1], [1 / 3, 1, 1, 1], [-1, -1, -1, -1]])
EX_SCALE = {
  "population": 0.5 / (0.5 + 1e-6),
  "unbiased": 0.5 / (np.sqrt(1 / 3) + 1e-6),
}


def _as_np(out):
  return {k: np.asarray(v) for k, v in vars(out).items()}


def _compare(out, ref, atol=2e-6, msg=""):
  out = out if isinstance(out, dict) else _as_np(out)
  for k in FIELDS_F + FIELDS_I:
    if k in FIELDS_F:
      np.testing.assert_allclose(out[k], ref[k], atol=atol, err_msg=f"{k} {msg}")
    else:
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f"{k} {msg}")


def _trie(tokens, mask, rewards, valid=None, **kw):
  ref = trie_prefix_tree(tokens, mask, rewards, valid, **kw)
  ref["num_branches"] = ref["branch"].sum(-1)
  return ref


def _run(impl, tokens, mask, rewards, valid, **kw):
  kw.setdefault("chunk_size", 32)
  return prefix_tree_advantages(
    tokens=tokens, mask=mask, rewards=rewards, valid_resp=valid, impl=impl, **kw
  )


def random_groups(seed, shape=SHAPE, vocab=3, p_invalid=0.1):
  """Tree-shaped groups: each response copies a random-length prefix of an earlier one
  (or all of it: duplicates), then goes on with random tokens; EOS only at the end,
  random junk after it; some responses invalid."""
  num_b, num_g, num_t = shape
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab + 1, size=shape)
  lengths = rng.integers(1, num_t + 1, size=(num_b, num_g))
  for b in range(num_b):
    for i in range(1, num_g):
      src = rng.integers(0, i)
      u = rng.random()
      if u < 0.2:  # a duplicate
        tokens[b, i], lengths[b, i] = tokens[b, src], lengths[b, src]
      elif u < 0.8:  # shares a prefix (never the source's EOS)
        k = rng.integers(0, lengths[b, src])
        tokens[b, i, :k] = tokens[b, src, :k]
        lengths[b, i] = max(lengths[b, i], k + 1)
  for b in range(num_b):
    for i in range(num_g):
      tokens[b, i, lengths[b, i] - 1] = EOS
      tokens[b, i, lengths[b, i] :] = rng.integers(0, vocab + 1, size=num_t - lengths[b, i])
  mask = np.arange(num_t) < lengths[..., None]
  rewards = rng.integers(0, 2, size=(num_b, num_g)).astype(np.float32)
  valid = rng.random((num_b, num_g)) >= p_invalid
  return tokens.astype(np.int32), mask, rewards, valid


def worked_example_batch():
  """The spec example as group 0 of a [4, 6, 40] batch, with two padded (invalid)
  responses and junk after EOS; groups 1-3 are random."""
  tokens, mask, rewards, valid = random_groups(99, p_invalid=0.0)
  tokens[0], mask[0], valid[0] = 9, False, [True] * 4 + [False] * 2
  tokens[0, :4, :4], mask[0, :4, :4], rewards[0, :4] = EX_TOKENS, True, EX_REWARDS
  rewards[0, 4:] = 5.0  # padded responses: must not enter the mean/std
  return tokens, mask, rewards, valid


# ----------------------------------------------------------------------------- worked example


# Both std modes x both root conventions for the production kernel and the trie; the
# oracle (slow to compile) runs two of the four.
@pytest.mark.parametrize(
  "impl,std_mode,root",
  [(impl, std, root) for impl in ("lcp", "trie") for std in EX_SCALE for root in (True, False)]
  + [("cumeq", "population", True), ("cumeq", "unbiased", False)],
)
def test_worked_example(impl, std_mode, root):
  expected_adv = EX_ADV.copy()
  if not root:  # the root does not gate the TD term: A_{i,1} = r~_i
    expected_adv[:, 0] = [1, -1, 1, -1]
  kw = dict(std_mode=std_mode, include_root_branch=root)
  batch = worked_example_batch()
  out = _trie(*batch, **kw) if impl == "trie" else _as_np(_run(impl, *batch, **kw))
  scale = EX_SCALE[std_mode]
  np.testing.assert_allclose(out["adv"][0, :4, :4], scale * expected_adv, atol=1e-6)
  np.testing.assert_allclose(out["delta"][0, :4, :4], scale * EX_DELTA, atol=1e-6)
  np.testing.assert_allclose(out["v_after"][0, :4, :4], scale * EX_V_AFTER, atol=1e-6)
  np.testing.assert_array_equal(
    out["branch"][0, :4, :4], [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
    out["count_after"][0, :4, :4], [[3, 2, 1, 1], [3, 2, 1, 1], [3, 1, 1, 1], [1, 1, 1, 1]]
  )
  lcp = np.zeros((6, 6), int)
  lcp[:4, :4] = [[4, 2, 1, 0], [2, 4, 1, 0], [1, 1, 4, 0], [0, 0, 0, 4]]
  np.testing.assert_array_equal(out["lcp"][0], lcp)
  for k in ("adv", "delta", "v_after", "count_after", "branch"):  # padding and invalid rows
    np.testing.assert_array_equal(out[k][0, :, 4:], 0)
    np.testing.assert_array_equal(out[k][0, 4:], 0)
  if std_mode == "unbiased" and root:  # the spec's quoted numbers (rounded, eps ignored)
    np.testing.assert_allclose(
      out["adv"][0, 0, :4], [1.154701, 0.577350, 1.732051, 0.866025], atol=5e-6
    )


def test_worked_example_tree_mc():
  out = _run("lcp", *worked_example_batch(), estimator="tree_mc")
  # A = r~ - V(s_{t-1}): V(root) = 0, V([1]) = 1/3, V([1,2]) = 0, V([1,2,3]) = 1, ... (x |r~|)
  expected = np.array([[1, 2 / 3, 1, 0], [-1, -4 / 3, -1, 0], [1, 2 / 3, 0, 0], [-1, 0, 0, 0]])
  np.testing.assert_allclose(out.adv[0, :4, :4], EX_SCALE["unbiased"] * expected, atol=1e-6)


# --------------------------------------------------------------- oracle = production = trie


@pytest.mark.parametrize(
  "estimator,std_mode,root,impls",
  [
    ("tempo", "unbiased", True, ("cumeq", "lcp", "lcp64")),
    ("tempo", "population", False, ("cumeq", "lcp")),
    ("tree_mc", "unbiased", True, ("cumeq", "lcp")),
  ],
)
def test_oracle_production_trie_agree(estimator, std_mode, root, impls):
  kw = dict(estimator=estimator, std_mode=std_mode, include_root_branch=root)
  for seed in range(4):
    batch = random_groups(seed)
    ref = _trie(*batch, **kw)
    for impl in impls:
      chunk = 64 if impl == "lcp64" else 32  # lcp64: one chunk instead of two
      out = _run(impl.removesuffix("64"), *batch, chunk_size=chunk, **kw)
      _compare(out, ref, msg=f"{impl} seed {seed}")


@pytest.mark.parametrize(
  "kind,x,y",
  [("split", 31, 40), ("split", 32, 40), ("split", 33, 40), ("prefix", 32, 40),
   ("prefix", 31, 40), ("prefix", 33, 40), ("prefix", 32, 32), ("prefix", 40, 40)],
)  # fmt: skip
def test_chunk_boundaries_and_early_exit(kind, x, y):
  """One pair of responses shares a long prefix; everything else diverges at t = 0, so
  the chunk loop (chunk 32) stops as soon as that pair does. "split": the pair differs
  from position x on; "prefix": identical tokens, lengths x and y (no EOS semantics)."""
  rng = np.random.default_rng(x * 100 + y)
  num_b, num_g, num_t = SHAPE
  tokens = rng.integers(10, 20, size=SHAPE)
  tokens[:, :, 0] = np.arange(num_g) + 100  # distinct first tokens
  lengths = rng.integers(1, num_t + 1, size=(num_b, num_g))
  tokens[0, 1] = tokens[0, 0]
  if kind == "split":
    tokens[0, 1, x:] = rng.integers(20, 30, size=num_t - x)
    lengths[0, :2] = y
  else:
    lengths[0, :2] = x, y
  mask = np.arange(num_t) < lengths[..., None]
  rewards = rng.normal(size=(num_b, num_g)).astype(np.float32)
  valid = np.ones((num_b, num_g), bool)
  ref = _trie(tokens, mask, rewards, valid)
  _compare(_run("lcp", tokens, mask, rewards, valid), ref, msg="lcp")
  _compare(_run("cumeq", tokens, mask, rewards, valid), ref, msg="cumeq")
  np.testing.assert_array_equal(lcp_matrix(tokens=tokens, mask=mask, chunk_size=32), ref["lcp"])


# ----------------------------------------------------------------------------- invariants


@pytest.fixture(scope="module")
def groups():
  tokens, mask, rewards, valid = random_groups(11, p_invalid=0.0)
  out = _as_np(_run("lcp", tokens, mask, rewards, valid))
  return tokens, mask, rewards, valid, out


def test_off_branch_delta_is_zero(groups):
  *_, out = groups
  assert out["branch"].sum() > 10 and (~out["branch"]).any()
  np.testing.assert_array_equal(out["delta"][~out["branch"]], 0.0)


def test_identical_responses_give_grpo():
  tokens, mask, _, valid = random_groups(3, p_invalid=0.0)
  tokens = np.broadcast_to(tokens[:, :1], tokens.shape).copy()
  mask = np.broadcast_to(mask[:, :1], mask.shape).copy()
  rewards = np.random.default_rng(0).normal(size=SHAPE[:2]).astype(np.float32)
  grpo = grpo_advantages(rewards=rewards, mask=mask)
  for impl in ("lcp", "cumeq"):
    out = _run(impl, tokens, mask, rewards, valid)
    np.testing.assert_array_equal(out.delta, 0.0)
    np.testing.assert_array_equal(out.branch, False)
    np.testing.assert_allclose(out.adv, grpo, atol=1e-6)
    assert np.abs(np.asarray(out.adv)).max() > 0.5


@pytest.mark.parametrize("value", [1.0, 0.7])
def test_equal_rewards_give_zero(groups, value):
  tokens, mask, rewards, valid, _ = groups
  rewards = np.full(rewards.shape, value, np.float32)
  for estimator in ("tempo", "tree_mc"):
    out = _run("lcp", tokens, mask, rewards, valid, estimator=estimator)
    assert np.isfinite(out.adv).all()
    np.testing.assert_array_equal(out.adv, 0.0)


def _same_response(tokens, lengths):
  """For each response, the indices of the responses with the same real tokens."""
  seqs = [tuple(tokens[i, : lengths[i]]) for i in range(len(tokens))]
  return [[j for j in range(len(seqs)) if seqs[j] == seqs[i]] for i in range(len(seqs))]


def test_telescoping(groups):
  """sum_t delta_{i,t} = V(leaf_i) - V(root); for a unique o_i, sum_t (A_tempo - A_grpo) = r~_i."""
  tokens, mask, rewards, _, out = groups
  grpo = np.asarray(grpo_advantages(rewards=rewards, mask=mask))
  norm = out["norm_rewards"]
  unique = 0
  for b in range(SHAPE[0]):
    for i, dup in enumerate(_same_response(tokens[b], mask[b].sum(-1))):
      expected = norm[b, dup].mean() - norm[b].mean()
      np.testing.assert_allclose(out["delta"][b, i].sum(), expected, atol=1e-5)
      if len(dup) == 1:
        unique += 1
        np.testing.assert_allclose((out["adv"][b, i] - grpo[b, i]).sum(), norm[b, i], atol=1e-5)
  assert unique > 5


def test_node_conservation(groups):
  """At every node, the TD corrections of the responses going on through it cancel."""
  tokens, mask, *_, out = groups
  lengths = mask.sum(-1)
  branching = 0
  for b in range(SHAPE[0]):
    for i in range(SHAPE[1]):
      for t in range(lengths[b, i]):  # the node s = tokens[b, i, :t]
        through = [
          j
          for j in range(SHAPE[1])
          if lengths[b, j] > t and np.array_equal(tokens[b, j, :t], tokens[b, i, :t])
        ]
        assert abs(out["delta"][b, through, t].sum()) < 1e-5, (b, i, t, through)
        branching += out["branch"][b, i, t]
  assert branching > 10


def test_permutation_equivariance(groups):
  tokens, mask, rewards, valid, out = groups
  perm = np.array([3, 0, 5, 1, 4, 2])
  p_out = _as_np(_run("lcp", tokens[:, perm], mask[:, perm], rewards[:, perm], valid[:, perm]))
  for k in ("adv", "v_after", "delta", "branch", "count_after", "num_branches", "norm_rewards"):
    np.testing.assert_allclose(p_out[k], out[k][:, perm], atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(p_out["lcp"], out["lcp"][:, perm][:, :, perm])


def test_padding_and_tokens_after_eos_are_ignored(groups):
  tokens, mask, rewards, valid, out = groups
  rng = np.random.default_rng(5)
  junk = np.where(mask, tokens, rng.integers(-5, 100, size=SHAPE)).astype(np.int32)
  _compare(_run("lcp", junk, mask, rewards, valid), out, atol=0.0)
  _compare(_run("cumeq", junk, mask, rewards, valid), out)
  # 32 more padded positions: the same outputs on the first T, zeros after.
  extra = rng.integers(0, 9, size=SHAPE[:2] + (32,))
  wide = _as_np(
    _run(
      "lcp",
      np.concatenate([tokens, extra], -1).astype(np.int32),
      np.concatenate([mask, np.zeros_like(extra, bool)], -1),
      rewards,
      valid,
    )
  )
  for k in ("adv", "v_after", "delta", "branch", "count_after"):
    np.testing.assert_allclose(wide[k][..., : SHAPE[2]], out[k], atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(wide[k][..., SHAPE[2] :], 0)
  np.testing.assert_array_equal(wide["lcp"], out["lcp"])


def test_invalid_responses_equal_slicing_them_out():
  tokens, mask, rewards, valid = random_groups(21, p_invalid=0.35)
  assert (~valid).any() and valid.sum(-1).min() >= 2
  rng = np.random.default_rng(1)
  tokens_junk = np.where(valid[..., None], tokens, rng.integers(0, 3, size=SHAPE))
  rewards_junk = np.where(valid, rewards, 123.0).astype(np.float32)
  for impl in ("lcp", "cumeq"):
    out = _as_np(_run(impl, tokens_junk.astype(np.int32), mask, rewards_junk, valid))
    for b in range(SHAPE[0]):
      keep = np.flatnonzero(valid[b])
      ref = _trie(tokens[b : b + 1, keep], mask[b : b + 1, keep], rewards[b : b + 1, keep])
      for k in ("adv", "v_after", "delta", "branch", "count_after"):
        np.testing.assert_allclose(out[k][b, keep], ref[k][0], atol=2e-6, err_msg=f"{impl} {k}")
        np.testing.assert_array_equal(out[k][b, ~valid[b]], 0)
      np.testing.assert_array_equal(out["lcp"][b][np.ix_(keep, keep)], ref["lcp"][0])
      np.testing.assert_array_equal(out["lcp"][b, ~valid[b]], 0)


def test_distinct_first_tokens_root_convention():
  """Spec §3e8: with all first tokens distinct, A_{i,1} = 2 r~_i when the root gates,
  and TEMPO == GRPO with include_root_branch=False."""
  tokens, mask, rewards, valid = random_groups(4, p_invalid=0.0)
  tokens[:, :, 0] = np.arange(SHAPE[1]) + 10
  rewards[:, :2] = [1.0, 0.0]  # no group of equal rewards
  grpo = np.asarray(grpo_advantages(rewards=rewards, mask=mask))
  on = _run("lcp", tokens, mask, rewards, valid)
  np.testing.assert_allclose(on.adv[..., 0], 2 * np.asarray(on.norm_rewards), atol=1e-6)
  np.testing.assert_allclose(on.adv[..., 1:], grpo[..., 1:], atol=1e-6)
  off = _run("lcp", tokens, mask, rewards, valid, include_root_branch=False)
  np.testing.assert_allclose(off.adv, grpo, atol=1e-6)


@pytest.mark.parametrize("estimator", ["tempo", "tree_mc"])
def test_an_empty_response_shares_the_root(estimator):
  """A valid empty response (L = 0) sits at the root with the others. With no other shared
  prefix in the batch the lcp kernel's loop used to run no chunk, so the root's branch was
  missed (adv [0.71, 0.71] instead of [1.41, 0.71]) and the result depended on the batch."""
  tokens = np.array([[[5, 3], [0, 0]]], np.int32)
  mask = np.array([[[True, True], [False, False]]])
  rewards = np.array([[1.0, 0.0]], np.float32)
  ref = trie_prefix_tree(tokens, mask, rewards, estimator=estimator)
  for impl in ("lcp", "cumeq"):
    out = prefix_tree_advantages(
      tokens=tokens, mask=mask, rewards=rewards, estimator=estimator, impl=impl
    )
    np.testing.assert_allclose(np.asarray(out.adv), ref["adv"], atol=1e-6, err_msg=impl)
    np.testing.assert_array_equal(np.asarray(out.branch), ref["branch"], err_msg=impl)


def test_tree_mc_is_gae_with_tree_values(groups):
  """tree_mc = GAE(gamma = lambda = 1) with V = V(s_{i,t}) and reward r~_i on the last token."""
  tokens, mask, rewards, valid, out = groups
  mc = _run("lcp", tokens, mask, rewards, valid, estimator="tree_mc")
  last = np.arange(SHAPE[2]) == (mask.sum(-1) - 1)[..., None]
  values = out["v_after"] - out["delta"]  # V(s_{i,t})
  token_rewards = np.where(last, out["norm_rewards"][..., None], 0.0).astype(np.float32)
  adv, _ = gae_advantages(rewards=token_rewards, values=values, mask=mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(mc.adv, adv, atol=1e-5)
  assert np.abs(np.asarray(mc.adv)).max() > 0.1


def test_td_coef_scales_the_td_term(groups):
  tokens, mask, rewards, valid, out = groups
  half = _run("lcp", tokens, mask, rewards, valid, td_coef=0.5)
  grpo = out["norm_rewards"][..., None] * mask
  np.testing.assert_allclose(half.adv - grpo, 0.5 * (out["adv"] - grpo), atol=1e-6)


# ----------------------------------------------------------------------------- jit, vmap, API


def test_no_recompilation_on_second_call(caplog):
  """New data, new td_coef/eps values (traced), passed or left at their defaults: one program."""

  def compiles(fn):
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
      result = fn()
    return result, sum("Compiling jit(_prefix_tree)" in r.getMessage() for r in caplog.records)

  batch = random_groups(30, shape=(2, 3, 17))
  _, first = compiles(
    lambda: prefix_tree_advantages(tokens=batch[0], mask=batch[1], rewards=batch[2])
  )
  assert first == 1  # a shape no other test uses: this call compiles (the count works)
  batch = random_groups(31, shape=(2, 3, 17))
  out, again = compiles(
    lambda: prefix_tree_advantages(
      tokens=batch[0], mask=batch[1], rewards=batch[2], td_coef=0.3, eps=np.float32(1e-5)
    )
  )
  assert again == 0
  _compare(out, _trie(*batch[:3], td_coef=0.3, eps=1e-5))


def test_vmap_over_an_extra_axis():
  batch = random_groups(40)
  fn = functools.partial(prefix_tree_advantages, chunk_size=32)
  split = lambda x: x.reshape((2, 2) + x.shape[1:])
  out = jax.vmap(lambda t, m, r, v: fn(tokens=t, mask=m, rewards=r, valid_resp=v))(
    *map(split, batch)
  )
  _compare(
    {k: np.asarray(v).reshape((4,) + v.shape[2:]) for k, v in vars(out).items()}, _trie(*batch)
  )


def test_registered_by_name(groups):
  tokens, mask, rewards, valid, out = groups
  assert ADVANTAGES.get("tempo") is tempo_advantages
  assert ADVANTAGES.get("tree_mc") is tree_mc_advantages
  res = ADVANTAGES.get("tempo")(
    tokens=jnp.asarray(tokens), mask=mask, rewards=rewards, valid_resp=valid, chunk_size=32
  )
  np.testing.assert_array_equal(res.adv, out["adv"])


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(tokens=np.zeros((2, 3), np.int32)), r"tokens must be \[B, G, T\]"),
    (dict(tokens=np.zeros((2, 3, 4), np.float32)), "integer token ids"),
    (dict(mask=np.ones((2, 3, 5), bool)), r"mask must have the shape of tokens \(2, 3, 4\)"),
    (dict(rewards=np.zeros((2, 4), np.float32)), r"rewards must be \[B, G\] = \(2, 3\)"),
    (dict(valid_resp=np.ones((3,), bool)), r"valid_resp must be \[B, G\]"),
    (dict(chunk_size=48), "multiple of 32"),
    (dict(std_mode="bessel"), "std_mode must be one of"),
    (dict(estimator="gae"), "estimator must be one of"),
    (dict(impl="fast"), "impl must be one of"),
  ],
)
def test_bad_inputs_raise(kwargs, match):
  args = dict(
    tokens=np.zeros((2, 3, 4), np.int32),
    mask=np.ones((2, 3, 4), bool),
    rewards=np.zeros((2, 3), np.float32),
  )
  with pytest.raises(ValueError, match=match):
    prefix_tree_advantages(**{**args, **kwargs})
