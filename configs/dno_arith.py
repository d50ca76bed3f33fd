"""Iterative DNO-Prct on embedded arithmetic: on-policy samples + gold, scored, best vs worst.

    python scripts/train.py --config=configs/dno_arith.py --workdir=runs/dno \
        --config.init.checkpoint=runs/sft_arith      # pi_0 = the SFT model
    python scripts/train.py --config=configs/dno_arith.py:correct --workdir=runs/dno_01

Each of `dno.iterations` iterations samples K = 5 responses per prompt from the current
policy pi_t, adds the gold answer, scores the K + 1 candidates (default "task_distance":
1 / (1 + |predicted - answer|); "correct" variant: 0/1 exact match), keeps (best, worst) when
the score margin is >= 0.5, and trains DPO against pi_t for `dno.steps_per_iteration` steps
(spec §8; K, the margin, the steps and the iteration count are [U] there).
`train.num_steps` follows iterations x steps_per_iteration. Variants: "", "correct",
"no_gold" (samples only), "tiny" (2 iterations of 1 step, tests).
"""

import ml_collections

from configs import dpo_arith


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  known = ("", "correct", "no_gold", "tiny")
  if arg not in known:
    raise ValueError(f"unknown variant {arg!r} of dno_arith; known: {', '.join(map(repr, known))}")
  c = dpo_arith.get_config("tiny" if arg == "tiny" else "")
  c.unlock()
  c.loss = "dno_prct"
  c.dno = ml_collections.ConfigDict({
    "pairs": "on_policy",
    "iterations": 3,  # [U] 3-6 reported
    "steps_per_iteration": 100,  # [U]
    "num_samples": 5,  # K on-policy samples (+ 1 gold), as in the paper
    "add_gold": True,
    "scorer": "task_distance",  # a name in critic_jax.train.preference_scorers.SCORERS
    "margin_threshold": 0.5,  # [U] delta, on the scorers' [0, 1] scale
    "prompts_per_iteration": 1024,  # fresh prompt subsets per iteration (0: all prompts)
    "reset_optimizer": True,  # each iteration a fresh DPO run from pi_t
    "max_new_tokens": 5,
    "sampling": {"method": "temperature", "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                 "min_p": 0.0},
    "sample_batch_size": 256,
    "score_workers": 2,
    "score_timeout_s": 10.0,
  })  # fmt: skip
  c.train.num_steps = c.dno.get_ref("iterations") * c.dno.get_ref("steps_per_iteration")
  c.train.eval_every = 100
  c.train.ckpt_every = 50
  if arg == "correct":
    c.dno.scorer = "task_correct"
  elif arg == "no_gold":
    c.dno.add_gold = False
  elif arg == "tiny":
    c.dno.iterations = 2
    c.dno.steps_per_iteration = 1
    c.dno.num_samples = 2
    c.dno.prompts_per_iteration = 16
    c.dno.sample_batch_size = 16
    c.optimizer.warmup_steps = 0  # one step per iteration: no warmup, so pi_t moves
    c.optimizer.lr = 1e-3
    c.train.eval_every = 2
    c.train.ckpt_every = 2
    c.eval.generate = False
  c.lock()
  return c
