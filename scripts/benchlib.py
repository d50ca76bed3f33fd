"""What the benchmark scripts share: each side of a comparison runs in its own child process.

A side (our JAX code, or the PyTorch baseline) runs as `script --side NAME ...` and prints
one `RESULT {json}` line; the parent never initialises a JAX backend or CUDA itself. On a
GPU this keeps JAX's preallocated memory pool (75% of the device by default) and PyTorch's
caching allocator out of each other's way, and on a CPU neither side's thread pools or
allocator state leak into the other's timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

__all__ = [
  "RESULT_PREFIX", "add_profile_flag", "add_rounds_flag", "exit_if_failed", "forward_args",
  "print_result", "profile_runs", "run_side", "side_or_none",
]  # fmt: skip

RESULT_PREFIX = "RESULT "


def _positive_int(text: str) -> int:
  n = int(text)
  if n < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
  return n


def add_rounds_flag(p: argparse.ArgumentParser) -> None:
  """`--rounds N`: the parent runs the sides alternately N times (see the scripts' reports)."""
  p.add_argument(
    "--rounds", type=_positive_int, default=1,
    help="run the sides alternately this many times (each in a fresh process) and report "
    "every round's ratio and their median: on a noisy machine one round can mislead",
  )  # fmt: skip


def add_profile_flag(p: argparse.ArgumentParser) -> None:
  """`--profile DIR`: after timing, trace a few more runs of our side into DIR."""
  p.add_argument(
    "--profile", default="",
    help="after timing, trace --profile-runs more runs of our side with jax.profiler into "
    "this directory (summarise it with scripts/profile_ops.py)",
  )  # fmt: skip
  p.add_argument("--profile-runs", type=_positive_int, default=2)


def profile_runs(directory: str, run, sync, n: int) -> None:
  """Traces `n` calls of `run` (each followed by `sync`) into `directory`."""
  import jax

  sync()
  with jax.profiler.trace(directory):
    for _ in range(n):
      run()
      sync()


def print_result(result: dict) -> None:
  """Prints a side's result as the line `run_side` reads back."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def forward_args(args, skip: tuple[str, ...] = ("side", "timeout", "rounds")) -> list[str]:
  """An argparse namespace back as command-line flags (`--flag value`; booleans bare).

  `skip` names the parent's own flags, which its sides do not get.
  """
  out = []
  for k, v in vars(args).items():
    if k in skip or v is None or v is False:
      continue
    flag = f"--{k.replace('_', '-')}"
    out += [flag] if v is True else [flag, str(v)]
  return out


def run_side(
  script: str, side: str, argv: list[str], *, env: dict | None = None, timeout: float = 1200.0
) -> dict:
  """Runs `python script --side side *argv` and returns its `RESULT` json.

  Raises SystemExit naming the side, with the tail of its output, if it fails, times out
  or prints no result.
  """
  cmd = [sys.executable, os.path.abspath(script), "--side", side, *argv]
  env = dict(os.environ if env is None else env, TOKENIZERS_PARALLELISM="false")
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    raise SystemExit(f"the {side} side did not finish within {timeout:.0f} s") from e
  lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
  result = json.loads(lines[-1][len(RESULT_PREFIX) :])
  result["process_s"] = time.perf_counter() - t0  # the side's whole process: start-up included
  return result


def side_or_none(i: int, name: str, run) -> dict | None:
  """Round `i`'s side `name`: `run()` (a `run_side` call) -> its result, printed at once, so
  a later side's failure or an outer time limit keeps it ("loops", if any, a line each).

  A side that fails (`run_side` raises SystemExit) is named and gives None; the caller runs
  the other sides and then calls `exit_if_failed`.
  """
  try:
    r = run()
  except SystemExit as e:
    print(f"round {i + 1}: side {name} FAILED: {e}", flush=True)
    return None
  print(f"round {i + 1}: side {name}: { {k: v for k, v in r.items() if k != 'loops'} }")
  for k, v in r.get("loops", {}).items():
    print(f"round {i + 1}: side {name}, {k} loop: {v}")
  sys.stdout.flush()
  return r


def exit_if_failed(rounds: list[dict]) -> None:
  """Exits non-zero naming the sides (`{name: result or None}` per round) that failed."""
  failed = sorted({n for r in rounds for n, x in r.items() if x is None})
  if failed:
    sys.exit(f"side(s) failed: {', '.join(failed)} (their output is above)")
