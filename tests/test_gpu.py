"""Checks that need a GPU (skipped on other backends): cuDNN attention against XLA's.

`scripts/device_checks.sh` runs this file first on a lent GPU machine. On a CPU the same
assertions run through XLA in `test_model.py::test_cudnn_config_keeps_packed_segments_apart`
(with "cudnn" routed to XLA); here the real cuDNN kernel is compared, in bfloat16.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from critic_jax.models import ModelConfig, Transformer
from critic_jax.train.sft import make_train_step
from critic_jax.train.state import TrainState

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")

# cuDNN flash attention wants 16-bit inputs and a head dim that is a multiple of 8.
CFG = ModelConfig.preset(
  "tiny", d_model=256, num_heads=4, num_kv_heads=2, mlp_dim=512, dtype="bfloat16",
  attention_impl="xla",
)  # fmt: skip


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def _setup(t=128, b=2):
  tokens = jnp.asarray(np.random.RandomState(0).randint(4, CFG.vocab_size, (b, t)), jnp.int32)
  params = nn.unbox(Transformer(CFG).init(jax.random.key(0), tokens))["params"]
  return tokens, params


def test_cudnn_equals_xla_on_padded_and_packed_rows():
  tokens, params = _setup()
  xla, cudnn = Transformer(CFG), Transformer(CFG.replace(attention_impl="cudnn"))
  # One right-padded segment per row: the sequence-lengths path.
  seg = jnp.asarray([[1] * 128, [1] * 100 + [0] * 28], jnp.int32)
  ref = xla.apply({"params": params}, tokens, segment_ids=seg).logits
  out = cudnn.apply({"params": params}, tokens, segment_ids=seg, packed=False).logits
  assert _rel(out[0], ref[0]) < 5e-2 and _rel(out[1, :100], ref[1, :100]) < 5e-2
  # Packed rows: the explicit segment mask; each segment equals its own sequence.
  seg = jnp.asarray([[1] * 60 + [2] * 68, [1] * 128], jnp.int32)
  pos = jnp.asarray([list(range(60)) + list(range(68)), list(range(128))], jnp.int32)
  out = cudnn.apply({"params": params}, tokens, segment_ids=seg, positions=pos).logits
  alone = xla.apply({"params": params}, tokens[:1, 60:]).logits
  assert _rel(out[0, 60:], alone[0]) < 5e-2


def test_cudnn_train_step_equals_xla():
  tokens, params = _setup()
  batch = {
    "tokens": tokens,
    "segment_ids": jnp.ones_like(tokens),
    "positions": jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape),
    "loss_mask": jnp.ones(tokens.shape, bool),
  }
  tx = optax.sgd(0.0)
  out = {}
  for impl in ("xla", "cudnn"):
    model = Transformer(CFG.replace(attention_impl=impl, remat="dots_no_batch"))
    state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      rng=jax.random.PRNGKey(0),
    )  # fmt: skip
    step = jax.jit(make_train_step(model, tx, lambda s: 0.0, "sft", 1, packed=False))
    _, out[impl] = step(state, batch)
  assert abs(float(out["cudnn"]["loss"]) - float(out["xla"]["loss"])) < 1e-2
  assert _rel(out["cudnn"]["grad_norm"], out["xla"]["grad_norm"]) < 5e-2
