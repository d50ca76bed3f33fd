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
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

__all__ = [
  "RESULT_PREFIX", "add_interleave_flags", "add_profile_flag", "add_rounds_flag",
  "exit_if_failed", "forward_args", "interleave_sides", "measure", "print_result",
  "profile_runs", "run_side", "side_or_none",
]  # fmt: skip

RESULT_PREFIX = "RESULT "
SERVE_PREFIX = "SERVE "


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


def add_interleave_flags(p: argparse.ArgumentParser) -> None:
  """`--interleave N` (the parent) and `--serve` (a side run by `interleave_sides`)."""
  p.add_argument(
    "--interleave", type=int, default=0, metavar="PAIRS",
    help="CPU: keep every side alive at once and run them in alternating bursts of --steps "
    "steps (calls), PAIRS bursts each, order flipping every pair; report the median of the "
    "per-pair ratios. A slow spell of a shared machine (seconds long) then hits both sides "
    "of a pair. Not for GPUs: the sides would share the device's memory",
  )  # fmt: skip
  p.add_argument(
    "--gap", type=float, default=0.05,
    help="--interleave: idle seconds after each burst (spinning worker threads go to sleep)",
  )  # fmt: skip
  p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)


def measure(args, run, sync, warmup: int, steps: int, timer) -> float:
  """A side's seconds per call of `run`: `timer(run, sync, warmup, steps)` (the median of
  `steps` timed calls), or with `--serve` the median of every call timed in the bursts that
  `interleave_sides` asks for."""
  if not getattr(args, "serve", False):
    return timer(run, sync, warmup, steps)
  for _ in range(warmup):
    run()
  sync()
  print(SERVE_PREFIX + "ready", flush=True)
  times = []
  while True:
    line = sys.stdin.readline().split()
    if not line or line[0] == "done":
      break
    burst = []
    for _ in range(int(line[1])):
      t0 = time.perf_counter()
      run()
      sync()
      burst.append(time.perf_counter() - t0)
    times += burst
    print(SERVE_PREFIX + json.dumps(burst), flush=True)
  if not times:
    raise SystemExit("--serve: no burst was requested")
  return statistics.median(times)


class _Served:
  """A side started with `--serve`: its stdout lines arrive on a queue (read by a thread), so
  every wait has a deadline; stderr goes to a file (read back if the side fails)."""

  def __init__(self, script, side, argv, env):
    self.side = side
    self.t0 = time.perf_counter()
    self.err = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, os.path.abspath(script), "--side", side, *argv, "--serve"]
    self.proc = subprocess.Popen(
      cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env
    )
    self.lines: queue.Queue = queue.Queue()
    self.out: list[str] = []
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    for line in self.proc.stdout:
      self.lines.put(line.rstrip("\n"))
    self.lines.put(None)

  def expect(self, prefix: str, deadline: float) -> str:
    """The payload of the next line starting with `prefix`; SystemExit naming the side if it
    exits first or the deadline passes."""
    while True:
      try:
        line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
      except queue.Empty:
        self.fail("did not answer in time")
      if line is None:
        self.fail(f"exited (code {self.proc.wait()})")
      if line.startswith(prefix):
        return line[len(prefix) :]
      self.out.append(line)

  def send(self, text: str) -> None:
    self.proc.stdin.write(text + "\n")
    self.proc.stdin.flush()

  def fail(self, why: str):
    self.kill()
    self.err.seek(0)
    sys.stderr.write("\n".join(self.out)[-4000:] + "\n" + self.err.read()[-4000:])
    raise SystemExit(f"the {self.side} side {why}")

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def interleave_sides(
  script: str, sides: list[str], argv: list[str], *, pairs: int, per: int, gap: float,
  timeout: float = 1800.0, env: dict | None = None,
) -> tuple[dict, list[dict]]:  # fmt: skip
  """Runs `sides` of `script` as live processes, in alternating timed bursts.

  Each side starts (`--serve`), sets up and warms up alone, then waits. For each of `pairs`
  pairs, every side in turn (the order reversed on odd pairs) runs `per` timed calls while
  the others sleep, followed by `gap` idle seconds. A spell of the machine lasting longer
  than a burst then slows the bursts of both sides within a pair, which separate processes
  run one after another cannot ensure.

  Returns ({side: its RESULT}, one {side: median seconds per call in its burst} per pair).
  SystemExit names a failed side. `env` (default: this process's) gets
  TOKENIZERS_PARALLELISM=false and XLA_PYTHON_CLIENT_PREALLOCATE=false.
  """
  env = dict(os.environ if env is None else env)
  env.update(TOKENIZERS_PARALLELISM="false", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  deadline = time.monotonic() + timeout
  live: dict[str, _Served] = {}
  try:
    for side in sides:  # one at a time: no side's start-up overlaps another's
      live[side] = _Served(script, side, argv, env)
      live[side].expect(SERVE_PREFIX, deadline)
    per_pair = []
    for i in range(pairs):
      medians = {}
      for side in sides if i % 2 == 0 else sides[::-1]:
        live[side].send(f"run {per}")
        medians[side] = statistics.median(json.loads(live[side].expect(SERVE_PREFIX, deadline)))
        time.sleep(gap)
      per_pair.append(medians)
    results = {}
    for side in sides:
      live[side].send("done")
      results[side] = json.loads(live[side].expect(RESULT_PREFIX, deadline))
      results[side]["process_s"] = time.perf_counter() - live[side].t0
    return results, per_pair
  finally:
    for served in live.values():
      served.kill()


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


def forward_args(
  args, skip: tuple[str, ...] = ("side", "timeout", "rounds", "interleave", "gap")
) -> list[str]:
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
