"""HF tokenizers from local folders: BOS/EOS/pad and chat templates in data, sampler and masks.

Tokenizers are trained in-process (tiny byte-level BPE) and saved, so nothing is
downloaded. Three conventions are covered: Llama-like (adds BOS, the chat
template renders BOS too, has a pad token), Qwen-like (no BOS, no pad token so
pad == eos) and GPT-2-like (bos == eos, never added, no chat template).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from critic_jax.data import (
  CharTokenizer,
  Example,
  HFTokenizer,
  encode_prompts,
  load_sft_jsonl,
  make_tokenizer,
  pad_example,
  render_chat,
  tokenize_example,
)
from critic_jax.interop import char_tokenizer_to_hf, hf_to_model_config, save_hf
from critic_jax.interop.hf_weights import abstract_params
from critic_jax.models import ModelConfig
from critic_jax.parallel import strip_boxes
from critic_jax.train.sft import sft_targets

CORPUS = ["hello world", "what is two plus two", "the answer is four", "user assistant system"]
MESSAGES = [
  {"role": "system", "content": "be brief"},
  {"role": "user", "content": "what is two plus two"},
  {"role": "assistant", "content": "the answer is four"},
]
EXAMPLES = [Example("hello", "world"), Example("what is two plus two", "the answer is four")]
LLAMA_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>"
  "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
QWEN_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe(specials):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(CORPUS * 5, trainer)
  return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  # Llama-like: BOS added by the post-processor and rendered by the template.
  tok = _bpe(["<pad>", "<eos>", "<bos>"])
  tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
  )
  hf = PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
  )
  hf.chat_template = LLAMA_TEMPLATE
  hf.save_pretrained(root / "llama")
  # Qwen-like: no BOS, no pad token, a template with its own turn markers.
  tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
  hf.chat_template = QWEN_TEMPLATE
  hf.save_pretrained(root / "qwen")
  # GPT-2-like: bos == eos == <|endoftext|>, never added; no chat template.
  tok = _bpe(["<|endoftext|>"])
  hf = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
  )
  hf.save_pretrained(root / "gpt2")
  return {k: str(root / k) for k in ("llama", "qwen", "gpt2")}


def test_special_ids_follow_the_tokenizer(folders):
  llama = HFTokenizer(folders["llama"])
  raw = AutoTokenizer.from_pretrained(folders["llama"], local_files_only=True)
  assert llama.bos_id == llama.bos_token_id == raw.convert_tokens_to_ids("<bos>")
  assert llama.pad_id == raw.convert_tokens_to_ids("<pad>") and not llama.pad_is_eos
  assert llama.eos_id == raw.convert_tokens_to_ids("<eos>")
  qwen = HFTokenizer(folders["qwen"])
  assert qwen.bos_id is None and qwen.pad_is_eos and qwen.pad_id == qwen.eos_id
  gpt2 = HFTokenizer(folders["gpt2"])
  assert gpt2.bos_token_id == gpt2.eos_id and gpt2.bos_id is None  # exists, never added
  # bos_id is exactly what transformers prepends by default.
  for t in (llama, qwen, gpt2):
    hf_ids = t.tok.encode("hello world", add_special_tokens=True)
    ours = ([t.bos_id] if t.bos_id is not None else []) + t.encode("hello world")
    assert ours == hf_ids
  assert isinstance(make_tokenizer("hf", folders["qwen"]), HFTokenizer)
  with pytest.raises(ValueError, match="cannot load a tokenizer from local folder"):
    HFTokenizer(folders["qwen"] + "_missing")


def _chat_example(tmp_path, tok):
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps({"messages": MESSAGES}) + "\n")
  (ex,) = load_sft_jsonl(str(path), tok.apply_chat_template)
  return ex, tokenize_example(ex, tok, 128)


def _template_ids(tok, messages, gen):
  out = tok.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_chat_records_tokenize_like_transformers(folders, tmp_path, name):
  tok = HFTokenizer(folders[name])
  ex, row = _chat_example(tmp_path, tok)
  prompt = _template_ids(tok, MESSAGES[:-1], True)
  response = tok.tok.encode(MESSAGES[-1]["content"], add_special_tokens=False) + [tok.eos_id]
  np.testing.assert_array_equal(row["tokens"], prompt + response)
  # Exactly one BOS (the template renders it; the pipeline does not add another).
  n_bos = int(np.sum(row["tokens"] == tok.bos_token_id)) if tok.bos_token_id is not None else 0
  assert n_bos == (1 if name == "llama" else 0)
  if name == "llama":
    assert row["tokens"][0] == tok.bos_id
  # The loss covers the response and its EOS, nothing of the prompt.
  assert row["loss_mask"].tolist() == [False] * len(prompt) + [True] * len(response)
  # The sampler encodes the same prompt the model was trained on.
  enc = encode_prompts([ex.prompt], tok)
  assert enc["tokens"][0, : enc["lengths"][0]].tolist() == prompt


def test_pad_equal_to_eos_keeps_the_final_eos_in_the_loss(folders):
  tok = HFTokenizer(folders["qwen"])
  assert tok.pad_id == tok.eos_id
  rows = [pad_example(tokenize_example(ex, tok, 32), 32, tok.pad_id) for ex in EXAMPLES]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  targets, mask = jax.device_get(sft_targets(batch))
  for i, r in enumerate(rows):
    n = int(r["segment_ids"].sum())
    assert r["tokens"][n - 1] == tok.eos_id and np.all(r["tokens"][n:] == tok.eos_id)
    assert mask[i, n - 2] and targets[i, n - 2] == tok.eos_id  # predicting the real EOS
    assert not mask[i, n - 1 :].any()  # padding (also eos ids) is never a target
  # The sampler's padded prompts carry their lengths: pad == eos is harmless there too.
  enc = encode_prompts(["hello", "what is two plus two"], tok)
  assert enc["lengths"].tolist() == [len(tok.encode("hello")), len(tok.encode(CORPUS[1]))]


def test_without_a_template_chat_falls_back_to_plain_rendering(folders):
  tok = HFTokenizer(folders["gpt2"])
  assert not tok.has_chat_template
  assert tok.apply_chat_template(MESSAGES[:-1], True) == render_chat(MESSAGES[:-1], True)
  custom = HFTokenizer(
    folders["gpt2"], chat_template="{% for m in messages %}{{ m.content }};{% endfor %}"
  )
  assert custom.apply_chat_template(MESSAGES[:2], False) == "be brief;what is two plus two;"


def test_char_tokenizer_exports_as_an_equivalent_hf_tokenizer(tmp_path):
  char = CharTokenizer()
  char_tokenizer_to_hf(char).save_pretrained(tmp_path)
  hf = HFTokenizer(str(tmp_path))
  assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.vocab_size) == (
    char.bos_id, char.eos_id, char.pad_id, char.vocab_size,
  )  # fmt: skip
  text = "What is 12 + 7?\nIt's 19."
  assert hf.encode(text) == char.encode(text) and hf.decode(hf.encode(text)) == text
  assert hf.encode("\u00e9") == [char.unk_id]
  ex = EXAMPLES[1]
  for k in ("tokens", "loss_mask"):
    np.testing.assert_array_equal(
      tokenize_example(ex, hf, 64)[k], tokenize_example(ex, char, 64)[k]
    )


def test_export_writes_the_tokenizer_and_its_special_ids(folders, tmp_path):
  tok = HFTokenizer(folders["llama"])
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=48)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), strip_boxes(abstract_params(cfg)))
  save_hf(tmp_path, params, cfg, tokenizer=tok)
  hf = json.load(open(tmp_path / "config.json"))
  assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (
    tok.bos_token_id, tok.eos_id, tok.pad_id,
  )  # fmt: skip
  gen = json.load(open(tmp_path / "generation_config.json"))
  assert gen["eos_token_id"] == tok.eos_id
  again = HFTokenizer(str(tmp_path))
  assert again.encode("two plus two") == tok.encode("two plus two")
  assert again.apply_chat_template(MESSAGES, False) == tok.apply_chat_template(MESSAGES, False)
  assert hf_to_model_config(tmp_path).vocab_size == tok.vocab_size
