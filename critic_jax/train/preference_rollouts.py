"""Sampled responses as training rows, their teacher-forced log-probs, and workdir caches.

Shared by the self-sampling preference trainers (D2O: `preference_d2o`, iterative DNO-Prct:
`preference_dno`). A row is `[BOS] prompt response` in the layout of
`critic_jax.data.preference` (tokens, positions, segment_ids, loss_mask, each `[N, T]`, the
loss mask on the response tokens, a final EOS included), so the trainer's `response_logps`
scores a sampled response exactly as it scores a dataset response.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from critic_jax.data import Example
from critic_jax.data.pipeline import pad_example, tokenize_example
from critic_jax.parallel import batch_sharding, to_host
from critic_jax.sampler import (
  GenerationConfig,
  RewardPool,
  Rollouts,
  Sampler,
  SamplingConfig,
  generate_rollouts,
)
from critic_jax.train.evaluate import eval_batch_size
from critic_jax.train.preference import response_logps

__all__ = [
  "ROW_KEYS",
  "load_cache",
  "make_logp_fn",
  "make_sampler",
  "response_rows",
  "rows_dataset",
  "rows_logps",
  "sample_rows",
  "save_cache",
  "text_rows",
]

log = logging.getLogger(__name__)
ROW_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")


def response_rows(
  prompt_ids: np.ndarray, prompt_lengths: np.ndarray, response_ids: np.ndarray,
  response_mask: np.ndarray, seq_len: int, pad_id: int,
) -> dict[str, np.ndarray]:  # fmt: skip
  """Prompt + response rows, cut at `seq_len`.

  Args:
    prompt_ids: `[N, P]` right-padded prompt ids (BOS included); prompt_lengths `[N]`.
    response_ids: `[N, R]` sampled ids; response_mask `[N, R]` bool, a prefix of each row.
  Returns:
    tokens, positions, segment_ids `[N, seq_len]` int32 and loss_mask `[N, seq_len]` bool
    (true on the response tokens that fit).
  """
  p = np.asarray(prompt_lengths, np.int64)[:, None]
  r = np.asarray(response_mask, bool).sum(1)[:, None]
  j = np.arange(seq_len)[None, :]
  from_prompt = np.take_along_axis(prompt_ids, np.clip(j, 0, prompt_ids.shape[1] - 1), 1)
  from_resp = np.take_along_axis(response_ids, np.clip(j - p, 0, response_ids.shape[1] - 1), 1)
  in_prompt = j < p
  in_resp = (j >= p) & (j < p + r)
  real = in_prompt | in_resp
  return {
    "tokens": np.where(in_prompt, from_prompt, np.where(in_resp, from_resp, pad_id)).astype(
      np.int32
    ),
    "positions": np.where(real, j, 0).astype(np.int32),
    "segment_ids": real.astype(np.int32),
    "loss_mask": in_resp,
  }


def text_rows(
  prompts: Sequence[str], responses: Sequence[str | None], tokenizer, seq_len: int
) -> dict[str, np.ndarray]:
  """Rows for given response texts (None: an all-padding row), as the dataset tokenizes them."""
  out = {k: [] for k in ROW_KEYS}
  for prompt, resp in zip(prompts, responses, strict=True):
    if resp is None:
      row = {
        "tokens": np.full(seq_len, tokenizer.pad_id, np.int32),
        "positions": np.zeros(seq_len, np.int32), "segment_ids": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, bool),
      }  # fmt: skip
    else:
      ex = tokenize_example(Example(prompt, resp), tokenizer, seq_len)
      row = pad_example(ex, seq_len, tokenizer.pad_id)
    for k in ROW_KEYS:
      out[k].append(row[k])
  return {k: np.stack(v) for k, v in out.items()}


def make_sampler(model, tokenizer, cfg, mesh, rules) -> Sampler:
  """A `Sampler` from a config section with max_new_tokens and sampling.{method, temperature,
  top_k, top_p, min_p}; stops at EOS, never samples ids past the tokenizer's vocabulary."""
  s = cfg.sampling
  gen = GenerationConfig(
    max_new_tokens=int(cfg.max_new_tokens),
    sampling=SamplingConfig(
      method=s.method, temperature=float(s.temperature), top_k=int(s.top_k),
      top_p=float(s.top_p), min_p=float(s.min_p),
    ),
    stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size,
  )  # fmt: skip
  return Sampler(model, gen, mesh=mesh, rules=rules)


