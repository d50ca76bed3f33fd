"""GPM vs BT on cyclic preferences (Zhang et al. 2024, arXiv 2410.02197; spec §3f).

    python scripts/repro_gpm_cyclic.py    # ~3 minutes on 2 CPU cores

Trains the variants of configs/reward_gpm_cyclic.py with the reward-model trainer (tiny
transformers; items are 3-letter strings) on two intransitive targets:
  rps:    a balanced 5-item tournament (each item beats the next two): any scalar reward gets
          at most 70% of the pairs right, and BT's optimum is a constant reward (chance);
  random: a random skew-symmetric target over 6 items, with its exact transitive bound.
Held-out = every labelled pair. Printed: the transitive bound and BT's and GPM's pairwise
accuracy. Claim: BT at or below the transitive bound (near chance on rps), GPM near 100%.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.reward_gpm_cyclic import get_config  # noqa: E402
from critic_jax.data.preference_tasks import make_preference_task  # noqa: E402
from critic_jax.train import get_trainer  # noqa: E402

TARGETS = {"rps": ("bt", ""), "random": ("random_bt", "random")}  # target: (BT arg, GPM arg)


def run_variant(arg: str, workdir: str) -> dict:
  config = get_config(arg)
  config.unlock()
  config.train.progress_bar = False
  config.lock()
  return get_trainer(config.trainer)(config, workdir)


def main(argv=None) -> dict[str, dict[str, float]]:
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for target, (bt_arg, gpm_arg) in TARGETS.items():
      t0 = time.time()
      c = get_config(gpm_arg)
      task = make_preference_task(c.data.task, **c.data.task_kwargs)
      bound = task.transitive_bound()
      bt = run_variant(bt_arg, os.path.join(tmp, bt_arg))["eval/accuracy"]
      gpm = run_variant(gpm_arg, os.path.join(tmp, gpm_arg or "rps"))["eval/accuracy"]
      n = c.data.task_kwargs.num_items
      pairs = len(task.eval_data())
      print(f"{target:6s} N={n} ({pairs} pairs): transitive bound {bound:.3f}  BT {bt:.3f}  "
            f"GPM (k={c.gpm.k}) {gpm:.3f}  ({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
      results[target] = {"bound": bound, "bt": bt, "gpm": gpm}
  return results


if __name__ == "__main__":
  main()
