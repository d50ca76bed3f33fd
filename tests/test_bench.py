"""The benchmark scripts run end to end (tiny sizes, both sides) and report a ratio.

No timing is asserted: these check that the comparison runs, each side in its own child
process, and that its report has every line a reader (or a GPU session with minutes to
spare) relies on.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchlib  # noqa: E402


def _env(**extra) -> dict:
  """The machine's one CPU device, not the suite's 8 (the suite's cheap code generation stays)."""
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  return {**os.environ, "XLA_FLAGS": " ".join(flags), **extra}


def _bench(name: str, *argv: str) -> str:
  """Runs `scripts/<name>.py argv` as a user would."""
  env = _env()
  cmd = [sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *argv]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
  return p.stdout


def test_bench_sides_that_fail_are_reported_and_the_others_still_run():
  """A side that fails (here: a time limit no side can meet) is named, the next side still
  runs, and the script exits non-zero: on a GPU lease one side's failure must not cost the
  other side's numbers."""
  for name, sides in (("bench_sft", ("jax", "torch")), ("bench_sampler", ("ours", "hf"))):
    argv = ["--preset", "tiny", "--timeout", "0.01"] + (["--torch"] if name == "bench_sft" else [])
    cmd = [sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert p.returncode != 0, p.stdout
    for side in sides:
      assert f"round 1: side {side} FAILED: the {side} side did not finish" in p.stdout, p.stdout
    assert f"side(s) failed: {', '.join(sorted(sides))}" in p.stderr, p.stderr


def test_bench_sft_runs_both_sides_and_reports_the_ratio():
  """Two alternating rounds (--rounds 2) of the three bfloat16 sides: every round's lines
  and ratio, then the per-side medians and the median and range of the rounds' ratios."""
  out = _bench(
    "bench_sft", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "1",
    "--warmup", "1", "--dtype", "bfloat16", "--torch", "--peak_tflops", "1", "--rounds", "2",
  )  # fmt: skip
  assert "batch 2 x 16 tokens, bfloat16" in out
  assert "round 1 of 2:" in out and "round 2 of 2:" in out and "median of 2 rounds:" in out
  for side in ("critic_jax", "pytorch", "autocast"):
    lines = [x for x in out.splitlines() if x.strip().startswith(f"{side}:")]
    assert len(lines) == 3, out  # two rounds and the median
    for line in lines:
      assert re.search(r"ms/step, +\d+ tokens/s, [\d.]+ TFLOP/s, MFU [\d.]+%", line), line
      assert re.search(r"\([\d.]+% counting embeddings\)", line), line
    # Each round's line has its side's loss, read at the same step on both sides.
    assert all(re.search(r"loss [\d.]+ after 3 steps$", x) for x in lines[:2]), lines
  pattern = r"ratio \(critic_jax tokens/s over PyTorch tokens/s\): ([\d.]+)x"
  each = [float(x) for x in re.findall(pattern, out)]
  summary = re.search(r"ratio over 2 rounds: median ([\d.]+)x, range ([\d.]+)-([\d.]+)x", out)
  assert len(each) == 2 and all(r > 0 for r in each) and summary, out
  assert (float(summary.group(2)), float(summary.group(3))) == (min(each), max(each)), out
  assert abs(float(summary.group(1)) - sum(each) / 2) <= 0.006, out


def test_bench_sampler_runs_both_sides_and_reports_the_ratio():
  """Two alternating rounds: a table row per side and round, and the rounds' ratios; both
  decode loops, each with and without the fused projections."""
  out = _bench(
    "bench_sampler", "--preset", "tiny", "--batch", "2", "--prompt-len", "8",
    "--new-tokens", "4", "--num-samples", "2", "--repeats", "1", "--loop", "both",
    "--fused", "both", "--rounds", "2",
  )  # fmt: skip
  assert "batch 2 x 2 samples, prompt 8, 4 new tokens" in out
  rows = [x for x in out.splitlines() if x.startswith(("| critic_jax", "| transformers"))]
  assert [r.split("|")[1].strip() for r in rows] == [
    "critic_jax (round 1)", "transformers (round 1)", "critic_jax (round 2)",
    "transformers (round 2)",
  ], out  # fmt: skip
  assert all(len(r.split("|")) == 10 for r in rows), out
  variants = ("host fused", "host unfused", "device fused", "device unfused")
  assert re.search(r" .* ".join(rf"{v} loop [\d.]+ ms" for v in variants), out), out
  assert re.search(r"ratio \(ours / transformers\): total [\d.]+x, prefill [\d.]+x", out), out
  assert re.search(r"total ratio over 2 rounds: median [\d.]+x, range [\d.]+-[\d.]+x \(", out)


_FAKE_SIDE = """
import json, sys, time
side, log = sys.argv[sys.argv.index("--side") + 1 :][:2]
assert sys.argv[-1] == "--serve", sys.argv
if side == "broken":
  sys.exit(3)
print("some library's chatter")
print("SERVE ready", flush=True)
while True:
  cmd = sys.stdin.readline().split()
  if not cmd or cmd[0] == "done":
    break
  with open(log, "a") as f:
    f.write(side + "\\n")
  dt = {"a": 0.1, "b": 0.3}[side]
  print("SERVE " + json.dumps([dt] * int(cmd[1])), flush=True)
print("RESULT " + json.dumps({"side": side}), flush=True)
"""


def test_interleave_sides_alternates_bursts_and_names_a_failed_side(tmp_path):
  """`--interleave`'s driver: each side's bursts in turn, the order flipping every pair, the
  per-pair medians and each side's RESULT; a side that dies is named."""
  script = tmp_path / "side.py"
  script.write_text(_FAKE_SIDE)
  log = tmp_path / "bursts.log"
  results, per_pair = benchlib.interleave_sides(
    str(script), ["a", "b"], [str(log)], pairs=3, per=2, gap=0.0, timeout=60
  )
  assert log.read_text().split() == ["a", "b", "b", "a", "a", "b"]
  assert per_pair == [{"a": 0.1, "b": 0.3}] * 3
  assert results["a"]["side"] == "a" and results["b"]["side"] == "b"
  assert all(r["process_s"] > 0 for r in results.values())
  with pytest.raises(SystemExit, match="the broken side exited"):
    benchlib.interleave_sides(
      str(script), ["a", "broken"], [str(log)], pairs=1, per=1, gap=0.0, timeout=60
    )


def test_bench_interleave_reports_per_pair_ratios():
  """Both benchmarks with --interleave: the sides stay alive and alternate bursts; the report
  gives the per-pair ratios' median, quartiles and range, and both SFT sides' losses are read
  at the same step (compile/warm-up steps plus every served step)."""
  out = _bench(
    "bench_sft", "--preset", "tiny", "--batch", "2", "--seq", "16", "--steps", "1",
    "--warmup", "1", "--torch", "--interleave", "3",
  )  # fmt: skip
  m = re.search(
    r"interleaved: 3 pairs of 1-step bursts per side .* per-pair ratio median ([\d.]+)x, "
    r"quartiles ([\d.]+)-([\d.]+)x, range ([\d.]+)-([\d.]+)x; critic_jax faster in \d of 3 pairs",
    out,
  )
  assert m, out
  lo, q1, q3, hi = (float(m.group(i)) for i in (4, 2, 3, 5))
  assert lo <= q1 <= float(m.group(1)) <= q3 <= hi, out
  for side in ("critic_jax", "pytorch"):
    assert re.search(rf"{side}: .* loss [\d.]+ after 5 steps$", out, re.M), out
  out = _bench(
    "bench_sampler", "--preset", "tiny", "--batch", "2", "--prompt-len", "8",
    "--new-tokens", "4", "--repeats", "1", "--interleave", "2",
  )  # fmt: skip
  assert re.search(
    r"interleaved: 2 pairs of 1-call bursts per side .* median call over all bursts: ours "
    r"[\d.]+ ms, generate [\d.]+ ms; per-pair ratio \(whole calls\) median [\d.]+x",
    out,
  ), out
  p = subprocess.run(
    [sys.executable, os.path.join(ROOT, "scripts", "bench_sft.py"), "--interleave", "2",
     "--rounds", "2"], capture_output=True, text=True, env=_env(), timeout=120,
  )  # fmt: skip
  assert p.returncode == 2 and "pick one" in p.stderr, p.stderr


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs Linux")
def test_bench_sampler_threads_1_puts_each_side_on_one_core():
  """--threads=1 means one core per side: XLA flags alone left XLA:CPU's matmuls on two
  threads (our side then used 1.6 CPU-seconds per second against PyTorch's one)."""
  out = _bench(
    "bench_sampler", "--preset", "tiny", "--batch", "2", "--prompt-len", "8",
    "--new-tokens", "4", "--repeats", "1", "--loop", "device", "--threads", "1",
  )  # fmt: skip
  assert "cores each side may use: ours 1, transformers 1" in out, out
  assert "threads: 1 (single-threaded ops)" in out, out


def test_run_side_returns_the_result_and_names_a_failed_side(tmp_path):
  script = tmp_path / "side.py"
  scripts = os.path.join(ROOT, "scripts")
  script.write_text(
    f"import sys\nsys.path.insert(0, {scripts!r})\nimport benchlib\n"
    "side, rest = sys.argv[2], sys.argv[3:]\n"
    "if side == 'bad':\n"
    "  print('boom', file=sys.stderr); sys.exit(3)\n"
    "if side == 'ok':\n"
    "  benchlib.print_result({'side': side, 'argv': rest})\n"
  )
  res = benchlib.run_side(str(script), "ok", ["--x", "1"])
  process_s = res.pop("process_s")  # the child's whole run, start-up included
  assert res == {"side": "ok", "argv": ["--x", "1"]}
  assert process_s > 0
  with pytest.raises(SystemExit, match="the bad side failed \\(exit 3\\)"):
    benchlib.run_side(str(script), "bad", [])
  with pytest.raises(SystemExit, match="the silent side failed \\(exit 0\\)"):
    benchlib.run_side(str(script), "silent", [])


def test_forward_args_round_trip():
  import argparse

  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--torch", action="store_true")
  p.add_argument("--scan", action="store_true")
  p.add_argument("--peak-tflops", type=float, default=None)
  p.add_argument("--side", default="both")
  benchlib.add_rounds_flag(p)
  args = p.parse_args(["--batch", "3", "--torch", "--side", "x", "--rounds", "2"])
  argv = benchlib.forward_args(args)
  assert argv == ["--preset", "", "--batch", "3", "--torch"]
  back = p.parse_args(argv)
  assert (back.batch, back.torch, back.scan, back.peak_tflops) == (3, True, False, None)
  assert (args.rounds, back.rounds) == (2, 1)  # the parent's flag stays in the parent
  with pytest.raises(SystemExit):
    p.parse_args(["--rounds", "0"])


@pytest.mark.slow
def test_device_checks_script_smoke(tmp_path):
  """scripts/device_checks.sh end to end at tiny sizes (--smoke): every phase logs a ratio."""
  env = _env(OUT=str(tmp_path), PYTHON=sys.executable)
  cmd = ["bash", os.path.join(ROOT, "scripts", "device_checks.sh"), "--smoke"]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  log = (tmp_path / "all.log").read_text()
  for phase in ("sft", "sampler64", "sampler256"):
    assert f"{phase}: exit 0" in log, log
    assert "ratio" in (tmp_path / f"{phase}.log").read_text()
  # The optional phases: sftswiglu's step, then both profiled steps summarised and their raw
  # traces returned flat.
  p = subprocess.run(cmd + ["sftswiglu", "profile"], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=600)  # fmt: skip
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "critic_jax:" in (tmp_path / "sftswiglu.log").read_text()
  table = (tmp_path / "profile.log").read_text()
  assert "jit_step" in table and "jit_generate_on_device" in table, table
  assert (tmp_path / "profile_sft.xplane.pb").exists()
  assert (tmp_path / "profile_sampler.xplane.pb").exists()


def test_profile_ops_sums_a_traced_step_per_op_with_its_hlo(tmp_path):
  """bench_sft --profile traces our step; profile_ops.py sums it per op and per category and
  names each op's source from the dumped HLO (what a GPU session reads to find the time)."""
  trace, hlo = tmp_path / "trace", tmp_path / "hlo"
  env = _env()
  env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} --xla_dump_to={hlo} --xla_dump_hlo_as_text"
  cmd = [
    sys.executable, os.path.join(ROOT, "scripts", "bench_sft.py"), "--side", "jax",
    "--preset", "tiny", "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1",
    "--profile", str(trace), "--profile-runs", "2",
  ]  # fmt: skip
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  # The traced steps come after the timed ones: the reported loss is still the timed step's.
  plain = _bench("bench_sft", *cmd[2:-4])
  pre = benchlib.RESULT_PREFIX
  lines = (p.stdout + plain).splitlines()
  loss = [json.loads(x[len(pre) :])["loss"] for x in lines if x.startswith(pre)]
  assert len(loss) == 2 and loss[0] == loss[1], loss
  out = _bench("profile_ops", str(trace), "--hlo", str(hlo), "--top", "50")
  assert "jit_step" in out.splitlines()[0], out  # the dump that names the traced ops
  block = out.split("| category | ms | share |")[1].split("top 50 source ops")[0]
  cats = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+)% \|$", block, re.M)
  shares = {c: float(s) for c, _, s in cats}
  assert shares.get("matmul", 0) > 0 and abs(sum(shares.values()) - 100) < 0.5, out
  # Every MLP matmul of the tiny model is found in the traced step, layers folded together.
  for src in ("mlp/gate/dot_general", "mlp/up/dot_general", "mlp/down/dot_general"):
    assert re.search(rf"^\| {re.escape(src)} \| [\d.]+ \| [\d.]+% \|$", out, re.M), out
  op_rows = re.findall(r"^\| (\S+) \| matmul \| (\d+) \|", out, re.M)
  assert op_rows and all(int(n) % 2 == 0 for _, n in op_rows), out  # once per traced step


