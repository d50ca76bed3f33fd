"""Two real JAX processes on this machine (4 CPU devices each, gloo collectives,
coordinator on localhost) train the same model as one 8-device process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from critic_jax.train import get_trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  workdir = str(tmp_path / "multi")
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(HERE, "multihost_worker.py"),
        str(i),
        "2",
        str(port),
        workdir,
        str(tmp_path / f"out{i}.json"),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-4000:]

  from configs.sft_arith import get_config

  config = get_config("tiny")
  with config.unlocked():
    config.train.num_steps = 3
    config.train.eval_every = 3
    config.train.ckpt_every = 3
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  single = get_trainer("sft")(config, str(tmp_path / "single"))

  outs = [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]
  for out in outs:  # both processes saw the same global results
    for k in ("train/loss", "eval/loss", "eval/accuracy"):
      np.testing.assert_allclose(out[k], single[k], rtol=1e-5)
  multi = {r["step"]: r["train/loss"] for r in _read(os.path.join(workdir, "metrics.jsonl"))
           if "train/loss" in r}  # fmt: skip
  ref = {r["step"]: r["train/loss"] for r in _read(str(tmp_path / "single" / "metrics.jsonl"))
         if "train/loss" in r}  # fmt: skip
  assert sorted(multi) == [1, 2, 3]
  for s in multi:
    np.testing.assert_allclose(multi[s], ref[s], rtol=1e-5)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
