"""Saves checkpoint 1, starts saving checkpoint 2 asynchronously, then dies at once.

python tests/ckpt_crash_worker.py <checkpoint_dir>
"""

import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from critic_jax.train.checkpoint import Checkpointer  # noqa: E402


def state(step):
  return {"w": jnp.full((256, 256), float(step)), "step": jnp.asarray(step)}


def main():
  ckpt = Checkpointer(sys.argv[1], keep=3, async_save=True)
  ckpt.save(1, state(1), {"next_index": 1})
  ckpt.wait()
  ckpt.save(2, state(2), {"next_index": 2})
  os._exit(17)  # a crash while step 2 is being written


if __name__ == "__main__":
  main()
