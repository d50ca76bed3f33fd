"""Preference pairs from a verifiable task: the right response is chosen, a corrupted one rejected.

For `Example(prompt="37+5=", response="42", answer="42")` the rejected response
replaces the final answer by a near miss (answer + d, d in +-[1, max_offset]),
the kind of mistake a half-trained model makes. Deterministic given the seed;
held-out pairs come from the task's held-out problems.
"""

from __future__ import annotations

import numpy as np

from critic_jax.data.preference import PreferenceExample
from critic_jax.data.tasks import Example

__all__ = ["corrupt_answer", "task_pairs"]


def corrupt_answer(ex: Example, rng: np.random.Generator, max_offset: int = 10) -> str:
  """The response with its final number moved by a nonzero offset."""
  value = int(ex.answer)
  offset = int(rng.integers(1, max_offset + 1)) * (1 if rng.random() < 0.5 else -1)
  wrong = value + offset
  if wrong < 0 <= value:  # stay in the task's range of answers
    wrong = value + abs(offset)
  head, sep, _ = ex.response.rpartition("=")
  return f"{head}{sep}{wrong}" if sep else str(wrong)


def task_pairs(
  task, n: int, *, seed: int = 0, heldout: bool = False, max_offset: int = 10
) -> list[PreferenceExample]:
  """`n` (prompt, correct response, corrupted response) pairs from `task`."""
  examples = task.eval_examples(n, seed=seed) if heldout else task.train_examples(n, seed=seed)
  rng = np.random.default_rng(seed + (1 << 20 if heldout else 0))
  return [
    PreferenceExample(e.prompt, e.response, corrupt_answer(e, rng, max_offset)) for e in examples
  ]
