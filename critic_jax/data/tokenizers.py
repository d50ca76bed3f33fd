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
  """A transformers tokenizer loaded from a local folder (never downloads)."""

  def __init__(self, path: str):
    from transformers import AutoTokenizer

    self.path = path
    try:
      self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot load a tokenizer from local folder {path!r}: {e}") from e
    self.eos_id = self.tok.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"tokenizer at {path!r} has no eos token")
    self.bos_id = self.tok.bos_token_id
    self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

  @property
  def vocab_size(self) -> int:
    return len(self.tok)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False)

  def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
    ids = [int(i) for i in ids]
    if stop_at_eos and self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self.tok.decode(ids, skip_special_tokens=True)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
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
