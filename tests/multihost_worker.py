"""One process of the two-process CPU test (run by tests/test_multihost.py, not by pytest).

python tests/multihost_worker.py <process_id> <num_processes> <port> <workdir> <out.json>
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main():
  pid, nproc, port, workdir, out = sys.argv[1:6]
  from configs.sft_arith import get_config
  from critic_jax.train import get_trainer

  config = get_config("tiny")
  with config.unlocked():
    config.train.num_steps = 3
    config.train.eval_every = 3
    config.train.ckpt_every = 3
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    config.distributed.enabled = True
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes = int(nproc)
    config.distributed.process_id = int(pid)
    config.distributed.cpu_collectives = "gloo"
  final = get_trainer("sft")(config, workdir)
  assert jax.process_count() == int(nproc) and jax.device_count() == 8
  with open(out, "w") as f:
    json.dump({k: v for k, v in final.items() if isinstance(v, (int, float))}, f)


if __name__ == "__main__":
  main()
