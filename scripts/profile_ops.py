"""Where a step's time goes: a `jax.profiler` trace summed per XLA op, with each op's HLO.

    # 1. trace some steps (the benchmarks take --profile DIR) and dump the optimised HLO:
    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text" python scripts/bench_sft.py \
        --side jax --preset llama_0.9b --batch 8 --seq 2048 --dtype bfloat16 \
        --attention cudnn --remat dots_no_batch --steps 2 --warmup 1 --profile /tmp/prof
    # 2. the table (here or on the device machine; the trace files can be carried back):
    python scripts/profile_ops.py /tmp/prof --hlo /tmp/hlo

On a GPU it sums the device's "XLA Ops" line (kernel time per HLO instruction; the "XLA
Modules" line gives the executables' own time); on a CPU, the XLA:CPU thunks on its
worker threads (threads overlap, so shares there are of summed thread time). Each op is put
in a category read from its optimised HLO instruction (cuBLAS / Triton GEMM, cuDNN
attention, XNNPACK/YNNPACK dots, loop or reduction fusions, copies, ...), so the table says
at a glance whether matmuls, attention or memory-bound fusions dominate. A sanity line
compares the sum of the ops with the executables' time (GPU) so a gap (launch overhead,
host syncs) is visible.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

# Wrappers and waits around the thunks (their time is the thunks' own, or idle).
SKIP_CPU = ("ThreadpoolListener", "SlinkyThreadPool", "Await", "ThunkExecutor")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("trace", help="a directory holding *.xplane.pb (searched recursively), or one")
  p.add_argument("--hlo", default="", help="an --xla_dump_to directory (*after_optimizations.txt)")
  p.add_argument(
    "--module", default="",
    help="the dump whose HLO names the ops (a file-name substring; default: the dump whose "
    "instructions cover the most traced time)",
  )  # fmt: skip
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--out", default="", help="also write the table to this file")
  return p.parse_args(argv)


def op_key(name: str) -> str:
  """An "XLA Ops" event's instruction name: some backends name the event by the whole HLO
  instruction ("%fusion.3 = f32[...] fusion(...), ...")."""
  if " = " in name:
    name = name.split(" = ", 1)[0]
  return name.strip().lstrip("%")


def load_events(path: str, texts: dict | None = None) -> tuple[dict, dict, str]:
  """Per-op {name: [count, total_ns]}, per-executable {name: total_ns}, and the platform.

  `texts`, if given, receives {op: HLO text} where the trace itself carries it (an event
  named by its whole instruction, or a "long_name" stat).
  """
  from jax.profiler import ProfileData

  pd = ProfileData.from_file(path)
  ops: dict = collections.defaultdict(lambda: [0, 0.0])
  modules: dict = collections.defaultdict(float)
  texts = {} if texts is None else texts
  gpu = [pl for pl in pd.planes if pl.name.startswith("/device:GPU")]
  if gpu:
    streams: dict = collections.defaultdict(lambda: [0, 0.0])  # kernels, if no "XLA Ops"
    for pl in gpu:
      for line in pl.lines:
        if line.name == "XLA Modules":
          for ev in line.events:
            modules[ev.name] += ev.duration_ns
        elif line.name == "XLA Ops":
          for ev in line.events:
            key = op_key(ev.name)
            ops[key][0] += 1
            ops[key][1] += ev.duration_ns
            if key not in texts:
              long = dict(ev.stats).get("long_name", "")
              text = ev.name if " = " in ev.name else str(long)
              if " = " in text:
                texts[key] = text.split(" = ", 1)[1]
        elif line.name.startswith("Stream"):
          for ev in line.events:
            streams[ev.name][0] += 1
            streams[ev.name][1] += ev.duration_ns
    return dict(ops or streams), dict(modules), "gpu"
  for pl in pd.planes:
    if pl.name != "/host:CPU":
      continue
    for line in pl.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        if ev.duration_ns > 0 and not ev.name.startswith(SKIP_CPU):
          ops[ev.name][0] += 1
          ops[ev.name][1] += ev.duration_ns
  return dict(ops), dict(modules), "cpu"


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def _read_hlo(path: str) -> dict[str, str]:
  table = {}
  with open(path) as f:
    for line in f:
      m = _INSTR.match(line)
      if m and m.group(1) not in table:
        table[m.group(1)] = m.group(2).strip()
  return table


def load_hlo(hlo_dir: str, ops: dict, module: str = "") -> tuple[dict[str, str], str]:
  """{instruction name: its HLO text} from the optimised dump that names the traced ops.

  Op names repeat across executables ("fusion.12"), so the dump is the one whose
  instructions cover the most traced time (or, with `module`, the largest whose file name
  holds it).
  """
  files = glob.glob(os.path.join(hlo_dir, "*after_optimizations.txt"))
  if module:
    files = [f for f in files if module in os.path.basename(f)]
    files = sorted(files, key=os.path.getsize)[-1:]
  best, best_path, best_score = {}, "", -1.0
  for path in files:
    table = _read_hlo(path)
    score = sum(t for name, (_, t) in ops.items() if name in table)
    if score > best_score:
      best, best_path, best_score = table, path, score
  return best, best_path


def describe(instr: str) -> str:
  """An instruction's shape, kind or custom-call target, and the JAX op it came from."""
  if not instr:
    return ""
  shape = instr.split(" ", 1)[0]
  kind = re.search(r'custom_call_target="([^"]+)"', instr) or re.search(r"kind=(\w+)", instr)
  op = re.search(r'op_name="([^"]+)"', instr)
  head = re.match(r"[\w\[\]{},.\s]*?\s([\w\-]+)\(", instr)  # the opcode
  what = kind.group(1) if kind else (head.group(1) if head else "")
  src = op.group(1) if op else ""
  return f"{shape} {what} {('...' + src[-90:]) if len(src) > 90 else src}".strip()


