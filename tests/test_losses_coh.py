"""Chain of Hindsight: data builder, forgetful causal mask, loss (spec §9)."""

import jax
import numpy as np
import pytest

from critic_jax.losses import LOSSES
from critic_jax.losses.coh import (
  COH_TEMPLATES,
  build_coh_batch,
  build_coh_example,
  coh_inference_prompt,
  coh_loss,
  coh_order_pair,
  forgetful_causal_mask,
)
from critic_jax.losses.sft import next_token_loss

EOS = 0
fcm = jax.jit(forgetful_causal_mask, static_argnames=("fcm_min", "fcm_max", "per_query"))


def _normal(seed, shape):
  """Seeded float32 normals from numpy (cheaper than compiling jax.random op by op)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def encode(text):
  """Byte-level toy tokenizer (ids 1..256; 0 is EOS)."""
  return [b + 1 for b in text.encode()]


def decode(ids):
  return bytes(i - 1 for i in ids).decode()


def _spans(tokens, mask):
  """Maximal runs of equal mask value: [(text-or-ids, in_loss), ...]."""
  out, start = [], 0
  for t in range(1, len(tokens) + 1):
    if t == len(tokens) or mask[t] != mask[start]:
      out.append((list(tokens[start:t]), bool(mask[start])))
      start = t
  return out


def _build(order, template="default"):
  return build_coh_example(
    prompt="sort 3 1 2",
    good="1 2 3",
    bad="3 2 1",
    order=order,
    encode=encode,
    eos_id=EOS,
    template=template,
  )


def test_registered():
  assert LOSSES.get("coh") is coh_loss


def test_formats_and_loss_mask_exact():
  tok, mask = _build("p")
  assert tok.dtype == np.int32 and mask.dtype == np.float32
  spans = _spans(tok, mask)
  assert [(decode(s) if EOS not in s else s, m) for s, m in spans] == [
    ("User: sort 3 1 2 A helpful answer:", False),
    ([b + 1 for b in b" 1 2 3"] + [EOS], True),
  ]
  tok, mask = _build("pn")
  spans = _spans(tok, mask)
  assert len(spans) == 4
  assert decode(spans[0][0]) == "User: sort 3 1 2 A helpful answer:" and not spans[0][1]
  assert spans[1] == (encode(" 1 2 3") + [EOS], True)
  assert decode(spans[2][0]) == "An unhelpful answer:" and not spans[2][1]
  assert spans[3] == (encode(" 3 2 1") + [EOS], True)
  tok, mask = _build("n")
  spans = _spans(tok, mask)
  assert decode(spans[0][0]).endswith("An unhelpful answer:")
  assert spans[1] == (encode(" 3 2 1") + [EOS], True)


@pytest.mark.parametrize("order", ["p", "n", "pn", "np"])
def test_mask_is_zero_on_prompt_and_phrases_one_on_answers_and_eos(order):
  tok, mask = _build(order)
  for ids, in_loss in _spans(tok, mask):
    if in_loss:
      assert ids[-1] == EOS and decode(ids[:-1]) in (" 1 2 3", " 3 2 1")
    else:
      text = decode(ids)
      assert EOS not in ids
      assert text.endswith(("A helpful answer:", "An unhelpful answer:"))
  # Every EOS is in the loss.
  assert np.all(mask[tok == EOS] == 1)


def test_pn_and_np_share_loss_tokens_in_different_order():
  t1, m1 = _build("pn")
  t2, m2 = _build("np")
  a, b = t1[m1 == 1], t2[m2 == 1]
  assert sorted(a.tolist()) == sorted(b.tolist())
  assert a.tolist() != b.tolist()
  assert a.tolist() == encode(" 1 2 3") + [EOS] + encode(" 3 2 1") + [EOS]
  assert b.tolist() == encode(" 3 2 1") + [EOS] + encode(" 1 2 3") + [EOS]


def test_templates_and_inference_prompt():
  tok, mask = _build("p", template="dialogue_helpful")
  assert decode(tok[mask == 0].tolist()).endswith(COH_TEMPLATES["dialogue_helpful"].good)
  for name in COH_TEMPLATES:
    ids = coh_inference_prompt("hi", encode=encode, template=name)
    assert decode(ids.tolist()).endswith(COH_TEMPLATES[name].good)
  with pytest.raises(ValueError, match="order"):
    _build("pp")
  with pytest.raises(ValueError, match="template"):
    _build("p", template="nope")


def test_ties_are_dropped():
  assert coh_order_pair("a", "b", 1.0, 1.0) is None
  assert coh_order_pair("a", "b", 0.0, 2.0) == ("b", "a")
  assert coh_order_pair("a", "b", 3.0, 2.0) == ("a", "b")


def test_batch_padding_and_truncation():
  ex = [
    {"prompt": "x", "good": "g", "bad": "b", "order": "p"},
    {"prompt": "x", "good": "good", "bad": "bad", "order": "pn"},
  ]
  tok, mask, attn = build_coh_batch(ex, encode=encode, eos_id=EOS, pad_id=EOS, max_len=40)
  t0, m0 = _build_one(ex[0])
  n0 = len(t0)
  np.testing.assert_array_equal(tok[0, :n0], t0)
  np.testing.assert_array_equal(mask[0, :n0], m0)
  assert np.all(mask[0, n0:] == 0) and np.all(~attn[0, n0:]) and np.all(attn[0, :n0])
  t1, m1 = _build_one(ex[1])
  assert len(t1) > 40
  np.testing.assert_array_equal(tok[1], t1[:40])
  np.testing.assert_array_equal(mask[1], m1[:40])
  assert np.all(attn[1])


def _build_one(e):
  return build_coh_example(
    prompt=e["prompt"], good=e["good"], bad=e["bad"], order=e["order"], encode=encode, eos_id=EOS
  )


ATTN = np.array([[True] * 12, [True] * 7 + [False] * 5])
CAUSAL = np.tril(np.ones((12, 12), bool))


def test_fcm_off_equals_plain_causal_with_padding():
  m = fcm(jax.random.key(0), ATTN, fcm_min=0.0, fcm_max=0.0)
  expected = CAUSAL[None] & ATTN[:, None, :]
  np.testing.assert_array_equal(m, expected)


def test_fcm_keeps_position_zero_and_stays_inside_causal():
  big = np.ones((4, 64), bool)
  m = np.asarray(fcm(jax.random.key(1), big, fcm_min=0.5, fcm_max=0.9))
  causal = np.tril(np.ones((64, 64), bool))
  assert np.all(m[:, :, 0])
  assert not np.any(m & ~causal[None])
  # The dropped fraction of past keys (k >= 1) lies in [fcm_min, fcm_max] up to sampling noise.
  past = causal.copy()
  past[:, 0] = False
  dropped = 1 - m[:, past].mean(-1)
  assert np.all((dropped > 0.45) & (dropped < 0.95))
  assert len(np.unique(np.round(dropped, 3))) > 1  # a ratio per sequence


def test_fcm_per_key_mode_shares_columns():
  big = np.ones((2, 16), bool)
  m = np.asarray(fcm(jax.random.key(2), big, fcm_max=0.5, per_query=False))
  causal = np.tril(np.ones((16, 16), bool))
  # Each key is kept for every query that may see it, or for none.
  for b in range(2):
    for k in range(16):
      col = m[b, k:, k]
      assert col.all() or not col.any()
  assert not np.all(m == causal[None])


def test_fcm_rejects_bad_ratio():
  with pytest.raises(ValueError, match="fcm"):
    forgetful_causal_mask(jax.random.key(0), ATTN, fcm_min=0.2, fcm_max=0.1)


def test_loss_reuses_sft_and_mixes_pretraining():
  logits = _normal(3, (2, 5, 7))
  targets = np.array([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]], np.int32)
  mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
  pt_logits = _normal(4, (2, 5, 7))
  pt_mask = np.ones((2, 5), np.float32)
  loss, m, ref, only = jax.jit(_coh_all)(logits, targets, mask, pt_logits, pt_mask)
  logsm = lambda x: x - np.log(np.sum(np.exp(x), -1, keepdims=True))
  nll = -np.take_along_axis(logsm(logits), targets[..., None], -1)[..., 0]
  coh = (nll * mask).sum() / mask.sum()
  pt = -np.take_along_axis(logsm(pt_logits), targets[..., None], -1)[..., 0].mean()
  np.testing.assert_allclose(m["coh_loss"], coh, rtol=1e-5)
  np.testing.assert_allclose(loss, coh + 0.01 * pt, rtol=1e-5)
  np.testing.assert_allclose(m["coh_loss"], ref, rtol=1e-6)
  np.testing.assert_allclose(only, coh, rtol=1e-5)


def _coh_all(logits, targets, mask, pt_logits, pt_mask):
  loss, m = coh_loss(
    logits=logits,
    targets=targets,
    loss_mask=mask,
    pt_logits=pt_logits,
    pt_targets=targets,
    pt_mask=pt_mask,
  )
  ref, _ = next_token_loss(logits=logits, targets=targets, mask=mask.astype(bool))
  only, _ = coh_loss(logits=logits, targets=targets, loss_mask=mask)
  return loss, m, ref, only
