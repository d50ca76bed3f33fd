"""Sharding on 8 fake CPU devices: init and train step equal the single-device ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from critic_jax.models import ModelConfig, Transformer
from critic_jax.parallel import (
  DEFAULT_RULES,
  batch_sharding,
  make_mesh,
  mesh_shape_from_config,
  rules_from_config,
)
from critic_jax.train.optim import make_optimizer
from critic_jax.train.sft import make_train_step
from critic_jax.train.state import init_train_state

CFG = ModelConfig.preset("tiny", vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2,
                         head_dim=8, mlp_dim=64, attention_block=4)  # fmt: skip
OPT = {"name": "adamw", "lr": 1e-2, "warmup_steps": 0, "clip_norm": 1.0, "weight_decay": 0.1}


def _batch(b=8, t=12):
  rng = np.random.RandomState(0)
  tokens = rng.randint(4, 64, (b, t)).astype(np.int32)
  seg = (np.arange(t)[None] < rng.randint(6, t + 1, b)[:, None]).astype(np.int32)
  return {
    "tokens": tokens * seg,
    "segment_ids": seg,
    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
    "loss_mask": (np.arange(t)[None] >= 3) & (seg == 1),
  }


def _run(mesh_cfg, devices, accum=1, steps=2, cfg=CFG):
  model = Transformer(cfg)
  tx, sched = make_optimizer(OPT, 10)
  mesh = make_mesh(mesh_cfg, devices)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    state, shardings = init_train_state(
      lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], tx, jax.random.PRNGKey(3),
      mesh, DEFAULT_RULES,
    )  # fmt: skip
    init_params = jax.device_get(state.params)
    step = jax.jit(
      make_train_step(model, tx, sched, "sft", accum),
      in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
      donate_argnums=(0,),
    )  # fmt: skip
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in _batch().items()}
    losses = []
    for _ in range(steps):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
  return init_params, state, losses


@pytest.fixture(scope="module")
def single():
  return _run({"data": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def sharded():
  assert jax.device_count() == 8
  return _run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())


def test_sharded_init_equals_single_device(single, sharded):
  for a, b in zip(jax.tree.leaves(single[0]), jax.tree.leaves(sharded[0]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_params_are_sharded_as_the_rules_say(sharded):
  params = sharded[1].params
  up = params["layer_0"]["mlp"]["up"]["kernel"]  # logical (embed, mlp)
  assert up.sharding.spec == P("fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (CFG.d_model // 2, CFG.mlp_dim // 2)
  q = params["layer_1"]["attn"]["q"]["kernel"]  # (embed, heads, head_dim)
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  emb = params["embed"]["embedding"]  # (vocab, embed)
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert params["final_norm"]["scale"].sharding.spec == P(None)
  # Adam's moments follow their parameters.
  mu = sharded[1].opt_state[1][0].mu["layer_0"]["mlp"]["up"]["kernel"]
  assert mu.sharding.spec == P("fsdp", "tensor")


def test_sharded_train_steps_equal_single_device(single, sharded):
  np.testing.assert_allclose(sharded[2], single[2], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single[1].params), jax.tree.leaves(sharded[1].params),
                  strict=True):  # fmt: skip
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_sharded_xla_attention_steps_equal_single_device(single):
  """attention_impl="xla" on the 2x2x2 mesh trains like the single-device model with
  the CPU's default ("auto" -> "blocked", 3 query blocks of 4)."""
  assert CFG.resolved_attention_impl == "blocked"
  cfg = CFG.replace(attention_impl="xla")
  _, state, losses = _run({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), cfg=cfg)
  np.testing.assert_allclose(losses, single[2], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single[1].params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def test_mesh_and_rules_config_errors():
  assert mesh_shape_from_config({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(KeyError, match="config.mesh.model"):
    mesh_shape_from_config({"model": 2}, 8)
  with pytest.raises(ValueError, match="needs 12 devices"):
    mesh_shape_from_config({"data": 3, "fsdp": 4}, 8)
  with pytest.raises(ValueError, match="unknown mesh axis 'tp'"):
    rules_from_config([("mlp", "tp")])
  # A misspelt logical axis would leave the parameters it names replicated, silently.
  with pytest.raises(ValueError, match=r"config.sharding_rules: .*'mpl'; did you mean 'mlp'\?"):
    rules_from_config([("mpl", "tensor")])
  assert rules_from_config([["act_batch", ["data", "fsdp"]]]) == (("act_batch", ("data", "fsdp")),)


def test_indivisible_dims_are_replicated_not_rejected():
  # 1 kv head cannot be split over tensor=2: that dim falls back to replication.
  cfg = CFG.replace(num_kv_heads=1)
  model = Transformer(cfg)
  tx, _ = make_optimizer(OPT, 10)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    state, _ = init_train_state(
      lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], tx, jax.random.PRNGKey(0),
      mesh, DEFAULT_RULES,
    )  # fmt: skip
  assert state.params["layer_0"]["attn"]["k"]["kernel"].sharding.spec == P("fsdp", None, None)
