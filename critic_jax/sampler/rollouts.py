"""The host-side rollout loop: prompts in, `Rollouts` (ids, masks, log-probs, text, rewards) out.

    sampler = Sampler(model, GenerationConfig(max_new_tokens=256, stop_tokens=(tok.eos_id,),
                                              pad_id=tok.pad_id, vocab_limit=tok.vocab_size))
    with RewardPool(verifier, timeout_s=5.0) as pool:
      rollouts, metrics = generate_rollouts(sampler, params, prompts, tok, rng, num_samples=8,
                                            reward_pool=pool, examples=examples)

The prompt list is cut into batches of `batch_size` prompts (the last one padded
to the same shape, so one compiled program serves every batch). The verifier
calls of batch k run in the reward pool while batch k+1 generates. Results
depend only on (params, prompts, rng): every sample's random draws are keyed by
its prompt's index in the list and its sample index, so the batch size does
not change them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import numpy as np

from critic_jax.data import encode_prompts
from critic_jax.sampler.generate import SampleOutput, Sampler
from critic_jax.sampler.rewards import RewardFuture, RewardPool

__all__ = ["Rollouts", "generate_rollouts"]


@flax.struct.dataclass
class Rollouts:
  """Sampled responses for B prompts x G samples (N = B * G rows, prompt-major).

  Arrays are host numpy; the text fields are static (not pytree leaves), so
  `jax.device_put(rollouts)` moves only the arrays.

  Attributes:
    prompt_ids: `[N, P]` int32 right-padded prompt ids (with BOS), pad_id after.
    prompt_lengths: `[N]` int32 real prompt tokens.
    response_ids: `[N, T]` int32 right-padded response ids, pad_id after.
    response_mask: `[N, T]` bool real response tokens (a final stop token included).
    logprobs: `[N, T]` float32 per-token log-probs under the sampling policy
      (the unmodified model distribution); 0 where the mask is False.
    processed_logprobs: `[N, T]` float32 log-probs under the processed
      (temperature / filtered) distribution, or None.
    finished: `[N]` bool the response ended with a stop token (else truncated).
    group: `[N]` int32 index in the prompt list of the prompt each row answers;
      the G rows of a group are consecutive.
    rewards: `[N]` float32 verifier rewards (the failure reward where it failed),
      or None without a reward pool.
    reward_failed: `[N]` bool the verifier raised, timed out or died; None without a pool.
    prompts: B prompt strings, one per group.
    texts: N decoded responses.
  """

  prompt_ids: np.ndarray
  prompt_lengths: np.ndarray
  response_ids: np.ndarray
  response_mask: np.ndarray
  logprobs: np.ndarray
  processed_logprobs: np.ndarray | None
  finished: np.ndarray
  group: np.ndarray
  rewards: np.ndarray | None
  reward_failed: np.ndarray | None
  prompts: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  texts: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

  @property
  def num_groups(self) -> int:
    return len(self.prompts)

  @property
  def group_size(self) -> int:
    return self.response_ids.shape[0] // max(self.num_groups, 1)

  @property
  def response_lengths(self) -> np.ndarray:
    return self.response_mask.sum(axis=1).astype(np.int32)

  def grouped(self, x: np.ndarray) -> np.ndarray:
    """`[N, ...]` -> `[B, G, ...]` (the spec's `[B, G, T]` layout for group advantages)."""
    return np.reshape(x, (self.num_groups, self.group_size) + x.shape[1:])


def _decode(tokenizer, out: SampleOutput) -> list[str]:
  return [tokenizer.decode(row[:n]) for row, n in zip(out.tokens, out.lengths, strict=True)]


def generate_rollouts(
  sampler: Sampler,
  params: Any,
  prompts: Sequence[str],
  tokenizer,
  rng: jax.Array,
  *,
  num_samples: int = 1,
  batch_size: int | None = None,
  reward_pool: RewardPool | None = None,
  examples: Sequence | None = None,
  progress: Callable[[int], None] | None = None,
) -> tuple[Rollouts, dict[str, float]]:
  """Samples `num_samples` responses per prompt, decodes them and scores them.

  Args:
    sampler: a `Sampler` (its `GenerationConfig` fixes length, stop tokens, sampling).
    params: the policy params.
    prompts: B prompt strings (encoded with BOS by `encode_prompts`).
    tokenizer: encodes prompts and decodes responses.
    rng: PRNG key; the rollouts are a deterministic function of it.
    num_samples: G responses per prompt (one prefill shared by the G).
    batch_size: prompts per device batch (default: all at once).
    reward_pool: scores each (prompt, text, example) on the host; failures are
      recorded in `reward_failed` and counted in the metrics.
    examples: per-prompt objects handed to the verifier (e.g. task `Example`s).
    progress: called with the number of prompts done after each batch.
  Returns:
    (rollouts, metrics: flat dict of floats under "rollout/" and "reward/").
  """
  n = len(prompts)
  if n == 0:
    raise ValueError("generate_rollouts needs at least one prompt")
  if examples is not None and len(examples) != n:
    raise ValueError(f"{len(examples)} examples for {n} prompts")
  g = int(num_samples)
  bs = min(batch_size or n, n)
  enc = encode_prompts(list(prompts), tokenizer)
  tokens, lengths = enc["tokens"], enc["lengths"]
  t0 = time.perf_counter()
  outs: list[SampleOutput] = []
  texts: list[str] = []
  futures: list[RewardFuture] = []
  for start in range(0, n, bs):
    stop = min(start + bs, n)
    idx = np.arange(start, start + bs).clip(max=n - 1)  # pad the last batch with its last prompt
    out = sampler.generate(
      params, tokens[idx], lengths[idx], rng, num_samples=g, prompt_offset=start
    )
    keep = (stop - start) * g
    out = jax.tree.map(lambda x, keep=keep: x[:keep], out)
    outs.append(out)
    batch_texts = _decode(tokenizer, out)
    texts.extend(batch_texts)
    if reward_pool is not None:
      rows = np.repeat(np.arange(start, stop), g)
      futures.append(
        reward_pool.submit(
          [prompts[i] for i in rows], batch_texts,
          None if examples is None else [examples[i] for i in rows],
        )
      )  # fmt: skip
    if progress is not None:
      progress(stop)
  gen_s = time.perf_counter() - t0

  def cat(name):
    parts = [getattr(o, name) for o in outs]
    return None if parts[0] is None else np.concatenate(parts)

  group = np.repeat(np.arange(n, dtype=np.int32), g)
  rewards = failed = None
  metrics: dict[str, float] = {}
  if reward_pool is not None:
    results = [f.result() for f in futures]
    rewards = np.concatenate([r.rewards for r in results])
    failed = np.concatenate([r.failed for r in results])
    status = sum((r.status for r in results), ())
    counts = {s: float(sum(x == s for x in status)) for s in ("error", "timeout", "died")}
    ok = ~failed
    metrics.update({
      "reward/mean": float(rewards[ok].mean()) if ok.any() else float("nan"),
      "reward/failures": float(failed.sum()),
      "reward/errors": counts["error"],
      "reward/timeouts": counts["timeout"],
      "reward/worker_deaths": counts["died"],
    })  # fmt: skip
  mask = cat("mask")
  new_tokens = float(mask.sum())
  total_s = time.perf_counter() - t0
  metrics.update({
    "rollout/samples": float(n * g),
    "rollout/response_length": float(mask.sum(1).mean()),
    "rollout/truncated_frac": float(1.0 - cat("finished").mean()),
    "rollout/new_tokens": new_tokens,
    "rollout/generate_s": gen_s,
    "rollout/total_s": total_s,
    "rollout/tokens_per_s": new_tokens / max(gen_s, 1e-9),
  })  # fmt: skip
  rollouts = Rollouts(
    prompt_ids=tokens[group],
    prompt_lengths=lengths[group],
    response_ids=cat("tokens"),
    response_mask=mask,
    logprobs=cat("logprobs"),
    processed_logprobs=cat("processed_logprobs"),
    finished=cat("finished"),
    group=group,
    rewards=rewards,
    reward_failed=failed,
    prompts=tuple(prompts),
    texts=tuple(texts),
  )
  return rollouts, metrics
