"""Plain-Python prefix trie for TEMPO / tree-MC advantages: the reference and the baseline.

This is the implementation a researcher writes first: insert every response of a
group into a dict-of-dicts trie, keep a (count, reward sum) per node, then walk
each response's path reading node values off the trie. It runs on NumPy/Python
values, one group at a time, and exists for two reasons: the tests check the
jitted kernels in `critic_jax.advantages.prefix_tree` against it, and
`scripts/bench_prefix_tree.py` times the kernels against it.

It follows spec `rl-critics-search.md` §3 (Tran, Yao and Yu, arXiv 2509.18314;
the formulas are the spec's reconstruction [R]) and shares no code with the
JAX kernels, including the group normalisation of the rewards.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TrieNode", "normalize_group_rewards_np", "trie_prefix_tree"]

_STD_MODES = ("unbiased", "population", "none")
_ROW_KEYS = ("adv", "v_after", "v_before", "delta", "branch", "count_after")


class TrieNode:
  """One prefix s: the responses through it (count, reward sum) and its children by token."""

  __slots__ = ("children", "count", "total")

  def __init__(self):
    self.children: dict[int, TrieNode] = {}
    self.count = 0
    self.total = 0.0


def normalize_group_rewards_np(
  rewards: np.ndarray, valid: np.ndarray, std_mode: str = "unbiased", eps: float = 1e-6
) -> np.ndarray:
  """GRPO normalisation of one group's rewards in NumPy (float64); invalid entries get 0.

  r~_i = (r_i - mean) / (std + eps) over the valid responses, with std unbiased,
  population, or none (Dr. GRPO: r_i - mean). A group with one valid response
  keeps its raw reward (verl: mean 0, std 1).
  """
  if std_mode not in _STD_MODES:
    raise ValueError(f"std_mode must be one of {_STD_MODES}, got {std_mode!r}")
  rewards = np.asarray(rewards, np.float64)
  valid = np.asarray(valid, bool)
  out = np.zeros_like(rewards)
  vals = rewards[valid]
  n = len(vals)
  if n == 0:
    return out
  if n == 1:
    out[valid] = vals
    return out
  mean = vals.mean()
  if std_mode == "none":
    out[valid] = vals - mean
  else:
    std = vals.std(ddof=1 if std_mode == "unbiased" else 0)
    out[valid] = (vals - mean) / (std + eps)
  return out


def _one_group(tokens, lengths, valid, r_norm, estimator, td_coef, include_root_branch, out, g):
  """Fills out[...][g] for one group; `tokens` is a list of lists (Python ints)."""
  num = len(tokens)
  root = TrieNode()
  for i in range(num):
    if not valid[i]:
      continue
    node = root
    node.count += 1
    node.total += r_norm[i]
    for tok in tokens[i][: lengths[i]]:
      child = node.children.get(tok)
      if child is None:
        child = TrieNode()
        node.children[tok] = child
      node = child
      node.count += 1
      node.total += r_norm[i]

  for i in range(num):
    if not valid[i]:
      continue
    rows = {key: [] for key in _ROW_KEYS}
    parent = root
    for t, tok in enumerate(tokens[i][: lengths[i]]):
      child = parent.children[tok]
      v_before = parent.total / parent.count
      v_after = child.total / child.count
      # A branch: some response through the parent does not continue with this token.
      branch = child.count < parent.count
      delta = v_after - v_before
      gate = branch and (include_root_branch or t > 0)
      if estimator == "tempo":
        adv = r_norm[i] + td_coef * delta * gate
      else:  # tree_mc: Monte-Carlo return minus the tree baseline V(s_t).
        adv = r_norm[i] - v_before
      rows["adv"].append(adv)
      rows["v_after"].append(v_after)
      rows["v_before"].append(v_before)
      rows["delta"].append(delta)
      rows["branch"].append(branch)
      rows["count_after"].append(child.count)
      parent = child
    for key, row in rows.items():
      out[key][g, i, : len(row)] = row


def _lcp_matrix(tokens, lengths, valid):
  """Pairwise longest common prefix, counting only real tokens of valid responses."""
  num = len(tokens)
  lcp = np.zeros((num, num), np.int64)
  for i in range(num):
    for j in range(num):
      if not (valid[i] and valid[j]):
        continue
      limit = min(lengths[i], lengths[j])
      k = 0
      while k < limit and tokens[i][k] == tokens[j][k]:
        k += 1
      lcp[i, j] = k
  return lcp


def trie_prefix_tree(
  tokens: np.ndarray,
  mask: np.ndarray,
  rewards: np.ndarray,
  valid_resp: np.ndarray | None = None,
  *,
  estimator: str = "tempo",
  std_mode: str = "unbiased",
  eps: float = 1e-6,
  td_coef: float = 1.0,
  include_root_branch: bool = True,
  with_lcp: bool = True,
) -> dict[str, np.ndarray]:
  """TEMPO or tree-MC advantages with a Python trie per group.

  Args:
    tokens: `[B, G, T]` int response tokens, right-padded, EOS included.
    mask: `[B, G, T]` bool, true on real tokens. Responses are right-padded:
      the first L = mask.sum(-1) positions are the response (spec §0).
    rewards: `[B, G]` scalar outcome rewards.
    valid_resp: optional `[B, G]` bool; false responses are left out of the
      group statistics and of every node.
    estimator: "tempo" (A = r~ + td_coef * b * delta) or "tree_mc" (A = r~ - V(s_t)).
    std_mode, eps: group normalisation (see `normalize_group_rewards_np`).
    td_coef: lambda_td.
    include_root_branch: whether the root may gate the TD term (spec §3e8).
    with_lcp: also compute the `[B, G, G]` LCP matrix (pairwise Python loops).

  Returns:
    A dict of NumPy arrays: adv, v_after, v_before, delta `[B, G, T]` float64;
    branch `[B, G, T]` bool; count_after `[B, G, T]` int64; norm_rewards
    `[B, G]` float64; lcp `[B, G, G]` int64 when `with_lcp`. Padding is 0.
  """
  if estimator not in ("tempo", "tree_mc"):
    raise ValueError(f"estimator must be 'tempo' or 'tree_mc', got {estimator!r}")
  tokens = np.asarray(tokens)
  mask = np.asarray(mask, bool)
  rewards = np.asarray(rewards, np.float64)
  if tokens.ndim != 3 or mask.shape != tokens.shape or rewards.shape != tokens.shape[:2]:
    raise ValueError(
      f"expected tokens/mask [B, G, T] and rewards [B, G]; got {tokens.shape}, "
      f"{mask.shape}, {rewards.shape}"
    )
  num_b, num_g, num_t = tokens.shape
  valid = np.ones((num_b, num_g), bool) if valid_resp is None else np.asarray(valid_resp, bool)
  # Spec §0: L = mask.sum(-1), and the first L positions are the response.
  lengths = np.where(valid, mask.sum(-1), 0)
  out = {
    "adv": np.zeros((num_b, num_g, num_t)),
    "v_after": np.zeros((num_b, num_g, num_t)),
    "v_before": np.zeros((num_b, num_g, num_t)),
    "delta": np.zeros((num_b, num_g, num_t)),
    "branch": np.zeros((num_b, num_g, num_t), bool),
    "count_after": np.zeros((num_b, num_g, num_t), np.int64),
    "norm_rewards": np.zeros((num_b, num_g)),
  }
  if with_lcp:
    out["lcp"] = np.zeros((num_b, num_g, num_g), np.int64)
  for b in range(num_b):
    r_norm = normalize_group_rewards_np(rewards[b], valid[b], std_mode, eps)
    out["norm_rewards"][b] = r_norm
    toks, lens, vals = tokens[b].tolist(), lengths[b].tolist(), valid[b].tolist()
    _one_group(toks, lens, vals, r_norm.tolist(), estimator, td_coef, include_root_branch, out, b)
    if with_lcp:
      out["lcp"][b] = _lcp_matrix(toks, lens, vals)
  return out