def test_profile_ops_reads_a_gpu_device_plane(tmp_path):
  """The GPU branch on a hand-made trace (no GPU here): a device plane's "XLA Modules" and
  "XLA Ops" lines, one op named by its whole HLO instruction (as some backends name them)."""
  from jax.profiler import ProfileData

  gemm = (
    '%cublas-gemm.1 = bf16[8,8]{1,0} custom-call(%a, %b), custom_call_target=\\"__cublas$gemm\\", '
    'metadata={op_name=\\"jit(step)/layer_3/mlp/up/dot_general\\"}'
  )
  text = f"""
  planes {{ id: 1 name: "/device:GPU:0"
    lines {{ id: 1 name: "XLA Modules" timestamp_ns: 0
      events {{ metadata_id: 1 offset_ps: 0 duration_ps: 1000000000 }} }}
    lines {{ id: 2 name: "XLA Ops" timestamp_ns: 0
      events {{ metadata_id: 2 offset_ps: 0 duration_ps: 300000000 }}
      events {{ metadata_id: 3 offset_ps: 300000000 duration_ps: 500000000 }}
      events {{ metadata_id: 2 offset_ps: 800000000 duration_ps: 100000000 }} }}
    event_metadata {{ key: 1 value {{ id: 1 name: "jit_step(7)" }} }}
    event_metadata {{ key: 2 value {{ id: 2 name: "{gemm}" }} }}
    event_metadata {{ key: 3 value {{ id: 3 name: "loop_fusion.2" }} }}
  }}"""
  (tmp_path / "gpu.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
  out = _bench("profile_ops", str(tmp_path))
  assert "(gpu)" in out and "HLO the trace's own op texts" in out, out
  assert "ops sum to 0.90 ms = 90% of the executables' 1.00 ms" in out, out
  assert "| matmul (cuBLAS) | 0.40 | 44.4% |" in out, out
  assert "| elementwise fusion | 0.50 | 55.6% |" in out, out
  assert "| mlp/up/dot_general | 0.40 | 44.4% |" in out, out  # from the event's own text
  row = "| cublas-gemm.1 | matmul (cuBLAS) | 2 | 0.40 | 200.0 | 44.4% | bf16[8,8]{1,0} __cublas"
  assert row in out, out