def category(name: str, instr: str) -> str:
  """A coarse kind of op, from its name and optimised HLO instruction (not its metadata)."""
  m = re.search(r'op_name="([^"]+)"', instr)
  src = m.group(1) if m else ""
  body = re.sub(r",\s*metadata=\{.*", "", instr).lower()
  text = name.lower() + " " + body
  if "fmha" in text or "cudnn$" in text or "flash" in text:
    return "attention (cuDNN)"
  if "__triton_gemm" in text or "triton_gemm" in text:
    return "matmul (Triton)"
  if "cublas" in text or "gemm" in text:
    return "matmul (cuBLAS)"
  if (
    " dot(" in text
    or name.startswith("dot")
    or src.endswith("dot_general")
    and ("ynn" in name or "xnn" in name)
  ):
    return "matmul"
  if any(c in text for c in ("all-reduce", "all-gather", "reduce-scatter", "collective")):
    return "collective"
  if name.startswith(("copy", "transpose")) or re.search(r"\s(copy|transpose)\(", body):
    return "copy/transpose"
  if "dynamic-update-slice" in text or "dynamic_update_slice" in text:
    return "cache update"
  if "kind=kinput" in text or name.startswith(("reduce", "scatter")):
    return "reduction fusion"
  if "fusion" in text:
    return "elementwise fusion"
  return "other"


def summarize(args) -> str:
  if os.path.isdir(args.trace):
    paths = sorted(glob.glob(os.path.join(args.trace, "**", "*.xplane.pb"), recursive=True))
  else:
    paths = [args.trace]
  if not paths:
    raise SystemExit(f"{args.trace}: no *.xplane.pb file (a --profile DIR from a benchmark?)")
  out = []
  for path in paths:
    texts: dict = {}
    ops, modules, platform = load_events(path, texts)
    if not ops:
      out.append(f"{path}: no XLA op events")
      continue
    hlo, hlo_path = load_hlo(args.hlo, ops, args.module) if args.hlo else ({}, "")
    hlo = {**texts, **hlo}  # the dump first; else what the trace carries
    hlo_path = hlo_path or ("the trace's own op texts" if texts else "")
    total = sum(t for _, t in ops.values())
    out.append(f"trace {path} ({platform}); HLO {hlo_path or 'not given'}")
    if modules:
      mod_total = sum(modules.values())
      ranked = sorted(modules.items(), key=lambda x: -x[1])
      each = ", ".join(f"{k} {v / 1e6:.2f} ms" for k, v in ranked)
      out.append(
        f"executables: {each}; ops sum to {total / 1e6:.2f} ms = "
        f"{100 * total / max(mod_total, 1):.0f}% of the executables' {mod_total / 1e6:.2f} ms"
      )
    else:
      out.append(f"ops sum to {total / 1e6:.2f} ms (thread time, threads overlap)")
    cats: dict = collections.defaultdict(float)
    for name, (_, t) in ops.items():
      cats[category(name, hlo.get(name, ""))] += t
    out.append("| category | ms | share |")
    out.append("|---|---|---|")
    for c, t in sorted(cats.items(), key=lambda x: -x[1]):
      out.append(f"| {c} | {t / 1e6:.2f} | {100 * t / total:.1f}% |")
    # The same time by source op, layers folded together (the last path parts of op_name).
    by_src: dict = collections.defaultdict(float)
    for name, (_, t) in ops.items():
      m = re.search(r'op_name="([^"]+)"', hlo.get(name, ""))
      src = re.sub(r"layer_\d+", "layer_*", m.group(1)) if m else "(no HLO source)"
      by_src["/".join(src.split("/")[-3:])] += t
    out.append(f"top {args.top} source ops (layers folded):")
    out.append("| source op | ms | share |")
    out.append("|---|---|---|")
    for src, t in sorted(by_src.items(), key=lambda x: -x[1])[: args.top]:
      out.append(f"| {src} | {t / 1e6:.2f} | {100 * t / total:.1f}% |")
    out.append(f"top {args.top} ops:")
    out.append("| op | category | count | ms | avg us | share | HLO: shape, kind, source op |")
    out.append("|---|---|---|---|---|---|---|")
    for name, (n, t) in sorted(ops.items(), key=lambda x: -x[1][1])[: args.top]:
      instr = hlo.get(name, "")
      out.append(
        f"| {name} | {category(name, instr)} | {n} | {t / 1e6:.2f} | {t / n / 1e3:.1f} | "
        f"{100 * t / total:.1f}% | {describe(instr).replace('|', '/')} |"
      )
  return "\n".join(out)


def main(argv=None):
  args = parse(argv)
  text = summarize(args)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  sys.exit(main())
