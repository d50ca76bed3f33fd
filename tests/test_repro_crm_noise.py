"""Reproduction (b): CRM vs BT under 40% label noise (scripts/repro_crm_noise.py)."""

import pytest


@pytest.mark.slow
def test_crm_beats_bt_on_clean_heldout_pairs(run_script):
  res = run_script("repro_crm_noise", ["--variants", "bt,"])
  bt, crm = res["bt"]["final"], res[""]["final"]
  assert crm["eval/accuracy"] > bt["eval/accuracy"] + 0.1, (
    crm["eval/accuracy"],
    bt["eval/accuracy"],
  )
  assert min(crm["eval/accuracy_A"], crm["eval/accuracy_B"]) > bt["eval/accuracy"]
