"""In-process A/B of the SFT train step: the baseline against a variant, alternating.

    python ab.py EXPERIMENT [bench_sft.py flags]    # e.g. ab.py noattn --preset sft_arith \
                                                    #        --batch 128 --seq 12

Both steps are built as `scripts/bench_sft.py` builds its JAX side (same model, batch,
AdamW, `keep_freed_memory`); the variant is traced under the experiment's patch (or compiled
with its XLA options, or built from its model config). Then `--pairs` pairs of `--per` steps
each run alternately (the order flips every pair) and the median of the per-pair time ratios
B / A is printed with how many pairs B won: on this noisy 2-core VM only a comparison inside
one process, interleaved, separates effects of a few percent. Experiments:

  noattn      attention core replaced by an elementwise q * v (what attention costs)
  btskr       causal attention as two einsums in [B, T, S, K, R] layout (no head transposes)
  mulsum      the same as broadcast multiplies and sums (no dot_general at all)
  xla         model.attention_impl = "xla" (jax.nn.dot_product_attention)
  swiglu_bar  an optimization barrier on (gate, up) before SwiGLU's gating
  swiglu_rec  model.swiglu_recompute = True (the backward's sigmoid via tanh: no CSE merge)
  sgd         optax.sgd instead of AdamW + clipping (what the optimizer costs)
  flag:JSON   XLA compile options for B, e.g. 'flag:{"xla_cpu_enable_fast_math": true}'
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import bench_sft  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from critic_jax.hostmem import keep_freed_memory  # noqa: E402
from critic_jax.models import Transformer, attention, layers  # noqa: E402
from critic_jax.parallel import DEFAULT_RULES, batch_sharding, make_mesh  # noqa: E402
from critic_jax.train.optim import make_optimizer  # noqa: E402
from critic_jax.train.sft import make_train_step  # noqa: E402
from critic_jax.train.state import init_train_state  # noqa: E402


@contextlib.contextmanager
def setattr_during(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def _causal_einsum(q, k, v, mask=None, *, block=64, scale=None, mulsum=False):
  b, t, n, h = q.shape
  kh = k.shape[2]
  scale = h**-0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, n // kh, h)
  if mulsum:
    s = jnp.sum(qg[:, :, None] * k[:, None, :, :, None, :], axis=-1)
  else:
    s = jnp.einsum("btkrh,bskh->btskr", qg, k)
  keep = (np.arange(t)[None, :] <= np.arange(t)[:, None])[None, :, :, None, None]
  if mask is not None:
    keep = keep & mask[:, 0, :, :, None, None]
  p = jax.nn.softmax(jnp.where(keep, s * scale, -1e30), axis=2)
  if mulsum:
    o = jnp.sum(p[..., None] * v[:, None, :, :, None, :], axis=2)
  else:
    o = jnp.einsum("btskr,bskh->btkrh", p, v)
  return o.reshape(b, t, n, h).astype(q.dtype)


def _elementwise_attention(q, k, v, mask=None, *, block=64, scale=None):
  return q * jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)


def _swiglu_barrier(gate, up, _orig=layers.swiglu):
  return _orig(*jax.lax.optimization_barrier((gate, up)))


def variant(name, cfg):
  """(patch context, model config, optimizer or None, XLA options or None) for B."""
  none = contextlib.nullcontext
  blocked = "blocked_attention"
  if name == "noattn":
    return (lambda: setattr_during(attention, blocked, _elementwise_attention)), cfg, None, None
  if name in ("btskr", "mulsum"):
    fn = lambda *a, **k: _causal_einsum(*a, **k, mulsum=name == "mulsum")  # noqa: E731
    return (lambda: setattr_during(attention, blocked, fn)), cfg, None, None
  if name == "xla":
    return none, cfg.replace(attention_impl="xla"), None, None
  if name == "swiglu_bar":
    return (lambda: setattr_during(layers, "swiglu", _swiglu_barrier)), cfg, None, None
  if name == "swiglu_rec":
    return none, cfg.replace(swiglu_recompute=True), None, None
  if name == "sgd":
    return none, cfg, optax.sgd(1e-4), None
  if name.startswith("flag:"):
    return none, cfg, None, json.loads(name[5:])
  raise SystemExit(f"unknown experiment {name!r}; see the docstring")


def main():
  name, rest = sys.argv[1], sys.argv[2:]
  pairs, per = int(os.environ.get("PAIRS", 16)), int(os.environ.get("PER", 5))
  args = bench_sft.parse(rest)
  keep_freed_memory()
  cfg = bench_sft.model_config(args)
  patch, cfg_b, tx_b, opts = variant(name, cfg)
  opt = {"name": "adamw", "lr": 1e-4, "warmup_steps": 0, "clip_norm": 1.0, "weight_decay": 0.0}
  tx, sched = make_optimizer(opt, 1000)
  mesh = make_mesh({"data": -1})
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    batch = {
      k: jax.device_put(v, batch_sharding(mesh, v.ndim))
      for k, v in bench_sft.batch_np(args, cfg.vocab_size).items()
    }

    def build(model_cfg, opt_tx, ctx, options):
      model = Transformer(model_cfg)
      init = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]  # noqa: E731
      state, sh = init_train_state(init, opt_tx, jax.random.PRNGKey(0), mesh, DEFAULT_RULES)
      step = jax.jit(
        make_train_step(model, opt_tx, sched, "sft", 1, packed=False),
        in_shardings=(sh, batch_sharding(mesh)), out_shardings=(sh, None), donate_argnums=(0,),
      )  # fmt: skip
      with ctx():
        compiled = step.lower(state, batch).compile(compiler_options=options)
      return [state, None, compiled]

    sides = {
      "A": build(cfg, tx, contextlib.nullcontext, None),
      "B": build(cfg_b, tx_b or tx, patch, opts),
    }

    def go(k, n):
      box = sides[k]
      t0 = time.perf_counter()
      for _ in range(n):
        box[0], box[1] = box[2](box[0], batch)
      jax.block_until_ready(box[1])
      return (time.perf_counter() - t0) / n

    for k in "AB":
      go(k, 3)
    ta, tb = [], []
    for i in range(pairs):
      t = {k: go(k, per) for k in ("AB" if i % 2 == 0 else "BA")}
      ta.append(t["A"])
      tb.append(t["B"])
    ratios = [b / a for a, b in zip(ta, tb, strict=True)]
    print(
      f"{name}: A {statistics.median(ta) * 1e3:.2f} ms, B {statistics.median(tb) * 1e3:.2f} ms, "
      f"B/A median {statistics.median(ratios):.4f}, B faster in {sum(r < 1 for r in ratios)} of "
      f"{pairs}; loss A {float(sides['A'][1]['loss']):.6f} B {float(sides['B'][1]['loss']):.6f}"
    )


if __name__ == "__main__":
  main()
