"""Held-out evaluation shared by trainers: greedy decoding scored by a task's verifier."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from critic_jax.data import Example, encode_prompts
from critic_jax.parallel import batch_sharding, to_host
from critic_jax.sampler import greedy_generate

__all__ = ["GreedyTaskEval", "eval_batch_size"]


def eval_batch_size(requested: int, n: int, mesh) -> int:
  """A batch size that the mesh's batch shards divide, no larger than needed for `n` rows."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  return int(math.ceil(min(requested, max(n, 1)) / shards) * shards)


class GreedyTaskEval:
  """Greedy completions of prompts (one compiled program: fixed batch and prompt length),
  and the exact-match accuracy of a task's held-out examples."""

  def __init__(self, model, tokenizer, task, examples: Sequence[Example], mesh, *,
               batch_size: int, max_new_tokens: int):  # fmt: skip
    self.tok, self.task, self.mesh = tokenizer, task, mesh
    self.examples = list(examples)
    self.batch = eval_batch_size(batch_size, len(self.examples), mesh)
    bos = 1 if tokenizer.bos_id is not None else 0
    self.prompt_len = max([bos + len(tokenizer.encode(e.prompt)) for e in self.examples] or [1])
    self._generate = jax.jit(
      lambda p, t, n: greedy_generate(
        model, p, t, n, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id
      )
    )

  def _put(self, arr: np.ndarray) -> jax.Array:
    return jax.device_put(arr, batch_sharding(self.mesh, arr.ndim))

  def generate(self, params, prompts: Sequence[str]) -> list[str]:
    texts = []
    for i in range(0, len(prompts), self.batch):
      chunk = list(prompts[i : i + self.batch])
      padded = chunk + [chunk[-1]] * (self.batch - len(chunk))
      enc = encode_prompts(padded, self.tok, max_len=max(self.prompt_len, 1))
      out, _ = self._generate(params, self._put(enc["tokens"]), self._put(enc["lengths"]))
      texts.extend(self.tok.decode(row) for row in to_host(out)[: len(chunk)])
    return texts

  def accuracy(self, params) -> tuple[float, list[tuple[Example, str]]]:
    """(exact-match accuracy, the first few (example, completion) pairs)."""
    texts = self.generate(params, [e.prompt for e in self.examples])
    correct = [self.task.score(e, t) for e, t in zip(self.examples, texts, strict=True)]
    return float(np.mean(correct)), list(zip(self.examples[:5], texts[:5], strict=False))
