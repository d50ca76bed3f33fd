"""GPM vs BT on cyclic (intransitive) preferences (Zhang et al. 2024, spec §3f).

    python scripts/train.py --config=configs/reward_gpm_cyclic.py --workdir=runs/gpm_cyclic
    python scripts/train.py --config=configs/reward_gpm_cyclic.py:bt --workdir=runs/bt_cyclic
    python scripts/repro_gpm_cyclic.py   # both, on both targets, with the transitive bound

Variants (the `:arg` after the file): "" (GPM, k = 3, on a balanced 5-item rock-paper-scissors
tournament: every item beats the next two), "bt" (the same data with a scalar BT reward),
"random" / "random_bt" (a random skew-symmetric target over 6 items), "gate" (GPM with the
prompt gate), "tiny" (2 steps, for tests). Held-out = every labelled pair.
"""

import ml_collections

from configs.reward_bt import reward_config, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  loss = "bt" if arg in ("bt", "random_bt") else "gpm"
  c = reward_config(loss)
  c.data.task = "cyclic"
  c.data.task_kwargs = ml_collections.ConfigDict(
    {"num_items": 5, "target": "rps", "item_len": 3, "repeats": 16, "seed": 0}
  )
  c.data.batch_size = 32
  c.gpm.k = 3
  c.centering.enabled = loss == "bt"
  c.optimizer.lr = 3e-3
  c.train.num_steps = 300
  c.train.log_every = 50
  c.train.eval_every = 100
  c.train.ckpt_every = 300
  if arg in ("random", "random_bt"):
    c.data.task_kwargs.num_items = 6
    c.data.task_kwargs.target = "random"
  elif arg == "gate":
    c.gpm.gate = True
  elif arg == "tiny":
    c = tiny(c)
    c.data.task_kwargs.repeats = 2
  elif arg not in ("", "bt"):
    raise ValueError(
      f"unknown variant {arg!r} of reward_gpm_cyclic; known: '', bt, random, random_bt, gate, tiny"
    )
  c.lock()
  return c
