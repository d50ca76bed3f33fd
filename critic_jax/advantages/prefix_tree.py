"""Prefix-to-Tree (P2T) node values and TEMPO / tree-MC advantages over a `[B, G, T]` batch.

Tran, Yao and Yu, "Exploiting Tree Structure for Credit Assignment in RL
Training of LLMs" (arXiv 2509.18314). The G responses to one prompt form a
prefix tree; the value of a prefix s is the mean normalised reward of the
responses through it. The formulas are the spec's reconstruction **[R]**
(`rl-critics-search.md` §3b); 0-indexed, position t holds token o_{t+1}, which
is emitted at s_{i,t} and lands in s_{i,t+1}:

  D(s_{i,t}) = {j valid : LCP(o_i, o_j) >= t}          (L_j >= t is implied)
  V(s)       = mean_{j in D(s)} r~_j                    r~ = GRPO-normalised rewards
  delta_{i,t} = V(s_{i,t+1}) - V(s_{i,t})
  b_{i,t}    = |D(s_{i,t+1})| < |D(s_{i,t})|            (the path branches here)
  tempo:   A_{i,t} = r~_i + td_coef * b_{i,t} * delta_{i,t}
  tree_mc: A_{i,t} = r~_i - V(s_{i,t})                  (MC return minus a tree baseline)

Two implementations of the node statistics, selected by `impl` (spec §3,
"Kernel design"):

* "cumeq", the oracle: share[b,i,j,t] = (prefixes of i and j agree through t),
  a cumulative equality over a `[B, G, G, T]` array. Simple, O(B G^2 T) memory.
* "lcp", production: the pairwise longest common prefix lcp[b,i,j] by first
  mismatch, from which j is in D(s_{i,t+1}) iff t < lcp_ij. T is processed in
  static chunks of `chunk_size` tokens inside one `lax.while_loop`, carrying
  the lcp and a "still equal" flag per pair (`[B, G, G]`); each iteration
  advances the lcp through its chunk and writes the outputs of the chunk's
  positions, with per-depth sums over j (no `[B, G, G, T]` array, no scatter,
  no cumsum). The loop stops as soon as every pair of distinct responses has
  diverged: past that point each response is alone in its subtree and the
  outputs are known in closed form, which is what the output buffers start
  with. So the work is O(B G^2 S), S the longest prefix two distinct responses
  share anywhere in the batch rounded up to a chunk, rather than O(B G^2 T)
  (worst case: identical responses, S = T); the memory is O(B G (G + T)).

Both end in the same elementwise step (values, deltas, gates, advantages). They
agree exactly on counts and lcp and to float rounding on values; the
plain-Python trie in `trie_reference.py` is the independent check of both.

CPU notes (XLA:CPU, measured): the per-chunk compare is a fixed sequence of
32-lane elementwise steps (`_LANES`) rather than one reduction over the chunk:
XLA vectorises elementwise chains reliably but an integer min-reduction over a
minor axis only for some shapes (5-10x apart). The sums over j are unrolled
for the same reason (a float reduction over a non-minor axis stays scalar);
see `_node_sums` for why they are unrolled only half-way.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from critic_jax.advantages.group import STD_MODES, group_normalize
from critic_jax.advantages.registry import ADVANTAGES

__all__ = [
  "ESTIMATORS",
  "IMPLS",
  "PrefixTreeOutput",
  "lcp_matrix",
  "prefix_tree_advantages",
  "tempo_advantages",
  "tree_mc_advantages",
]

ESTIMATORS = ("tempo", "tree_mc")
IMPLS = ("lcp", "cumeq")
_LANES = 32  # tokens compared per elementwise step; chunk_size must be a multiple.


@flax.struct.dataclass
class PrefixTreeOutput:
  """Advantages and prefix-tree diagnostics for a `[B, G, T]` group batch.

  Position t (0-indexed) is token o_{i,t+1}, emitted at prefix s_{i,t} and
  landing in s_{i,t+1}; s_{i,0} is the root (the prompt). Every `[B, G, T]`
  field is 0 (False) at padded positions and on invalid responses.

  Attributes:
    adv: `[B, G, T]` float32 advantages of the chosen estimator.
    v_after: `[B, G, T]` float32 V(s_{i,t+1}), the value of the node the token lands in.
    delta: `[B, G, T]` float32 TD error V(s_{i,t+1}) - V(s_{i,t}); so the value of
      the node a token leaves is V(s_{i,t}) = v_after - delta.
    branch: `[B, G, T]` bool, true where |D(s_{i,t+1})| < |D(s_{i,t})| (before
      the `include_root_branch` gate).
    count_after: `[B, G, T]` int32 |D(s_{i,t+1})|, responses sharing the prefix
      through token t.
    num_branches: `[B, G]` int32 branching tokens on each response's path
      (the sum of `branch` over t).
    lcp: `[B, G, G]` int32 longest common prefix of each pair of valid
      responses in real tokens; the diagonal is the length L_i; 0 for invalid ones.
    norm_rewards: `[B, G]` float32 r~, the group-normalised rewards (0 if invalid).
  """

  adv: jax.Array
  v_after: jax.Array
  delta: jax.Array
  branch: jax.Array
  count_after: jax.Array
  num_branches: jax.Array
  lcp: jax.Array
  norm_rewards: jax.Array


def _check_inputs(tokens, mask, rewards, valid_resp) -> jax.Array:
  """Validates shapes and dtypes; returns valid_resp as bool `[B, G]` (all true if None)."""
  if tokens.ndim != 3:
    raise ValueError(f"tokens must be [B, G, T], got shape {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
  if tokens.shape[-1] == 0:
    raise ValueError(f"tokens must have T >= 1, got shape {tokens.shape}")
  if mask.shape != tokens.shape:
    raise ValueError(f"mask must have the shape of tokens {tokens.shape}, got {mask.shape}")
  if rewards.shape != tokens.shape[:2]:
    raise ValueError(f"rewards must be [B, G] = {tokens.shape[:2]}, got {rewards.shape}")
  if valid_resp is None:
    return np.ones(rewards.shape, bool)  # host constant: no eager device op per call
  valid_resp = jnp.asarray(valid_resp)
  if valid_resp.shape != rewards.shape:
    raise ValueError(f"valid_resp must be [B, G] = {rewards.shape}, got {valid_resp.shape}")
  return valid_resp.astype(bool)


def _node_outputs(count_a, total_a, count_b, total_b, norm, real, pos, estimator, td_coef, root):
  """The elementwise tail shared by both implementations (steps 4-8 of the spec's oracle).

  count_a/total_a: |D(s_{i,t+1})| and the sum of r~ over it (the node the token
  lands in); count_b/total_b: the same for s_{i,t} (the node it leaves). All
  `[B, G, t]` for some slice of positions `pos` `[t]`; `real` masks padding.
  Returns (adv, v_after, delta, branch, count_after), zero on padding.
  """
  r_i = norm[..., None]
  v_after = total_a / jnp.maximum(count_a, 1).astype(jnp.float32)
  v_before = total_b / jnp.maximum(count_b, 1).astype(jnp.float32)
  delta = jnp.where(real, v_after - v_before, 0.0)
  branch = real & (count_a < count_b)
  if estimator == "tempo":
    gate = branch if root else branch & (pos > 0)
    adv = r_i + td_coef * jnp.where(gate, delta, 0.0)
  else:
    adv = r_i - v_before
  zero = jnp.zeros((), jnp.float32)
  return (
    jnp.where(real, adv, zero),
    jnp.where(real, v_after, zero),
    delta,
    branch,
    jnp.where(real, count_a, 0),
  )


def _tree_cumeq(tokens, lengths, valid, norm, estimator, td_coef, root):
  """The oracle: cumulative equality share[b,i,j,t] over a `[B, G, G, T]` array."""
  num_t = tokens.shape[-1]
  pos = jnp.arange(num_t, dtype=jnp.int32)
  real = pos < lengths[..., None]  # [B, G, T]
  eq = (tokens[:, :, None, :] == tokens[:, None, :, :]) & real[:, :, None, :] & real[:, None]
  # cumprod of eq over t, written as "no mismatch so far".
  share = jnp.cumsum(~eq, axis=-1, dtype=jnp.int32) == 0  # [B, G(i), G(j), T]
  lcp = jnp.sum(share, axis=-1, dtype=jnp.int32)
  # Prepend the root (every valid j) so that the node a token leaves, s_{i,t}, is column t
  # and the node it lands in, s_{i,t+1}, is column t + 1 of the same sums.
  root_col = jnp.broadcast_to(valid[:, None, :, None], share.shape[:3] + (1,))
  share = jnp.concatenate([root_col, share], axis=-1)
  count = jnp.sum(share, axis=2, dtype=jnp.int32)
  total = jnp.sum(jnp.where(share, norm[:, None, :, None], 0.0), axis=2)
  count_a, total_a, count_b, total_b = (
    count[..., 1:],
    total[..., 1:],
    count[..., :-1],
    total[..., :-1],
  )
  outs = _node_outputs(
    count_a, total_a, count_b, total_b, norm, real, pos, estimator, td_coef, root
  )
  return outs, lcp


def _first_mismatch(chunk: jax.Array, chunk_len: int) -> jax.Array:
  """First position where two responses differ in a `[B, G, K, _LANES]` chunk; chunk_len if none.

  Returns `[B, G, G]` int32. Lane-parallel: a running minimum over the K
  32-token steps, kept per lane and reduced over the 32 lanes at the end.
  """
  num_b, num_g, num_k, _ = chunk.shape
  lane = lax.broadcasted_iota(jnp.int32, (_LANES,), 0)

  def step(k, first):
    x = chunk[:, :, k]  # [B, G, lanes]
    differ = x[:, :, None, :] != x[:, None, :, :]
    return jnp.minimum(first, jnp.where(differ, k * _LANES + lane, chunk_len))

  init = jnp.full((num_b, num_g, num_g, _LANES), chunk_len, jnp.int32)
  return jnp.min(lax.fori_loop(0, num_k, step, init, unroll=True), axis=-1)


def _node_sums(reach, norm, positions):
  """Per-depth node statistics along each response's path, from per-pair reach depths.

  reach `[B, G, G]`: j is in the node of i's path at position t iff t < reach[b,i,j].
  Returns (count, total) `[B, G, len(positions)]`: #{j : t < reach_ij} and the
  sum of r~_j over those j, at each t in `positions`.

  The sum over j runs as a two-step loop, each step unrolled over half the
  group: unrolled, the steps fuse into one vectorised pass over positions (a
  float reduction over a non-minor axis would stay scalar on XLA:CPU); the loop
  carry makes XLA materialise the result, where a fully unrolled chain would
  be fused into, and recomputed by, each of the five output loops that read it.
  """
  num_b, num_g, _ = reach.shape
  shape = (num_b, num_g, positions.shape[0])

  def add(j, acc):
    count, total = acc
    inside = positions < reach[:, :, j, None]
    return count + inside, total + jnp.where(inside, norm[:, j, None, None], 0.0)

  init = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32))
  return lax.fori_loop(0, num_g, add, init, unroll=-(-num_g // 2))


def _chunked(tokens: jax.Array, chunk_size: int) -> tuple[jax.Array, int, int]:
  """Tokens as int32 padded to a whole number of chunks; returns (tokens, chunk, num_chunks)."""
  num_t = tokens.shape[-1]
  chunk = min(chunk_size, -(-num_t // _LANES) * _LANES)
  num_chunks = -(-num_t // chunk)
  tok = tokens.astype(jnp.int32)
  if num_chunks * chunk != num_t:
    tok = jnp.pad(tok, ((0, 0), (0, 0), (0, num_chunks * chunk - num_t)))
  return tok, chunk, num_chunks


def _lcp_init(lengths):
  """Initial (lcp, still): lcp starts at the common length (the cap), the diagonal at L_i."""
  common_len = jnp.minimum(lengths[:, :, None], lengths[:, None, :])
  still = ~jnp.eye(lengths.shape[-1], dtype=bool) & (common_len > 0)
  return common_len, still


def _lcp_step(tok, c, chunk, lcp, still, common_len):
  """Advances the pairwise lcp through chunk c (spec step 1, chunked).

  Tokens are compared raw and the lcp is capped by the common length, so what
  sits in padded positions never matters. A pair still equal at the end of the
  chunk keeps lcp = the chunk's end (a lower bound) and its `still` flag. Once
  a pair stops, its lcp is final and below the end of the chunk that stopped it.
  """
  num_b, num_g, _ = tok.shape
  start = c * chunk
  x = lax.dynamic_slice_in_dim(tok, start, chunk, axis=2)
  first = _first_mismatch(x.reshape(num_b, num_g, chunk // _LANES, _LANES), chunk)
  lcp = jnp.where(still, jnp.minimum(start + first, common_len), lcp)
  # `<=`: a pair whose common length ends exactly at the chunk's end stays "still" for
  # one more chunk, so that every pair that stops has lcp < the end of the last chunk.
  still = still & (first == chunk) & (start + chunk <= common_len)
  return lcp, still


def _pairwise_lcp(tokens, lengths, chunk_size):
  """lcp `[B, G, G]` alone: the chunk loop of `_tree_lcp` without the outputs."""
  tok, chunk, num_chunks = _chunked(tokens, chunk_size)
  common_len, still = _lcp_init(lengths)

  def body(state):
    c, lcp, still = state
    return (c + 1, *_lcp_step(tok, c, chunk, lcp, still, common_len))

  def cond(state):
    return (state[0] < num_chunks) & jnp.any(state[2])

  return lax.while_loop(cond, body, (jnp.int32(0), common_len, still))[1]


def _tree_lcp(tokens, lengths, valid, norm, estimator, td_coef, root, chunk_size):
  """Production: chunked first-mismatch LCP with early exit; outputs written per chunk.

  Iteration c advances the lcp of every pair still equal so far through chunk
  c, then computes the node sums at positions c*chunk - 1 ... (c+1)*chunk - 1
  from the pairwise lcp alone (j is in D(s_{i,t+1}) iff t < lcp_ij): column
  t + 1 is the node a token at t lands in, column t the node it leaves. A pair
  still equal after the chunk has lcp >= the chunk's end, which is all these
  sums need; a pair that stopped has its final lcp.

  The loop ends once no two distinct responses are still equal, at the end of
  some chunk, position `stop`. Every pair then has lcp < stop (see the `<=` in
  `_lcp_step`), so from stop on each response is alone in its subtree, the node
  it leaves included: count 1, V = r~_i, delta 0. That is what the output
  buffers hold from the start.
  """
  num_b, num_g, num_t = tokens.shape
  tok, chunk, num_chunks = _chunked(tokens, chunk_size)
  padded_t = num_chunks * chunk
  common_len, still = _lcp_init(lengths)
  real = jnp.arange(padded_t, dtype=jnp.int32) < lengths[..., None]

  def outputs_at(lcp, start, real_slice):
    # Node sums at positions start - 1 .. start + chunk - 1 in one pass: column t + 1
    # is the node a token at t lands in, column t the node it leaves. Invalid j get
    # reach -1, so that at t = -1 (the root) exactly the valid responses count.
    positions = start - 1 + jnp.arange(chunk + 1, dtype=jnp.int32)
    count, total = _node_sums(jnp.where(valid[:, None, :], lcp, -1), norm, positions)
    return _node_outputs(count[..., 1:], total[..., 1:], count[..., :-1], total[..., :-1], norm,
                         real_slice, positions[1:], estimator, td_coef, root)  # fmt: skip

  r_i = norm[..., None]
  alone = (
    jnp.where(real, r_i if estimator == "tempo" else 0.0, 0.0),  # adv
    jnp.where(real, r_i, 0.0),  # v_after
    jnp.zeros((num_b, num_g, padded_t), jnp.float32),  # delta
    jnp.zeros((num_b, num_g, padded_t), bool),  # branch
    real.astype(jnp.int32),  # count_after
  )

  def cond(state):
    c, _, still, _ = state
    # Chunk 0 always runs: it writes the root's column, and with no pair "still" equal at the
    # start (e.g. the only other valid response is empty) the root is still shared.
    return (c < num_chunks) & ((c == 0) | jnp.any(still))

  def body(state):
    c, lcp, still, outs = state
    lcp, still = _lcp_step(tok, c, chunk, lcp, still, common_len)
    start = c * chunk
    new = outputs_at(lcp, start, lax.dynamic_slice_in_dim(real, start, chunk, axis=2))
    outs = tuple(
      lax.dynamic_update_slice_in_dim(o, n, start, axis=2) for o, n in zip(outs, new, strict=True)
    )
    return c + 1, lcp, still, outs

  _, lcp, _, outs = lax.while_loop(cond, body, (jnp.int32(0), common_len, still, alone))
  return tuple(o[..., :num_t] for o in outs), lcp


def _count_true(x: jax.Array) -> jax.Array:
  """x.sum(-1) of a bool `[B, G, T]` array as int32 `[B, G]`, summed in 32-wide int8 pieces
  first: XLA:CPU lowers a plain s32 sum of a bool array through a materialised s32 copy."""
  num_b, num_g, num_t = x.shape
  padded_t = -(-num_t // _LANES) * _LANES
  x = x.astype(bool)
  if padded_t != num_t:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, padded_t - num_t)))
  part = jnp.sum(x.reshape(num_b, num_g, -1, _LANES), axis=-1, dtype=jnp.int8)
  return jnp.sum(part, axis=-1, dtype=jnp.int32)


def prefix_tree_advantages(
  *,
  tokens: jax.Array,
  mask: jax.Array,
  rewards: jax.Array,
  valid_resp: jax.Array | None = None,
  estimator: str = "tempo",
  std_mode: str = "unbiased",
  eps: float = 1e-6,
  td_coef: float = 1.0,
  include_root_branch: bool = True,
  impl: str = "lcp",
  chunk_size: int = 256,
) -> PrefixTreeOutput:
  """TEMPO or tree-MC advantages from the prefix tree of each group (see the module docstring).

  Runs one jitted program per (shapes, estimator, std_mode,
  include_root_branch, impl, chunk_size); `eps` and `td_coef` are traced, so
  new values of them or of the data reuse it. Callable inside `jit` and
  `vmap` (over any extra leading axis).

  Args:
    tokens: `[B, G, T]` int response token ids, right-padded, EOS included.
    mask: `[B, G, T]` bool, true on real tokens (EOS included). Only its count
      L = mask.sum(-1) is used: the first L positions are the response (§0).
    rewards: `[B, G]` scalar outcome rewards.
    valid_resp: optional `[B, G]` bool, false on padded responses: they are left
      out of the group mean/std and of every D(s), and get all-zero outputs.
    estimator: "tempo" (GRPO + branch-gated TD) or "tree_mc" (r~ - V(s_t)).
    std_mode: "unbiased" (verl default), "population", or "none", see
      `critic_jax.advantages.group.group_normalize`.
    eps: added to the std in the normalisation.
    td_coef: lambda_td, the weight of the TD term (TEMPO only).
    include_root_branch: whether a branch at the root gates the TD term of the
      first token. Default True, the spec's choice; with False, TEMPO equals
      GRPO when no two responses share a first token. Which one the paper uses
      is unconfirmed [U] (spec §3e8).
    impl: "lcp" (production) or "cumeq" (the O(B G^2 T)-memory oracle).
    chunk_size: tokens per chunk of the "lcp" compare, a positive multiple of 32.

  Returns:
    A `PrefixTreeOutput`.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
  if std_mode not in STD_MODES:
    raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  _check_chunk_size(chunk_size)
  tokens, mask, rewards = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(rewards)
  valid = _check_inputs(tokens, mask, rewards, valid_resp)
  # Always the same argument structure and dtypes, so no call pattern recompiles.
  scalars = tuple(
    np.float32(x) if isinstance(x, (int, float, np.number)) else jnp.asarray(x, jnp.float32)
    for x in (eps, td_coef)
  )
  return _prefix_tree(
    tokens, mask, rewards, valid, *scalars, estimator=estimator, std_mode=std_mode,
    include_root_branch=bool(include_root_branch), impl=impl, chunk_size=chunk_size,
  )  # fmt: skip


@functools.partial(
  jax.jit, static_argnames=("estimator", "std_mode", "include_root_branch", "impl", "chunk_size")
)
def _prefix_tree(
  tokens, mask, rewards, valid, eps, td_coef, *, estimator, std_mode, include_root_branch, impl,
  chunk_size,
):  # fmt: skip
  lengths = jnp.where(valid, _count_true(mask), 0)
  norm = group_normalize(rewards, valid_resp=valid, std_mode=std_mode, eps=eps)
  args = (tokens, lengths, valid, norm, estimator, td_coef, include_root_branch)
  if impl == "cumeq":
    outs, lcp = _tree_cumeq(*args)
  else:
    outs, lcp = _tree_lcp(*args, chunk_size)
  adv, v_after, delta, branch, count_after = outs
  return PrefixTreeOutput(
    adv=adv,
    v_after=v_after,
    delta=delta,
    branch=branch,
    count_after=count_after,
    num_branches=_count_true(branch),
    lcp=lcp,
    norm_rewards=norm,
  )


def _check_chunk_size(chunk_size: int) -> None:
  if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % _LANES:
    raise ValueError(f"chunk_size must be a positive multiple of {_LANES}, got {chunk_size!r}")


@ADVANTAGES.register("tempo")
def tempo_advantages(
  *,
  tokens: jax.Array,
  mask: jax.Array,
  rewards: jax.Array,
  valid_resp: jax.Array | None = None,
  std_mode: str = "unbiased",
  eps: float = 1e-6,
  td_coef: float = 1.0,
  include_root_branch: bool = True,
  impl: str = "lcp",
  chunk_size: int = 256,
) -> PrefixTreeOutput:
  """TEMPO: A_{i,t} = r~_i + td_coef * b_{i,t} * (V(s_{i,t+1}) - V(s_{i,t})).

  arXiv 2509.18314, spec §3b [R]. Arguments and output as `prefix_tree_advantages`.
  """
  return prefix_tree_advantages(
    tokens=tokens, mask=mask, rewards=rewards, valid_resp=valid_resp, estimator="tempo",
    std_mode=std_mode, eps=eps, td_coef=td_coef, include_root_branch=include_root_branch,
    impl=impl, chunk_size=chunk_size,
  )  # fmt: skip


@ADVANTAGES.register("tree_mc")
def tree_mc_advantages(
  *,
  tokens: jax.Array,
  mask: jax.Array,
  rewards: jax.Array,
  valid_resp: jax.Array | None = None,
  std_mode: str = "unbiased",
  eps: float = 1e-6,
  impl: str = "lcp",
  chunk_size: int = 256,
) -> PrefixTreeOutput:
  """Tree Monte-Carlo: A_{i,t} = r~_i - V(s_{i,t}), the MC return minus a prefix-tree baseline.

  Equal to GAE with gamma = lambda = 1, values V(s_{i,t}) and the reward r~_i on
  the last token (spec §3b, TreeRPO-like). Arguments and output as
  `prefix_tree_advantages`.
  """
  return prefix_tree_advantages(
    tokens=tokens, mask=mask, rewards=rewards, valid_resp=valid_resp, estimator="tree_mc",
    std_mode=std_mode, eps=eps, impl=impl, chunk_size=chunk_size,
  )  # fmt: skip


def lcp_matrix(*, tokens: jax.Array, mask: jax.Array, chunk_size: int = 256) -> jax.Array:
  """Pairwise longest common prefix `[B, G, G]` int32 of right-padded responses.

  lcp[b,i,j] counts the leading positions where both responses have real tokens
  and the tokens agree; lcp[b,i,i] = L_i. The production path of
  `prefix_tree_advantages` (chunked first mismatch with early exit), jitted.
  """
  _check_chunk_size(chunk_size)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  _check_inputs(tokens, mask, np.zeros(tokens.shape[:2]), None)
  return _lcp_matrix(tokens, mask, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _lcp_matrix(tokens, mask, *, chunk_size):
  return _pairwise_lcp(tokens, _count_true(mask), chunk_size)
