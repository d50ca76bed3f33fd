"""Chain of Hindsight (CoH): feedback-conditioned sequences, forgetful causal mask, masked LM loss.

Paper: Liu, Sferrazza & Abbeel 2023, "Chain of Hindsight Aligns Language Models with Feedback",
arXiv 2302.02676; official JAX code lhao499/chain-of-hindsight (`coh/data/pack_hf.py`,
`coh/llama.py`, `coh/coh_train_llama.py`).
Spec: `shared/specs/preference-and-reward.md` §9.

The data builder runs on the host (plain Python/numpy, a tokenizer callable injected); the mask
generator and the loss are pure JAX. The loss reuses `critic_jax.losses.sft.next_token_loss`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from critic_jax.losses.registry import LOSSES
from critic_jax.losses.sft import next_token_loss

__all__ = [
  "COH_ORDERS",
  "COH_TEMPLATES",
  "CoHTemplate",
  "build_coh_batch",
  "build_coh_example",
  "coh_inference_prompt",
  "coh_loss",
  "coh_order_pair",
  "forgetful_causal_mask",
]

COH_ORDERS = ("p", "n", "pn", "np")


@dataclasses.dataclass(frozen=True)
class CoHTemplate:
  """Feedback phrases of one CoH template.

  Attributes:
    user: marker before the prompt.
    good: feedback phrase before a good answer (the inference-time conditioning phrase).
    bad: feedback phrase before a bad answer.
  """

  user: str = "User:"
  good: str = "A helpful answer:"
  bad: str = "An unhelpful answer:"


# "default" holds the confirmed markers [C]. The others are built from the spec's fragments of
# the official auxiliary templates ("The following is a better / more helpful / more harmless
# response", "... better / more accurate summary", bad phrases mirrored); their exact official
# wording was not re-checked.
COH_TEMPLATES: dict[str, CoHTemplate] = {
  "default": CoHTemplate(),
  "dialogue_better": CoHTemplate(
    good="The following is a better response.", bad="The following is a worse response."
  ),
  "dialogue_helpful": CoHTemplate(
    good="The following is a more helpful response.",
    bad="The following is a less helpful response.",
  ),
  "dialogue_harmless": CoHTemplate(
    good="The following is a more harmless response.",
    bad="The following is a more harmful response.",
  ),
  "summary_better": CoHTemplate(
    good="The following is a better summary.", bad="The following is a worse summary."
  ),
  "summary_accurate": CoHTemplate(
    good="The following is a more accurate summary.",
    bad="The following is a less accurate summary.",
  ),
}


def coh_order_pair(
  answer_0: str, answer_1: str, score_0: float, score_1: float
) -> tuple[str, str] | None:
  """Orders two scored answers as (good, bad); None for a tie (WebGPT ties are dropped)."""
  if score_0 == score_1:
    return None
  return (answer_0, answer_1) if score_0 > score_1 else (answer_1, answer_0)


def _template(template: CoHTemplate | str) -> CoHTemplate:
  if isinstance(template, CoHTemplate):
    return template
  if template not in COH_TEMPLATES:
    raise ValueError(f"coh: unknown template {template!r}; known: {', '.join(COH_TEMPLATES)}")
  return COH_TEMPLATES[template]


def _segments(prompt, good, bad, order, template, sep):
  """(text or None for EOS, in_loss) segments of one CoH sequence; bracketed spans are masked."""
  head = f"{template.user}{sep}{prompt}{sep}"
  if order == "p":
    return [(head + template.good, False), (sep + good, True), (None, True)]
  if order == "n":
    return [(head + template.bad, False), (sep + bad, True), (None, True)]
  if order == "pn":
    return [
      (head + template.good, False),
      (sep + good, True),
      (None, True),
      (template.bad, False),
      (sep + bad, True),
      (None, True),
    ]
  if order == "np":
    return [
      (head + template.bad, False),
      (sep + bad, True),
      (None, True),
      (template.good, False),
      (sep + good, True),
      (None, True),
    ]
  raise ValueError(f"coh: unknown order {order!r}; known: {', '.join(COH_ORDERS)}")


def build_coh_example(
  *,
  prompt: str,
  good: str,
  bad: str,
  order: str,
  encode: Callable[[str], list[int]],
  eos_id: int,
  template: CoHTemplate | str = "default",
  sep: str = " ",
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and loss mask of one CoH sequence (spec §9 formats; `[...]` = no loss):

    p:  [User: x  A helpful answer:] y+ <eos>
    n:  [User: x  An unhelpful answer:] y- <eos>
    pn: [User: x  A helpful answer:] y+ <eos> [An unhelpful answer:] y- <eos>
    np: [User: x  An unhelpful answer:] y- <eos> [A helpful answer:] y+ <eos>

  The second answer of pn/np does not repeat the user input. Each text segment is encoded on
  its own (so the mask boundary is exact); answers are encoded with a leading `sep`, the
  marker segment as "{user}{sep}{prompt}{sep}{phrase}".

  Args:
    prompt, good, bad: texts (only the one the order uses needs to be meaningful).
    order: one of `COH_ORDERS`.
    encode: tokenizer, str -> list of int ids (no special tokens added).
    eos_id: id appended after every answer; it is in the loss.
    template: a `CoHTemplate` or a key of `COH_TEMPLATES`.
    sep: separator placed before answers and between the marker parts.
  Returns:
    tokens `[T]` int32 and loss_mask `[T]` float32, 1 exactly on answer tokens and their EOS.
  """
  template = _template(template)
  ids: list[int] = []
  loss: list[float] = []
  for text, in_loss in _segments(prompt, good, bad, order, template, sep):
    seg = [eos_id] if text is None else list(encode(text))
    ids.extend(seg)
    loss.extend([1.0 if in_loss else 0.0] * len(seg))
  return np.asarray(ids, np.int32), np.asarray(loss, np.float32)


