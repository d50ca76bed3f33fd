"""DPO (and IPO, hinge, cDPO, DPO+SFT, CoH) on embedded arithmetic preference pairs.

    python scripts/train.py --config=configs/dpo_arith.py --workdir=runs/dpo \
        --config.init.checkpoint=runs/sft_arith      # start from (and refer to) an SFT run
    python scripts/train.py --config=configs/dpo_arith.py:ipo --workdir=runs/ipo
    python scripts/train.py --config=configs/dpo_arith.py:coh --workdir=runs/coh

Pairs: prompt "a+b=", chosen = the right sum, rejected = a near miss
(`critic_jax/data/task_pairs.py`). Variants: "" (DPO, sigmoid), "ipo", "hinge",
"cdpo" (label smoothing 0.1), "sft" (DPO + 0.1 x SFT), "online" (reference
computed every step, exact token KL reported), "coh", "tiny" (2 steps, tests).
D2O (negatives only, reference self-samples) and iterative on-policy DNO-Prct have their own
configs built on this one: configs/d2o_arith.py and configs/dno_arith.py.
"""

import ml_collections

from configs import common
from critic_jax.models import ModelConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  c = ml_collections.ConfigDict()
  c.trainer = "preference"
  c.seed = 0
  c.loss = "dpo"
  c.loss_kwargs = ml_collections.ConfigDict(
    {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "sft_weight": 0.0}
  )
  c.reference = ml_collections.ConfigDict({"mode": "precompute"})
  c.coh = ml_collections.ConfigDict({"template": "default", "fcm_min": 0.0, "fcm_max": 0.05})
  c.model = ModelConfig.preset("tiny", vocab_size=128).to_configdict(preset="tiny")
  c.tokenizer = ml_collections.ConfigDict({"name": "char", "path": ""})
  c.task = ml_collections.ConfigDict({"name": "addition", "kwargs": {"num_digits": 2}})
  c.data = ml_collections.ConfigDict(dict(
    source="task", jsonl_path="", eval_jsonl_path="", seq_len=12, batch_size=64,
    num_train_examples=4096,
  ))  # fmt: skip
  c.optimizer = common.optimizer(lr=1e-4, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0)
  c.train = common.train(num_steps=300, log_every=25, eval_every=100, ckpt_every=100)
  c.eval = ml_collections.ConfigDict(
    {"num_examples": 512, "batch_size": 256, "max_new_tokens": 6, "generate": True}
  )
  c.init = common.init(checkpoint="")
  c.mesh = common.mesh()
  c.sharding_rules = common.sharding_rules()
  c.distributed = common.distributed()

  if arg == "ipo":
    c.loss_kwargs.loss_type = "ipo"
  elif arg == "hinge":
    c.loss_kwargs.loss_type = "hinge"
  elif arg == "cdpo":
    c.loss_kwargs.label_smoothing = 0.1
  elif arg == "sft":
    c.loss_kwargs.sft_weight = 0.1
  elif arg == "online":
    c.reference.mode = "online"
  elif arg == "coh":
    c.loss = "coh"
    c.data.seq_len = 64
    c.optimizer.lr = 1e-3
  elif arg == "tiny":
    c.model.d_model = 32
    c.model.mlp_dim = 64
    c.data.batch_size = 8
    c.data.num_train_examples = 32
    c.eval.num_examples = 16
    c.eval.batch_size = 16
    c.train = common.train(num_steps=2, log_every=1, eval_every=2, ckpt_every=2,
                           progress_bar=False)  # fmt: skip
  elif arg:
    raise ValueError(
      f"unknown variant {arg!r} of dpo_arith; known: '', ipo, hinge, cdpo, sft, online, coh, tiny"
    )
  c.lock()
  return c
