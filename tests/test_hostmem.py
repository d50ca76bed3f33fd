"""The host allocator setting of the training and benchmark scripts."""

import os
import subprocess
import sys

import pytest

CODE = "from critic_jax.hostmem import keep_freed_memory; print(keep_freed_memory())"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(env_value):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("CRITIC_JAX_MALLOC", None)
  if env_value is not None:
    env["CRITIC_JAX_MALLOC"] = env_value
  out = subprocess.run(
    [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True
  )
  return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_applies_and_can_be_turned_off():
  # In a fresh interpreter: the setting lasts for the whole process.
  assert _run(None) == "True"
  assert _run("default") == "False"
