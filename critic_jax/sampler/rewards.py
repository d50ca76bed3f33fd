"""Rewards from Python callables (verifiers), run on the host in a worker pool.

A verifier is `fn(prompt: str, completion: str, example) -> float` (`example` is
whatever the caller attached to the prompt: a task `Example`, a reference
answer, None). Verifiers are arbitrary code, so the pool contains them:

* every call has a timeout measured from when it *starts* running (queueing
  behind other calls does not count);
* an exception, a non-finite or non-numeric result, a timeout, or a worker
  process that dies becomes a recorded failure (`RewardResult.failed`, counted
  in `metrics()`), never an exception in the caller;
* a hung call never blocks the caller past its timeout. With
  `backend="process"` the hung worker is killed and replaced; with
  `backend="thread"` (cheaper, no pickling, but Python threads cannot be killed)
  the thread is abandoned and a new one takes its slot, so capacity is kept
  but the hung thread lives on (counted as `abandoned_threads`). Use processes
  for untrusted or CPU-heavy verifiers (code execution); their `fn` must be
  picklable (a module-level function, or a `functools.partial` of one), and
  workers start with the "spawn" method, which imports `fn`'s module afresh:
  keep module-level code of scripts under `if __name__ == "__main__":`.

Calls are submitted in batches (`submit` returns at once, so verification of
one batch overlaps generation of the next); results come back in input order,
so they do not depend on completion order.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import multiprocessing as mp
import pickle
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["RewardFn", "RewardPool", "RewardFuture", "RewardResult"]

RewardFn = Callable[[str, str, Any], float]

OK, ERROR, TIMEOUT, DIED = "ok", "error", "timeout", "died"


@dataclasses.dataclass(frozen=True)
class RewardResult:
  """Rewards of one batch of calls, in input order.

  Attributes:
    rewards: `[N]` float32; `failure_reward` where the call failed.
    failed: `[N]` bool.
    status: N of "ok", "error" (exception or bad value), "timeout", "died" (worker died).
    errors: N messages (None where ok).
    elapsed_s: wall time from submission to the last result.
  """

  rewards: np.ndarray
  failed: np.ndarray
  status: tuple[str, ...]
  errors: tuple[str | None, ...]
  elapsed_s: float

  def metrics(self, prefix: str = "reward/") -> dict[str, float]:
    ok = ~self.failed
    n = len(self.status)
    mean = float(np.mean(self.rewards[ok])) if ok.any() else float("nan")
    counts = collections.Counter(self.status)
    return {
      f"{prefix}mean": mean,
      f"{prefix}calls": float(n),
      f"{prefix}failures": float(self.failed.sum()),
      f"{prefix}errors": float(counts[ERROR]),
      f"{prefix}timeouts": float(counts[TIMEOUT]),
      f"{prefix}worker_deaths": float(counts[DIED]),
      f"{prefix}time_s": self.elapsed_s,
    }


class RewardFuture:
  """The pending result of one `RewardPool.submit`."""

  def __init__(self, n: int, failure_reward: float):
    self._values = np.full((n,), failure_reward, np.float32)
    self._status: list[str | None] = [None] * n
    self._errors: list[str | None] = [None] * n
    self._left = n
    self._start = time.perf_counter()
    self._elapsed = 0.0
    self._done = threading.Event()
    if n == 0:
      self._done.set()

  def _resolve(self, i: int, status: str, value: float | None, error: str | None) -> None:
    if self._status[i] is not None:
      return
    self._status[i] = status
    if status == OK:
      self._values[i] = value
    self._errors[i] = error
    self._left -= 1
    if self._left == 0:
      self._elapsed = time.perf_counter() - self._start
      self._done.set()

  def done(self) -> bool:
    return self._done.is_set()

  def result(self, timeout: float | None = None) -> RewardResult:
    """Blocks until every call of the batch has a result (each is bounded by the pool's timeout)."""
    if not self._done.wait(timeout):
      raise TimeoutError("reward batch not finished")
    return RewardResult(
      rewards=self._values.copy(),
      failed=np.asarray([s != OK for s in self._status], bool),
      status=tuple(self._status),
      errors=tuple(self._errors),
      elapsed_s=self._elapsed,
    )


def _check_value(value: Any) -> float:
  v = float(value)
  if not math.isfinite(v):
    raise ValueError(f"non-finite reward {v}")
  return v


def _thread_call(run_id: int, fn: RewardFn, args: tuple, events: queue.Queue) -> None:
  try:
    events.put(("result", run_id, True, _check_value(fn(*args))))
  except BaseException as e:  # noqa: BLE001 - any verifier failure is recorded, never raised
    events.put(("result", run_id, False, f"{type(e).__name__}: {e}"))


def _worker_main(fn: RewardFn, conn) -> None:
  """Body of a verifier process: run (run_id, args) messages until told to stop."""
  conn.send(("ready",))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    run_id, args = msg
    try:
      reply = (run_id, True, _check_value(fn(*args)))
    except BaseException as e:  # noqa: BLE001
      reply = (run_id, False, f"{type(e).__name__}: {e}")
    conn.send(reply)


@dataclasses.dataclass
class _Proc:
  """One verifier process slot."""

  generation: int
  process: Any
  conn: Any
  ready: bool = False
  run_id: int | None = None


class RewardPool:
  """Runs a verifier over (prompt, completion, example) triples with per-call timeouts.

  Args:
    fn: the verifier `(prompt, completion, example) -> float`.
    timeout_s: per-call limit, from the moment the call starts.
    num_workers: calls running at once.
    backend: "thread" or "process" (see the module docstring).
    failure_reward: the reward recorded for a failed call.
    start_retries: for processes, how many workers in a row may die before
      becoming ready (e.g. `fn` fails to import) before pending calls are failed.
  """

  def __init__(
    self,
    fn: RewardFn,
    *,
    timeout_s: float = 10.0,
    num_workers: int = 4,
    backend: str = "thread",
    failure_reward: float = 0.0,
    start_retries: int = 3,
  ):
    if backend not in ("thread", "process"):
      raise ValueError(f"backend must be 'thread' or 'process', got {backend!r}")
    if not timeout_s > 0 or num_workers < 1:
      raise ValueError(f"need timeout_s > 0 and num_workers >= 1, got {timeout_s}, {num_workers}")
    if backend == "process":
      try:
        pickle.dumps(fn)
      except Exception as e:
        raise ValueError(
          f"backend='process' needs a picklable verifier (a module-level function): {e}"
        ) from e
    self.fn, self.timeout_s, self.num_workers = fn, float(timeout_s), int(num_workers)
    self.backend, self.failure_reward = backend, float(failure_reward)
    self.abandoned_threads = 0
    self.worker_restarts = 0
    self._start_retries = start_retries
    self._start_failures = 0
    self._events: queue.Queue = queue.Queue()
    self._pending: collections.deque = collections.deque()
    self._running: dict[int, tuple[float, RewardFuture, int, Any]] = {}
    self._run_ids = itertools.count()
    self._lock = threading.Lock()
    self._closed = False
    self._procs: list[_Proc] = []
    self._generations = itertools.count()
    self._ctx = mp.get_context("spawn") if backend == "process" else None
    if backend == "process":
      self._procs = [self._spawn() for _ in range(self.num_workers)]
    self._thread = threading.Thread(target=self._supervise, name="reward-pool", daemon=True)
    self._thread.start()

  # --- public ---------------------------------------------------------------------
  def submit(
    self, prompts: Sequence[str], completions: Sequence[str], examples: Sequence | None = None
  ) -> RewardFuture:
    """Queues one call per (prompt, completion, example); returns at once."""
    n = len(completions)
    if len(prompts) != n or (examples is not None and len(examples) != n):
      raise ValueError(
        f"prompts ({len(prompts)}), completions ({n}) and examples "
        f"({None if examples is None else len(examples)}) must have the same length"
      )
    if self._closed:
      raise RuntimeError("the reward pool is closed")
    fut = RewardFuture(n, self.failure_reward)
    with self._lock:
      for i in range(n):
        ex = None if examples is None else examples[i]
        self._pending.append((fut, i, (prompts[i], completions[i], ex)))
    self._events.put(("wake",))
    return fut

  def __call__(self, prompts, completions, examples=None) -> RewardResult:
    return self.submit(prompts, completions, examples).result()

  def close(self) -> None:
    """Fails calls not yet started, stops the workers (killing busy processes)."""
    if self._closed:
      return
    self._closed = True
    self._events.put(("wake",))
    self._thread.join()
    for p in self._procs:
      self._stop_proc(p, kill=p.run_id is not None)

  def __enter__(self) -> RewardPool:
    return self

  def __exit__(self, *exc) -> bool:
    self.close()
    return False

  # --- supervisor -------------------------------------------------------------------
  def _supervise(self) -> None:
    while True:
      self._dispatch()
      if self._closed:
        with self._lock:
          while self._pending:
            fut, i, _ = self._pending.popleft()
            fut._resolve(i, ERROR, None, "reward pool closed")
        if not self._running:
          return
      deadlines = [d for d, *_ in self._running.values()]
      wait = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
      try:
        msg = self._events.get(timeout=wait)
      except queue.Empty:
        msg = None
      while msg is not None:
        self._handle(msg)
        try:
          msg = self._events.get_nowait()
        except queue.Empty:
          msg = None
      self._expire()

  def _dispatch(self) -> None:
    with self._lock:
      while self._pending:
        if self.backend == "thread":
          if len(self._running) >= self.num_workers:
            return
          slot = None
        elif self._start_failures > self._start_retries:
          # Workers keep dying before they are ready: fail calls instead of waiting forever.
          fut, i, _ = self._pending.popleft()
          fut._resolve(i, DIED, None, "verifier workers fail to start")
          continue
        else:
          free = [p for p in self._procs if p.ready and p.run_id is None]
          if not free:
            return
          slot = free[0]
        fut, i, args = self._pending.popleft()
        run_id = next(self._run_ids)
        self._running[run_id] = (time.monotonic() + self.timeout_s, fut, i, slot)
        if slot is None:
          threading.Thread(
            target=_thread_call, args=(run_id, self.fn, args, self._events), daemon=True,
            name=f"verifier-{run_id}",
          ).start()  # fmt: skip
        else:
          slot.run_id = run_id
          try:
            slot.conn.send((run_id, args))
          except (OSError, ValueError, pickle.PicklingError) as e:
            self._finish(run_id, ERROR, None, f"cannot send the call to a worker: {e}")

  def _finish(self, run_id: int, status: str, value, error) -> None:
    entry = self._running.pop(run_id, None)
    if entry is None:  # a late answer from an abandoned thread or killed process
      return
    _, fut, i, slot = entry
    if slot is not None and slot.run_id == run_id:
      slot.run_id = None
    fut._resolve(i, status, value, error)

  def _handle(self, msg) -> None:
    kind = msg[0]
    if kind == "result":
      _, run_id, ok, payload = msg
      self._finish(run_id, OK if ok else ERROR, payload if ok else None, None if ok else payload)
    elif kind == "proc":
      _, gen, payload = msg
      slot = next((p for p in self._procs if p.generation == gen), None)
      if slot is None:
        return
      if payload == ("ready",):
        slot.ready = True
        self._start_failures = 0
      else:
        run_id, ok, value = payload
        self._finish(run_id, OK if ok else ERROR, value if ok else None, None if ok else value)
    elif kind == "died":
      _, gen = msg
      slot = next((p for p in self._procs if p.generation == gen), None)
      if slot is None:
        return
      slot.process.join(timeout=1.0)  # its pipe closed: reap it to read the exit code
      run_id, code = slot.run_id, slot.process.exitcode
      if not slot.ready:
        self._start_failures += 1
      self._replace(slot)  # before resolving, so the caller sees a consistent pool
      if run_id is not None:
        self._finish(run_id, DIED, None, f"verifier process died (exit code {code})")

  def _expire(self) -> None:
    now = time.monotonic()
    for run_id, (deadline, _, _, slot) in list(self._running.items()):
      if now < deadline:
        continue
      if slot is None:
        self.abandoned_threads += 1
      else:
        self._replace(slot)  # kill the hung worker before the caller sees the result
      self._finish(run_id, TIMEOUT, None, f"verifier timed out after {self.timeout_s:g}s")

  # --- processes --------------------------------------------------------------------
  def _spawn(self) -> _Proc:
    parent, child = self._ctx.Pipe()
    proc = self._ctx.Process(target=_worker_main, args=(self.fn, child), daemon=True)
    proc.start()
    child.close()
    slot = _Proc(generation=next(self._generations), process=proc, conn=parent)
    threading.Thread(
      target=self._read, args=(slot.generation, parent), daemon=True, name="verifier-reader"
    ).start()
    return slot

  def _read(self, gen: int, conn) -> None:
    while True:
      try:
        msg = conn.recv()
      except (EOFError, OSError):
        self._events.put(("died", gen))
        return
      self._events.put(("proc", gen, msg))

  def _stop_proc(self, slot: _Proc, kill: bool) -> None:
    if kill:
      slot.process.kill()
    else:
      try:
        slot.conn.send(None)
      except (OSError, ValueError):
        pass
    slot.process.join(timeout=5)
    if slot.process.is_alive():
      slot.process.kill()
      slot.process.join()
    slot.conn.close()

  def _replace(self, slot: _Proc) -> None:
    """Kills a slot's process and starts a fresh one in its place."""
    idx = self._procs.index(slot)
    self._stop_proc(slot, kill=True)
    if not self._closed and self._start_failures <= self._start_retries:
      self.worker_restarts += 1
      self._procs[idx] = self._spawn()
