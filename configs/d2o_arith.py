"""D2O (negatives only; positives sampled from the reference) on embedded arithmetic.

    python scripts/train.py --config=configs/d2o_arith.py --workdir=runs/d2o \
        --config.init.checkpoint=runs/sft_arith      # the reference = the SFT model
    python scripts/train.py --config=configs/d2o_arith.py:per_step --workdir=runs/d2o_fresh

Data: prompt "a+b=" with only the rejected near miss of `critic_jax/data/task_pairs.py`
(the chosen side is dropped); the positive side is K = 11 samples of the reference per
prompt (spec §6: K = 11, alpha = beta = 0.1). Variants: "" (samples drawn once before
training and cached in the workdir), "per_step" (fresh reference samples for every batch),
"online" (reference log-probs of the negatives computed every step, exact token KL
reported), "tiny" (2 steps, tests). Start from an SFT run: from a random init the reference
samples are noise.
"""

import ml_collections

from configs import dpo_arith


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  known = ("", "per_step", "online", "tiny")
  if arg not in known:
    raise ValueError(f"unknown variant {arg!r} of d2o_arith; known: {', '.join(map(repr, known))}")
  c = dpo_arith.get_config("tiny" if arg == "tiny" else "")
  c.unlock()
  c.loss = "d2o"
  c.loss_kwargs = ml_collections.ConfigDict({"alpha": 0.1, "beta": 0.1})
  c.d2o = ml_collections.ConfigDict({
    "num_samples": 11,
    "samples": "precompute",  # spec §6 [M]: self-samples generated once before training
    "max_new_tokens": 5,  # "198" + EOS fits; prompt (7 with BOS) + 5 = seq_len 12
    "sampling": {"method": "temperature", "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                 "min_p": 0.0},  # temperature 1: true samples of pi_ref
    "sample_batch_size": 256,  # prompts per sampler call
  })  # fmt: skip
  c.data.batch_size = 32
  if arg == "per_step":
    c.d2o.samples = "per_step"
  elif arg == "online":
    c.reference.mode = "online"
  elif arg == "tiny":
    c.d2o.num_samples = 2
    c.d2o.sample_batch_size = 32
    c.data.batch_size = 8
    c.eval.generate = False
  c.lock()
  return c
