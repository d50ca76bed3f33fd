"""`config.init.hf_path`: trainers start from a local transformers folder."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from critic_jax.critics.reward_model import RewardModel
from critic_jax.data import CharTokenizer
from critic_jax.interop import save_hf
from critic_jax.interop.hf_weights import abstract_params
from critic_jax.models import ModelConfig
from critic_jax.parallel import DEFAULT_RULES, make_mesh, strip_boxes
from critic_jax.train import get_trainer
from critic_jax.train.checkpoint import load_params
from critic_jax.train.common import build_model, fresh_state, model_config_from
from tests.test_train import _tiny as _tiny_sft


def _random_params(cfg, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32),
    strip_boxes(abstract_params(cfg)),
  )


def _assert_tree_equal(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, x), (_, y) in zip(fa, fb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """A 1-layer Qwen3-style causal LM over the char vocabulary, saved as transformers would."""
  cfg = ModelConfig.preset(
    "tiny_qwen3", vocab_size=CharTokenizer().vocab_size, d_model=32, mlp_dim=48, head_dim=16,
    num_layers=1,
  )  # fmt: skip
  params = _random_params(cfg, 7)
  path = tmp_path_factory.mktemp("hf") / "qwen3"
  save_hf(path, params, cfg)
  return str(path), cfg, params


def test_model_config_comes_from_the_folder(hf_folder):
  path, hf_cfg, _ = hf_folder
  c = _tiny_sft(**{"init.hf_path": path})
  mcfg = model_config_from(c, CharTokenizer().vocab_size)
  assert (mcfg.num_layers, mcfg.d_model, mcfg.qk_norm) == (1, 32, True)  # not config.model's 2
  assert mcfg.heads == tuple(c.model.heads)  # runtime fields stay the config's
  with pytest.raises(ValueError, match="vocab_size of .*config.init.hf_path"):
    model_config_from(c, hf_cfg.vocab_size + 1)


def test_sharded_fresh_state_holds_the_hf_weights(hf_folder):
  path, hf_cfg, params = hf_folder
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  mcfg = hf_cfg.replace(heads=("lm", "value"))
  _, init_params = build_model(mcfg)
  tx = optax.adamw(1e-3)
  with jax.set_mesh(mesh):
    state, shardings = fresh_state(
      init_params, tx, 0, mesh, DEFAULT_RULES, {"hf_path": path, "checkpoint": ""}, mcfg
    )
  loaded = {k: v for k, v in state.params.items() if k != "value_head"}
  _assert_tree_equal(loaded, params)
  assert "value_head" in state.params  # a head the folder lacks is freshly initialised
  for leaf, sh in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params),
                      strict=True):  # fmt: skip
    assert leaf.sharding == sh
  # Adam's moments restart at zero for the new params.
  mu = state.opt_state[0].mu
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(mu))
  with pytest.raises(ValueError, match="not both"):
    fresh_state(init_params, tx, 0, mesh, DEFAULT_RULES, {"hf_path": path, "checkpoint": "x"},
                mcfg)  # fmt: skip


def test_two_reward_models_both_start_from_the_folder(hf_folder):
  """CRM's params are {"A": rm, "B": rm}: the folder is grafted into each."""
  path, hf_cfg, params = hf_folder
  mesh = make_mesh({"data": -1})
  mcfg = hf_cfg.replace(heads=("reward",))
  rm = RewardModel(mcfg)

  def init_params(rng):
    a, b = jax.random.split(rng)
    return {"A": rm.init(a), "B": rm.init(b)}

  with jax.set_mesh(mesh):
    state, _ = fresh_state(init_params, optax.sgd(0.1), 0, mesh, DEFAULT_RULES,
                           {"hf_path": path}, mcfg)  # fmt: skip
  trunk_keys = set(params) - {"lm_head"}
  for m in ("A", "B"):
    _assert_tree_equal({k: state.params[m][k] for k in trunk_keys},
                       {k: params[k] for k in trunk_keys})  # fmt: skip
    assert "reward_head" in state.params[m]
  # Heads the folder lacks are initialised once, from one key: A and B start equal.
  _assert_tree_equal(state.params["A"]["reward_head"], state.params["B"]["reward_head"])


def _first_loss(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return next(r["train/loss"] for r in rows if r.get("step") == 1 and "train/loss" in r)


def test_sft_from_hf_trains_the_folder_weights(hf_folder, tmp_path):
  """The trainer starts from the folder's weights and architecture, end to end.

  With lr=0 the step-1 checkpoint is the start; it must equal the folder's weights.
  A second run started from that checkpoint (init.checkpoint, same architecture)
  sees the same first-step loss; a random start does not.
  """
  path, _, params = hf_folder
  one = {"train.num_steps": 1, "train.log_every": 1, "train.eval_every": 0,
         "train.ckpt_every": 1, "optimizer.lr": 0.0}  # fmt: skip
  from_hf = str(tmp_path / "from_hf")
  c_hf = _tiny_sft(**one, **{"init.hf_path": path})
  get_trainer("sft")(c_hf, from_hf)
  mcfg = model_config_from(c_hf, None)
  _, init_params = build_model(mcfg)
  abstract = strip_boxes(jax.eval_shape(init_params, jax.random.PRNGKey(0)))
  _assert_tree_equal(load_params(from_hf, abstract), params)

  arch = {f"model.{k}": v for k, v in mcfg.to_configdict().to_dict().items()}
  from_ckpt = str(tmp_path / "from_ckpt")
  get_trainer("sft")(_tiny_sft(**one, **arch, **{"init.checkpoint": from_hf}), from_ckpt)
  np.testing.assert_allclose(_first_loss(from_ckpt), _first_loss(from_hf), rtol=1e-6)
  rand = str(tmp_path / "random")
  get_trainer("sft")(_tiny_sft(**one, **arch), rand)
  assert abs(_first_loss(rand) - _first_loss(from_hf)) > 1e-3
