"""Test setup: 8 fake CPU devices, no network, float32 matmuls.

XLA_FLAGS must be set before JAX initialises its backends, so this runs first.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests compile hundreds of tiny programs and run each a few times: cheap LLVM code generation
# (about 35% less suite time on 2 cores); the math is the same, only the machine code is slower.
for _flag in ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"):
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent XLA compilation cache per test session: tests that build the same model and
# step (a run and its resumed rerun, configs sharing a tiny model) compile it once. Under
# pytest-xdist (`-n 2` in scripts/test.sh) the workers inherit the controller's environment and
# so share its cache; the process that made the directory removes it at exit (the controller
# outlives its workers).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_XLA_CACHE = os.environ.get("_CRITIC_JAX_TEST_XLA_CACHE")
if _XLA_CACHE is None:
  _XLA_CACHE = tempfile.mkdtemp(prefix="critic_jax_test_xla_cache_")
  os.environ["_CRITIC_JAX_TEST_XLA_CACHE"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# --- reproduction scripts, each in a fresh interpreter ----------------------------------
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUNNER = """
import importlib.util, os, pickle, sys
root, name, out = sys.argv[1:4]
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location(name, os.path.join(root, "scripts", name + ".py"))
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
res = mod.main(sys.argv[4:])
with open(out, "wb") as f:
  pickle.dump(res, f)
"""


@pytest.fixture
def run_script(tmp_path):
  """`run_script(name, argv)` -> what `scripts/<name>.py`'s `main(argv)` returns, run in a
  fresh Python process (the reproductions are long JAX programs: one process each keeps
  a crash or leftover state of one from touching the next)."""

  def run(name: str, argv: list[str]):
    out = tmp_path / f"{name}.result.pkl"
    # The child runs as a user runs the script: the machine's own CPU device and normal code
    # generation, not the suite's 8 fake devices (whose collectives XLA aborts when one device
    # thread is starved for 40 s on a loaded 2-core machine; seen in repro_dpo) or cheap codegen.
    drop = ("--xla_force_host_platform_device_count", "--xla_backend_optimization_level",
            "--xla_llvm_disable_expensive_passes")  # fmt: skip
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(drop)]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
    cmd = [sys.executable, "-c", _RUNNER, _ROOT, name, str(out), *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=_ROOT, env=env)
    sys.stdout.write(p.stdout[-20000:])
    assert p.returncode == 0, f"scripts/{name}.py failed ({p.returncode}):\n{p.stderr[-5000:]}"
    with open(out, "rb") as f:
      return pickle.load(f)

  return run
