"""CRM vs BT under 40% symmetric label noise (Zhang et al. 2025, spec §4f).

    python scripts/train.py --config=configs/reward_crm_noise.py --workdir=runs/crm_noise
    python scripts/train.py --config=configs/reward_crm_noise.py:bt --workdir=runs/bt_noise
    python scripts/repro_crm_noise.py   # both, with held-out clean accuracy

Data: "noisy_bt" items (4-letter strings whose hidden score is a sum of per-letter weights),
1000 training pairs over 400 items with exactly 40% of the labels flipped, held-out clean pairs
over 200 unseen items; 600 steps of batch 64 (about 38 epochs, enough for BT to overfit the
flips). Variants (the `:arg` after the file): "" (CRM: two RMs, keep ratio 1 - 0.4,
easy-to-hard curriculum), "bt" (one BT RM on the same data), "no_curriculum", "self" (the
paper's Self Review ablation: each RM trains on its own picks; no curriculum), "ramp" (the [U]
co-teaching ramp of the keep ratio over 200 steps), "tiny" (2 steps, for tests).
"""

import ml_collections

from configs.reward_bt import reward_config, tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  c = reward_config("bt" if arg == "bt" else "crm")
  c.data.task_kwargs = ml_collections.ConfigDict(dict(
    num_items=400, num_train_pairs=1000, num_eval_items=200, num_eval_pairs=1000,
    noise_rate=0.4, item_len=4, alphabet_size=8, seed=0,
  ))  # fmt: skip
  c.model.d_model = 32
  c.model.mlp_dim = 128
  c.crm.noise_rate = 0.4
  c.train.num_steps = 600
  c.train.eval_every = 150
  c.train.ckpt_every = 600
  if arg == "no_curriculum":
    c.crm.curriculum = False
  elif arg == "self":
    c.crm.curriculum = False
    c.crm.selection = "self"
  elif arg == "ramp":
    c.crm.ramp_steps = 200
  elif arg == "tiny":
    c = tiny(c)
    c.data.task_kwargs = ml_collections.ConfigDict(dict(
      num_items=32, num_train_pairs=20, num_eval_items=16, num_eval_pairs=24, noise_rate=0.4,
      num_references=8,
    ))  # fmt: skip
  elif arg not in ("", "bt"):
    raise ValueError(
      f"unknown variant {arg!r} of reward_crm_noise; known: '', bt, no_curriculum, self, ramp, tiny"
    )
  c.lock()
  return c
