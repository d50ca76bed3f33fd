"""Tajwar et al. (2024) bandit: on-policy sampling and negative gradients vs offline maximum
likelihood at an equal reward-query budget (spec preference-and-reward.md §13f).

    python scripts/repro_bandit.py            # ~1-2 minutes on 2 CPU cores
    python scripts/repro_bandit.py --quick    # fewer learning rates and rounds

A tabular policy over A = 100 actions (10 states, each with its own logits, all starting at the
tanh-Cauchy pi_ref) is trained for R rounds; each round draws N = 10 actions per state (from
the policy: on-policy; from pi_ref: offline), queries the reward R_c(a) = exp(-((a - c)/10)^2),
and takes 15 Adam steps on one of:
  ML (maximum likelihood): best-of-N, L = -log pi(a_best);
  NEG (negative gradient):  IPO on all sample pairs with |r_w - r_l| >= 0.2, target 10
                            (`pairwise_preference_loss`), or best-of-N plus the mean log-prob of
                            the worse samples ("bon+neg", `best_of_n_loss(neg_weight=1)`).
Printed: expected reward E_pi[R] (exact) after 25%, 50% and 100% of the query budget, mean and
std over 5 seeds, for c = 70 (reward peak in a low-likelihood region of pi_ref) and c = 20
(aligned with the mode). Every method is run at each learning rate of a sweep; the table shows
each method at its best learning rate (by the mean of the three budget points) and, for
reference, at the spec's untuned 3e-3.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from critic_jax.losses.bandit import (  # noqa: E402
  best_of_n_loss,
  bump_reward,
  pairwise_preference_loss,
  run_bandit,
  tanh_cauchy_ref_probs,
)

REF = tanh_cauchy_ref_probs()
METHODS = {  # name: (loss, uses a negative gradient)
  "ML: best-of-N": (best_of_n_loss, False),
  "NEG: IPO": (
    functools.partial(
      pairwise_preference_loss,
      ref_logp=jnp.log(REF),
      loss_type="ipo",
      ipo_target=10.0,
      reward_threshold=0.2,
    ),
    True,
  ),  # fmt: skip
  "NEG: bon+neg": (functools.partial(best_of_n_loss, neg_weight=1.0, negative="mean_worse"), True),
}


def sweep(loss_fn, center: float, lrs, rounds: int, seeds: int = 5) -> np.ndarray:
  """Expected reward `[lr, on_policy (off, on), seed, round]`, one compilation per method."""
  reward_fn = functools.partial(bump_reward, center=center, sigma=10.0)

  def one(lr, on, key):
    _, m = run_bandit(
      rng=key, loss_fn=loss_fn, ref_probs=REF, reward_fn=reward_fn, num_states=10,
      num_rounds=rounds, num_samples=10, inner_steps=15, learning_rate=lr, on_policy=on,
    )  # fmt: skip
    return m["expected_reward"]

  keys = jax.random.split(jax.random.key(0), seeds)
  f = jax.vmap(jax.vmap(jax.vmap(one, (None, None, 0)), (None, 0, None)), (0, None, None))
  return np.asarray(jax.jit(f)(jnp.asarray(lrs, jnp.float32), jnp.array([False, True]), keys))


def run(center: float, lrs, rounds: int) -> dict:
  points = [rounds // 4, rounds // 2, rounds]
  out = {}
  for name, (loss_fn, _) in METHODS.items():
    er = sweep(loss_fn, center, lrs, rounds)[..., [p - 1 for p in points]]  # [lr, on, seed, 3]
    for on in (0, 1):
      score = er[:, on].mean(axis=(1, 2))  # mean over seeds and budget points, per lr
      best = int(np.argmax(score))
      setting = ("on-policy " if on else "offline   ") + name
      untuned = er[lrs.index(3e-3), on].mean(0) if 3e-3 in lrs else None
      out[setting] = {"lr": lrs[best], "mean": er[best, on].mean(0), "std": er[best, on].std(0),
                      "untuned": untuned}  # fmt: skip
  return {"points": points, "rows": out, "queries": [p * 100 for p in points]}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true")
  args = p.parse_args(argv)
  lrs = [3e-3, 1e-2, 3e-2, 1e-1] if args.quick else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
  rounds = 60 if args.quick else 100
  results = {}
  t0 = time.time()
  for center in (70.0, 20.0):
    r = run(center, lrs, rounds)
    r0 = float(jnp.sum(REF * bump_reward(jnp.arange(100), center=center, sigma=10.0)))
    print(f"\nreward c={center:g}: E_pi_ref[R] = {r0:.3f}; expected reward at "
          f"{', '.join(str(q) for q in r['queries'])} reward queries (5 seeds)")  # fmt: skip
    for setting, v in r["rows"].items():
      cells = "  ".join(f"{m:.3f}+-{s:.3f}" for m, s in zip(v["mean"], v["std"], strict=True))
      untuned = "" if v["untuned"] is None else f"  | lr 3e-3: {v['untuned'][-1]:.3f}"
      print(f"  {setting:24s} best lr {v['lr']:<6g} {cells}{untuned}")
    results[center] = r
  print(f"\n({time.time() - t0:.0f}s)")
  return results


if __name__ == "__main__":
  main()
