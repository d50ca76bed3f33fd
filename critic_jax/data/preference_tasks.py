"""Synthetic preference tasks over short text items, for reward-model training and tests.

Each task renders items as short strings, labels pairs of them, and returns
`PreferenceData` (a list of `PreferenceExample` plus which labels were flipped), built on the
seeded generators of `critic_jax.data.synthetic_preferences`. Tasks are chosen by name from
`PREFERENCE_TASKS` (`config.data.task`, kwargs in `config.data.task_kwargs`):

* "cyclic": N items, labelled by a random skew-symmetric target or a balanced
  rock-paper-scissors tournament (GPM vs BT, spec §3f). Held-out = every labelled pair.
* "noisy_bt": items whose hidden score is a linear function of their characters; train
  labels flipped at a known rate, held-out pairs (by default over unseen items) clean (BT / CRM
  under label noise, spec §4f).
"""

from __future__ import annotations

import dataclasses
import itertools
import string

import numpy as np

from critic_jax.data.preference import PreferenceExample
from critic_jax.data.synthetic_preferences import (
  cyclic_preference_pairs,
  noisy_bt_pairs,
  random_skew_target,
  rock_paper_scissors_target,
)
from critic_jax.data.tasks import Example
from critic_jax.registry import Registry

__all__ = [
  "PREFERENCE_TASKS",
  "CyclicTask",
  "NoisyBTTask",
  "PreferenceData",
  "make_preference_task",
  "random_items",
  "transitive_bound",
]

PREFERENCE_TASKS: Registry = Registry("preference task")


@dataclasses.dataclass(frozen=True)
class PreferenceData:
  """Labelled pairs as text.

  Attributes:
    examples: P `PreferenceExample`s (prompt, chosen, rejected).
    flipped: `[P]` bool, true where the label disagrees with the ground truth; None when the
      data cannot know (e.g. JSONL).
  """

  examples: list[PreferenceExample]
  flipped: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.examples)


def random_items(
  num_items: int,
  length: int,
  rng,
  alphabet: str = string.ascii_lowercase,
  exclude: frozenset[str] = frozenset(),
) -> list[str]:
  """`num_items` distinct random strings of `length` characters (none in `exclude`)."""
  g = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  if len(alphabet) ** length - len(exclude) < num_items:
    raise ValueError(
      f"random_items: cannot draw {num_items} distinct strings of length {length} "
      f"over {len(alphabet)} characters"
    )
  out, seen = [], set(exclude)
  while len(out) < num_items:
    s = "".join(alphabet[i] for i in g.integers(len(alphabet), size=length))
    if s not in seen:
      seen.add(s)
      out.append(s)
  return out


def transitive_bound(target: np.ndarray) -> float:
  """Best fraction of the nonzero pairs of a skew-symmetric `target` that one linear order
  (any scalar reward) gets right; exhaustive over the N! orders, so N <= 9."""
  target = np.asarray(target)
  n = target.shape[0]
  if n > 9:
    raise ValueError(f"transitive_bound: exhaustive search needs N <= 9, got {n}")
  i, j = np.triu_indices(n, k=1)
  nz = target[i, j] != 0
  i, j, sign = i[nz], j[nz], np.sign(target[i[nz], j[nz]])
  best = 0
  for perm in itertools.permutations(range(n)):
    rank = np.empty(n)
    rank[list(perm)] = np.arange(n, 0, -1)  # perm[0] is the top item
    best = max(best, int(np.sum(np.sign(rank[i] - rank[j]) == sign)))
  return best / max(len(i), 1)


def _examples(prompt: str, items: list[str], chosen, rejected) -> list[PreferenceExample]:
  return [
    PreferenceExample(prompt, items[c], items[r]) for c, r in zip(chosen, rejected, strict=True)
  ]


