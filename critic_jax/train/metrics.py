"""Metric logging: a JSONL file and TensorBoard event files in the workdir, plus tqdm."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

__all__ = ["MetricWriter", "StepTimer"]


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites `path` (atomically) without the records of steps after `step`, and without a
  line a crash left half-written."""

  def keep(line: str) -> bool:
    try:
      return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):
      return False

  with open(path, encoding="utf-8") as f:
    lines = [ln for ln in f if ln.strip() and keep(ln)]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(ln if ln.endswith("\n") else ln + "\n" for ln in lines)
  os.replace(tmp, path)


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/tb/` (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool | None = None, start_step: int | None = None):
    """`start_step`: the step training resumes from; records logged after it by an earlier,
    interrupted run are dropped (they are about to be logged again)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if start_step is not None and os.path.exists(path):
        _drop_records_after(path, start_step)
      self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
      try:
        from tensorboardX import SummaryWriter

        purge = None if start_step is None else start_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)
      except ImportError:  # TensorBoard output is optional
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> dict:
    """Logs `scalars` (device arrays are fetched here) and returns them as floats."""
    vals = {f"{prefix}{k}": float(np.asarray(v)) for k, v in jax.device_get(dict(scalars)).items()}
    if not self.enabled:
      return vals
    rec = {"step": int(step), "time": time.time()}
    rec.update({k: (v if math.isfinite(v) else str(v)) for k, v in vals.items()})
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in vals.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    return vals

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class StepTimer:
  """Wall time and tokens between log points (the caller blocks on metrics there)."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.t0 = time.perf_counter()
    self.steps = 0
    self.tokens = 0

  def tick(self, tokens: int) -> None:
    self.steps += 1
    self.tokens += tokens

  def rates(self) -> dict[str, float]:
    dt = max(time.perf_counter() - self.t0, 1e-9)
    out = {"step_time": dt / max(self.steps, 1), "tokens_per_sec": self.tokens / dt}
    self.reset()
    return out
