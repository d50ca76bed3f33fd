"""The reward-model trainer: BT / GPM / CRM steps, CRM selection inside the step, the curriculum
order across a resume, a loss swap by name end to end, and the sharded step."""

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from critic_jax.critics import BTObjective, CRMObjective, GPMObjective
from critic_jax.data import CharTokenizer, Example
from critic_jax.data.preference import PreferenceExample
from critic_jax.data.preference_tasks import PreferenceData
from critic_jax.eval import encode_pairs
from critic_jax.losses import bradley_terry_loss, gpm_loss
from critic_jax.models import ModelConfig, Transformer, last_token_index
from critic_jax.parallel import DEFAULT_RULES, batch_sharding, logical_to_sharding, make_mesh
from critic_jax.train import get_trainer
from critic_jax.train.reward import (
  PairFeeder,
  make_objective,
  make_train_step,
  make_tx,
  reward_centring,
)
from critic_jax.train.state import TrainState

# One layer: these tests are dominated by compile time, which grows with the layer count.
CFG = ModelConfig.preset("tiny", vocab_size=128, d_model=32, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=8, mlp_dim=64, heads=("reward",))  # fmt: skip
OPT = {"name": "adamw", "lr": 1e-2, "warmup_steps": 0, "clip_norm": 1.0, "weight_decay": 0.0,
       "schedule": "constant"}  # fmt: skip
# Equality tests use SGD: Adam turns float noise in near-zero gradients into +-lr updates.
SGD = {"name": "sgd", "lr": 0.5, "warmup_steps": 0, "clip_norm": 1.0, "schedule": "constant"}
TOK = CharTokenizer()


def _pairs(n=8, seed=0):
  rng = np.random.RandomState(seed)
  words = ["".join(rng.choice(list("abcdefgh"), rng.randint(2, 6))) for _ in range(2 * n)]
  return [PreferenceExample("q" * (i % 3), words[2 * i], words[2 * i + 1]) for i in range(n)]


def _batch(n=8, seed=0, flipped=None):
  return encode_pairs(_pairs(n, seed), range(n), TOK, 10, flipped)


_INIT: dict = {}


def _rm_params(rm, key):
  """Params of a reward model; one jitted init per head kind for the whole module (init
  compiles are the slow part of these tests)."""
  if rm.head not in _INIT:
    _INIT[rm.head] = jax.jit(lambda r, rm=rm: nn.unbox(rm.init(r)))
  return _INIT[rm.head](key)


def _params(objective, seed=0):
  key = jax.random.key(seed)
  if objective.models is None:
    return _rm_params(objective.rm, key)
  keys = jax.random.split(key, len(objective.models))
  return {m: _rm_params(objective.rm, k) for m, k in zip(objective.models, keys, strict=True)}


def _init(objective, mesh, seed=0, opt=OPT):
  """(state placed by its logical-axis shardings, shardings, tx, schedule)."""
  tx, sched = make_tx(objective, opt, 10)

  def init(r):
    p = objective.init_params(r)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r)

  shardings = logical_to_sharding(jax.eval_shape(init, jax.random.key(0)), mesh, DEFAULT_RULES)
  params = _params(objective, seed)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key(seed))  # fmt: skip
  return jax.device_put(state, shardings), shardings, tx, sched


_STEPS: dict = {}


def _step(obj, tx, sched, accum=1, key=None):
  """A jitted train step, shared by tests that build the same one (`key`)."""
  if key is None or key not in _STEPS:
    fn = jax.jit(make_train_step(obj, tx, sched, accum))
    if key is None:
      return fn
    _STEPS[key] = fn
  return _STEPS[key]


def _mesh1():
  return make_mesh({"data": 1}, jax.devices()[:1])


def _side(batch, side):
  return {k: jnp.asarray(batch[f"{side}_{k}"]) for k in ("tokens", "positions", "segment_ids",
                                                          "loss_mask")}  # fmt: skip


def _rewards(rm, params, batch, side):
  rows = _side(batch, side)
  return rm.apply(params, rows["tokens"], positions=rows["positions"],
                  segment_ids=rows["segment_ids"], loss_mask=rows["loss_mask"])  # fmt: skip


