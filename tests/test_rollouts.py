"""The host-side loop: verifier pool containment, and `Rollouts` from prompts."""

import os
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.data import CharTokenizer, encode_prompts
from critic_jax.models import ModelConfig, Transformer
from critic_jax.sampler import (
  GenerationConfig,
  RewardPool,
  Sampler,
  SamplingConfig,
  generate_rollouts,
)

TOK = CharTokenizer()
STOPS = (TOK.eos_id, *range(40, 48))
_RELEASE = threading.Event()  # lets abandoned "hanging" verifier threads finish at the end


def _verifier(prompt, completion, example):
  """Behaviour chosen by the completion: raise, hang, return junk, or score."""
  if completion == "boom":
    raise ValueError("boom")
  if completion == "hang":
    _RELEASE.wait(60)  # returns normally after 60 s: only a timeout makes it fail
    return 5.0
  if completion == "nan":
    return float("nan")
  if completion == "text":
    return "not a number"
  return 1.0


def _proc_verifier(prompt, completion, example):
  if completion == "hang":
    time.sleep(60)
    return 5.0
  if completion == "boom":
    raise ValueError("boom")
  if completion == "die":
    os._exit(3)
  return float(os.getpid())


@pytest.fixture(scope="module", autouse=True)
def _release_threads():
  yield
  _RELEASE.set()


def test_thread_pool_records_errors_and_timeouts():
  calls = ["ok", "boom", "hang", "ok", "nan", "text"]
  with RewardPool(_verifier, timeout_s=0.5, num_workers=2, failure_reward=-1.0) as pool:
    res = pool(["p"] * len(calls), calls, [None] * len(calls))
    assert res.status == ("ok", "error", "timeout", "ok", "error", "error")
    np.testing.assert_array_equal(res.rewards, [1, -1, -1, 1, -1, -1])
    np.testing.assert_array_equal(res.failed, [False, True, True, False, True, True])
    assert "ValueError: boom" in res.errors[1] and "non-finite" in res.errors[4]
    m = res.metrics()
    assert (m["reward/failures"], m["reward/errors"], m["reward/timeouts"]) == (4, 3, 1)
    assert m["reward/mean"] == 1.0
    assert pool.abandoned_threads == 1
    # One worker, a hang first: the calls queued behind it are timed from their own
    # start, so they still succeed, and the pool keeps working afterwards.
  with RewardPool(_verifier, timeout_s=0.5, num_workers=1) as pool:
    res = pool(["p"] * 3, ["hang", "ok", "ok"])
    assert res.status == ("timeout", "ok", "ok")
    assert pool(["p"], ["ok"]).status == ("ok",)


def test_process_pool_kills_hung_and_dead_workers():
  with RewardPool(_proc_verifier, timeout_s=1.0, num_workers=2, backend="process") as pool:
    res = pool(["p"] * 5, ["hang", "ok", "boom", "die", "ok"])
    assert res.status == ("timeout", "ok", "error", "died", "ok")
    assert "exit code 3" in res.errors[3]
    assert pool.worker_restarts == 2  # the hung worker was killed, the dead one replaced
    assert all(p.process.is_alive() for p in pool._procs)
    pids = {int(r) for r in res.rewards[[1, 4]]}
    assert os.getpid() not in pids  # the verifier really ran in another process
    assert pool(["p"], ["ok"]).status == ("ok",)
  with pytest.raises(ValueError, match="picklable"):
    RewardPool(lambda p, c, e: 0.0, backend="process")


