"""The preference trainer: DPO at the reference is log 2, precomputed = online reference,
loss swap by name, CoH, implicit-reward accuracy, the reference-log-prob cache."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.data import CharTokenizer, make_task
from critic_jax.data.preference import preference_dataset
from critic_jax.data.task_pairs import task_pairs
from critic_jax.models import ModelConfig, Transformer
from critic_jax.parallel import DEFAULT_RULES, make_mesh
from critic_jax.train import get_trainer
from critic_jax.train.optim import make_optimizer
from critic_jax.train.preference import (
  implicit_reward_accuracy,
  make_dpo_step,
  reference_logps,
  response_logps,
)
from critic_jax.train.state import init_train_state


def test_implicit_reward_accuracy_by_hand():
  pol = np.array([[-1.0, -3.0], [-2.0, -1.0], [-1.0, -1.0]])
  ref = np.array([[-2.0, -2.0], [-2.0, -2.0], [-1.0, -1.0]])
  out = implicit_reward_accuracy(pol, ref, beta=0.5)
  # r_w - r_l = 0.5 * [(1) - (-1), (0) - (1), 0] = [1, -0.5, 0]; ties count as wrong.
  assert out["implicit_reward_accuracy"] == pytest.approx(1 / 3)
  assert out["reward_margin"] == pytest.approx(0.5 / 3)


@pytest.fixture(scope="module")
def setup():
  tok = CharTokenizer()
  cfg = ModelConfig.preset("tiny", vocab_size=128, d_model=32, mlp_dim=64)
  model = Transformer(cfg)
  pairs = task_pairs(make_task("addition"), 8, seed=0)
  batch = next(iter(preference_dataset(pairs, tok, seq_len=12, batch_size=8, shuffle=False)))
  tx, sched = make_optimizer({"name": "sgd", "lr": 0.1, "warmup_steps": 0,
                              "schedule": "constant"}, 10)  # fmt: skip
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    state, _ = init_train_state(
      lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], tx, jax.random.PRNGKey(0),
      mesh, DEFAULT_RULES,
    )  # fmt: skip
    ref = reference_logps(model, state.params, pairs, tok, 12, 8, mesh)
  return dict(tok=tok, model=model, pairs=pairs, batch=batch, tx=tx, sched=sched, state=state,
              ref=ref, mesh=mesh)  # fmt: skip


def test_reference_logps_match_teacher_forcing(setup):
  model, state, batch = setup["model"], setup["state"], setup["batch"]
  rows = {k: jnp.asarray(batch[f"chosen_{k}"]) for k in ("tokens", "positions", "segment_ids",
                                                          "loss_mask")}  # fmt: skip
  lp, n, _, _ = response_logps(model, state.params, rows)
  np.testing.assert_allclose(setup["ref"][:, 0], lp, rtol=1e-5)
  # By hand for row 0: sum of log softmax at the response positions.
  logits = model.apply({"params": state.params}, rows["tokens"][:1]).logits[0]
  logp = jax.nn.log_softmax(logits, -1)
  tok = np.asarray(rows["tokens"][0])
  mask = np.asarray(rows["loss_mask"][0])
  want = sum(float(logp[t - 1, tok[t]]) for t in range(1, 12) if mask[t])
  np.testing.assert_allclose(lp[0], want, rtol=1e-5)
  assert int(n[0]) == int(mask.sum())


def test_dpo_at_the_reference_is_log2_and_online_equals_precomputed(setup):
  s, batch = setup, dict(setup["batch"])
  batch["ref_chosen_logps"] = s["ref"][:, 0]
  batch["ref_rejected_logps"] = s["ref"][:, 1]
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  kw = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "sft_weight": 0.0}
  pre = jax.jit(make_dpo_step(s["model"], s["tx"], s["sched"], kw, online_ref=False))
  onl = jax.jit(make_dpo_step(s["model"], s["tx"], s["sched"], kw, online_ref=True))
  st_pre, m_pre = pre(s["state"], batch, s["state"].params)
  st_onl, m_onl = onl(s["state"], batch, s["state"].params)
  np.testing.assert_allclose(m_pre["loss"], math.log(2), rtol=1e-6)
  np.testing.assert_allclose(m_onl["loss"], math.log(2), rtol=1e-6)
  np.testing.assert_allclose(m_onl["kl_token"], 0.0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(st_pre.params), jax.tree.leaves(st_onl.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # After one SGD step on the DPO loss the chosen responses gained on the rejected ones.
  _, m2 = pre(st_pre, batch, s["state"].params)
  assert float(m2["loss"]) < math.log(2) and float(m2["reward_margin"]) > 0


def _tiny(name, **over):
  from configs.dpo_arith import get_config

  c = get_config("tiny")
  with c.unlocked():
    for k, v in over.items():
      node = c
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      node[last] = v
  return c


@pytest.mark.parametrize("over", [{"loss_kwargs.loss_type": "ipo"}, {"loss": "coh"}],
                         ids=["ipo", "coh"])  # fmt: skip
def test_swap_loss_by_config_name(over, tmp_path):
  out = get_trainer("preference")(_tiny("t", **over), str(tmp_path))
  assert out["step"] == 2 and np.isfinite(out["train/loss"])


def test_reference_cache_written_once_and_reused(tmp_path):
  wd = str(tmp_path / "run")
  get_trainer("preference")(_tiny("t", **{"eval.generate": False}), wd)
  path = os.path.join(wd, "reference_logps.npy")
  ref = np.load(path)
  assert ref.shape == (32, 2) and np.all(ref < 0)
  mtime = os.path.getmtime(path)
  out = get_trainer("preference")(_tiny("t", **{"train.num_steps": 3, "eval.generate": False}), wd)
  assert out["step"] == 3 and os.path.getmtime(path) == mtime
  with pytest.raises(ValueError, match="not a preference-trainer loss"):
    get_trainer("preference")(_tiny("t", loss="bt"), str(tmp_path / "x"))