def test_bt_at_a_zero_head_is_log2_with_the_hand_gradient():
  obj = BTObjective(CFG)
  params = _params(obj)
  params["reward_head"] = jax.tree.map(jnp.zeros_like, params["reward_head"])
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  model = Transformer(CFG)

  @jax.jit
  def run(p):
    def h_last(side):
      rows = _side(batch, side)
      h = model.apply({"params": p}, rows["tokens"], positions=rows["positions"],
                      segment_ids=rows["segment_ids"], heads=()).hidden  # fmt: skip
      return h[jnp.arange(8), last_token_index(rows["segment_ids"])]

    out = jax.value_and_grad(lambda q: obj.loss(q, batch, 0), has_aux=True)(p)
    return out, h_last("chosen") - h_last("rejected")

  ((loss, m), g), dh = run(params)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  assert float(m["accuracy"]) == 0.0 and float(m["margin"]) == 0.0  # ties count as wrong
  # dL/dw = mean_b -(1 - sigma(0)) (h_w - h_l) = -0.5 mean_b (h_w - h_l) at the last tokens.
  hand = -0.5 * jnp.mean(dh, axis=0)
  np.testing.assert_allclose(g["reward_head"]["Dense_0"]["kernel"][:, 0], hand, atol=1e-6)
  np.testing.assert_allclose(g["reward_head"]["Dense_0"]["bias"], 0.0, atol=1e-7)


@pytest.mark.parametrize("name", ["bt", "gpm", "crm"])
def test_steps_fit_a_batch(name):
  if name == "bt":
    obj = BTObjective(CFG, margin=0.1, tau=0.5)
  elif name == "gpm":
    obj = GPMObjective(CFG.replace(heads=()), k=2, gate=True)
  else:
    obj = CRMObjective(CFG, noise_rate=0.25, knows_flips=True)
  mesh = _mesh1()
  state, _, tx, sched = _init(obj, mesh)
  flipped = np.zeros(8, bool)
  flipped[:2] = True
  batch = {k: jnp.asarray(v) for k, v in _batch(flipped=flipped).items()}

  # The first step's loss is the pure loss on separately computed rewards / representations.
  @jax.jit
  def reference(p):
    o_w, o_l = (_rewards(obj.rm, p, batch, s) for s in ("chosen", "rejected"))
    if name == "bt":
      return bradley_terry_loss(chosen_rewards=o_w.rewards, rejected_rewards=o_l.rewards,
                                margin=0.1, tau=0.5)[0]  # fmt: skip
    return gpm_loss(chosen_emb=o_w.emb, rejected_emb=o_l.emb, gate_logits=o_w.gate_logits)[0]

  want = None if name == "crm" else reference(state.params)
  with jax.set_mesh(mesh):
    step = jax.jit(make_train_step(obj, tx, sched), donate_argnums=(0,))
    losses = []
    for _ in range(25):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
  if want is not None:
    np.testing.assert_allclose(losses[0], want, rtol=1e-5)
  assert losses[-1] < 0.5 * losses[0], losses
  assert float(m["lr"]) == pytest.approx(1e-2)
  # CRM fits only the pairs the peers keep (6 of 8 at a time).
  assert float(m["accuracy"]) >= (0.75 if name == "crm" else 1.0)
  if name == "crm":
    assert float(m["keep_ratio"]) == pytest.approx(0.75) and float(m["num_selected"]) == 6
    assert float(m["clean_fraction_batch"]) == pytest.approx(0.75)
    assert 0.0 <= float(m["clean_fraction_trains_A"]) <= 1.0
    assert float(m["grad_norm_A"]) > 0 and float(m["grad_norm_B"]) > 0


def test_crm_trains_each_model_only_on_its_peers_picks():
  obj = CRMObjective(CFG, noise_rate=0.4)
  bt = BTObjective(CFG)
  params = _params(obj, seed=1)
  batch = {k: jnp.asarray(v) for k, v in _batch(10, seed=3).items()}
  run = jax.jit(lambda p: (obj.masks(p, batch, 0), obj.scores(p, batch),
                           jax.grad(lambda q: obj.loss(q, batch, 0)[0])(p)))  # fmt: skip
  (mask_a, mask_b), margins, grads = run(params)
  assert int(mask_a.sum()) == int(mask_b.sum()) == math.ceil(0.6 * 10)
  # The masks are the peers' picks: B's largest margins train A, A's train B.
  for mask, peer in ((mask_a, "margin_B"), (mask_b, "margin_A")):
    np.testing.assert_array_equal(np.flatnonzero(mask), np.sort(np.argsort(-margins[peer])[:6]))
  # Each RM's gradient is BT on the sub-batch its peer picked: the other pairs give exactly 0.
  bt_grad = jax.jit(jax.grad(lambda p, sub: bt.loss(p, sub, 0)[0]))
  for m, mask in (("A", mask_a), ("B", mask_b)):
    want = bt_grad(params[m], {k: v[np.asarray(mask)] for k, v in batch.items()})
    for a, b in zip(jax.tree.leaves(grads[m]), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)
  # Self review (the ablation) trains each RM on its own picks.
  self_obj = CRMObjective(CFG, noise_rate=0.4, selection="self")
  self_a, self_b, _ = self_obj._select(margins["margin_A"], margins["margin_B"], 0)
  np.testing.assert_array_equal(self_a, mask_b)
  np.testing.assert_array_equal(self_b, mask_a)


