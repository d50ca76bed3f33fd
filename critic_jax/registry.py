"""Name -> object registries for every swappable part (losses, models, tasks, ...).

Configs hold names as strings; code looks them up here. An unknown name raises
with the list of known names and the closest matches, and registering a name
twice raises, so a typo never silently picks something else.

Example:
  >>> LOSSES = Registry("loss")
  >>> @LOSSES.register("dpo")
  ... def dpo_loss(...): ...
  >>> LOSSES.get("dpo")
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
  """A named mapping from strings to objects with loud failure modes."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
    """Registers `obj` under `name`; usable as a decorator when `obj` is None."""

    def _add(o: T) -> T:
      if not isinstance(name, str) or not name:
        raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = o
      return o

    return _add if obj is None else _add(obj)

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(self._unknown_message(name)) from None

  def _unknown_message(self, name: Any) -> str:
    known = sorted(self._entries)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known)}"

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {self.names()})"
