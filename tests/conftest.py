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
# step (a run and its resumed rerun, configs sharing a tiny model) compile it once.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_XLA_CACHE = tempfile.mkdtemp(prefix="critic_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