def test_crm_with_keep_ratio_one_is_two_independent_bt_models():
  mesh = _mesh1()
  crm, bt = CRMObjective(CFG, noise_rate=0.0), BTObjective(CFG)
  state, _, tx, sched = _init(crm, mesh, opt=SGD)
  bt_state, _, bt_tx, bt_sched = _init(bt, mesh, opt=SGD)
  batch = {k: jnp.asarray(v) for k, v in _batch(seed=5).items()}
  with jax.set_mesh(mesh):
    new, m = jax.jit(make_train_step(crm, tx, sched))(state, batch)
    bt_step = _step(bt, bt_tx, bt_sched, key="bt_sgd")
    for name in ("A", "B"):
      p = state.params[name]
      bt_new, bt_m = bt_step(bt_state.replace(params=p, opt_state=bt_tx.init(p)), batch)
      np.testing.assert_allclose(m[f"loss_{name}"], bt_m["loss"], rtol=1e-6)
      np.testing.assert_allclose(m[f"grad_norm_{name}"], bt_m["grad_norm"], rtol=1e-5)
      for a, b in zip(jax.tree.leaves(new.params[name]), jax.tree.leaves(bt_new.params),
                      strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_accumulation_equals_one_batch():
  mesh = _mesh1()
  obj = BTObjective(CFG)
  state, _, tx, sched = _init(obj, mesh, opt=SGD)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  with jax.set_mesh(mesh):
    s1, m1 = _step(obj, tx, sched, key="bt_sgd")(state, batch)
    s4, m4 = jax.jit(make_train_step(obj, tx, sched, 4))(state, batch)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="accum_steps must be 1"):
    make_train_step(CRMObjective(CFG), tx, sched, 2)


def test_pair_feeder_state_and_reorder():
  data = PreferenceData(_pairs(10), np.arange(10) % 3 == 0)
  mesh = _mesh1()
  calls = []

  def reorder():
    calls.append(1)
    return np.arange(10)[::-1]

  f = PairFeeder(data, TOK, seq_len=10, batch_size=4, mesh=mesh, seed=0, reorder=reorder)
  first = [np.asarray(f.next()[0]["index"]) for _ in range(2)]  # epoch 0: 2 batches of 4
  assert len(set(np.concatenate(first).tolist())) == 8 and not calls
  b, n_tokens = f.next()  # epoch 1 starts: the reorder's permutation
  assert calls == [1] and f.epoch == 1
  np.testing.assert_array_equal(b["index"], [9, 8, 7, 6])
  np.testing.assert_array_equal(b["flipped"], [True, False, False, True])
  assert n_tokens == int(
    np.sum(b["chosen_segment_ids"] != 0) + np.sum(b["rejected_segment_ids"] != 0)
  )
  state = json.loads(json.dumps(f.get_state()))
  g = PairFeeder(data, TOK, seq_len=10, batch_size=4, mesh=mesh, seed=0, state=state,
                 reorder=lambda: np.arange(10))  # fmt: skip
  np.testing.assert_array_equal(g.next()[0]["index"], f.next()[0]["index"])  # [5, 4, 3, 2]
  np.testing.assert_array_equal(g.next()[0]["index"], np.arange(4))  # g's own next epoch
  with pytest.raises(ValueError, match="fewer than one batch"):
    PairFeeder(data, TOK, seq_len=10, batch_size=16, mesh=mesh, seed=0)


def _tiny(**over):
  from configs.reward_bt import get_config

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


