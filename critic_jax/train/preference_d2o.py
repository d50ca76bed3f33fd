"""D2O: preference optimisation from negatives only, the positives sampled from the reference.

    python scripts/train.py --config=configs/d2o_arith.py --workdir=runs/d2o \
        --config.init.checkpoint=runs/sft_arith

D2O (Duan et al., arXiv 2403.03419; spec §6) contrasts each human-labelled negative y_l with K
responses y_1..y_K sampled from the reference pi_r (the initial model):

    u(x) = beta * mean_i log(pi(y_i|x) / pi_r(y_i|x)) - alpha * log(pi(y_l|x) / pi_r(y_l|x)),
    L = -mean_x log sigma(u(x))                              (`critic_jax.losses.d2o_loss`).

The self-sample term is a Monte-Carlo estimate of -KL(pi_r || pi), reported as
`kl_ref_policy_mc` = KL(pi_r || pi); with `config.reference.mode="online"` the exact per-token
KL(pi || pi_r) on the sampled contexts is reported too (`kl_token`).

Self-samples (`config.d2o.samples`):
  "precompute" (default; spec §6: generated once from the initial model before training [M]):
    K samples per prompt and their reference log-probs are drawn once by the sampler and
    cached in `<workdir>/d2o_reference_samples.npz` (reused on resume).
  "per_step": K fresh reference samples for every batch, drawn on the host before each step
    (the reference is frozen, so these are draws from the same distribution).
The reference log-prob of a sample is the teacher-forced `response_logps` of the reference,
the function the step uses for the policy, so at pi = pi_r the loss is exactly log 2.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from critic_jax.data import Example, make_tokenizer
from critic_jax.data.pipeline import pad_example, tokenize_example
from critic_jax.data.preference import PreferenceExample, load_preference_jsonl
from critic_jax.losses import LOSSES
from critic_jax.train.common import (
  BatchFeeder,
  build_model,
  model_config_from,
  save_config,
  setup_mesh,
)
from critic_jax.train.loop import train_loop
from critic_jax.train.metrics import MetricWriter
from critic_jax.train.optim import make_optimizer
from critic_jax.train.preference import (
  apply_update,
  implicit_reward_accuracy,
  load_pairs,
  policy_and_reference,
  reference_logps,
  reference_online,
  response_logps,
  scalars,
  task_accuracy,
  token_kl,
)
from critic_jax.train.preference_rollouts import (
  ROW_KEYS,
  load_cache,
  make_logp_fn,
  make_sampler,
  rows_logps,
  sample_rows,
  save_cache,
  text_rows,
)
from critic_jax.train.state import TrainState

__all__ = ["make_d2o_step", "reference_samples", "d2o_dataset", "train_and_evaluate"]

log = logging.getLogger(__name__)
SAMPLE_MODES = ("precompute", "per_step")


def make_d2o_step(model, tx, schedule, loss_kwargs: dict, online_ref: bool):
  """(state, batch, ref_params) -> (state, metrics) for D2O.

  Batch (B prompts, K self-samples, T tokens): `neg_{tokens,positions,segment_ids,loss_mask}`
  `[B, T]` (the negatives), `self_*` `[B, K, T]` (the reference samples), `self_ref_logps`
  `[B, K]`, `self_mask [B, K]` bool, and without `online_ref` `ref_neg_logps [B]`. With
  `online_ref` every reference log-prob comes from `ref_params` (frozen) in the step.
  Negatives and samples go through one forward pass of `B + B*K` rows.
  """
  loss_fn = LOSSES.get("d2o")

  def step(state: TrainState, batch, ref_params):
    b, k, t = batch["self_tokens"].shape
    rows = {
      key: jnp.concatenate([batch[f"neg_{key}"], batch[f"self_{key}"].reshape(b * k, t)])
      for key in ROW_KEYS
    }
    ref_logits = None
    if online_ref:
      ref_lp, _, ref_logits, _ = response_logps(model, ref_params, rows)
      ref_lp, ref_logits = jax.lax.stop_gradient((ref_lp, ref_logits))
      ref_neg, ref_self = ref_lp[:b], ref_lp[b:].reshape(b, k)
    else:
      ref_neg, ref_self = batch["ref_neg_logps"], batch["self_ref_logps"]

    def objective(params):
      lp, _, logits, mask = response_logps(model, params, rows)
      loss, m = loss_fn(
        policy_neg_logps=lp[:b], refplus_neg_logps=ref_neg,
        policy_self_logps=lp[b:].reshape(b, k), refminus_self_logps=ref_self,
        self_mask=batch["self_mask"], **loss_kwargs,
      )  # fmt: skip
      # E_{y~pi_r}[log pi_r(y) - log pi(y)] = KL(pi_r || pi), the self-sample term's estimate.
      m = {**m, "kl_ref_policy_mc": -m["self_logratio_mean"]}
      m["self_valid_frac"] = jnp.mean(batch["self_mask"].astype(jnp.float32))
      if ref_logits is not None:
        m["kl_token"] = token_kl(logits[b:], ref_logits[b:], mask[b:])
      return loss, scalars(m)

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return apply_update(tx, schedule, state, grads, metrics)

  return step


def _sample_fields(rows: dict[str, np.ndarray], ref: np.ndarray, n: int, k: int) -> dict:
  out = {f"self_{key}": v.reshape(n, k, -1) for key, v in rows.items()}
  out["self_ref_logps"] = ref.reshape(n, k)
  out["self_mask"] = rows["loss_mask"].any(-1).reshape(n, k)
  return out


def reference_samples(
  path: str | None, sampler, logp_fn, ref_params, prompts: list[str], tokenizer, rng, *,
  num_samples: int, seq_len: int, sample_batch: int, eval_batch: int, mesh,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:  # fmt: skip
  """K reference samples per prompt and their reference log-probs, cached at `path`.

  Returns (`self_*` `[N, K, T]`, `self_ref_logps [N, K]` teacher-forced under `ref_params`,
  `self_sampler_logps [N, K]` the sampler's own log-probs, `self_mask [N, K]`; metrics).
  """
  meta = {"num_prompts": len(prompts), "num_samples": num_samples, "seq_len": seq_len,
          "first_prompt": prompts[0], "last_prompt": prompts[-1]}  # fmt: skip
  cached = load_cache(path, meta) if path else None
  if cached is not None:
    return cached[0], cached[1].get("metrics", {})
  rows, rollouts, metrics = sample_rows(
    sampler, ref_params, prompts, tokenizer, rng, num_samples=num_samples, seq_len=seq_len,
    batch_size=sample_batch,
  )  # fmt: skip
  ref = rows_logps(logp_fn, ref_params, rows, eval_batch, mesh)
  n = len(prompts)
  out = _sample_fields(rows, ref, n, num_samples)
  out["self_sampler_logps"] = rollouts.logprobs.sum(1).reshape(n, num_samples)
  # The sampler (KV cache) and teacher forcing score the same tokens: a sanity check.
  whole = ~(rows["loss_mask"].sum(1) < rollouts.response_lengths)
  gap = np.abs(out["self_sampler_logps"].reshape(-1) - ref)[whole]
  metrics["sampler_forward_logp_gap"] = float(gap.max()) if gap.size else 0.0
  metrics = {k: float(v) for k, v in metrics.items()}
  if path:
    save_cache(path, out, {**meta, "metrics": metrics})
  return out, metrics


class _FreshSamples:
  """BatchFeeder extra for `samples="per_step"`: K new reference samples for each batch.

  The draw of batch s uses `fold_in(rng, s)` (s counts from the resumed step), so a resumed
  run draws what the uninterrupted one would have.
  """

  def __init__(self, sampler, logp_fn, ref_params, prompts, tokenizer, rng, *, num_samples,
               seq_len, eval_batch, mesh, start: int):  # fmt: skip
    self.sampler, self.logp_fn, self.ref_params = sampler, logp_fn, ref_params
    self.prompts, self.tok, self.rng = prompts, tokenizer, rng
    self.k, self.seq_len, self.eval_batch, self.mesh = num_samples, seq_len, eval_batch, mesh
    self.count = start

  def __call__(self, batch: dict) -> dict:
    idx = np.asarray(batch["index"])
    rng = jax.random.fold_in(self.rng, self.count)
    self.count += 1
    rows, _, _ = sample_rows(
      self.sampler, self.ref_params, [self.prompts[i] for i in idx], self.tok, rng,
      num_samples=self.k, seq_len=self.seq_len, batch_size=len(idx),
    )  # fmt: skip
    ref = rows_logps(self.logp_fn, self.ref_params, rows, self.eval_batch, self.mesh)
    return _sample_fields(rows, ref, len(idx), self.k)


def d2o_dataset(
  negatives: list[PreferenceExample], tokenizer, *, seq_len: int, batch_size: int, seed: int,
  samples: dict[str, np.ndarray] | None = None, ref_neg: np.ndarray | None = None,
):  # fmt: skip
  """Shuffled, repeated batches: `neg_*` rows `[B, T]`, `index [B]`, and (when given) the
  cached `self_*` fields `[B, K, ...]` and `ref_neg_logps [B]`."""
  import grain

  def item(i):
    ex = negatives[i]
    row = pad_example(
      tokenize_example(Example(ex.prompt, ex.rejected), tokenizer, seq_len), seq_len,
      tokenizer.pad_id,
    )  # fmt: skip
    out = {f"neg_{k}": row[k] for k in ROW_KEYS}
    out["index"] = np.asarray(i, np.int32)
    if samples is not None:
      out.update({k: v[i] for k, v in samples.items() if k != "self_sampler_logps"})
    if ref_neg is not None:
      out["ref_neg_logps"] = ref_neg[i]
    return out

  ds = grain.MapDataset.range(len(negatives)).seed(seed).shuffle().repeat(None).map(item)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def _negatives(config, tokenizer) -> tuple[list[PreferenceExample], list, Any]:
  """Negatives-only training data (any chosen side is dropped), held-out pairs, the task."""
  d = config.data
  if d.source == "jsonl":
    if not d.jsonl_path:
      raise ValueError("config.data.source='jsonl' needs config.data.jsonl_path")
    template = getattr(tokenizer, "apply_chat_template", None)
    train = load_preference_jsonl(d.jsonl_path, template, negatives_only=True)
    evals = load_preference_jsonl(d.eval_jsonl_path, template) if d.eval_jsonl_path else []
    task = None
  else:
    train, evals, task = load_pairs(config, tokenizer)
  return [PreferenceExample(e.prompt, None, e.rejected) for e in train], evals, task


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a policy with D2O as `config` says (`config.loss="d2o"`); returns final metrics."""
  # --- mesh and checks ---------------------------------------------------------
  mesh, rules = setup_mesh(config)
  save_config(config, workdir)
  c = config.d2o
  if c.samples not in SAMPLE_MODES:
    raise ValueError(f"config.d2o.samples must be one of {SAMPLE_MODES}, got {c.samples!r}")
  online = reference_online(config)
  k = int(c.num_samples)
  if k < 1:
    raise ValueError(f"config.d2o.num_samples must be >= 1, got {k}")

  # --- data -----------------------------------------------------------------
  tokenizer = make_tokenizer(config.tokenizer.name, config.tokenizer.get("path") or None)
  negatives, eval_pairs, task = _negatives(config, tokenizer)
  d = config.data
  prompts = [e.prompt for e in negatives]

  # --- model and optimizer ----------------------------------------------------
  mcfg = model_config_from(config, tokenizer.vocab_size)
  model, init_params = build_model(mcfg)
  tx, schedule = make_optimizer(config.optimizer, config.train.num_steps)
  kwargs = dict(config.loss_kwargs)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # --- sharded init (the reference is the initial policy), or resume -----------
    ckpt, state, data_state, shardings, ref_params = policy_and_reference(
      config, workdir, init_params, tx, mesh, rules, mcfg
    )
    writer = MetricWriter(workdir, start_step=int(jax.device_get(state.step)))

    # --- reference self-samples and reference log-probs of the negatives ----------
    sampler = make_sampler(model, tokenizer, c, mesh, rules)
    logp_fn = make_logp_fn(model)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xD2)
    eb = config.eval.batch_size
    samples, extra = None, None
    if c.samples == "precompute":
      samples, smetrics = reference_samples(
        os.path.join(workdir, "d2o_reference_samples.npz"), sampler, logp_fn, ref_params,
        prompts, tokenizer, rng, num_samples=k, seq_len=d.seq_len,
        sample_batch=c.sample_batch_size, eval_batch=eb, mesh=mesh,
      )  # fmt: skip
      writer.write(int(state.step), smetrics, prefix="d2o/")
    else:
      extra = _FreshSamples(
        sampler, logp_fn, ref_params, prompts, tokenizer, rng, num_samples=k, seq_len=d.seq_len,
        eval_batch=eb, mesh=mesh, start=int(state.step),
      )  # fmt: skip
    ref_neg = None
    if not online:
      ref_neg = _cached_neg_logps(
        os.path.join(workdir, "d2o_reference_neg_logps.npz"), logp_fn, ref_params, negatives,
        tokenizer, d.seq_len, eb, mesh,
      )  # fmt: skip
    dataset = d2o_dataset(
      negatives, tokenizer, seq_len=d.seq_len, batch_size=d.batch_size, seed=config.seed,
      samples=samples, ref_neg=ref_neg,
    )  # fmt: skip
    feeder = BatchFeeder(dataset, mesh, d.batch_size, data_state, extra)

    # --- the jitted step ----------------------------------------------------
    step = make_d2o_step(model, tx, schedule, kwargs, online)
    jitted = jax.jit(
      step, in_shardings=(shardings, None, shardings.params), out_shardings=(shardings, None),
      donate_argnums=(0,),
    )  # fmt: skip

    def step_fn(st, batch):
      return jitted(st, batch, ref_params)

    # --- evaluation: implicit-reward accuracy on held-out full pairs -------------
    evaluate = None
    eval_pairs = [p for p in eval_pairs if p.chosen is not None]
    if eval_pairs:
      beta = float(kwargs.get("beta", 0.1))
      eval_ref = reference_logps(model, ref_params, eval_pairs, tokenizer, d.seq_len, eb, mesh)

      def evaluate(st):
        pol = reference_logps(model, st.params, eval_pairs, tokenizer, d.seq_len, eb, mesh)
        return implicit_reward_accuracy(pol, eval_ref, beta)

    state, final = train_loop(
      state=state, step_fn=step_fn, next_batch=feeder.next, data_state=feeder.get_state,
      evaluate=evaluate, ckpt=ckpt, writer=writer, train_cfg=config.train, desc="d2o",
    )  # fmt: skip
    if task is not None and config.eval.generate:
      final["eval/task_accuracy"] = task_accuracy(
        config, model, tokenizer, task, state.params, mesh
      )
    return final


def _cached_neg_logps(path, logp_fn, ref_params, negatives, tokenizer, seq_len, batch, mesh):
  """Reference log-probs `[N]` of the negatives, computed once and kept in the workdir."""
  meta = {"num": len(negatives), "seq_len": seq_len, "first": negatives[0].rejected}
  cached = load_cache(path, meta)
  if cached is not None:
    return cached[0]["ref_neg_logps"]
  rows = text_rows([e.prompt for e in negatives], [e.rejected for e in negatives], tokenizer,
                   seq_len)  # fmt: skip
  ref = rows_logps(logp_fn, ref_params, rows, batch, mesh)
  save_cache(path, {"ref_neg_logps": ref}, meta)
  return ref
