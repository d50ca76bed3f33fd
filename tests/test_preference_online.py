"""D2O and iterative DNO-Prct in the preference trainer: row layout, pair selection, scorers,
reference self-samples, D2O at the reference is log 2, sharded == single-device step, and
tiny end-to-end runs (DNO resumed mid-iteration)."""

import glob
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from critic_jax.data import CharTokenizer, make_task
from critic_jax.data.preference import PreferenceExample
from critic_jax.data.task_pairs import task_pairs
from critic_jax.data.tasks import Example
from critic_jax.models import ModelConfig, Transformer
from critic_jax.parallel import DEFAULT_RULES, batch_sharding, logical_to_sharding, make_mesh
from critic_jax.train import get_trainer
from critic_jax.train.optim import make_optimizer
from critic_jax.train.preference_d2o import d2o_dataset, make_d2o_step, reference_samples
from critic_jax.train.preference_dno import dno_optimizer, gather_pairs, select_dno_pairs
from critic_jax.train.preference_rollouts import (
  make_logp_fn,
  make_sampler,
  response_rows,
  rows_logps,
  text_rows,
)
from critic_jax.train.preference_scorers import SCORERS, make_scorer
from critic_jax.train.state import TrainState, init_train_state

TOK = CharTokenizer()
SEQ = 12


def test_response_rows_match_dataset_rows():
  # Prompt [BOS] "1+2=" (5 ids), response "3" EOS: the same row the dataset tokenizer builds.
  enc = [TOK.bos_id, *TOK.encode("1+2=")]
  prompt = np.zeros((2, 7), np.int32)
  prompt[0, :5] = enc
  prompt[1, :5] = enc
  resp = np.zeros((2, 4), np.int32)
  resp[0, :2] = [*TOK.encode("3"), TOK.eos_id]
  resp[1, :4] = TOK.encode("3456")  # truncated sample (no EOS), cut by seq_len=8 below
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  rows = response_rows(prompt, np.array([5, 5]), resp, mask, 8, TOK.pad_id)
  want = text_rows(["1+2="], ["3"], TOK, 8)
  for k in want:
    np.testing.assert_array_equal(rows[k][0], want[k][0])
  assert rows["tokens"][1].tolist() == enc + TOK.encode("345")
  assert rows["loss_mask"][1].tolist() == [False] * 5 + [True] * 3
  assert rows["positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
  assert rows["segment_ids"][0].tolist() == [1] * 7 + [0]


def test_dno_pair_selection_by_hand():
  scores = np.array([
    [0.1, 0.9, 0.5],  # best 1, worst 0, margin 0.8: kept
    [0.5, 0.5, 0.5],  # all tied: never kept
    [0.2, 0.3, 0.1],  # margin 0.2 < 0.3: dropped
    [0.0, 0.7, 5.0],  # the 5.0 is invalid (failed score): best 1, worst 0, kept
    [0.4, 0.9, 0.0],  # the 0.0 is invalid: margin 0.5, kept (>= threshold)
  ])  # fmt: skip
  valid = np.ones_like(scores, bool)
  valid[3, 2] = valid[4, 2] = False
  pos, neg, keep = select_dno_pairs(scores, valid, 0.3)
  assert keep.tolist() == [True, False, False, True, True]
  assert pos[keep].tolist() == [1, 1, 1] and neg[keep].tolist() == [0, 0, 0]
  assert not select_dno_pairs(scores, valid, 0.81)[2].any()  # delta above every margin
  # Rows follow the selected candidates: candidate c of prompt n holds the token 10 * n + c.
  cand = {k: np.zeros((5, 3, 4), np.int32) for k in ("positions", "segment_ids", "loss_mask")}
  cand["tokens"] = (10 * np.arange(5)[:, None, None] + np.arange(3)[None, :, None]) * np.ones(
    (1, 1, 4), np.int32
  )
  pairs = gather_pairs(cand, pos, neg, keep)
  assert pairs["chosen_tokens"][:, 0].tolist() == [1, 31, 41]
  assert pairs["rejected_tokens"][:, 0].tolist() == [0, 30, 40]


def test_scorers_by_hand():
  task = make_task("addition")
  ex = Example("40+2=", "42", "42")
  assert make_scorer("task_correct", task)("40+2=", "42", ex) == 1.0
  assert make_scorer("task_correct", task)("40+2=", "43", ex) == 0.0
  dist = make_scorer("task_distance", task)
  assert dist("", "42", ex) == 1.0 and dist("", "45", ex) == 0.25 and dist("", "x", ex) == 0.0
  pair = PreferenceExample("p", "abcd", "zz")
  assert make_scorer("gold_exact")("p", " abcd ", pair) == 1.0
  assert make_scorer("gold_similarity")("p", "abxx", pair) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="needs the embedded task"):
    make_scorer("task_correct", None)
  with pytest.raises(KeyError, match="Known preference scorers"):
    SCORERS.get("judge")


