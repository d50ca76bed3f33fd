"""Reproduction (b): CRM vs BT under 40% label noise (scripts/repro_crm_noise.py)."""

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
def test_crm_beats_bt_on_clean_heldout_pairs():
  res = _script("repro_crm_noise").main(["--variants", "bt,"])
  bt, crm = res["bt"]["final"], res[""]["final"]
  assert crm["eval/accuracy"] > bt["eval/accuracy"] + 0.1, (
    crm["eval/accuracy"],
    bt["eval/accuracy"],
  )
  assert min(crm["eval/accuracy_A"], crm["eval/accuracy_B"]) > bt["eval/accuracy"]