@PREFERENCE_TASKS.register("cyclic")
class CyclicTask:
  """Intransitive preferences over N items rendered as short strings (spec §3f).

  Args:
    num_items: N.
    target: "rps" (balanced tournament: item i beats i+1..i+(N-1)/2 mod N; N odd; every item
      wins half its games, so the best scalar reward is constant and BT sits at chance) or
      "random" (`random_skew_target`, upper entries N(0, 1)).
    item_len: characters per item string.
    repeats: copies of every labelled pair in the training set (one epoch = all pairs x
      repeats, reshuffled).
    prompt: the shared prompt.
    seed: draws the item strings and the random target.
  """

  def __init__(
    self,
    num_items: int = 5,
    target: str = "rps",
    item_len: int = 3,
    repeats: int = 8,
    prompt: str = "",
    seed: int = 0,
  ):
    if target not in ("rps", "random"):
      raise ValueError(f"cyclic: target must be 'rps' or 'random', got {target!r}")
    if repeats < 1:
      raise ValueError(f"cyclic: repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(seed)
    self.target = (
      rock_paper_scissors_target(num_items)
      if target == "rps"
      else random_skew_target(num_items, rng)
    )
    self.items = random_items(num_items, item_len, rng)
    self.prompt, self.repeats = prompt, repeats
    pairs = cyclic_preference_pairs(self.target)
    self._pairs = (pairs.chosen, pairs.rejected)

  def train_data(self, seed: int = 0) -> PreferenceData:
    del seed  # every labelled pair, `repeats` times (the trainer shuffles)
    ex = _examples(self.prompt, self.items, *self._pairs) * self.repeats
    return PreferenceData(ex, np.zeros(len(ex), bool))

  def eval_data(self, seed: int = 0) -> PreferenceData:
    """Every labelled pair once. The reversed ordering of a pair is the same comparison: a BT
    margin and a GPM score are both exactly antisymmetric, so its accuracy is the same."""
    del seed
    ex = _examples(self.prompt, self.items, *self._pairs)
    return PreferenceData(ex, np.zeros(len(ex), bool))

  def reference_examples(self) -> list[Example]:
    return [Example(self.prompt, s) for s in self.items]

  def transitive_bound(self) -> float:
    return transitive_bound(self.target)


@PREFERENCE_TASKS.register("noisy_bt")
class NoisyBTTask:
  """Items with a hidden linear score, compared with symmetric label noise (spec §4f).

  An item is a string of `item_len` characters over the first `alphabet_size` lowercase
  letters; its hidden score is sum_t w[char_t] with w ~ N(0, 1) per letter, so a reward model
  can represent the truth. Training pairs come from `noisy_bt_pairs` over `num_items` items with
  exactly round(noise_rate * P) labels flipped; held-out pairs are clean and, with
  `heldout_items`, drawn over `num_eval_items` items never seen in training. Held-out pairs
  whose two items score exactly the same (same letters) are dropped.

  Args:
    num_items, num_train_pairs: training items and pairs.
    num_eval_items, num_eval_pairs: held-out items and pairs.
    noise_rate: eta, the fraction of flipped training labels.
    item_len, alphabet_size: item strings.
    heldout_items: held-out pairs over unseen items (True) or over the training items.
    num_references: items used as reference responses for reward centring.
    prompt: the shared prompt.
    seed: draws everything.
  """

  def __init__(
    self,
    num_items: int = 400,
    num_train_pairs: int = 2000,
    num_eval_items: int = 200,
    num_eval_pairs: int = 1000,
    noise_rate: float = 0.4,
    item_len: int = 4,
    alphabet_size: int = 8,
    heldout_items: bool = True,
    num_references: int = 64,
    prompt: str = "",
    seed: int = 0,
  ):
    if not 1 <= alphabet_size <= 26:
      raise ValueError(f"noisy_bt: alphabet_size must be in [1, 26], got {alphabet_size}")
    rng = np.random.default_rng(seed)
    alphabet = string.ascii_lowercase[:alphabet_size]
    self.letter_weights = rng.standard_normal(alphabet_size)
    self.items = random_items(num_items, item_len, rng, alphabet)
    self.eval_items = (
      random_items(num_eval_items, item_len, rng, alphabet, frozenset(self.items))
      if heldout_items
      else self.items
    )
    self.alphabet, self.prompt = alphabet, prompt
    self.noise_rate, self.num_references = noise_rate, num_references
    self.num_train_pairs, self.num_eval_pairs = num_train_pairs, num_eval_pairs
    self._seed = seed

  def score(self, item: str) -> float:
    """The hidden ground-truth score of an item string."""
    return float(sum(self.letter_weights[self.alphabet.index(c)] for c in item))

  def _pairs(self, items, num_pairs, noise_rate, seed):
    scores = np.asarray([self.score(s) for s in items])
    p = noisy_bt_pairs(
      num_items=len(items),
      num_pairs=num_pairs,
      noise_rate=noise_rate,
      rng=np.random.default_rng([self._seed, seed]),
      scores=scores,
    )
    return p, scores

  def train_data(self, seed: int = 0) -> PreferenceData:
    p, _ = self._pairs(self.items, self.num_train_pairs, self.noise_rate, 1000 + seed)
    return PreferenceData(_examples(self.prompt, self.items, p.chosen, p.rejected), p.flipped)

  def eval_data(self, seed: int = 0) -> PreferenceData:
    p, scores = self._pairs(self.eval_items, self.num_eval_pairs, 0.0, 2000 + seed)
    keep = scores[p.chosen] != scores[p.rejected]
    return PreferenceData(
      _examples(self.prompt, self.eval_items, p.chosen[keep], p.rejected[keep]),
      np.zeros(int(keep.sum()), bool),
    )

  def reference_examples(self) -> list[Example]:
    return [Example(self.prompt, s) for s in self.items[: self.num_references]]


def make_preference_task(name: str, **kwargs):
  """Builds a preference task by registry name; bad keyword arguments name the task."""
  cls = PREFERENCE_TASKS.get(name)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise TypeError(f"config.data.task_kwargs for {name!r}: {e}") from None
