"""Atomic, resumable, asynchronous checkpoints (orbax) and SIGTERM handling.

A checkpoint holds the whole `TrainState` (params, optimizer state, step, RNG)
and the data iterator's state. Orbax writes each step into a temporary
directory and renames it only once every file is complete, so a crash mid-save
leaves no checkpoint that would load wrong: `latest_step` only sees finished
ones. On SIGTERM (TPU preemption, `kill`, SLURM) the loop saves the current
step and exits cleanly; rerunning with the same workdir resumes from there.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "PreemptionGuard", "load_params"]

log = logging.getLogger(__name__)


class Checkpointer:
  """Keeps the last `keep` checkpoints of (state, data iterator state) under `directory`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    if keep is not None and keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1 (or None for all), got {keep}")
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
      item_names=("state", "data"),
    )  # fmt: skip

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None) -> bool:
    """Starts saving `step` (returns at once when async); no-op if it already exists."""
    if step in self._mngr.all_steps():
      return False
    return self._mngr.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` straight into the shardings carried by `abstract_state`."""
    out = self._mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
      ),
    )
    return out["state"], dict(out["data"] or {})

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def load_params(workdir: str, abstract_params: Any, step: int | None = None) -> Any:
  """Restores only the params of a critic_jax run (e.g. an SFT run, to start DPO from it).

  Args:
    workdir: the run's workdir (holding `checkpoints/`) or its checkpoint directory.
    abstract_params: ShapeDtypeStructs with shardings: every device reads only its shard.
    step: which checkpoint (default: the latest).
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    directory = workdir
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.init.checkpoint: no checkpoint directory at {workdir!r}")
  mngr = ocp.CheckpointManager(
    os.path.abspath(directory), item_handlers={"state": ocp.PyTreeCheckpointHandler()},
    options=ocp.CheckpointManagerOptions(read_only=True),
  )  # fmt: skip
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"config.init.checkpoint: {directory!r} holds no finished checkpoint")
  target = {"params": abstract_params}
  try:
    out = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        )
      ),
    )  # fmt: skip
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"config.init.checkpoint: the params in {directory!r} (step {step}) do not match this "
      f"model: {e}"
    ) from e
  finally:
    mngr.close()
  return out["state"]["params"]


class PreemptionGuard:
  """Turns SIGTERM (and optionally SIGINT) into a flag the training loop polls.

  Use as a context manager; the previous handlers come back on exit.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.signals = signals
    self.requested = False
    self._old = {}

  def _handler(self, signum, frame):
    log.warning("received signal %d: will checkpoint and stop after this step", signum)
    self.requested = True

  def __enter__(self):
    for s in self.signals:
      try:
        self._old[s] = signal.signal(s, self._handler)
      except ValueError:  # not the main thread: signals cannot be caught here
        pass
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    return False
