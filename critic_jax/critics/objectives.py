"""Reward-model objectives: adapters between a `RewardModel` and a pure preference loss.

An objective owns the reward model(s) and turns a paired batch into a loss; the trainer
(`critic_jax/train/reward.py`) owns everything else. Chosen by name from `REWARD_OBJECTIVES`:

* "bt":  scalar RM, L = -mean log sigma((r_w - r_l - m) / tau)   (Stiennon et al., 2009.01325)
* "gpm": GPM head,  L = -mean log sigma((s(y_w > y_l) - m) / tau) (Zhang et al., 2410.02197)
* "crm": two scalar RMs A and B trained together; each keeps the ceil(rho B) pairs it finds
  easiest (lowest BT loss) and those train the *other* one (Zhang et al., 2505.10597).
Spec: `shared/specs/preference-and-reward.md` §1, §3, §4.

A paired batch holds, for side in ("chosen", "rejected"), `{side}_tokens`, `{side}_positions`,
`{side}_segment_ids`, `{side}_loss_mask` `[B, T]`, plus `flipped [B]` bool (known label flips;
all false when unknown). Every objective has:
  init_params(rng) -> boxed params;  models: None, or the top-level param keys of its RMs;
  loss(params, batch, step) -> (loss, {name: scalar});  grad_metrics(grads) -> {name: scalar};
  scores(params, batch) -> {name: [B]} per pair, "margin*" keys being preference margins;
  scalar_rewards, and then sequence_rewards(params, rows) -> {"reward*": [B]} per sequence;
  supports_accumulation: whether micro-batches may split the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from critic_jax.critics.reward_model import RewardModel
from critic_jax.losses import LOSSES, crm_keep_ratio, crm_select, masked_mean
from critic_jax.models import ModelConfig
from critic_jax.registry import Registry

__all__ = ["REWARD_OBJECTIVES", "BTObjective", "CRMObjective", "GPMObjective", "stack_sides"]

REWARD_OBJECTIVES: Registry = Registry("reward objective")
_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


def stack_sides(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`[2B, T]` rows: the B chosen sequences, then the B rejected ones (one forward pass)."""
  return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in _FIELDS}


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  b = x.shape[0] // 2
  return x[:b], x[b:]


def _apply(rm: RewardModel, params, rows: dict[str, jax.Array]):
  return rm.apply(
    params, rows["tokens"], positions=rows["positions"], segment_ids=rows["segment_ids"],
    loss_mask=rows["loss_mask"],
  )  # fmt: skip


@REWARD_OBJECTIVES.register("bt")
class BTObjective:
  """Bradley-Terry on the trunk's scalar reward head, with margin m and temperature tau."""

  supports_accumulation = True
  scalar_rewards = True
  models = None

  def __init__(self, model: ModelConfig, *, margin: float = 0.0, tau: float = 1.0):
    self.rm = RewardModel(model, "scalar")
    self.margin, self.tau = float(margin), float(tau)
    self.loss_fn = LOSSES.get("bt")

  def init_params(self, rng):
    return self.rm.init(rng)

  def _pair_terms(self, params, batch):
    r_w, r_l = _halves(_apply(self.rm, params, stack_sides(batch)).rewards)
    loss, m = self.loss_fn(
      chosen_rewards=r_w, rejected_rewards=r_l, margin=self.margin or None, tau=self.tau
    )
    return r_w, r_l, loss, m

  def loss(self, params, batch, step):
    del step
    _, _, loss, m = self._pair_terms(params, batch)
    return loss, {
      "loss": loss, "accuracy": m["accuracy"], "margin": m["margin"],
      "chosen_reward": m["chosen_rewards_mean"], "rejected_reward": m["rejected_rewards_mean"],
    }  # fmt: skip

  def grad_metrics(self, grads):
    return {"grad_norm": optax.tree.norm(grads)}

  def scores(self, params, batch):
    r_w, r_l, _, m = self._pair_terms(params, batch)
    return {"margin": r_w - r_l, "chosen_reward": r_w, "rejected_reward": r_l,
            "loss": m["per_example_loss"]}  # fmt: skip

  def sequence_rewards(self, params, rows):
    return {"reward": _apply(self.rm, params, rows).rewards}


@REWARD_OBJECTIVES.register("gpm")
class GPMObjective:
  """General Preference Model: representations of 2k dims, temperature tau (0.1 in the paper),
  optional prompt gate, L2 normalisation flag, margin. `gate_scale` / `gate_temperature` are
  the spec's [U] gate variants (1, 1 = the released plain softmax)."""

  supports_accumulation = True
  scalar_rewards = False  # a GPM scores pairs; there is no scalar reward to centre
  models = None

  def __init__(self, model: ModelConfig, *, k: int = 3, tau: float = 0.1, gate: bool = False,
               normalize: bool = True, margin: float = 0.0, gate_scale: float = 1.0,
               gate_temperature: float = 1.0):  # fmt: skip
    self.rm = RewardModel(model, "gpm", gpm_k=int(k), gpm_gate=bool(gate))
    self.kw = dict(
      tau=float(tau), normalize=bool(normalize), margin=float(margin) or None,
      gate_scale=float(gate_scale), gate_temperature=float(gate_temperature),
    )  # fmt: skip
    self.loss_fn = LOSSES.get("gpm")

  def init_params(self, rng):
    return self.rm.init(rng)

  def _pair_terms(self, params, batch):
    out = _apply(self.rm, params, stack_sides(batch))
    e_w, e_l = _halves(out.emb)
    # The gate reads the last prompt token of the chosen sequence (spec §3b).
    gate = None if out.gate_logits is None else _halves(out.gate_logits)[0]
    return self.loss_fn(chosen_emb=e_w, rejected_emb=e_l, gate_logits=gate, **self.kw)

  def loss(self, params, batch, step):
    del step
    loss, m = self._pair_terms(params, batch)
    return loss, {"loss": loss, "accuracy": m["accuracy"], "score": m["score_mean"]}

  def grad_metrics(self, grads):
    return {"grad_norm": optax.tree.norm(grads)}

  def scores(self, params, batch):
    _, m = self._pair_terms(params, batch)
    return {"margin": m["score"], "loss": m["per_example_loss"]}