def _sampling_cfg(k=3):
  return ml_collections.ConfigDict({
    "max_new_tokens": 5, "sampling": {"method": "temperature", "temperature": 1.0, "top_k": 0,
                                      "top_p": 1.0, "min_p": 0.0},
  })  # fmt: skip


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig.preset("tiny", vocab_size=128, d_model=32, mlp_dim=64)
  model = Transformer(cfg)
  tx, sched = make_optimizer({"name": "sgd", "lr": 0.5, "warmup_steps": 0,
                              "schedule": "constant"}, 10)  # fmt: skip
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  pairs = task_pairs(make_task("addition"), 4, seed=0)
  negatives = [PreferenceExample(p.prompt, None, p.rejected) for p in pairs]
  prompts = [p.prompt for p in pairs]
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    state, _ = init_train_state(
      lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], tx, jax.random.PRNGKey(0),
      mesh, DEFAULT_RULES,
    )  # fmt: skip
    sampler = make_sampler(model, TOK, _sampling_cfg(), mesh, DEFAULT_RULES)
    logp_fn = make_logp_fn(model)
    samples, metrics = reference_samples(
      None, sampler, logp_fn, state.params, prompts, TOK, jax.random.PRNGKey(3), num_samples=3,
      seq_len=SEQ, sample_batch=4, eval_batch=8, mesh=mesh,
    )  # fmt: skip
    ref_neg = rows_logps(
      logp_fn, state.params, text_rows(prompts, [n.rejected for n in negatives], TOK, SEQ), 8, mesh
    )
  kw = {"alpha": 0.1, "beta": 0.1}
  steps = {
    online: jax.jit(make_d2o_step(model, tx, sched, kw, online_ref=online))
    for online in (False, True)
  }
  ds = d2o_dataset(negatives, TOK, seq_len=SEQ, batch_size=4, seed=0, samples=samples,
                   ref_neg=ref_neg)  # fmt: skip
  batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
  return dict(model=model, tx=tx, sched=sched, mesh=mesh, state=state, samples=samples,
              metrics=metrics, prompts=prompts, batch=batch, steps=steps)  # fmt: skip


_LOGITS = {}


def _forced_logp(model, params, tokens, mask):
  """Teacher-forced log-prob of one row, by hand from the logits."""
  if model not in _LOGITS:  # one compiled forward for every row
    _LOGITS[model] = jax.jit(lambda p, t: model.apply({"params": p}, t[None]).logits[0])
  lp = np.asarray(jax.nn.log_softmax(_LOGITS[model](params, jnp.asarray(tokens)), -1))
  return sum(float(lp[t - 1, tokens[t]]) for t in range(1, len(tokens)) if mask[t])


def test_reference_samples_come_from_the_reference(setup):
  s, model, params = setup["samples"], setup["model"], setup["state"].params
  assert s["self_tokens"].shape == (4, 3, SEQ) and s["self_mask"].all()
  for i, prompt in enumerate(setup["prompts"]):
    head = [TOK.bos_id, *TOK.encode(prompt)]
    for j in range(3):
      assert s["self_tokens"][i, j, : len(head)].tolist() == head
      assert not s["self_loss_mask"][i, j, : len(head)].any()
  # Cached reference log-probs = teacher forcing of the reference, by hand.
  for i, j in [(0, 0), (2, 1), (3, 2)]:
    want = _forced_logp(model, params, s["self_tokens"][i, j], s["self_loss_mask"][i, j])
    np.testing.assert_allclose(s["self_ref_logps"][i, j], want, rtol=1e-5)
  # The sampler's log-probs of its own draws are the reference's (so it sampled the reference),
  # and another model scores the same tokens differently.
  np.testing.assert_allclose(s["self_sampler_logps"], s["self_ref_logps"], atol=1e-4)
  assert setup["metrics"]["sampler_forward_logp_gap"] < 1e-4
  other = jax.tree.map(lambda x: 1.5 * x, params)
  forced = _forced_logp(model, other, s["self_tokens"][0, 0], s["self_loss_mask"][0, 0])
  assert abs(forced - s["self_ref_logps"][0, 0]) > 1e-2


