"""SFT loss masking, gradient accumulation, resume, configs and the config CLI."""

import glob
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from critic_jax.losses import LOSSES, next_token_loss
from critic_jax.losses.common import align_to_logits, first_argmax
from critic_jax.models import ModelConfig, Transformer
from critic_jax.parallel import DEFAULT_RULES, make_mesh
from critic_jax.train import get_trainer
from critic_jax.train.optim import make_optimizer
from critic_jax.train.sft import _forward_loss, make_train_step, sft_targets
from critic_jax.train.state import init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(b=4, t=10, v=64, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(4, v, (b, t)).astype(np.int32)
  lengths = rng.randint(5, t + 1, b)
  seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  prompt = rng.randint(1, 4, b)
  loss_mask = (np.arange(t)[None] >= prompt[:, None]) & (seg == 1)
  pos = np.tile(np.arange(t), (b, 1)).astype(np.int32)
  tokens[seg == 0] = 0
  batch = dict(tokens=tokens, segment_ids=seg, positions=pos, loss_mask=loss_mask)
  return {k: jnp.asarray(x) for k, x in batch.items()}


def test_loss_counts_only_response_tokens():
  batch = _batch()
  logits = jax.random.normal(jax.random.key(0), batch["tokens"].shape + (64,))
  targets, mask = sft_targets(batch)
  loss, m = next_token_loss(logits=logits[:, :-1], targets=targets, mask=mask)
  # By hand: mean over (row, t) with t+1 a response token of the row.
  lp = jax.nn.log_softmax(logits, -1)
  tot, n = 0.0, 0
  tok, lm, seg = (np.asarray(batch[k]) for k in ("tokens", "loss_mask", "segment_ids"))
  for i in range(tok.shape[0]):
    for t in range(tok.shape[1] - 1):
      if lm[i, t + 1] and seg[i, t + 1]:
        tot -= float(lp[i, t, tok[i, t + 1]])
        n += 1
  np.testing.assert_allclose(loss, tot / n, rtol=1e-5)
  assert float(m["num_tokens"]) == n
  # Changing the logits at prompt or padding positions does not change the loss.
  keep = np.zeros(logits.shape[:2], bool)
  keep[:, :-1] = np.asarray(mask)
  noisy = jnp.where(
    keep[..., None], logits, logits + 5 * jax.random.normal(jax.random.key(1), logits.shape)
  )
  loss2, _ = next_token_loss(logits=noisy[:, :-1], targets=targets, mask=mask)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)


def test_trainer_loss_over_all_logits_equals_the_sliced_loss():
  """The trainers' loss reads all T logits with the last position masked
  (`align_to_logits`); it must equal `next_token_loss` over `logits[:, :-1]` (loss,
  token count, NLL sum, accuracy) and have the same gradient, which is zero at the
  last position."""
  batch = _batch()
  logits = jax.random.normal(jax.random.key(1), batch["tokens"].shape + (64,))
  targets, mask = sft_targets(batch)

  def sliced(lg):
    return next_token_loss(logits=lg[:, :-1], targets=targets, mask=mask)

  def full(lg):
    return next_token_loss(logits=lg, targets=align_to_logits(targets), mask=align_to_logits(mask))

  (ls, ms), gs = jax.value_and_grad(sliced, has_aux=True)(logits)
  (lf, mf), gf = jax.value_and_grad(full, has_aux=True)(logits)
  np.testing.assert_allclose(lf, ls, rtol=1e-6)
  for k in ("num_tokens", "nll_sum", "token_accuracy"):
    np.testing.assert_allclose(mf[k], ms[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(gf, gs, atol=1e-7)
  assert not np.any(np.asarray(gf)[:, -1])
  # The trainer's own forward (`_forward_loss`) is this form over a model's logits.
  cfg = ModelConfig.preset("tiny", vocab_size=64)
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), batch["tokens"])["params"])
  got, gm = _forward_loss(model, LOSSES.get("sft"), params, batch, packed=True)
  out = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"]).logits  # fmt: skip
  want, wm = sliced(out)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(gm["num_tokens"], wm["num_tokens"])


def test_token_accuracy_argmax_keeps_the_first_of_tied_maxima():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 7, 50), jnp.float32)
  np.testing.assert_array_equal(first_argmax(x), jnp.argmax(x, -1))
  # Ties (bfloat16 logits tie often): the first index of the maximum, as jnp.argmax.
  tied = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0], [-1.0, -2.0, -1.0, -5.0]])
  np.testing.assert_array_equal(first_argmax(tied), [1, 0, 0])
  np.testing.assert_array_equal(first_argmax(tied.astype(jnp.bfloat16)), [1, 0, 0])
  targets = jnp.asarray([[3, 0, 0]])
  _, m = next_token_loss(logits=tied[None], targets=targets, mask=jnp.ones((1, 3), bool))
  np.testing.assert_allclose(m["token_accuracy"], 2 / 3)  # row 0's target 3 is a later tie
  # Indices are reduced as float32 below 2**24 (exact there) and as int32 from 2**24 on,
  # where float32 would round the odd index 2**24 + 1 to 2**24.
  for v in (200_003, 2**24 + 3):
    big = np.zeros((2, v), np.float32)
    big[0, [v - 2, v - 1]] = 1.0  # the first of two maxima at the end
    big[1, v - 1] = 2.0
    np.testing.assert_array_equal(jax.jit(first_argmax)(jnp.asarray(big)), [v - 2, v - 1])