def _random_params(model, std=0.2, seed=0):
  """Normal(0, std) weights (norm scales 1, biases 0) of the model's shapes, without
  compiling `model.init` (seconds of XLA compile for nothing the tests need)."""
  shapes = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
  )
  rng = np.random.RandomState(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return np.ones(s.shape, s.dtype)
    if "bias" in name:
      return np.zeros(s.shape, s.dtype)
    return (std * rng.standard_normal(s.shape)).astype(s.dtype)

  return jax.device_put(jax.tree_util.tree_map_with_path(leaf, shapes))


@pytest.fixture(scope="module")
def policy():
  model = Transformer(ModelConfig.preset("tiny", vocab_size=128, d_model=32, mlp_dim=64))
  params = _random_params(model)
  # Two cache chunks and stop tokens (EOS and a few frequent ids, so that some rows
  # stop early), with the device loop (the default on a CPU).
  gen = GenerationConfig(
    max_new_tokens=6, sampling=SamplingConfig("temperature", temperature=2.0),
    stop_tokens=STOPS, pad_id=TOK.pad_id, vocab_limit=TOK.vocab_size, kv_chunk=3,
  )  # fmt: skip
  return Sampler(model, gen, batch_multiple=4, loop="device"), params


def _length_reward(prompt, completion, example):
  if "!" in prompt:
    raise RuntimeError("verifier bug")
  return float(len(completion)) + 100.0 * example


def test_generate_rollouts(policy):
  sampler, params = policy
  prompts = ["1+1=", "22+3=", "x!", "7", "abc"]
  done = []
  with RewardPool(_length_reward, timeout_s=5.0, num_workers=2) as pool:
    ro, metrics = generate_rollouts(
      sampler, params, prompts, TOK, jax.random.key(1), num_samples=2, batch_size=2,
      reward_pool=pool, examples=list(range(5)), progress=done.append,
    )  # fmt: skip
    again, _ = generate_rollouts(
      sampler, params, prompts, TOK, jax.random.key(1), num_samples=2, batch_size=4,
      reward_pool=pool, examples=list(range(5)),
    )  # fmt: skip
  assert done == [2, 4, 5]
  n = len(prompts) * 2
  assert ro.response_ids.shape == (n, 6) and ro.num_groups == 5 and ro.group_size == 2
  np.testing.assert_array_equal(ro.group, np.repeat(np.arange(5), 2))
  enc = encode_prompts(prompts, TOK)
  np.testing.assert_array_equal(ro.prompt_ids, enc["tokens"][ro.group])
  np.testing.assert_array_equal(ro.prompt_lengths, enc["lengths"][ro.group])
  assert ro.grouped(ro.response_ids).shape == (5, 2, 6)
  lengths = ro.response_mask.sum(1)
  for i in range(n):
    ids = ro.response_ids[i]
    assert ro.texts[i] == TOK.decode(ids[: lengths[i]])
    assert np.all(ids[lengths[i] :] == TOK.pad_id)
    assert ro.finished[i] == (ids[lengths[i] - 1] in STOPS)
    assert not set(ids[: lengths[i] - 1].tolist()) & set(STOPS)  # nothing after a stop
  assert 0 < ro.finished.sum() < n and (lengths > 4).any()  # stops, and the second chunk
  assert np.all(ro.logprobs[ro.response_mask] < 0) and np.all(ro.logprobs[~ro.response_mask] == 0)
  # The verifier raised for the two samples of "x!": recorded, counted, not raised.
  bad = ro.group == 2
  np.testing.assert_array_equal(ro.reward_failed, bad)
  want = [len(t) + 100.0 * g for t, g in zip(ro.texts, ro.group, strict=True)]
  np.testing.assert_allclose(ro.rewards[~bad], np.asarray(want)[~bad])
  assert np.all(ro.rewards[bad] == 0)
  assert metrics["reward/failures"] == 2 and metrics["reward/errors"] == 2
  assert metrics["rollout/samples"] == n
  assert metrics["rollout/new_tokens"] == ro.response_mask.sum()
  # Same key, other batch size: identical rollouts (sample keys follow the prompt index).
  for field in ("response_ids", "response_mask", "finished", "rewards"):
    np.testing.assert_array_equal(getattr(again, field), getattr(ro, field))
  np.testing.assert_allclose(again.logprobs, ro.logprobs, atol=1e-5)
  assert again.texts == ro.texts
