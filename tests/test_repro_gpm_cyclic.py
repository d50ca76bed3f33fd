"""Reproduction (a): GPM vs BT on cyclic preferences (scripts/repro_gpm_cyclic.py)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow
def test_gpm_fits_cyclic_preferences_bt_cannot():
  res = _script("repro_gpm_cyclic").main([])
  rps, rand = res["rps"], res["random"]
  assert rps["bound"] == pytest.approx(0.7)
  for r in (rps, rand):
    assert r["gpm"] >= 0.99, r
    assert r["bt"] <= r["bound"] + 1e-9, r
  assert rps["bt"] <= 0.7  # the balanced tournament: BT's optimum is a constant reward
