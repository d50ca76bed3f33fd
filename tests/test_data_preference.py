"""Preference JSONL forms, file:line errors, and paired batches."""

import json

import numpy as np
import pytest

from critic_jax.data import CharTokenizer, JsonlError
from critic_jax.data.preference import (
  PreferenceExample,
  load_preference_jsonl,
  preference_dataset,
)


def _write(tmp_path, recs):
  p = tmp_path / "pref.jsonl"
  p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
  return str(p)


def test_all_record_forms(tmp_path):
  u = {"role": "user", "content": "hi"}
  path = _write(tmp_path, [
    {"prompt": "p", "chosen": "a", "rejected": "b"},
    {"messages": [u], "chosen": "a", "rejected": {"role": "assistant", "content": "b"}},
    {"chosen": [u, {"role": "assistant", "content": "a"}],
     "rejected": [u, {"role": "assistant", "content": "b"}]},
  ])  # fmt: skip
  exs = load_preference_jsonl(path)
  assert exs[0] == PreferenceExample("p", "a", "b")
  assert exs[1] == exs[2] == PreferenceExample("User: hi\nAssistant: ", "a", "b")
  neg = _write(tmp_path, [{"prompt": "p", "rejected": "b"}])
  assert load_preference_jsonl(neg, negatives_only=True) == [PreferenceExample("p", None, "b")]
  with pytest.raises(JsonlError, match=r"pref.jsonl:1: missing field 'chosen'"):
    load_preference_jsonl(neg)


@pytest.mark.parametrize(
  "bad, msg",
  [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": 1, "chosen": "a", "rejected": "b"}, "needs a string 'prompt'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    (
      {
        "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}],
      },
      "must share all but the last message",
    ),  # fmt: skip
    ("{oops", "invalid JSON"),
  ],
)
def test_errors_name_file_and_line(tmp_path, bad, msg):
  path = _write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, bad])
  with pytest.raises(JsonlError, match=msg) as e:
    load_preference_jsonl(path)
  assert str(e.value).startswith(f"{path}:2:")


def test_paired_batches():
  tok = CharTokenizer()
  exs = [PreferenceExample(f"{i}+1=", str(i + 1), str(i + 2)) for i in range(10)]
  exs.append(PreferenceExample("9+9=", None, "17"))
  it = iter(preference_dataset(exs, tok, seq_len=12, batch_size=11, shuffle=False, num_epochs=1))
  b = next(it)
  assert b["chosen_tokens"].shape == b["rejected_tokens"].shape == (11, 12)
  np.testing.assert_array_equal(b["index"], np.arange(11))
  assert b["has_chosen"].tolist() == [True] * 10 + [False]
  assert not b["chosen_loss_mask"][10].any() and b["rejected_loss_mask"][10].any()
  # The prompt is shared; only the responses differ, and only they carry the loss mask.
  for i in range(10):
    c, r = b["chosen_tokens"][i], b["rejected_tokens"][i]
    n = 1 + len(f"{i}+1=")
    np.testing.assert_array_equal(c[:n], r[:n])
    assert not b["chosen_loss_mask"][i, :n].any()
    assert tok.decode(c[b["chosen_loss_mask"][i]]) == str(i + 1)