def _expected_d2o(model, params, ref_params, batch, alpha, beta):
  """D2O loss by hand from per-row teacher-forced log-probs (numpy)."""
  tok, lm = np.asarray(batch["neg_tokens"]), np.asarray(batch["neg_loss_mask"])
  stok, slm = np.asarray(batch["self_tokens"]), np.asarray(batch["self_loss_mask"])
  out = []
  for i in range(tok.shape[0]):
    neg = _forced_logp(model, params, tok[i], lm[i]) - _forced_logp(
      model, ref_params, tok[i], lm[i]
    )
    selfs = [
      _forced_logp(model, params, stok[i, j], slm[i, j])
      - _forced_logp(model, ref_params, stok[i, j], slm[i, j])
      for j in range(stok.shape[1])
    ]
    u = beta * np.mean(selfs) - alpha * neg
    out.append(np.log1p(np.exp(-u)))
  return float(np.mean(out))


def test_d2o_step_at_the_reference_is_log2_then_matches_by_hand(setup):
  s = setup
  pre, onl = s["steps"][False], s["steps"][True]
  ref = s["state"].params
  st_pre, m_pre = pre(s["state"], s["batch"], ref)
  st_onl, m_onl = onl(s["state"], s["batch"], ref)
  for m in (m_pre, m_onl):
    np.testing.assert_allclose(m["loss"], math.log(2), rtol=1e-6)
    np.testing.assert_allclose(m["neg_logratio_mean"], 0.0, atol=1e-5)
    np.testing.assert_allclose(m["kl_ref_policy_mc"], 0.0, atol=1e-5)
  np.testing.assert_allclose(m_onl["kl_token"], 0.0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(st_pre.params), jax.tree.leaves(st_onl.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # One SGD step later: the loss is the hand-computed D2O loss of the new policy, below log 2,
  # and the negatives lost probability relative to the reference.
  _, m2 = pre(st_pre, s["batch"], ref)
  want = _expected_d2o(s["model"], st_pre.params, ref, s["batch"], 0.1, 0.1)
  np.testing.assert_allclose(m2["loss"], want, rtol=1e-5)
  assert float(m2["loss"]) < math.log(2) and float(m2["neg_logratio_mean"]) < 0
  _, m3 = onl(st_onl, s["batch"], ref)
  np.testing.assert_allclose(m3["loss"], m2["loss"], rtol=1e-5)
  assert float(m3["kl_token"]) > 0


def test_d2o_sharded_step_equals_single_device(setup):
  s = setup
  kw = {"alpha": 0.1, "beta": 0.1}
  step = make_d2o_step(s["model"], s["tx"], s["sched"], kw, online_ref=True)
  perturbed = jax.tree.map(lambda x: 1.1 * x, s["state"].params)  # policy != reference
  state1 = s["state"].replace(params=perturbed)
  st1, m1 = s["steps"][True](state1, s["batch"], s["state"].params)
  mesh8 = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh8), nn.logical_axis_rules(DEFAULT_RULES):

    def init(r):
      params = s["model"].init(r, jnp.zeros((1, 8), jnp.int32))["params"]
      return TrainState(jnp.zeros((), jnp.int32), params, s["tx"].init(params), r)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = logical_to_sharding(abstract, mesh8, DEFAULT_RULES)
    state8 = jax.device_put(jax.device_get(state1), shardings)
    ref8 = jax.device_put(jax.device_get(s["state"].params), shardings.params)
    batch8 = {k: jax.device_put(np.asarray(v), batch_sharding(mesh8, v.ndim))
              for k, v in s["batch"].items()}  # fmt: skip
    jitted = jax.jit(step, in_shardings=(shardings, None, shardings.params),
                     out_shardings=(shardings, None))  # fmt: skip
    st8, m8 = jitted(state8, batch8, ref8)
  assert len(st8.params["embed"]["embedding"].sharding.device_set) == 8
  for k in ("loss", "neg_logratio_mean", "self_logratio_mean", "kl_token", "grad_norm"):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(st8.params), jax.tree.leaves(st1.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _config(module, **over):
  import importlib

  c = importlib.import_module(f"configs.{module}").get_config("tiny")
  with c.unlocked():
    for k, v in over.items():
      node = c
      *path, last = k.split(".")
      for p in path:
        node = node[p]
      node[last] = v
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_d2o_end_to_end_tiny(tmp_path):
  wd = str(tmp_path / "d2o")
  out = get_trainer("preference")(_config("d2o_arith", **{"train.eval_every": 0}), wd)
  assert out["step"] == 2 and np.isfinite(out["train/loss"])
  assert abs(out["train/loss"] - math.log(2)) < 0.05  # two tiny steps from the reference
  for k in ("train/neg_logratio_mean", "train/self_logratio_mean", "train/kl_ref_policy_mc"):
    assert np.isfinite(out[k])
  with np.load(os.path.join(wd, "d2o_reference_samples.npz")) as f:
    assert f["self_tokens"].shape == (32, 2, SEQ) and np.all(f["self_ref_logps"] < 0)


def test_dno_iterations_end_to_end_and_resume_mid_iteration(tmp_path):
  over = {"dno.steps_per_iteration": 2, "train.ckpt_every": 3, "train.keep_checkpoints": 10,
          "train.async_checkpoint": False, "train.eval_every": 0}  # fmt: skip
  wd = str(tmp_path / "dno")
  out = get_trainer("preference")(_config("dno_arith", **over), wd)
  assert out["step"] == 4 and np.isfinite(out["train/loss"])
  recs = _metrics(wd)
  its = [(r["step"], r["dno/iteration"]) for r in recs if "dno/iteration" in r]
  assert its == [(0, 0.0), (2, 1.0)]
  loss = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
  assert sorted(loss) == [1, 2, 3, 4]
  np.testing.assert_allclose(loss[1], math.log(2), rtol=1e-5)  # step 1 of each iteration:
  np.testing.assert_allclose(loss[3], math.log(2), rtol=1e-5)  # pi = pi_t, so log 2
  task = make_task("addition")
  caches = sorted(glob.glob(os.path.join(wd, "dno", "iteration_*.npz")))
  assert len(caches) == 2
  with np.load(caches[0]) as f:
    assert len(f["has_chosen"]) > 0
    # The chosen responses are right answers (gold, or a sample as good); the rejected ones
    # lose to them by at least the margin.
    for ct, cm, rt, rm in zip(f["chosen_tokens"], f["chosen_loss_mask"], f["rejected_tokens"],
                              f["rejected_loss_mask"], strict=True):  # fmt: skip
      prompt = TOK.decode(ct[1 : np.argmax(cm)])
      a, b = map(int, prompt.rstrip("=").split("+"))
      ex = Example(prompt, str(a + b), str(a + b))
      assert task.score(ex, TOK.decode(ct[cm]))
      assert not task.score(ex, TOK.decode(rt[rm]))
  mtimes = [os.path.getmtime(p) for p in caches]
  # Lose the last checkpoint: the run resumes at step 3, inside iteration 1, on its cached
  # pairs, and its step-4 loss equals the uninterrupted run's.
  shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
  out2 = get_trainer("preference")(_config("dno_arith", **over), wd)
  assert out2["step"] == 4
  assert [os.path.getmtime(p) for p in caches] == mtimes
  # The resumed run dropped the records past its checkpoint (step 3) and logged step 4
  # again: one record per step, and no iteration re-run.
  recs2 = _metrics(wd)
  assert [(r["step"], r["dno/iteration"]) for r in recs2 if "dno/iteration" in r] == its
  assert [r["step"] for r in recs2 if "train/loss" in r] == [1, 2, 3, 4]
  np.testing.assert_allclose(out2["train/loss"], loss[4], rtol=1e-5)


def test_dno_mode_checks(tmp_path):
  trainer = get_trainer("preference")
  with pytest.raises(ValueError, match="needs config.dno.pairs='on_policy'"):
    trainer(_config("dno_arith", **{"dno.pairs": "given"}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="must be 'given' or 'on_policy'"):
    trainer(_config("dno_arith", **{"dno.pairs": "online"}), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="must equal config.dno.iterations"):
    trainer(_config("dno_arith", **{"train.num_steps": 3}), str(tmp_path / "c"))


@pytest.mark.parametrize("reset", [True, False])
def test_dno_optimizer_applies_the_rate_it_logs(reset):
  """Without reset_optimizer the optimizer's step count runs across iterations: its schedule
  must span the run. It used to span one iteration, so from iteration 1 on every step ran at
  the schedule's floor while the logged rate restarted. With SGD on a unit gradient the
  update is the rate applied; it must equal the logged one at every global step."""
  opt = {"name": "sgd", "lr": 1e-3, "warmup_steps": 1, "end_lr_ratio": 0.1}
  spi, iters = 4, 3
  tx, logged = dno_optimizer(opt, spi, iters, reset)
  params = jnp.zeros(())
  state = tx.init(params)
  for s in range(spi * iters):
    if reset and s % spi == 0:
      state = tx.init(params)
    update, state = tx.update(jnp.ones(()), state, params)
    np.testing.assert_allclose(-float(update), float(logged(s)), rtol=1e-6, atol=1e-12)
