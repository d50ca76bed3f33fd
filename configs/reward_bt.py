"""Bradley-Terry reward model on a tiny transformer (Stiennon et al. 2020, spec §1).

    python scripts/train.py --config=configs/reward_bt.py --workdir=runs/reward_bt
    python scripts/train.py --config=configs/reward_bt.py:tiny --workdir=/tmp/t
    python scripts/train.py --config=configs/reward_bt.py:jsonl --workdir=runs/rm \
        --config.data.jsonl_path=train.jsonl --config.data.eval_jsonl_path=test.jsonl

Variants (the `:arg` after the file): "" (clean "noisy_bt" pairs: items with a hidden linear
score; held-out pairs over unseen items; reward centring over 64 reference items), "noise"
(40% flipped training labels), "margin" (BT with margin 0.5), "jsonl" (preference JSONL,
see critic_jax/data/preference.py), "tiny" (2 steps, for tests).

`reward_config()` is the shared base of every reward-model config; `--config.loss=gpm` or
`--config.loss=crm` swaps the objective (see critic_jax/train/reward.py for the keys).
"""

import ml_collections

from configs import common
from critic_jax.models import ModelConfig


def reward_config(loss: str = "bt") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = "reward_model"
  c.seed = 0
  c.loss = loss  # "bt" | "gpm" | "crm"
  c.bt = ml_collections.ConfigDict({"margin": 0.0, "tau": 1.0})
  # gate_scale / gate_temperature: the spec's [U] gate variants (1, 1 = plain softmax).
  c.gpm = ml_collections.ConfigDict(dict(
    k=3, tau=0.1, gate=False, normalize=True, margin=0.0, gate_scale=1.0, gate_temperature=1.0,
  ))  # fmt: skip
  # noise_rate: prior eta_hat, keep ratio rho = 1 - eta_hat; ramp_steps > 0: [U] co-teaching
  # ramp rho(t) = 1 - eta_hat min(t / ramp_steps, 1); curriculum: easy-to-hard epochs by the
  # mean margin; selection: "peer" (CRM) or "self" (the paper's Self Review ablation).
  c.crm = ml_collections.ConfigDict(
    {"noise_rate": 0.4, "ramp_steps": 0, "curriculum": True, "selection": "peer"}
  )
  c.model = ModelConfig.preset(
    "tiny", vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=256,
    heads=("reward",),
  ).to_configdict(preset="tiny")  # fmt: skip
  c.tokenizer = ml_collections.ConfigDict({"name": "char", "path": ""})
  c.data = ml_collections.ConfigDict(dict(
    source="task", task="noisy_bt", task_kwargs=ml_collections.ConfigDict({"noise_rate": 0.0}),
    jsonl_path="", eval_jsonl_path="", seq_len=8, batch_size=64,
  ))  # fmt: skip
  # Stiennon reward centring after training: the bias over reference responses (the task's,
  # or a prompt/response JSONL).
  c.centering = ml_collections.ConfigDict({"enabled": True, "reference_jsonl_path": ""})
  # checkpoint: a critic_jax workdir whose params (same tree) start this run;
  # hf_path: a transformers folder (causal LM or *ForSequenceClassification).
  c.init = common.init(checkpoint="")
  c.optimizer = common.optimizer(lr=1e-3, warmup_steps=50, end_lr_ratio=0.1, weight_decay=0.01)
  c.train = common.train(num_steps=1500, log_every=100, eval_every=500, ckpt_every=500)
  c.eval = ml_collections.ConfigDict({"batch_size": 256})
  c.mesh = common.mesh()
  c.sharding_rules = common.sharding_rules()
  c.distributed = common.distributed()
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Two steps of a 2-layer, 32-wide model on a few dozen pairs."""
  c.model.d_model = 32
  c.model.mlp_dim = 64
  c.data.batch_size = 8
  c.train = common.train(num_steps=2, log_every=1, eval_every=2, ckpt_every=2,
                         progress_bar=False)  # fmt: skip
  c.eval.batch_size = 32
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  c = reward_config("bt")
  if arg == "noise":
    c.data.task_kwargs.noise_rate = 0.4
  elif arg == "margin":
    c.bt.margin = 0.5
  elif arg == "jsonl":
    c.data.source = "jsonl"
    c.data.seq_len = 512
    c.model.vocab_size = 256
  elif arg == "tiny":
    c = tiny(c)
    c.data.task_kwargs = ml_collections.ConfigDict(dict(
      num_items=32, num_train_pairs=48, num_eval_items=16, num_eval_pairs=24, num_references=8,
      noise_rate=0.0,
    ))  # fmt: skip
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of reward_bt; known: '', noise, margin, jsonl, tiny")
  c.lock()
  return c
