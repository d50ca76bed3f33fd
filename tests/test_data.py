"""Tokenizer, synthetic tasks, JSONL loading with file:line errors, the grain pipeline."""

import json

import numpy as np
import pytest

from critic_jax.data import (
  CharTokenizer,
  Example,
  JsonlError,
  load_sft_jsonl,
  make_task,
  sft_dataset,
  tokenize_example,
)
from critic_jax.data.tasks import _is_heldout


def test_char_tokenizer_roundtrip_and_specials():
  tok = CharTokenizer()
  ids = tok.encode("12+34=46")
  assert tok.decode(ids) == "12+34=46"
  assert min(ids) >= 4 and tok.vocab_size == 100
  assert tok.decode(ids + [tok.eos_id] + tok.encode("xx")) == "12+34=46"
  assert tok.encode("é") == [tok.unk_id]


def test_addition_task_is_deterministic_and_holds_out():
  task = make_task("addition", num_digits=2)
  a = task.train_examples(500, seed=3)
  assert a == task.train_examples(500, seed=3)
  ev = task.eval_examples(200)
  train_keys = {e.prompt for e in task.train_examples(20_000, seed=0)}
  assert not train_keys & {e.prompt for e in ev}
  assert all(_is_heldout(e.prompt[:-1], 0.1) for e in ev)
  for e in ev[:20]:
    x, y = e.prompt[:-1].split("+")
    assert int(e.answer) == int(x) + int(y) and e.response == e.answer
  assert task.score(ev[0], ev[0].answer) and not task.score(ev[0], ev[0].answer + "1")


def test_heldout_problems_are_distinct_and_uniform():
  """The held-out set is distinct problems drawn uniformly from the held-out space: it used
  to draw with replacement after picking each operand's digit count uniformly, so 1000
  held-out 2-digit additions held 413 distinct problems, 227 of them single-digit sums
  (10 of the 1040 held-out problems)."""
  task = make_task("addition", num_digits=2)
  ev = task.eval_examples(1000, seed=0)
  assert len({e.prompt for e in ev}) == 1000
  one_digit = sum(all(len(x) == 1 for x in e.prompt[:-1].split("+")) for e in ev)
  assert one_digit <= 12
  with pytest.raises(ValueError, match="only 1040 exist"):
    task.eval_examples(1041)
  steps = make_task("arith_steps").eval_examples(300, seed=0)
  assert len({e.prompt for e in steps}) == 300


def test_arith_steps_task():
  task = make_task("arith_steps", num_operands=3, num_digits=2)
  for e in task.train_examples(50, seed=1):
    steps = e.response.split(";")
    assert len(steps) == 2
    # Every step is correct arithmetic and chains into the next.
    for s in steps:
      lhs, rhs = s.split("=")
      assert eval(lhs) == int(rhs)  # noqa: S307 (our own generated digits and +/-)
    assert eval(e.prompt[:-1]) == int(e.answer)  # noqa: S307
    assert task.score(e, e.response)
  with pytest.raises(TypeError, match="config.task for 'arith_steps'"):
    make_task("arith_steps", num_digit=2)
  with pytest.raises(KeyError, match="Did you mean 'addition'"):
    make_task("additon")


def _write(tmp_path, lines):
  p = tmp_path / "data.jsonl"
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def test_jsonl_prompt_response_and_chat(tmp_path):
  path = _write(
    tmp_path,
    [
      json.dumps({"prompt": "a", "response": "b"}),
      "",
      json.dumps({"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]}),
    ],
  )  # fmt: skip
  exs = load_sft_jsonl(path)
  assert exs[0] == Example("a", "b")
  assert exs[1].prompt == "User: hi\nAssistant: " and exs[1].response == "yo"


@pytest.mark.parametrize(
  "bad, msg",
  [
    ('{"prompt": "a", "response": ', "invalid JSON"),
    ('{"prompt": "a"}', "missing field 'response'"),
    ('{"prompt": 3, "response": "b"}', "field 'prompt' must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must have role"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages\\[0\\].role"),
    ('{"text": "x"}', "needs 'prompt' and 'response', or 'messages'"),
    ("[1, 2]", "expected a JSON object"),
  ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, msg):
  path = _write(tmp_path, [json.dumps({"prompt": "a", "response": "b"}), bad])
  with pytest.raises(JsonlError, match=msg) as e:
    load_sft_jsonl(path)
  assert str(e.value).startswith(f"{path}:2:")


def test_jsonl_encoding_errors_name_the_line_and_a_bom_is_accepted(tmp_path):
  good = json.dumps({"prompt": "a", "response": "b"}).encode()
  path = tmp_path / "latin1.jsonl"
  latin1 = '{"prompt": "caf\u00e9", "response": "b"}'.encode("latin-1")
  path.write_bytes(good + b"\n" + good + b"\n" + latin1)
  with pytest.raises(JsonlError, match=rf"^{path}:3: not UTF-8"):
    load_sft_jsonl(str(path))
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
  assert len(load_sft_jsonl(str(bom))) == 1


def test_tokenize_masks_response_and_eos_only():
  tok = CharTokenizer()
  ex = tokenize_example(Example("12+3=", "15"), tok, max_len=32)
  assert ex["tokens"][0] == tok.bos_id and ex["tokens"][-1] == tok.eos_id
  assert ex["loss_mask"].tolist() == [False] * 6 + [True] * 3
  assert tok.decode(ex["tokens"][ex["loss_mask"]]) == "15"


def test_pipeline_padding_packing_and_resumable_state():
  tok = CharTokenizer()
  exs = make_task("addition").train_examples(64, seed=0)
  ds = sft_dataset(exs, tok, seq_len=16, batch_size=8, seed=1)
  it = iter(ds)
  b0 = next(it)
  assert b0["tokens"].shape == (8, 16) and b0["tokens"].dtype == np.int32
  assert np.all(b0["tokens"][b0["segment_ids"] == 0] == tok.pad_id)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it2 = iter(sft_dataset(exs, tok, seq_len=16, batch_size=8, seed=1))
  it2.set_state(json.loads(json.dumps(state)))
  for want in expected:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  packed = next(iter(sft_dataset(exs, tok, seq_len=40, batch_size=4, seed=1, packing=True)))
  assert packed["segment_ids"].max() >= 3  # several examples per row
  for row in range(4):
    seg, pos = packed["segment_ids"][row], packed["positions"][row]
    for s in set(seg[seg > 0].tolist()):
      assert pos[seg == s].tolist() == list(range((seg == s).sum()))
