"""scripts/convert_hf.py: HF folder -> critic_jax params -> HF folder, and trainer workdir -> HF."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from critic_jax.data import CharTokenizer, HFTokenizer
from critic_jax.interop import HFInteropError, hf_to_model_config, load_hf_params, save_hf
from critic_jax.interop.hf_weights import abstract_params
from critic_jax.models import ModelConfig
from critic_jax.parallel import strip_boxes
from critic_jax.train.checkpoint import Checkpointer
from critic_jax.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def convert():
  spec = importlib.util.spec_from_file_location(
    "convert_hf", os.path.join(ROOT, "scripts", "convert_hf.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _params(cfg, seed=0):
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32),
    strip_boxes(abstract_params(cfg)),
  )


def _assert_equal(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, x), (_, y) in zip(fa, fb, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_hf_to_jax_and_back(convert, tmp_path):
  cfg = ModelConfig.preset("tiny_qwen3", vocab_size=64, d_model=32, mlp_dim=48, head_dim=16)
  params = _params(cfg)
  save_hf(tmp_path / "hf", params, cfg)
  convert.main(["to_jax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "jax"),
                "--heads", "lm,value"])  # fmt: skip
  meta = json.load(open(tmp_path / "jax" / convert.MODEL_FILE))
  assert meta["hf_family"] == "qwen3" and meta["model_config"]["heads"] == ["lm", "value"]
  convert.main(["to_hf", "--params", str(tmp_path / "jax"), "--out", str(tmp_path / "hf2")])
  back = load_hf_params(
    tmp_path / "hf2", hf_to_model_config(tmp_path / "hf2", heads=("lm", "value"))
  )
  orig = load_hf_params(tmp_path / "hf", hf_to_model_config(tmp_path / "hf", heads=("lm", "value")))
  _assert_equal(back, orig)  # the freshly initialised value head travels too
  assert json.load(open(tmp_path / "hf2" / "config.json"))["architectures"] == ["Qwen3ForCausalLM"]


def _fake_run(workdir, model: dict, params, extra=None):
  """What a trainer leaves behind: config.json and an orbax checkpoint of the TrainState."""
  os.makedirs(workdir)
  run = {"trainer": "sft", "model": model, "tokenizer": {"name": "char", "path": ""}}
  run.update(extra or {})
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(run, f)
  tx = optax.adamw(1e-3)
  state = TrainState(step=jnp.asarray(7, jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(0))  # fmt: skip
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(7, state, {"epoch": 0})
  ckpt.close()


def test_trainer_workdir_to_hf(convert, tmp_path):
  cfg = ModelConfig.preset("tiny", vocab_size=CharTokenizer().vocab_size, d_model=32, mlp_dim=48)
  params = _params(cfg, 1)
  _fake_run(tmp_path / "run", json.loads(json.dumps(cfg.to_configdict().to_dict())), params)
  convert.main(["to_hf", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                "--dtype", "bfloat16"])  # fmt: skip
  back = load_hf_params(tmp_path / "hf", cfg)
  rounded = jax.tree.map(
    lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params
  )
  _assert_equal(back, rounded)
  # The run's char tokenizer was converted: same ids through transformers.
  tok = HFTokenizer(str(tmp_path / "hf"))
  assert tok.encode("12+7=19") == CharTokenizer().encode("12+7=19") and tok.bos_id == 1

  # A run started from an HF folder takes its architecture from there.
  hf_cfg = ModelConfig.preset("tiny_gpt2", vocab_size=64, d_model=32, mlp_dim=48)
  save_hf(tmp_path / "base", _params(hf_cfg, 2), hf_cfg)
  runtime = ModelConfig(heads=("lm", "value")).to_configdict().to_dict()  # stale shapes
  tuned = _params(hf_cfg.replace(heads=("lm", "value")), 3)
  _fake_run(tmp_path / "run2", json.loads(json.dumps(runtime)), tuned,
            {"init": {"hf_path": str(tmp_path / "base")}})  # fmt: skip
  convert.main(["to_hf", "--workdir", str(tmp_path / "run2"), "--out", str(tmp_path / "hf2"),
                "--tokenizer", "none"])  # fmt: skip
  assert json.load(open(tmp_path / "hf2" / "config.json"))["architectures"] == ["GPT2LMHeadModel"]
  _assert_equal(load_hf_params(tmp_path / "hf2", hf_cfg.replace(heads=("lm", "value"))), tuned)
  with pytest.raises(HFInteropError, match="no checkpoint 3"):
    convert.main(["to_hf", "--workdir", str(tmp_path / "run2"), "--out", str(tmp_path / "x"),
                  "--step", "3"])  # fmt: skip
