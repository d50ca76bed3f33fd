"""HF config mapping (v4 and v5 layouts), what is unsupported, and the error messages.

Checkpoint folders here are written by `save_hf` (whose output transformers
loads, see test_hf_families.py) and then broken on purpose; no torch needed.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from critic_jax.interop import (
  FAMILIES,
  HEADS_FILE,
  HFInteropError,
  export_layout,
  hf_to_model_config,
  infer_family,
  load_hf_params,
  model_config_from_hf,
  model_to_hf_config,
  save_hf,
)
from critic_jax.interop.hf_weights import abstract_params
from critic_jax.models import ModelConfig
from critic_jax.parallel import strip_boxes

LLAMA = dict(
  architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100, hidden_size=32,
  intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
  rms_norm_eps=1e-5, max_position_embeddings=256, hidden_act="silu",
)  # fmt: skip
GPT2 = dict(
  architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=100, n_embd=32, n_layer=1,
  n_head=4, n_positions=64, activation_function="gelu_new", layer_norm_epsilon=1e-5,
)  # fmt: skip
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 128}  # fmt: skip


def test_v5_and_v4_rope_layouts_give_the_same_config():
  v5 = dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
  v4 = dict(LLAMA, rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3})
  a, b = hf_to_model_config(v5), hf_to_model_config(v4)
  assert a == b
  assert a.rope_theta == 500000.0 and a.rope_scaling == {"rope_type": "llama3", **LLAMA3}
  assert (a.d_model, a.num_heads, a.num_kv_heads, a.resolved_head_dim, a.mlp_dim) == (
    32, 4, 2, 8, 48,
  )  # fmt: skip
  assert a.norm_eps == 1e-5 and a.heads == ("lm",) and not a.tie_embeddings
  # llama3 without original_max_position_embeddings falls back to max_position_embeddings.
  no_orig = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
  c = hf_to_model_config(dict(LLAMA, rope_scaling={"rope_type": "llama3", **no_orig}))
  assert c.rope_scaling["original_max_position_embeddings"] == 256
  # No RoPE fields at all: HF's default theta.
  assert hf_to_model_config(LLAMA).rope_theta == 10000.0


@pytest.mark.parametrize(
  "change, needle",
  [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                           "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(architectures=["FalconForCausalLM"], model_type="falcon"), "FalconForCausalLM"),
    (dict(architectures=["LlamaForSequenceClassification"], num_labels=3), "3 labels"),
  ],
)  # fmt: skip
def test_unsupported_configs_raise_naming_what_was_found(change, needle):
  with pytest.raises(HFInteropError) as e:
    hf_to_model_config(dict(LLAMA, **change))
  assert needle in str(e.value)
  if "Falcon" in needle:  # the message lists what is supported
    assert "LlamaForCausalLM" in str(e.value) and "GPT2LMHeadModel" in str(e.value)


@pytest.mark.parametrize(
  "change, needle",
  [
    (dict(activation_function="gelu"), "activation_function='gelu'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(scale_attn_weights=False), "scale_attn_weights"),
  ],
)
def test_unsupported_gpt2_variants_raise(change, needle):
  with pytest.raises(HFInteropError, match=needle):
    hf_to_model_config(dict(GPT2, **change))


def test_sliding_windows():
  qwen2 = dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=2)
  assert hf_to_model_config(dict(qwen2, sliding_window=16)).sliding_window is None  # not used
  on = dict(qwen2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
  assert hf_to_model_config(on).sliding_window == 16
  with pytest.raises(HFInteropError, match="some layers only"):
    hf_to_model_config(dict(on, max_window_layers=1))
  mistral = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral")
  assert hf_to_model_config(dict(mistral, sliding_window=None)).sliding_window is None
  assert hf_to_model_config(dict(mistral, sliding_window=4096)).sliding_window == 4096


def test_runtime_fields_come_from_the_user_config():
  base = ModelConfig(d_model=96, heads=("lm", "value"), param_dtype="bfloat16", scan_layers=True)
  cfg = model_config_from_hf(LLAMA, base.to_configdict())
  assert cfg.d_model == 32 and cfg.heads == ("lm", "value")
  assert cfg.param_dtype == "bfloat16" and cfg.scan_layers
  recompute = model_config_from_hf(LLAMA, ModelConfig(swiglu_recompute=True).to_configdict())
  assert recompute.swiglu_recompute


def test_rope_scaling_written_with_the_v4_key_reads_back():
  """A config whose rope_scaling used transformers v4's "type" key is exported with one
  rope_type; folders written before that (rope_type "default" beside type "linear", which
  transformers reads as linear) are read as linear too."""
  cfg = ModelConfig(vocab_size=50, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    rope_scaling={"type": "linear", "factor": 4.0})  # fmt: skip
  hf = model_to_hf_config(cfg, export_layout(cfg), bos_token_id=1, eos_token_id=2)
  assert hf["rope_parameters"]["rope_type"] == "linear" and "type" not in hf["rope_parameters"]
  assert hf_to_model_config(json.loads(json.dumps(hf))) == cfg
  old = dict(LLAMA, rope_parameters={"rope_type": "default", "type": "linear", "factor": 4.0,
                                     "rope_theta": 10000.0})  # fmt: skip
  assert hf_to_model_config(old).rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_attention_and_mlp_biases_map_separately():
  """Llama's attention_bias and mlp_bias, and Qwen3's attention_bias (its MLP has none), are
  separate switches: no MLP biases appear that the checkpoint lacks."""
  both = hf_to_model_config(dict(LLAMA, attention_bias=True, mlp_bias=True))
  assert both.out_bias and both.resolved_mlp_bias and both.mlp_bias is None
  attn = hf_to_model_config(dict(LLAMA, attention_bias=True, mlp_bias=False))
  assert attn.qkv_bias and attn.out_bias and not attn.resolved_mlp_bias
  mlp = hf_to_model_config(dict(LLAMA, attention_bias=False, mlp_bias=True))
  assert not mlp.out_bias and mlp.resolved_mlp_bias
  for cfg in (both, attn, mlp):
    assert export_layout(cfg).mlp_bias == cfg.resolved_mlp_bias
  qwen3 = dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=8,
               attention_bias=True)  # fmt: skip
  q = hf_to_model_config(qwen3)
  assert q.qk_norm and q.out_bias and not q.resolved_mlp_bias
  assert export_layout(q).family == "qwen3"


def test_infer_family():
  assert infer_family(ModelConfig.preset("tiny_gpt2")) == "gpt2"
  assert infer_family(ModelConfig.preset("tiny_qwen3")) == "qwen3"
  assert infer_family(ModelConfig(qkv_bias=True)) == "qwen2"
  assert infer_family(ModelConfig(sliding_window=8)) == "mistral"
  assert infer_family(ModelConfig()) == "llama"
  assert infer_family(ModelConfig(qkv_bias=True, out_bias=True)) == "llama"


CONFIGS = {
  "llama": ModelConfig(vocab_size=50, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                       norm_eps=1e-5, rope_theta=5e5, max_seq_len=128,
                       rope_scaling={"rope_type": "llama3", **LLAMA3}),
  "mistral": ModelConfig(vocab_size=50, d_model=32, num_heads=4, num_kv_heads=1, mlp_dim=48,
                         sliding_window=8, head_dim=16,
                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
  "qwen2": ModelConfig(vocab_size=50, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                       qkv_bias=True, tie_embeddings=True, sliding_window=16),
  "qwen3": ModelConfig(vocab_size=50, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48,
                       head_dim=16, qk_norm=True, qkv_bias=True, out_bias=True, mlp_bias=False),
  "gpt2": ModelConfig.preset("tiny_gpt2", vocab_size=50, d_model=32, mlp_dim=48),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["causal_lm", "sequence_classification"])
def test_written_config_reads_back_as_the_same_model(family, kind):
  cfg = CONFIGS[family]
  hf = model_to_hf_config(cfg, export_layout(cfg, family, kind), bos_token_id=1, eos_token_id=2)
  hf = json.loads(json.dumps(hf))  # what config.json holds
  back = hf_to_model_config(hf)
  assert back.replace(heads=cfg.heads) == cfg
  assert back.heads == (("lm",) if kind == "causal_lm" else ("reward",))
  assert hf["bos_token_id"] == 1 and hf["eos_token_id"] == 2


def test_export_layout_refuses_what_a_family_cannot_hold():
  with pytest.raises(HFInteropError, match=r"qk_norm=True \(needs False\)"):
    export_layout(CONFIGS["qwen3"], "llama")
  with pytest.raises(HFInteropError, match="sliding_window=8"):
    export_layout(CONFIGS["mistral"], "llama")
  with pytest.raises(HFInteropError, match="position='rope'"):
    export_layout(CONFIGS["llama"], "gpt2")
  with pytest.raises(HFInteropError, match="unknown HF family 'falcon'"):
    export_layout(CONFIGS["llama"], "falcon")


def _params(cfg, seed=0):
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32),
    strip_boxes(abstract_params(cfg)),
  )


def test_nonzero_params_a_family_lacks_are_refused_or_kept_beside(tmp_path, caplog):
  # Mistral has no biases: a nonzero one cannot be dropped silently.
  cfg = CONFIGS["mistral"].replace(out_bias=True)
  with pytest.raises(HFInteropError, match=r"layer_0/attn/o/bias.*mistral has no such"):
    save_hf(tmp_path / "m", _params(cfg), cfg, family="mistral")
  # Zero biases are fine (e.g. a Llama-with-MLP-bias import exported again).
  params = _params(cfg)
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.zeros_like(x) if p[-1].key == "bias" else x, params
  )
  save_hf(tmp_path / "m", params, cfg, family="mistral")
  # A reward head's bias has no place in a *ForSequenceClassification: kept beside.
  rcfg = CONFIGS["qwen2"].replace(heads=("reward",))
  rparams = _params(rcfg, 1)
  save_hf(tmp_path / "r", rparams, rcfg, "sequence_classification", pad_token_id=0)
  assert "reward_head/Dense_0/bias" in load_file(tmp_path / "r" / HEADS_FILE)
  assert "differ from critic_jax's" in caplog.text
  back = load_hf_params(tmp_path / "r", rcfg)
  np.testing.assert_array_equal(back["reward_head"]["Dense_0"]["bias"],
                                rparams["reward_head"]["Dense_0"]["bias"])  # fmt: skip


def test_export_needs_the_head_it_is_asked_for(tmp_path):
  cfg = CONFIGS["llama"].replace(heads=("value",))
  with pytest.raises(HFInteropError, match="needs an LM head"):
    save_hf(tmp_path, _params(cfg), cfg, "causal_lm")
  with pytest.raises(HFInteropError, match="needs a reward head"):
    save_hf(tmp_path, _params(cfg), cfg, "sequence_classification")
  rcfg = cfg.replace(heads=("reward",))
  with pytest.raises(HFInteropError, match="needs pad_token_id"):
    save_hf(tmp_path, _params(rcfg), rcfg, "sequence_classification")


@pytest.fixture
def ckpt(tmp_path):
  cfg = CONFIGS["llama"]
  params = _params(cfg)
  save_hf(tmp_path / "ok", params, cfg)
  return tmp_path / "ok", cfg, params


def _broken(ckpt, tmp_path):
  dst = tmp_path / "broken"
  shutil.copytree(ckpt[0], dst)
  return dst


def test_missing_folder_and_files(ckpt, tmp_path):
  folder, cfg, _ = ckpt
  with pytest.raises(HFInteropError, match="does not exist"):
    load_hf_params(tmp_path / "nope", cfg)
  d = _broken(ckpt, tmp_path)
  os.remove(d / "config.json")
  with pytest.raises(HFInteropError, match=r"no config.json in .* \(found: .*model.safetensors"):
    hf_to_model_config(d)
  d = tmp_path / "weights_gone"
  shutil.copytree(folder, d)
  os.remove(d / "model.safetensors")
  with pytest.raises(HFInteropError, match="no model.safetensors or model.safetensors.index.json"):
    load_hf_params(d, cfg)
  (d / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(HFInteropError, match=r"PyTorch pickles .*safetensors"):
    load_hf_params(d, cfg)


def test_sharded_index_with_a_missing_shard(ckpt, tmp_path):
  folder, cfg, params = ckpt
  save_hf(tmp_path / "sharded", params, cfg, max_shard_size=8_000)
  index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2
  _assert_equal(load_hf_params(tmp_path / "sharded", cfg), params)
  # Exporting again into the folder replaces the shards instead of mixing in.
  (tmp_path / "sharded" / "adapter.safetensors").write_bytes(b"not ours")
  save_hf(tmp_path / "sharded", params, cfg)
  assert sorted(f for f in os.listdir(tmp_path / "sharded") if "safetensors" in f) == [
    "adapter.safetensors", "model.safetensors",
  ]  # fmt: skip
  _assert_equal(load_hf_params(tmp_path / "sharded", cfg), params)
  save_hf(tmp_path / "sharded", params, cfg, max_shard_size=8_000)
  os.remove(tmp_path / "sharded" / files[1])
  with pytest.raises(HFInteropError, match=f"lists shard file.*{files[1]}.*not in"):
    load_hf_params(tmp_path / "sharded", cfg)


def test_mismatched_tensors_are_named(ckpt, tmp_path):
  d = _broken(ckpt, tmp_path)
  cfg = ckpt[1]
  tensors = dict(load_file(d / "model.safetensors"))
  key = "model.layers.0.self_attn.q_proj.weight"
  tensors[key] = np.zeros((16, 32), np.float32)
  del tensors["model.layers.0.mlp.up_proj.weight"]
  tensors["model.layers.7.extra.weight"] = np.zeros((2,), np.float32)
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
  save_file(tensors, d / "model.safetensors", {"format": "pt"})
  with pytest.raises(HFInteropError) as e:
    load_hf_params(d, cfg)
  msg = str(e.value)
  assert f"{key!r} in model.safetensors has shape [16, 32], expected [32, 32]" in msg
  assert "missing tensor 'model.layers.0.mlp.up_proj.weight' (expected shape [48, 32])" in msg
  assert "'model.layers.7.extra.weight'" in msg and "LlamaForCausalLM" in msg
  assert "'model.norm.weight' has dtype I8" in msg


def test_legacy_tensor_names_and_buffers_are_understood(tmp_path):
  # Old GPT-2 files name tensors without "transformer." and carry causal-mask
  # buffers; old Llama files carry rotary inv_freq buffers. Neither is a parameter.
  for family in ("gpt2", "llama"):
    cfg = CONFIGS[family]
    params = _params(cfg, 5)
    save_hf(tmp_path / family, params, cfg)
    tensors = dict(load_file(tmp_path / family / "model.safetensors"))
    if family == "gpt2":
      tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
      tensors["h.0.attn.bias"] = np.ones((1, 1, 8, 8), np.float32)
    else:
      tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((4,), np.float32)
    save_file(tensors, tmp_path / family / "model.safetensors", {"format": "pt"})
    _assert_equal(load_hf_params(tmp_path / family, cfg), params)


def test_model_config_must_match_the_checkpoint(ckpt):
  folder, cfg, _ = ckpt
  with pytest.raises(HFInteropError, match=r"model.d_model=64 but the checkpoint has 32"):
    load_hf_params(folder, cfg.replace(d_model=64))
  with pytest.raises(HFInteropError, match=r"model.rope_theta=10000.0 but the checkpoint has"):
    load_hf_params(folder, cfg.replace(rope_theta=10000.0))


def test_heads_the_checkpoint_lacks(ckpt, tmp_path, caplog):
  folder, cfg, params = ckpt
  full = cfg.replace(heads=("lm", "value", "reward"))
  p = load_hf_params(folder, full, rng=jax.random.PRNGKey(3))
  assert "has no value_head; initialising it" in caplog.text
  v, r = p["value_head"]["Dense_0"], p["reward_head"]["Dense_0"]
  assert v["kernel"].shape == (32, 1) and float(jnp.abs(v["bias"]).max()) == 0.0
  assert not np.allclose(v["kernel"], r["kernel"])  # independent draws
  assert 0.5 / 33 < float(jnp.std(v["kernel"])) < 2.0 / 33  # "std" init: N(0, 1/(D+1))
  with pytest.raises(HFInteropError, match=r"\(LlamaForCausalLM\) lacks a value_head"):
    load_hf_params(folder, cfg.replace(heads=("lm", "value")), init_missing_heads=False)
  # A reward model has no LM head (untied): asking for one names the file's class.
  trunk = {k: v for k, v in params.items() if k != "lm_head"}
  rm = full.replace(heads=("reward",))
  save_hf(tmp_path / "rm", {**trunk, "reward_head": p["reward_head"]}, rm,
          "sequence_classification", pad_token_id=0)  # fmt: skip
  with pytest.raises(HFInteropError, match=r"LlamaForSequenceClassification\) lacks an LM head"):
    load_hf_params(tmp_path / "rm", full.replace(heads=("lm", "reward")))


def _assert_equal(a, b):
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_export_dtype(ckpt, tmp_path):
  folder, cfg, params = ckpt
  save_hf(tmp_path / "bf16", params, cfg, dtype="bfloat16")
  hf = json.load(open(tmp_path / "bf16" / "config.json"))
  assert hf["dtype"] == hf["torch_dtype"] == "bfloat16"
  t = load_file(tmp_path / "bf16" / "model.safetensors")
  assert {str(x.dtype) for x in t.values()} == {"bfloat16"}
  back = load_hf_params(tmp_path / "bf16", cfg)
  x = np.asarray(params["embed"]["embedding"])
  y = np.asarray(back["embed"]["embedding"])
  assert y.dtype == np.float32 and 0 < np.abs(x - y).max() <= 2**-8 * np.abs(x).max()
  with pytest.raises(HFInteropError, match="dtype='int8'"):
    save_hf(tmp_path / "x", params, cfg, dtype="int8")