def make_logp_fn(model) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
  """Jitted (params, rows `[N, T]`) -> summed response log-probs `[N]` (teacher forcing)."""
  return jax.jit(lambda p, rows: response_logps(model, p, rows)[0])


def rows_logps(logp_fn, params, rows: dict[str, np.ndarray], batch_size: int, mesh) -> np.ndarray:
  """Teacher-forced response log-probs `[N]` of `rows` under `params`, in fixed-size batches."""
  n = len(rows["tokens"])
  if n == 0:
    return np.zeros((0,), np.float32)
  bs = eval_batch_size(batch_size, n, mesh)
  idx = np.arange(int(np.ceil(n / bs)) * bs).clip(max=n - 1)
  out = []
  for i in range(0, len(idx), bs):
    chunk = {k: rows[k][idx[i : i + bs]] for k in ROW_KEYS}
    chunk = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in chunk.items()}
    out.append(to_host(logp_fn(params, chunk)))
  return np.concatenate(out)[:n].astype(np.float32)


def sample_rows(
  sampler: Sampler, params, prompts: Sequence[str], tokenizer, rng: jax.Array, *,
  num_samples: int, seq_len: int, batch_size: int, reward_pool: RewardPool | None = None,
  examples: Sequence | None = None,
) -> tuple[dict[str, np.ndarray], Rollouts, dict[str, float]]:  # fmt: skip
  """K samples per prompt from `params` as rows `[N*K, seq_len]` (prompt-major).

  Returns (rows, the `Rollouts` (texts, sampler log-probs, rewards when a pool is given),
  metrics incl. `rollout/cut_by_seq_len`, the fraction of samples longer than `seq_len`).
  """
  rollouts, metrics = generate_rollouts(
    sampler, params, list(prompts), tokenizer, rng, num_samples=num_samples,
    batch_size=batch_size, reward_pool=reward_pool, examples=examples,
  )  # fmt: skip
  rows = response_rows(
    rollouts.prompt_ids, rollouts.prompt_lengths, rollouts.response_ids, rollouts.response_mask,
    seq_len, tokenizer.pad_id,
  )  # fmt: skip
  cut = rows["loss_mask"].sum(1) < rollouts.response_lengths
  metrics["rollout/cut_by_seq_len"] = float(cut.mean())
  return rows, rollouts, metrics


def rows_dataset(arrays: dict[str, np.ndarray], *, batch_size: int, seed: int):
  """Shuffled, endlessly repeated batches of the rows of `arrays` (all `[N, ...]`), plus
  `index [B]`, their position in `arrays`."""
  import grain

  n = len(next(iter(arrays.values())))
  if n == 0:
    raise ValueError("rows_dataset: no rows")

  def item(i):
    return {**{k: v[i] for k, v in arrays.items()}, "index": np.asarray(i, np.int32)}

  ds = grain.MapDataset.range(n).seed(seed).shuffle().repeat(None).map(item)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def save_cache(path: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
  """Writes `arrays` and `meta` (JSON) to `path` (.npz) atomically, from process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, __meta__=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
  os.replace(tmp, path)  # a crash never leaves a half-written cache


def load_cache(path: str, meta: dict) -> tuple[dict[str, np.ndarray], dict] | None:
  """(arrays, stored meta) of a cache written with the same `meta` keys and values, else None."""
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    stored = json.loads(str(f["__meta__"]))
    if any(stored.get(k) != v for k, v in meta.items()):
      log.warning("%s was written for %s, not %s: recomputing", path, stored, meta)
      return None
    return {k: f[k] for k in f.files if k != "__meta__"}, stored