def _one_step(accum, batch):
  cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=32, mlp_dim=64)
  model = Transformer(cfg)
  opt = {"name": "adamw", "lr": 1e-2, "warmup_steps": 0, "clip_norm": 1.0, "weight_decay": 0.1}
  tx, sched = make_optimizer(opt, 10)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    state, _ = init_train_state(
      lambda r: model.init(r, batch["tokens"])["params"], tx, jax.random.PRNGKey(0), mesh,
      DEFAULT_RULES,
    )  # fmt: skip
    step = jax.jit(make_train_step(model, tx, sched, "sft", accum))
    return step(state, batch)


def test_gradient_accumulation_equals_full_batch():
  batch = _batch(b=8)
  s1, m1 = _one_step(1, batch)
  s4, m4 = _one_step(4, batch)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)  # Adam amplifies float noise where g ~ 0


def _tiny(**over):
  from configs.sft_arith import get_config

  c = get_config("tiny")
  c.unlock()
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  c.lock()
  return c


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_gives_the_same_next_step_loss(tmp_path):
  over = {"train.num_steps": 4, "train.ckpt_every": 2, "train.eval_every": 0, "train.log_every": 1}
  full = get_trainer("sft")(_tiny(**over), str(tmp_path / "full"))
  # Stop after 2 steps, then rerun with the same workdir and the full step count.
  part = str(tmp_path / "part")
  get_trainer("sft")(_tiny(**{**over, "train.num_steps": 2}), part)
  resumed = get_trainer("sft")(_tiny(**over), part)
  assert resumed["step"] == 4
  loss = {r["step"]: r["train/loss"] for r in _read_metrics(part) if "train/loss" in r}
  ref = {r["step"]: r["train/loss"] for r in _read_metrics(str(tmp_path / "full"))}
  assert set(loss) == {1, 2, 3, 4}
  for s in (3, 4):
    np.testing.assert_allclose(loss[s], ref[s], rtol=1e-6)
  np.testing.assert_allclose(resumed["train/loss"], full["train/loss"], rtol=1e-6)


def test_reruns_and_crashes_leave_one_metrics_record_per_step(tmp_path):
  """Rerunning a finished workdir logs no second eval record; records an interrupted run
  wrote after its last checkpoint (and a half-written line) are dropped on resume, since the
  resumed run logs those steps again."""
  over = {"train.num_steps": 2, "train.ckpt_every": 2, "train.eval_every": 2, "train.log_every": 1}
  wd = str(tmp_path / "run")
  get_trainer("sft")(_tiny(**over), wd)
  again = get_trainer("sft")(_tiny(**over), wd)
  assert "eval/loss" in again
  recs = _read_metrics(wd)
  assert sorted(r["step"] for r in recs if "train/loss" in r) == [1, 2]
  assert sum("eval/loss" in r for r in recs) == 1
  # A crash after step 2's checkpoint: steps 3-4 were logged, step 4's line half-written.
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 3, "train/loss": 9.0}) + "\n" + '{"step": 4, "train/lo')
  get_trainer("sft")(_tiny(**{**over, "train.num_steps": 4}), wd)
  steps = [r["step"] for r in _read_metrics(wd) if "train/loss" in r]
  assert steps == [1, 2, 3, 4]


def test_jsonl_eval_reports_loss_but_no_task_accuracy(tmp_path):
  """Held-out JSONL records have no task answer to score: greedy accuracy is off (it scored
  every completion against the empty answer)."""
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n"
                          for i in range(8)))  # fmt: skip
  over = {"data.source": "jsonl", "data.jsonl_path": str(path), "data.eval_jsonl_path": str(path),
          "train.eval_every": 2}  # fmt: skip
  out = get_trainer("sft")(_tiny(**over), str(tmp_path / "wd"))
  assert "eval/loss" in out and "eval/accuracy" not in out


def test_optimizer_schedule_and_keep_checkpoints_typos_raise(tmp_path):
  with pytest.raises(ValueError, match="config.optimizer.schedule must be"):
    make_optimizer({"name": "adamw", "lr": 1e-3, "schedule": "cosin"}, 10)
  with pytest.raises(ValueError, match="keep_checkpoints must be >= 1"):
    get_trainer("sft")(_tiny(**{"train.keep_checkpoints": 0}), str(tmp_path / "k0"))
  with pytest.raises(ValueError, match=r"config.train.ckpt_every must be >= 1, got 0"):
    get_trainer("sft")(_tiny(**{"train.ckpt_every": 0}), str(tmp_path / "c0"))


def _configs():
  return sorted(
    p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(p) not in ("__init__.py", "common.py")
  )  # fmt: skip


@pytest.mark.parametrize("path", _configs(), ids=os.path.basename)
def test_every_config_tiny_variant_runs_two_steps(path, tmp_path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("tiny")
  assert config.train.num_steps == 2
  out = get_trainer(config.trainer)(config, str(tmp_path))
  assert out["step"] == 2
  assert np.isfinite(out["train/loss"])
  assert os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))
  assert glob.glob(os.path.join(tmp_path, "tb", "events.out.tfevents.*"))


def _parse(argv):
  fv = flags.FlagValues()
  argv = ["prog", *argv]
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_cli_overrides_and_typos():
  path = os.path.join(ROOT, "configs", "sft_arith.py")
  c = _parse([f"--config={path}:tiny", "--config.optimizer.lr=0.5", "--config.model.num_layers=3"])
  assert c.optimizer.lr == 0.5 and c.model.num_layers == 3
  with pytest.raises(Exception, match='Did you mean "lr"'):
    _parse([f"--config={path}:tiny", "--config.optimizer.lrr=0.5"])
  with pytest.raises(Exception, match="unknown variant .tinyy."):
    _parse([f"--config={path}:tinyy"])
  c.unlock()
  c.model.num_layer = 2  # a typo that slipped into a config file
  with pytest.raises(KeyError, match="Did you mean 'num_layers'"):
    get_trainer("sft")(c, "/nonexistent/never/created")
