"""Reproduction (e): the InfoNCE uniformity-tolerance dilemma (scripts/repro_infonce.py)."""

import numpy as np
import pytest


@pytest.mark.slow
def test_lower_temperature_more_uniform_less_tolerant(run_script):
  res = run_script("repro_infonce", [])
  taus = [t for t in sorted(res) if t >= 0.1]
  unif = [res[t]["uniformity"] for t in taus]
  tol = [res[t]["tolerance"] for t in taus]
  assert np.all(np.diff(unif) > 0), unif
  assert np.all(np.diff(tol) > 0), tol
  assert tol[-1] - tol[0] > 0.03 and unif[-1] - unif[0] > 0.05
