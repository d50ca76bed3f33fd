"""HF interop per family: tiny random transformers models built from a config in PyTorch.

For each family (Llama with Llama-3.1 RoPE scaling, Llama with biases and linear
RoPE scaling, Mistral with a sliding window shorter than the batch, Qwen2 tied
and saved as HF shards, Qwen3 with head_dim != d_model / heads, GPT-2): logits
and sequence-classification scores agree with transformers in fp32 over a
right-padded batch; random critic_jax params exported and loaded by
transformers give our logits/scores; loading on an 8-device mesh (also with
scanned layers) equals the unsharded load and reads only per-device shards.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from critic_jax.interop import (
  HEADS_FILE,
  SafetensorsCheckpoint,
  hf_to_model_config,
  load_hf_params,
  save_hf,
)
from critic_jax.interop.hf_weights import abstract_params
from critic_jax.models import Transformer
from critic_jax.parallel import DEFAULT_RULES, make_mesh, strip_boxes

V, PAD = 300, 0
LENGTHS = (12, 8, 5)
COMMON = dict(
  vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FAMILIES = {
  "llama": lambda: transformers.LlamaConfig(
    **COMMON, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32},
  ),
  "llama_bias": lambda: transformers.LlamaConfig(
    **COMMON, attention_bias=True, mlp_bias=False, tie_word_embeddings=True,
    rope_parameters={"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0},
  ),
  "mistral": lambda: transformers.MistralConfig(
    **COMMON, sliding_window=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
  ),
  "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
  "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32, rms_norm_eps=1e-5),
  "gpt2": lambda: transformers.GPT2Config(
    vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64, bos_token_id=1,
    eos_token_id=2,
  ),
}  # fmt: skip
# Saved by transformers as several files with model.safetensors.index.json.
HF_SHARDED = ("qwen2", "gpt2")


def _perturb_torch(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # norms at 1 and biases at 0 would hide mapping mistakes
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))


def _batch():
  rng = np.random.RandomState(0)
  t = max(LENGTHS)
  seg = (np.arange(t)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  tokens = np.where(seg == 1, rng.randint(3, V, (len(LENGTHS), t)), PAD).astype(np.int32)
  return tokens, seg


def _torch_out(model, tokens, seg):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(seg))
  return out.logits.numpy()


def _ours(cfg, params, tokens, seg):
  return Transformer(cfg).apply(
    {"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(seg)
  )


def _assert_logits_close(ours, ref, seg):
  real = seg.astype(bool)  # padded positions are meaningless on both sides
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory):
  """One family: HF causal LM and reward model folders, and their reference outputs."""
  name = request.param
  root = tmp_path_factory.mktemp(name)
  torch.manual_seed(0)
  hf_cfg = FAMILIES[name]()
  lm = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
  _perturb_torch(lm, 1)
  shard = "100KB" if name in HF_SHARDED else "5GB"
  lm.save_pretrained(root / "lm", max_shard_size=shard)
  cls_cfg = FAMILIES[name]()
  cls_cfg.num_labels, cls_cfg.pad_token_id = 1, PAD
  rm = transformers.AutoModelForSequenceClassification.from_config(cls_cfg).eval()
  _perturb_torch(rm, 2)
  rm.save_pretrained(root / "rm")
  tokens, seg = _batch()
  return dict(
    name=name, root=root, lm=str(root / "lm"), rm=str(root / "rm"), tokens=tokens, seg=seg,
    lm_logits=_torch_out(lm, tokens, seg), rm_scores=_torch_out(rm, tokens, seg)[:, 0],
  )  # fmt: skip


def test_hf_files_are_what_the_family_claims(fam):
  # Guards the fixture itself: sharded families really are sharded, and the
  # configs exercise the features they are meant to.
  files = os.listdir(fam["lm"])
  assert ("model.safetensors.index.json" in files) == (fam["name"] in HF_SHARDED)
  cfg = hf_to_model_config(fam["lm"])
  expect = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama_bias": dict(qkv_bias=True, out_bias=True, tie_embeddings=True, rope_theta=500000.0,
                       rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(sliding_window=4, rope_theta=1e6),
    "qwen2": dict(qkv_bias=True, out_bias=False, tie_embeddings=True),
    "qwen3": dict(qk_norm=True, head_dim=32, norm_eps=1e-5),
    "gpt2": dict(position="learned", norm="layer", mlp="gelu", out_bias=True, mlp_dim=96),
  }[fam["name"]]  # fmt: skip
  for k, v in expect.items():
    assert getattr(cfg, k) == v, k
  assert cfg.heads == ("lm",) and hf_to_model_config(fam["rm"]).heads == ("reward",)


def test_causal_lm_logits_match_transformers(fam):
  cfg = hf_to_model_config(fam["lm"])
  params = load_hf_params(fam["lm"], cfg)
  out = _ours(cfg, params, fam["tokens"], fam["seg"])
  _assert_logits_close(out.logits, fam["lm_logits"], fam["seg"])


def test_sequence_classification_scores_match_transformers(fam):
  cfg = hf_to_model_config(fam["rm"])
  params = load_hf_params(fam["rm"], cfg)
  np.testing.assert_array_equal(params["reward_head"]["Dense_0"]["bias"], 0.0)
  rewards = _ours(cfg, params, fam["tokens"], fam["seg"]).rewards
  np.testing.assert_allclose(rewards, fam["rm_scores"], atol=1e-4, rtol=0)


def _random_params(cfg, seed):
  """Random critic_jax params, every leaf random (no zero biases, no unit norms)."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    x = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(x + (path[-1].key == "scale"), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, strip_boxes(abstract_params(cfg)))


