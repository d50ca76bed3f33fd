"""JSONL loaders for user data, with errors that name the file and line.

SFT records take one of two forms:
  {"prompt": "...", "response": "..."}
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
In the chat form the last message must come from the assistant: it is the
response, and the messages before it are rendered into the prompt (with the
tokenizer's chat template when it has one, else `render_chat`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from critic_jax.data.tasks import Example

__all__ = ["JsonlError", "read_jsonl", "load_sft_jsonl", "render_chat", "check_messages"]

_ROLES = ("system", "user", "assistant")


class JsonlError(ValueError):
  """A malformed record; the message starts with `path:line:`."""


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (line number, record) for every non-blank line; bad JSON raises JsonlError."""
  try:
    f = open(path, "rb")  # noqa: SIM115
  except OSError as e:
    raise JsonlError(f"{path}: cannot open: {e.strerror}") from None
  with f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise JsonlError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start + 1})") from None
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise JsonlError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(rec, dict):
        raise JsonlError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
      yield lineno, rec


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
  """Validates a chat `messages` list; `where` is "path:line" for the error."""
  if not isinstance(messages, list) or not messages:
    raise JsonlError(f"{where}: field 'messages' must be a non-empty list")
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise JsonlError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
    if m.get("role") not in _ROLES:
      raise JsonlError(
        f"{where}: messages[{i}].role must be one of {_ROLES}, got {m.get('role')!r}"
      )
    if not isinstance(m.get("content"), str):
      raise JsonlError(f"{where}: messages[{i}].content must be a string")
  return messages


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
  """A plain chat rendering for tokenizers without a template ("User: ...\\nAssistant: ")."""
  parts = [f"{m['role'].capitalize()}: {m['content']}\n" for m in messages]
  if add_generation_prompt:
    parts.append("Assistant: ")
  return "".join(parts)


def _string_field(rec: dict, key: str, where: str) -> str:
  if key not in rec:
    raise JsonlError(f"{where}: missing field {key!r} (have: {', '.join(sorted(rec))})")
  if not isinstance(rec[key], str):
    raise JsonlError(f"{where}: field {key!r} must be a string, got {type(rec[key]).__name__}")
  return rec[key]


def load_sft_jsonl(
  path: str, chat_template: Callable[[list[dict], bool], str] | None = None
) -> list[Example]:
  """Reads SFT examples from `path` (prompt/response or chat-messages records)."""
  render = chat_template or render_chat
  out = []
  for lineno, rec in read_jsonl(path):
    where = f"{path}:{lineno}"
    if "messages" in rec:
      msgs = check_messages(rec["messages"], where)
      if msgs[-1]["role"] != "assistant":
        raise JsonlError(f"{where}: the last message must have role 'assistant' (the response)")
      prompt = render(msgs[:-1], True)
      out.append(Example(prompt=prompt, response=msgs[-1]["content"]))
    elif "prompt" in rec or "response" in rec:
      out.append(
        Example(_string_field(rec, "prompt", where), _string_field(rec, "response", where))
      )
    else:
      raise JsonlError(
        f"{where}: a record needs 'prompt' and 'response', or 'messages' "
        f"(have: {', '.join(sorted(rec))})"
      )
  if not out:
    raise JsonlError(f"{path}: no records")
  return out