def _read(workdir, key, last=False):
  """{step: value} from metrics.jsonl (the first record of a step, or the last)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  out = {}
  for r in recs:
    if key in r and (last or r["step"] not in out):
      out[r["step"]] = r[key]
  return out


def test_crm_by_name_and_its_curriculum_across_a_resume(tmp_path):
  # A BT config swapped to CRM by name; 20 pairs in batches of 8 = 2 steps per epoch, so
  # epoch 1 (the first curriculum order) starts at step 3 and epoch 2 at step 5.
  over = {"loss": "crm", "data.task_kwargs.num_train_pairs": 20, "data.task_kwargs.noise_rate": 0.4,
          "train.num_steps": 4, "train.ckpt_every": 3, "train.eval_every": 0, "train.log_every": 1,
          "train.async_checkpoint": False, "centering.enabled": False,
          "model.num_layers": 1}  # fmt: skip
  wd = str(tmp_path / "run")
  first = get_trainer("reward_model")(_tiny(**over), wd)
  assert first["step"] == 4 and "train/loss_A" in first and "train/clean_fraction_trains_B" in first
  with open(os.path.join(wd, "checkpoints", "3", "data", "metadata")) as f:
    saved = json.load(f)
  assert saved["epoch"] == 1 and saved["pos"] == 8 and sorted(saved["order"]) == list(range(20))
  assert saved["order"] != np.random.default_rng([0, 1]).permutation(20).tolist()  # not random
  ref = {k: _read(wd, k) for k in ("train/loss", "train/clean_fraction_batch")}
  # Lose step 4's checkpoint (a crash before it was written), then resume from step 3: step 4
  # must see the same params and the saved curriculum order, i.e. the same pairs and loss.
  shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
  resumed = get_trainer("reward_model")(_tiny(**{**over, "train.num_steps": 6}), wd)
  assert resumed["step"] == 6
  got = {k: _read(wd, k, last=True) for k in ref}
  assert set(got["train/loss"]) == set(range(1, 7))
  for k in ref:
    np.testing.assert_allclose(got[k][4], ref[k][4], rtol=1e-5, err_msg=k)
  with open(os.path.join(wd, "checkpoints", "6", "data", "metadata")) as f:
    assert json.load(f)["epoch"] == 2  # a new curriculum order was computed after the resume


def _sharded_steps(obj, mesh_cfg, devices, steps=2):
  mesh = make_mesh(mesh_cfg, devices)
  state, shardings, tx, sched = _init(obj, mesh, seed=3, opt=SGD)
  raw = _batch(8, seed=7, flipped=np.arange(8) % 4 == 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in raw.items()}
    shard_batch = {k: batch_sharding(mesh, v.ndim) for k, v in raw.items()}
    step = jax.jit(make_train_step(obj, tx, sched), in_shardings=(shardings, shard_batch),
                   out_shardings=(shardings, None), donate_argnums=(0,))  # fmt: skip
    metrics = []
    for _ in range(steps):
      state, m = step(state, batch)
      metrics.append(jax.device_get(m))
  return state, metrics


@pytest.mark.parametrize("name", ["gpm", "crm"])
def test_sharded_step_equals_single_device(name):
  assert jax.device_count() == 8
  if name == "gpm":
    obj = GPMObjective(CFG.replace(heads=()), k=2, gate=True)
  else:
    obj = CRMObjective(CFG, noise_rate=0.25, knows_flips=True)
  s1, m1 = _sharded_steps(obj, {"data": 1}, jax.devices()[:1])
  s8, m8 = _sharded_steps(obj, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
  for a, b in zip(m1, m8, strict=True):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5)
  # The params and optimizer state really are sharded by their logical axes (embed over fsdp).
  if name == "gpm":
    p = s8.params["gpm_head"]["value"]["kernel"]
  else:
    p = s8.params["A"]["reward_head"]["Dense_0"]["kernel"]
  assert p.sharding.spec[0] == "fsdp"
  up = (s8.params["trunk"] if name == "gpm" else s8.params["B"])["layer_0"]["mlp"]["up"]["kernel"]
  assert tuple(up.sharding.spec) == ("fsdp", "tensor")


def test_reward_centring_bias_by_hand():
  # A reward head with zero weights and bias 0.7 scores every response 0.7: b = 0.7, and CRM
  # reports one bias per RM.
  obj = CRMObjective(CFG)
  params = _params(obj)
  for m, b in (("A", 0.7), ("B", -0.2)):
    head = params[m]["reward_head"]["Dense_0"]
    params[m]["reward_head"]["Dense_0"] = {"kernel": jnp.zeros_like(head["kernel"]),
                                           "bias": jnp.full_like(head["bias"], b)}  # fmt: skip
  refs = [Example("q", w) for w in ("ab", "cde", "f", "gh", "abcd")]
  mesh = make_mesh({"data": 2}, jax.devices()[:2])
  with jax.set_mesh(mesh):
    bias = reward_centring(obj, params, refs, TOK, seq_len=10, batch_size=4, mesh=mesh)
  assert bias == pytest.approx({"reward_bias_A": 0.7, "reward_bias_B": -0.2}, abs=1e-6)
  assert reward_centring(GPMObjective(CFG), None, refs, TOK, seq_len=10, batch_size=4,
                         mesh=mesh) == {}  # fmt: skip


def test_objective_config_errors():
  from configs.reward_bt import get_config

  c = get_config("tiny")
  c.unlock()
  c.loss = "gpm"
  c.gpm.kk = 2
  with pytest.raises(TypeError, match="config.gpm: .*'kk'"):
    make_objective(c, CFG)
  c.loss = "bpo"
  with pytest.raises(KeyError, match="Did you mean 'gpm' or 'crm'|Known reward objectives"):
    make_objective(c, CFG)
  with pytest.raises(ValueError, match="selection must be 'peer' or 'self'"):
    CRMObjective(CFG, selection="peers")
