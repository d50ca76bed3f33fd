"""Pairwise accuracy: hand-computed values, padded sharded batches, metric names."""

import jax
import numpy as np
import pytest

from critic_jax.data import CharTokenizer
from critic_jax.data.preference import PreferenceExample
from critic_jax.eval import PairwiseEvaluator, pairwise_accuracy, pairwise_metrics, score_pairs
from critic_jax.parallel import make_mesh


def test_pairwise_accuracy_by_hand():
  margins = np.array([0.5, -1.0, 0.0, 2.0, -0.1])
  # 0.5 and 2.0 are right; a tie (0.0) counts as wrong.
  assert pairwise_accuracy(margins) == pytest.approx(2 / 5)
  assert pairwise_accuracy(margins, mask=np.array([1, 1, 0, 0, 0], bool)) == pytest.approx(1 / 2)
  assert pairwise_accuracy(np.zeros(0)) == 0.0
  m = pairwise_metrics({"margin": margins, "margin_A": -margins, "loss": np.ones(5)})
  assert m["accuracy"] == pytest.approx(0.4) and m["accuracy_A"] == pytest.approx(0.4)
  assert m["margin"] == pytest.approx(np.mean(margins)) and m["loss"] == 1.0


def test_score_pairs_over_padded_sharded_batches():
  # A "reward model" that scores a response by its first character's id: r(y) = id(y[0]).
  tok = CharTokenizer()
  pairs = [("b", "a"), ("a", "c"), ("z", "y"), ("d", "d"), ("a", "b"), ("q", "p"), ("m", "n")]
  exs = [PreferenceExample("12", c, r) for c, r in pairs]
  prompt_len = 1 + 2  # BOS + "12"

  def fn(params, batch):
    r_w = batch["chosen_tokens"][:, prompt_len] * params
    r_l = batch["rejected_tokens"][:, prompt_len] * params
    return {"margin": (r_w - r_l).astype(np.float32), "chosen_reward": r_w.astype(np.float32)}

  mesh = make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4])
  with jax.set_mesh(mesh):
    out = score_pairs(jax.jit(fn), 1, exs, tok, seq_len=8, batch_size=3, mesh=mesh)
    ev = PairwiseEvaluator(jax.jit(fn), exs, tok, seq_len=8, batch_size=3, mesh=mesh)(1)
  hand = np.array([ord(c) - ord(r) for c, r in pairs], np.float32)
  np.testing.assert_array_equal(out["margin"], hand)
  assert out["chosen_reward"].shape == (7,)
  # Right: b>a, z>y, q>p; wrong: a<c, tie d=d, a<b, m<n.
  assert ev["accuracy"] == pytest.approx(3 / 7)
