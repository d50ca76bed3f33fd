"""Tokenizers: a character-level one for tiny models, and Hugging Face ones from a local folder.

Every tokenizer exposes `encode(str) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `pad_id`, `bos_id` and `eos_id` (bos_id may be None), so data,
sampler and loss masks handle special tokens the same way.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from critic_jax.registry import Registry

__all__ = ["TOKENIZERS", "CharTokenizer", "HFTokenizer", "make_tokenizer"]

TOKENIZERS: Registry = Registry("tokenizer")

_DEFAULT_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"


@TOKENIZERS.register("char")
class CharTokenizer:
  """One id per character: pad=0, bos=1, eos=2, unk=3, then the alphabet.

  The default alphabet (digits, letters, punctuation, space, newline) gives 100
  ids, enough for the synthetic tasks and small text experiments.
  """

  pad_id = 0
  bos_id = 1
  eos_id = 2
  unk_id = 3
  specials = ("<pad>", "<bos>", "<eos>", "<unk>")

  def __init__(self, chars: str = _DEFAULT_CHARS):
    if len(set(chars)) != len(chars):
      raise ValueError("CharTokenizer alphabet has repeated characters")
    self.chars = chars
    self._to_id = {c: i + len(self.specials) for i, c in enumerate(chars)}

  @property
  def vocab_size(self) -> int:
    return len(self.specials) + len(self.chars)

  def encode(self, text: str) -> list[int]:
    return [self._to_id.get(c, self.unk_id) for c in text]

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id and stop_at_eos:
        break
      if len(self.specials) <= i < self.vocab_size:
        out.append(self.chars[i - len(self.specials)])
      elif i == self.unk_id or i >= self.vocab_size:  # unknown, or an id past the alphabet
        out.append("\ufffd")
    return "".join(out)


@TOKENIZERS.register("hf")
class HFTokenizer:
  """A transformers tokenizer loaded from a local folder (never downloads).

  Special tokens follow the tokenizer's own conventions, so that data, sampler
  and loss masks put them where transformers would:

  - `bos_id` is the BOS the tokenizer itself prepends (`add_special_tokens=True`),
    else None: Llama and Mistral tokenizers add one, GPT-2 and Qwen ones do not.
    The pipeline and `encode_prompts` prepend exactly this. `bos_token_id` keeps
    the raw BOS token (which may exist without being added).
  - `encode` never adds special tokens, and when the text starts with the BOS
    string (a chat template rendered it) and the pipeline adds BOS itself, that
    leading BOS is dropped: a templated prompt starts with exactly one BOS.
  - `eos_id` is required; it ends every response (and is in the loss).
  - `pad_id` is the pad token, or EOS when the tokenizer has none (`pad_is_eos`).
    Padding is found from segment ids / lengths, never by comparing token ids,
    so pad == eos cannot mask out a real EOS.
  - `apply_chat_template` uses the tokenizer's template (or `chat_template`, a
    Jinja string or a file holding one), else the plain `render_chat` layout.
  """

  def __init__(self, path: str, chat_template: str | None = None):
    import os

    from transformers import AutoTokenizer

    self.path = path
    try:
      self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot load a tokenizer from local folder {path!r}: {e}") from e
    if chat_template:
      if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
          chat_template = f.read()
      self.tok.chat_template = chat_template
    self.eos_id = self.tok.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"tokenizer at {path!r} has no eos token")
    self.bos_token_id = self.tok.bos_token_id
    self.bos_id = self.bos_token_id if self._adds_bos() else None
    self.pad_is_eos = self.tok.pad_token_id is None or self.tok.pad_token_id == self.eos_id
    self.pad_id = self.eos_id if self.tok.pad_token_id is None else self.tok.pad_token_id

  def _adds_bos(self) -> bool:
    if self.bos_token_id is None:
      return False
    plain = self.tok.encode("a", add_special_tokens=False)
    full = self.tok.encode("a", add_special_tokens=True)
    return full[:1] == [self.bos_token_id] and full[1 : 1 + len(plain)] == plain

  @property
  def vocab_size(self) -> int:
    return len(self.tok)

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self.tok, "chat_template", None))

  def encode(self, text: str) -> list[int]:
    ids = self.tok.encode(text, add_special_tokens=False)
    bos_text = self.tok.bos_token
    if (
      self.bos_id is not None
      and ids[:1] == [self.bos_id]
      and bos_text
      and text.startswith(bos_text)
    ):
      ids = ids[1:]  # the pipeline prepends BOS itself
    return ids

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    ids = [int(i) for i in ids]
    if stop_at_eos and self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self.tok.decode(ids, skip_special_tokens=True)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
    if not self.has_chat_template:
      from critic_jax.data.jsonl import render_chat

      return render_chat(messages, add_generation_prompt)
    return self.tok.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def make_tokenizer(name: str, path: str | None = None):
  """Builds a tokenizer by registry name ("char", or "hf" with a local `path`)."""
  cls = TOKENIZERS.get(name)
  if name == "hf":
    if not path:
      raise ValueError("tokenizer 'hf' needs config.tokenizer.path (a local folder)")
    return cls(path)
  return cls()