@REWARD_OBJECTIVES.register("crm")
class CRMObjective:
  """Collaborative reward modelling: scalar RMs A and B (params {"A": ..., "B": ...}).

  Per pair i, margins m_a(i) = r_a(y_w) - r_a(y_l). With rho = `crm_keep_ratio(step)`
  (1 - noise_rate, or the [U] co-teaching ramp over `ramp_steps` > 0), A keeps its ceil(rho B)
  largest-margin pairs (lowest BT loss) S_A and B keeps S_B (`crm_select`: no gradient through
  the selection); L = mean_{S_B} l_A + mean_{S_A} l_B, so each RM learns only from its peer's
  picks (`selection="peer"`). The params are disjoint, so the gradient of L with respect to
  each RM is exactly its own cross update. `selection="self"` is the paper's "Self Review"
  ablation (each RM trains on its own picks). With `knows_flips`, the metrics include the clean
  fraction of the batch and of the pairs that train each RM.
  """

  supports_accumulation = False  # selection ranks the whole batch
  scalar_rewards = True
  models = ("A", "B")

  def __init__(self, model: ModelConfig, *, noise_rate: float = 0.4, ramp_steps: int = 0,
               selection: str = "peer", knows_flips: bool = False):  # fmt: skip
    if selection not in ("peer", "self"):
      raise ValueError(f"crm: selection must be 'peer' or 'self', got {selection!r}")
    self.rm = RewardModel(model, "scalar")
    self.noise_rate, self.ramp_steps = float(noise_rate), int(ramp_steps) or None
    self.peer, self.knows_flips = selection == "peer", knows_flips
    self.loss_fn = LOSSES.get("crm_bt")

  def init_params(self, rng):
    r_a, r_b = jax.random.split(rng)
    return {"A": self.rm.init(r_a), "B": self.rm.init(r_b)}

  def _margins(self, params, batch):
    rows = stack_sides(batch)
    out = {}
    for m in self.models:
      r_w, r_l = _halves(_apply(self.rm, params[m], rows).rewards)
      out[m] = (r_w, r_l, r_w - r_l)
    return out

  def _select(self, m_a, m_b, step):
    rho = crm_keep_ratio(step, noise_rate=self.noise_rate, ramp_steps=self.ramp_steps)
    mask_a, mask_b = crm_select(margins_A=m_a, margins_B=m_b, keep_ratio=rho)  # peer picks
    return (mask_a, mask_b, rho) if self.peer else (mask_b, mask_a, rho)

  def masks(self, params, batch, step) -> tuple[jax.Array, jax.Array]:
    """(pairs that train A `[B]`, pairs that train B `[B]`) bool, at optimizer step `step`."""
    t = self._margins(params, batch)
    return self._select(t["A"][2], t["B"][2], step)[:2]

  def loss(self, params, batch, step):
    t = self._margins(params, batch)
    m_a, m_b = t["A"][2], t["B"][2]
    mask_a, mask_b, rho = self._select(m_a, m_b, step)
    loss_a, _ = self.loss_fn(margins=m_a, mask=mask_a)
    loss_b, _ = self.loss_fn(margins=m_b, mask=mask_b)
    loss = loss_a + loss_b
    metrics = {
      "loss": loss, "loss_A": loss_a, "loss_B": loss_b,
      "accuracy": jnp.mean((m_a + m_b > 0).astype(jnp.float32)),
      "margin": jnp.mean((m_a + m_b) / 2), "keep_ratio": jnp.asarray(rho, jnp.float32),
      "num_selected": jnp.sum(mask_a).astype(jnp.float32),
      "selection_overlap": jnp.sum(mask_a & mask_b).astype(jnp.float32),
    }  # fmt: skip
    for name in self.models:
      r_w, r_l, mg = t[name]
      metrics[f"accuracy_{name}"] = jnp.mean((mg > 0).astype(jnp.float32))
      metrics[f"margin_{name}"] = jnp.mean(mg)
      metrics[f"chosen_reward_{name}"] = jnp.mean(r_w)
      metrics[f"rejected_reward_{name}"] = jnp.mean(r_l)
    if self.knows_flips:
      clean = (~batch["flipped"].astype(bool)).astype(jnp.float32)
      metrics["clean_fraction_batch"] = jnp.mean(clean)
      metrics["clean_fraction_trains_A"] = masked_mean(clean, mask_a)
      metrics["clean_fraction_trains_B"] = masked_mean(clean, mask_b)
    return loss, metrics

  def grad_metrics(self, grads):
    return {"grad_norm": optax.tree.norm(grads), "grad_norm_A": optax.tree.norm(grads["A"]),
            "grad_norm_B": optax.tree.norm(grads["B"])}  # fmt: skip

  def scores(self, params, batch):
    t = self._margins(params, batch)
    m_a, m_b = t["A"][2], t["B"][2]
    return {"margin": (m_a + m_b) / 2, "margin_A": m_a, "margin_B": m_b}

  def sequence_rewards(self, params, rows):
    return {f"reward_{m}": _apply(self.rm, params[m], rows).rewards for m in self.models}
