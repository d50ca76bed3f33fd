"""Reproduction (d): Tajwar et al.'s bandit (scripts/repro_bandit.py)."""

import pytest


@pytest.mark.slow
def test_on_policy_and_negative_gradient_beat_offline_ml(run_script):
  res = run_script("repro_bandit", [])
  rows = res[70.0]["rows"]
  final = {k: v["mean"][-1] for k, v in rows.items()}
  early = {k: v["mean"][0] for k, v in rows.items()}
  off_ml, on_ml = final["offline   ML: best-of-N"], final["on-policy ML: best-of-N"]
  # c = 70 (peak in a low-likelihood region), each method at its best learning rate:
  assert on_ml > off_ml + 0.3  # on-policy sampling
  assert final["offline   NEG: IPO"] > off_ml + 0.2  # negative gradient, offline
  for neg in ("on-policy NEG: IPO", "on-policy NEG: bon+neg"):
    assert final[neg] > on_ml, (neg, final)  # both together
    assert early[neg] > early["on-policy ML: best-of-N"]  # and faster
  # c = 20 (aligned with pi_ref's mode): every method ends close to the top.
  assert min(v["mean"][-1] for v in res[20.0]["rows"].values()) > 0.9
