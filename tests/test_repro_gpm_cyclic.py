"""Reproduction (a): GPM vs BT on cyclic preferences (scripts/repro_gpm_cyclic.py)."""

import pytest


@pytest.mark.slow
def test_gpm_fits_cyclic_preferences_bt_cannot(run_script):
  res = run_script("repro_gpm_cyclic", [])
  rps, rand = res["rps"], res["random"]
  assert rps["bound"] == pytest.approx(0.7)
  for r in (rps, rand):
    assert r["gpm"] >= 0.99, r
    assert r["bt"] <= r["bound"] + 1e-9, r
  assert rps["bt"] <= 0.7  # the balanced tournament: BT's optimum is a constant reward
