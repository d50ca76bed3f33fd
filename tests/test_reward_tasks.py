"""Synthetic preference tasks: cyclic targets and their transitive bound, noisy BT labels."""

import numpy as np
import pytest

from critic_jax.data.preference_tasks import (
  PREFERENCE_TASKS,
  make_preference_task,
  transitive_bound,
)
from critic_jax.data.synthetic_preferences import rock_paper_scissors_target


def test_transitive_bound_by_hand():
  assert transitive_bound(rock_paper_scissors_target(3)) == pytest.approx(2 / 3)
  # Regular 5-tournament: a linear order gets at most 7 of the 10 pairs right.
  assert transitive_bound(rock_paper_scissors_target(5)) == pytest.approx(0.7)
  t = np.array([[0, 1, 1], [-1, 0, 1], [-1, -1, 0]])  # transitive
  assert transitive_bound(t) == 1.0


def test_cyclic_task_pairs():
  task = make_preference_task("cyclic", num_items=5, target="rps", item_len=3, repeats=4)
  ev, tr = task.eval_data(), task.train_data()
  assert len(ev) == 10 and len(tr) == 40 and not tr.flipped.any()
  assert len(set(task.items)) == 5 and all(len(s) == 3 for s in task.items)
  wins = {s: 0 for s in task.items}
  for ex in ev.examples:
    wins[ex.chosen] += 1
  assert sorted(wins.values()) == [2] * 5  # each item beats the next two
  rand = make_preference_task("cyclic", num_items=6, target="random", seed=3)
  assert len(rand.eval_data()) == 15
  assert 0.5 < rand.transitive_bound() <= 1.0


def test_noisy_bt_task_labels():
  task = make_preference_task(
    "noisy_bt", num_items=50, num_train_pairs=200, num_eval_items=30, num_eval_pairs=100,
    noise_rate=0.4, seed=1,
  )  # fmt: skip
  tr, ev = task.train_data(), task.eval_data()
  assert tr.flipped.sum() == 80  # exactly round(0.4 * 200)
  for ex, f in zip(tr.examples, tr.flipped, strict=True):
    assert (task.score(ex.chosen) > task.score(ex.rejected)) != f
  assert not ev.flipped.any() and 0 < len(ev) <= 100
  assert all(task.score(e.chosen) > task.score(e.rejected) for e in ev.examples)
  train_items = {s for e in tr.examples for s in (e.chosen, e.rejected)}
  assert not train_items & {s for e in ev.examples for s in (e.chosen, e.rejected)}
  assert len(task.reference_examples()) == 50


def test_registry_errors():
  assert {"cyclic", "noisy_bt"} <= set(PREFERENCE_TASKS.names())
  with pytest.raises(KeyError, match="Known preference tasks: cyclic, noisy_bt"):
    make_preference_task("cyclik")
  with pytest.raises(TypeError, match="task_kwargs for 'cyclic'"):
    make_preference_task("cyclic", num_itemz=3)
