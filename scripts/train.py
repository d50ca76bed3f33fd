"""Runs any trainer: the config's `trainer` field picks it.

    python scripts/train.py --config=configs/sft_arith.py --workdir=runs/sft_arith \
        [--config.optimizer.lr=1e-3 --config.model.num_layers=4 ...]

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

import logging as pylogging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from critic_jax.hostmem import keep_freed_memory  # noqa: E402
from critic_jax.train import get_trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  keep_freed_memory()  # XLA:CPU's per-step buffers stay mapped (see critic_jax/hostmem.py)
  # critic_jax's own progress at INFO; libraries (orbax's per-save chatter) at WARNING.
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger("critic_jax").setLevel(pylogging.INFO)
  config = _CONFIG.value
  final = get_trainer(config.trainer)(config, _WORKDIR.value)
  keys = sorted(k for k in final if k.startswith("eval/"))
  print(f"final: step {final['step']}; " + ", ".join(f"{k}={final[k]:.4f}" for k in keys))
  if "eval/accuracy" in final:
    print(f"held-out exact-match accuracy: {100 * final['eval/accuracy']:.1f}%")


if __name__ == "__main__":
  app.run(main)