def _assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert {p for p, _ in flat_a} == set(flat_b)
  for p, x in flat_a:
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[p]), err_msg=str(p))


def test_export_causal_lm_loads_in_transformers(fam, tmp_path):
  cfg = hf_to_model_config(fam["lm"], heads=("lm", "value"))
  params = _random_params(cfg, 3)
  shard = 60_000 if fam["name"] in ("llama", "qwen3") else "5GB"
  arch = save_hf(tmp_path, params, cfg, "causal_lm", max_shard_size=shard)
  assert arch == json.load(open(tmp_path / "config.json"))["architectures"][0]
  files = os.listdir(tmp_path)
  assert ("model.safetensors.index.json" in files) == (shard != "5GB")
  assert HEADS_FILE in files  # the value head has no place in a CausalLM
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(hf).__name__ == arch
  ref = _torch_out(hf, fam["tokens"], fam["seg"])
  _assert_logits_close(_ours(cfg, params, fam["tokens"], fam["seg"]).logits, ref, fam["seg"])
  # ... and back: exactly the same params, value head included.
  _assert_trees_equal(load_hf_params(tmp_path, cfg), params)


def test_export_reward_model_loads_in_transformers(fam, tmp_path):
  cfg = hf_to_model_config(fam["rm"])
  params = _random_params(cfg, 4)
  params["reward_head"]["Dense_0"]["bias"] = jnp.zeros((1,))
  arch = save_hf(tmp_path, params, cfg, "sequence_classification", pad_token_id=PAD)
  assert arch.endswith("ForSequenceClassification")
  assert not os.path.exists(tmp_path / HEADS_FILE)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  ref = _torch_out(hf, fam["tokens"], fam["seg"])[:, 0]
  ours = _ours(cfg, params, fam["tokens"], fam["seg"]).rewards
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  _assert_trees_equal(load_hf_params(tmp_path, cfg), params)


@pytest.fixture(scope="module")
def mesh():
  return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_sharded_load_equals_unsharded_and_reads_only_shards(fam, mesh, monkeypatch):
  cfg = hf_to_model_config(fam["lm"], heads=("lm", "value"))
  plain = load_hf_params(fam["lm"], cfg)
  reads = []
  orig = SafetensorsCheckpoint.read

  def spy(self, key, index):
    out = orig(self, key, index)
    reads.append((key, out.shape))
    return out

  monkeypatch.setattr(SafetensorsCheckpoint, "read", spy)
  sharded = load_hf_params(fam["lm"], cfg, mesh, DEFAULT_RULES)
  _assert_trees_equal(sharded, plain)
  emb = sharded["embed"]["embedding"]
  assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
  # The embedding [V, D] is split over tensor (V) and fsdp (D): 4 distinct
  # blocks, each read once (the data axis replicates them), never whole.
  emb_key = "transformer.wte.weight" if fam["name"] == "gpt2" else "model.embed_tokens.weight"
  emb_reads = [s for k, s in reads if k == emb_key]
  assert emb_reads == [(V // 2, 32)] * 4
  for shard in emb.addressable_shards:
    assert shard.data.shape == (V // 2, 32)
  # Every read of a sharded leaf is smaller than its tensor.
  with SafetensorsCheckpoint(fam["lm"]) as ckpt:
    full = {k: ckpt.shape(k) for k in ckpt.keys()}
  assert all(np.prod(s) < np.prod(full[k]) for k, s in reads if len(full[k]) == 2)

  # Scanned layers: the same tensors stacked on a leading axis.
  scanned = load_hf_params(fam["lm"], cfg, mesh, DEFAULT_RULES, scan_layers=True)
  assert "layers" in scanned and "layer_0" not in scanned
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda x, i=i: x[i], scanned["layers"])
    _assert_trees_equal(layer, plain[f"layer_{i}"])