def build_coh_batch(
  examples: Sequence[dict],
  *,
  encode: Callable[[str], list[int]],
  eos_id: int,
  pad_id: int,
  max_len: int,
  template: CoHTemplate | str = "default",
  sep: str = " ",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded batch of CoH sequences.

  Args:
    examples: dicts with keys `prompt`, `good`, `bad`, `order`.
    encode, eos_id, template, sep: see `build_coh_example`.
    pad_id: padding id.
    max_len: T; longer sequences are truncated on the right.
  Returns:
    tokens `[B, T]` int32, loss_mask `[B, T]` float32 (0 on padding), attn_mask `[B, T]` bool.
  """
  tokens = np.full((len(examples), max_len), pad_id, np.int32)
  loss_mask = np.zeros((len(examples), max_len), np.float32)
  attn = np.zeros((len(examples), max_len), bool)
  for i, ex in enumerate(examples):
    ids, lm = build_coh_example(
      prompt=ex["prompt"],
      good=ex["good"],
      bad=ex["bad"],
      order=ex["order"],
      encode=encode,
      eos_id=eos_id,
      template=template,
      sep=sep,
    )
    n = min(len(ids), max_len)
    tokens[i, :n] = ids[:n]
    loss_mask[i, :n] = lm[:n]
    attn[i, :n] = True
  return tokens, loss_mask, attn


def coh_inference_prompt(
  prompt: str,
  *,
  encode: Callable[[str], list[int]],
  template: CoHTemplate | str = "default",
  sep: str = " ",
) -> np.ndarray:
  """Generation prompt "{user}{sep}{prompt}{sep}{good}": always ends with the positive phrase."""
  template = _template(template)
  return np.asarray(encode(f"{template.user}{sep}{prompt}{sep}{template.good}"), np.int32)


def forgetful_causal_mask(
  rng: jax.Array,
  attn_mask: jax.Array,
  *,
  fcm_min: float = 0.0,
  fcm_max: float = 0.0,
  per_query: bool = True,
) -> jax.Array:
  """Forgetful causal mask: causal AND key-padding AND keep, for training only.

  Per sequence b, r_b ~ U[fcm_min, fcm_max]; keep[b, q, k] = (U[b, q, k] >= r_b) with
  keep[b, :, 0] = True, so position 0 is always attendable and no causal row is empty for
  right-padded sequences. `>=` (rather than the code's `>`, a measure-zero difference) makes
  fcm_max = 0 give exactly the plain causal mask. The paper masks 0-5% of past tokens [M]; the
  official default is 0/0 (off).
  [U] `per_query=False` draws one U per key shared by all queries ([B, 1, T] broadcast), which
  is how we recall `coh/llama.py`; the spec's form (default) draws per (query, key).

  Args:
    rng: PRNG key.
    attn_mask: `[B, T]` bool, true on real tokens (keys that may be attended).
    fcm_min, fcm_max: range of the masking ratio, 0 <= fcm_min <= fcm_max < 1.
    per_query: draw U per (query, key) (True) or per key (False).
  Returns:
    `[B, T, T]` bool, true where query q may attend key k.
  """
  if attn_mask.ndim != 2:
    raise ValueError(f"forgetful_causal_mask: attn_mask must be [B, T], got {attn_mask.shape}")
  if not 0.0 <= fcm_min <= fcm_max < 1.0:
    raise ValueError(
      f"forgetful_causal_mask: need 0 <= fcm_min <= fcm_max < 1, got {fcm_min}, {fcm_max}"
    )
  b, t = attn_mask.shape
  causal = jnp.tril(jnp.ones((t, t), bool))
  base = causal[None] & attn_mask.astype(bool)[:, None, :]
  if fcm_max == 0.0:
    return base
  k_ratio, k_u = jax.random.split(rng)
  ratio = jax.random.uniform(k_ratio, (b, 1, 1), minval=fcm_min, maxval=fcm_max)
  u = jax.random.uniform(k_u, (b, t if per_query else 1, t))
  keep = (u >= ratio).at[:, :, 0].set(True)
  return base & keep


@LOSSES.register("coh")
def coh_loss(
  *,
  logits: jax.Array,
  targets: jax.Array,
  loss_mask: jax.Array,
  pt_logits: jax.Array | None = None,
  pt_targets: jax.Array | None = None,
  pt_mask: jax.Array | None = None,
  pt_loss_weight: float = 0.01,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CoH objective: masked next-token loss on answer tokens, plus an optional pretraining LM loss.

    L = -(1/sum m) sum_i m_i log p(x_i | x_<i)  +  lambda_pt * L_LM(pretrain batch),
  lambda_pt = 0.01 [C]. Both terms are `next_token_loss` (token-mean over the batch).

  Args:
    logits: `[B, T, V]` predictions for `targets` (already shifted).
    targets: `[B, T]` int ids (tokens[:, 1:] of the built sequence).
    loss_mask: `[B, T]` (loss_mask[:, 1:] of the built sequence), nonzero on answer tokens.
    pt_logits, pt_targets, pt_mask: optional pretraining batch, same layout.
    pt_loss_weight: lambda_pt.
  Returns:
    (loss, metrics) with the feedback loss, token accuracy and (if given) the pretrain loss.
  """
  fb_loss, fb = next_token_loss(logits=logits, targets=targets, mask=loss_mask.astype(bool))
  metrics = {
    "coh_loss": fb_loss,
    "coh_num_tokens": fb["num_tokens"],
    "coh_token_accuracy": fb["token_accuracy"],
  }
  loss = fb_loss
  if pt_logits is not None:
    if pt_targets is None or pt_mask is None:
      raise ValueError("coh_loss: pt_logits needs pt_targets and pt_mask")
    pt_loss, _ = next_token_loss(logits=pt_logits, targets=pt_targets, mask=pt_mask.astype(bool))
    metrics["pt_loss"] = pt_loss
    loss = loss + pt_loss_weight * pt_loss
  metrics["loss"] = loss
  return loss, metrics
