"""Preference data: JSONL loading (with file:line errors), tokenization and grain batches.

Record forms (one JSON object per line):
  {"prompt": "...", "chosen": "...", "rejected": "..."}
  {"messages": [...prompt messages...], "chosen": "...", "rejected": "..."}
  {"chosen": [...messages...], "rejected": [...messages...]}   # shared prefix, last
      message of each from the assistant (the Anthropic-HH / TRL conversational form)
  {"prompt": "...", "rejected": "..."}                         # negatives only (D2O)

A batch is a dict of numpy arrays, for side in ("chosen", "rejected"):
  {side}_tokens `[B, T]` int32, {side}_segment_ids `[B, T]` int32 (0 = padding),
  {side}_positions `[B, T]` int32, {side}_loss_mask `[B, T]` bool (response + EOS),
plus `index [B]` int32, the example's position in the dataset (for caches of
reference log-probs), and `has_chosen [B]` bool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from critic_jax.data.jsonl import JsonlError, check_messages, read_jsonl, render_chat
from critic_jax.data.pipeline import pad_example, tokenize_example
from critic_jax.data.tasks import Example

if TYPE_CHECKING:
  import grain  # imported where used: the model, trainers' steps and benchmarks run without it

__all__ = [
  "PreferenceExample",
  "load_preference_jsonl",
  "tokenize_pair",
  "preference_dataset",
  "SIDES",
]

SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """A prompt with a preferred and a dispreferred response (`chosen` None: negatives only)."""

  prompt: str
  chosen: str | None
  rejected: str


def _response(value, where: str, key: str) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and value.get("role") == "assistant":
    return check_messages([value], where)[0]["content"]
  raise JsonlError(f"{where}: field {key!r} must be a string or an assistant message")


def _conversational(rec: dict, where: str, render) -> PreferenceExample:
  chosen = check_messages(rec["chosen"], f"{where}: chosen")
  rejected = check_messages(rec["rejected"], f"{where}: rejected")
  if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
    raise JsonlError(f"{where}: the last chosen and rejected messages must be from the assistant")
  if chosen[:-1] != rejected[:-1]:
    raise JsonlError(
      f"{where}: chosen and rejected conversations must share all but the last message"
    )
  return PreferenceExample(
    render(chosen[:-1], True), chosen[-1]["content"], rejected[-1]["content"]
  )


def load_preference_jsonl(
  path: str, chat_template: Callable[[list[dict], bool], str] | None = None,
  negatives_only: bool = False,
) -> list[PreferenceExample]:  # fmt: skip
  """Reads preference pairs (or, with `negatives_only`, prompt + rejected records)."""
  render = chat_template or render_chat
  out = []
  for lineno, rec in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "rejected" not in rec:
      raise JsonlError(f"{where}: missing field 'rejected' (have: {', '.join(sorted(rec))})")
    if isinstance(rec.get("chosen"), list) or isinstance(rec["rejected"], list):
      if "chosen" not in rec:
        raise JsonlError(f"{where}: the conversational form needs 'chosen' and 'rejected' lists")
      out.append(_conversational(rec, where, render))
      continue
    if "messages" in rec:
      prompt = render(check_messages(rec["messages"], where), True)
    elif isinstance(rec.get("prompt"), str):
      prompt = rec["prompt"]
    else:
      raise JsonlError(f"{where}: needs a string 'prompt' or a 'messages' list")
    rejected = _response(rec["rejected"], where, "rejected")
    if "chosen" in rec:
      chosen = _response(rec["chosen"], where, "chosen")
    elif negatives_only:
      chosen = None
    else:
      raise JsonlError(
        f"{where}: missing field 'chosen' (negatives-only data needs the D2O loader)"
      )
    out.append(PreferenceExample(prompt, chosen, rejected))
  if not out:
    raise JsonlError(f"{path}: no records")
  return out


def tokenize_pair(
  ex: PreferenceExample, tokenizer, seq_len: int, index: int
) -> dict[str, np.ndarray]:
  """Both sides of a pair as padded rows (a missing chosen side is all padding)."""
  out: dict[str, np.ndarray] = {}
  for side in SIDES:
    text = getattr(ex, side)
    if text is None:
      row = {
        "tokens": np.full(seq_len, tokenizer.pad_id, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, bool),
      }  # fmt: skip
    else:
      row = pad_example(
        tokenize_example(Example(ex.prompt, text), tokenizer, seq_len), seq_len, tokenizer.pad_id
      )
    out.update({f"{side}_{k}": v for k, v in row.items()})
  out["index"] = np.asarray(index, np.int32)
  out["has_chosen"] = np.asarray(ex.chosen is not None)
  return out


def preference_dataset(
  examples: Sequence[PreferenceExample], tokenizer, *, seq_len: int, batch_size: int,
  seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
  drop_remainder: bool = True,
) -> grain.IterDataset:  # fmt: skip
  """Batches of tokenized pairs (see the module docstring); reshuffled every epoch."""
  import grain

  if not examples:
    raise ValueError("preference_dataset: no examples")
  ds = grain.MapDataset.range(len(examples)).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  ds = ds.map(lambda i: tokenize_pair(examples[i], tokenizer, seq_len, i))
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder)
