"""Synthetic tasks with verifiable answers, generated deterministically from a seed.

Each task yields `Example(prompt, response, answer)` and scores a model's
completion by exact match of the final answer. Held-out problems are chosen by
a hash of the problem, so no held-out problem is ever trained on, whatever the
seed or the number of training examples.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from critic_jax.registry import Registry

__all__ = ["TASKS", "Example", "Addition", "ArithmeticSteps", "make_task"]

TASKS: Registry = Registry("task")


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt, the target response, and the answer the response must end with."""

  prompt: str
  response: str
  answer: str = ""


def _is_heldout(key: str, frac: float) -> bool:
  h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
  return (h % 1_000_003) < frac * 1_000_003


def final_answer(text: str) -> str:
  """The text after the last '=' (the whole text if there is none), stripped."""
  return text.rsplit("=", 1)[-1].strip()


class _Task:
  holdout_frac: float

  def _problem(self, rng: np.random.Generator) -> tuple[str, Example]:
    raise NotImplementedError

  def _sample(self, n: int, seed: int, heldout: bool) -> list[Example]:
    rng = np.random.default_rng(seed)
    out, seen, tries = [], set(), 0
    while len(out) < n:
      tries += 1
      if tries > 100 * n + 10_000:
        raise ValueError(
          f"{type(self).__name__}: cannot draw {n} distinct problems; space too small"
        )
      key, ex = self._problem(rng)
      if _is_heldout(key, self.holdout_frac) == heldout and not (heldout and key in seen):
        seen.add(key)
        out.append(ex)
    return out

  def train_examples(self, n: int, seed: int = 0) -> list[Example]:
    return self._sample(n, seed, heldout=False)

  def eval_examples(self, n: int, seed: int = 1) -> list[Example]:
    return self._sample(n, seed + 7919, heldout=True)

  def score(self, example: Example, completion: str) -> bool:
    """Exact match of the final answer of `completion` with the example's answer."""
    return final_answer(completion) == example.answer


@TASKS.register("addition")
class Addition(_Task):
  """a+b with operands of `min_digits`..`num_digits` digits: "37+5=" -> "42".

  With `num_digits=2` operands are drawn from [0, 100).
  """

  def __init__(self, num_digits: int = 2, min_digits: int = 1, holdout_frac: float = 0.1):
    if not 1 <= min_digits <= num_digits:
      raise ValueError(
        f"addition needs 1 <= min_digits <= num_digits, got {min_digits}, {num_digits}"
      )
    self.num_digits, self.min_digits, self.holdout_frac = num_digits, min_digits, holdout_frac

  def _operand(self, rng):
    d = int(rng.integers(self.min_digits, self.num_digits + 1))
    lo = 0 if d == 1 else 10 ** (d - 1)
    return int(rng.integers(lo, 10**d))

  def _problem(self, rng):
    a, b = self._operand(rng), self._operand(rng)
    return f"{a}+{b}", Example(prompt=f"{a}+{b}=", response=str(a + b), answer=str(a + b))

  def train_examples(self, n: int, seed: int = 0) -> list[Example]:
    if self.num_digits <= 2 and self.min_digits == 1:
      # The whole space is small: enumerate it (minus held-out), then shuffle.
      exs = [
        Example(f"{a}+{b}=", str(a + b), str(a + b))
        for a in range(10**self.num_digits) for b in range(10**self.num_digits)
        if not _is_heldout(f"{a}+{b}", self.holdout_frac)
      ]  # fmt: skip
      order = np.random.default_rng(seed).permutation(len(exs))
      reps = -(-n // len(exs))
      return [exs[i] for _ in range(reps) for i in order][:n]
    return super().train_examples(n, seed)

  def eval_examples(self, n: int, seed: int = 1) -> list[Example]:
    if self.num_digits <= 2 and self.min_digits == 1:
      # Distinct held-out problems, uniform over the (enumerable) problem space.
      exs = [
        Example(f"{a}+{b}=", str(a + b), str(a + b))
        for a in range(10**self.num_digits) for b in range(10**self.num_digits)
        if _is_heldout(f"{a}+{b}", self.holdout_frac)
      ]  # fmt: skip
      if n > len(exs):
        raise ValueError(f"Addition: {n} held-out problems asked, only {len(exs)} exist")
      order = np.random.default_rng(seed + 7919).permutation(len(exs))
      return [exs[i] for i in order[:n]]
    return super().eval_examples(n, seed)


@TASKS.register("arith_steps")
class ArithmeticSteps(_Task):
  """Chains of + and - with intermediate steps: "12+34-5=" -> "12+34=46;46-5=41".

  The answer is the number after the last '='.
  """

  def __init__(self, num_operands: int = 3, num_digits: int = 2, holdout_frac: float = 0.1):
    if num_operands < 2:
      raise ValueError(f"arith_steps needs num_operands >= 2, got {num_operands}")
    self.num_operands, self.num_digits, self.holdout_frac = num_operands, num_digits, holdout_frac

  def _problem(self, rng):
    xs = [int(rng.integers(0, 10**self.num_digits)) for _ in range(self.num_operands)]
    ops = [("+", "-")[int(rng.integers(0, 2))] for _ in range(self.num_operands - 1)]
    expr = str(xs[0]) + "".join(f"{o}{x}" for o, x in zip(ops, xs[1:], strict=True))
    acc, steps = xs[0], []
    for o, x in zip(ops, xs[1:], strict=True):
      new = acc + x if o == "+" else acc - x
      steps.append(f"{acc}{o}{x}={new}")
      acc = new
    return expr, Example(prompt=f"{expr}=", response=";".join(steps), answer=str(acc))


def make_task(name: str, **kwargs):
  """Builds a task by registry name; unknown keyword arguments raise with the task name."""
  cls = TASKS.get(name)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise TypeError(f"config.task for {name!r}: {e}") from None
