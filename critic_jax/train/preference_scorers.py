"""Scorers (verifiers / rewards) that rank on-policy candidates for iterative DNO-Prct.

DNO-Prct (Rosset et al., arXiv 2404.03715; spec §8) ranks K policy samples plus a gold
response with a judge (GPT-4-Turbo in the paper) and keeps the (best, worst) pair. Here the
judge is a host-side callable `(prompt, completion, example) -> float` (the sampler's
`RewardFn`), chosen by name from `SCORERS` (`config.dno.scorer`). Each entry is a factory
`(task) -> RewardFn`; `task` is the embedded task (None for JSONL data).

* "task_correct": 1.0 if the completion's final answer matches the task's answer, else 0.0.
* "task_distance": 1 / (1 + |predicted - answer|) for a numeric final answer (1.0 when
  right, decaying with the distance), 0.0 when the answer does not parse.
* "gold_exact": 1.0 if the completion equals the gold response (stripped), else 0.0.
* "gold_similarity": difflib's similarity ratio in [0, 1] to the gold response.

`example` is a task `Example` (gold = `response`) or a `PreferenceExample` (gold = `chosen`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from critic_jax.data.tasks import final_answer
from critic_jax.registry import Registry

__all__ = ["SCORERS", "gold_response", "make_scorer"]

SCORERS: Registry = Registry("preference scorer")

Scorer = Callable[[str, str, Any], float]


def gold_response(example: Any) -> str | None:
  """The gold (reference) response of a task `Example` or a `PreferenceExample`, or None."""
  if hasattr(example, "chosen"):
    return example.chosen
  return getattr(example, "response", None)


def _need_task(name: str, task) -> None:
  if task is None:
    raise ValueError(f"scorer {name!r} needs the embedded task (config.data.source='task')")


@SCORERS.register("task_correct")
def _task_correct(task) -> Scorer:
  _need_task("task_correct", task)

  def score(prompt: str, completion: str, example) -> float:
    return float(task.score(example, completion))

  return score


@SCORERS.register("task_distance")
def _task_distance(task) -> Scorer:
  _need_task("task_distance", task)

  def score(prompt: str, completion: str, example) -> float:
    try:
      got = int(final_answer(completion))
    except ValueError:
      return 0.0
    return 1.0 / (1.0 + abs(got - int(example.answer)))

  return score


def _gold(example) -> str:
  gold = gold_response(example)
  if gold is None:
    raise ValueError("this scorer needs a gold response (data with a 'chosen' side)")
  return gold


@SCORERS.register("gold_exact")
def _gold_exact(task=None) -> Scorer:
  def score(prompt: str, completion: str, example) -> float:
    return float(completion.strip() == _gold(example).strip())

  return score


@SCORERS.register("gold_similarity")
def _gold_similarity(task=None) -> Scorer:
  def score(prompt: str, completion: str, example) -> float:
    return difflib.SequenceMatcher(None, completion, _gold(example)).ratio()

  return score


def make_scorer(name: str, task=None) -> Scorer:
  """The scorer registered as `name`, built for `task` (None for JSONL data)."""
  return SCORERS.get(name)(task)
