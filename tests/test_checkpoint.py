"""Checkpoints: atomic under a crash mid-save, SIGTERM saves and resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from critic_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abstract():
  return {
    "w": jax.ShapeDtypeStruct((256, 256), jnp.float32),
    "step": jax.ShapeDtypeStruct((), jnp.int32),
  }


def test_crash_mid_save_never_leaves_a_bad_checkpoint(tmp_path):
  d = str(tmp_path / "ckpt")
  p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ckpt_crash_worker.py"), d],
                     capture_output=True, text=True, timeout=300)  # fmt: skip
  assert p.returncode == 17, p.stderr[-3000:]
  # A half-written directory of a later step, as a crash in the middle of a write leaves it.
  junk = tmp_path / "ckpt" / "5.orbax-checkpoint-tmp-1234567"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "garbage").write_bytes(b"\x00" * 10)
  ckpt = Checkpointer(d, keep=3)
  step = ckpt.latest_step()
  assert step in (1, 2), ckpt.all_steps()
  assert 5 not in ckpt.all_steps()
  state, data = ckpt.restore(step, _abstract())
  np.testing.assert_array_equal(state["w"], np.full((256, 256), float(step)))
  assert int(state["step"]) == step and data == {"next_index": step}
  ckpt.close()


def _metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _cmd(workdir, steps):
  return [
    sys.executable, os.path.join(ROOT, "scripts", "train.py"),
    f"--config={os.path.join(ROOT, 'configs', 'sft_arith.py')}:tiny", f"--workdir={workdir}",
    f"--config.train.num_steps={steps}", "--config.train.log_every=1",
    "--config.train.ckpt_every=100000", "--config.train.eval_every=0",
  ]  # fmt: skip


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen(_cmd(workdir, 100000), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip
  deadline = time.time() + 300
  while len(_metrics(workdir)) < 3:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "training did not start"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert len(steps) == 1 and steps[0] >= 3
  stopped = steps[0]
  assert max(r["step"] for r in _metrics(workdir)) == stopped
  # Rerunning with the same workdir continues from the saved step.
  p = subprocess.run(_cmd(workdir, stopped + 2), env=env, capture_output=True, text=True,
                     timeout=300)  # fmt: skip
  assert p.returncode == 0, p.stderr[-3000:]
  logged = [r["step"] for r in _metrics(workdir)]
  assert logged[-2:] == [stopped + 1, stopped + 2]
  assert logged.count(1) == 1  # it did not start over
