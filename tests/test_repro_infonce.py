"""Reproduction (e): the InfoNCE uniformity-tolerance dilemma (scripts/repro_infonce.py)."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow
def test_lower_temperature_more_uniform_less_tolerant():
  res = _script("repro_infonce").main([])
  taus = [t for t in sorted(res) if t >= 0.1]
  unif = [res[t]["uniformity"] for t in taus]
  tol = [res[t]["tolerance"] for t in taus]
  assert np.all(np.diff(unif) > 0), unif
  assert np.all(np.diff(tol) > 0), tol
  assert tol[-1] - tol[0] > 0.03 and unif[-1] - unif[0] > 0.05
