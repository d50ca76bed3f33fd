"""Sampling with a KV cache: a jitted prefill and decode step, and the host loop over them.

Design (see `Sampler`):

* **Prefill once per prompt.** The B prompts `[B, P]` (right-padded, P a bucket
  length) run through the training forward once; their keys/values become the
  prefix of a `DecodeContext` shared by the G samples of each prompt (query rows
  b*G .. b*G+G-1 read prompt row b), so neither the prefill nor the prompt cache
  is repeated G times.
* **Decode steps over a preallocated cache.** Each step feeds the last sampled
  token of every sample; every layer writes the token's keys/values with one
  `dynamic_update_slice` into the donated cache buffer (in place: no copy of
  the cache; checked in the compiled HLO) and then attends over the prompt
  prefix and the generated chunks; then the next token is sampled. Generated
  keys/values live in chunks of `kv_chunk` slots; the step for chunk j reads
  chunks 0..j only (one compiled step per chunk). With one sample per prompt
  the prompt's keys/values sit at the front of chunk 0 (`merge_prompt`).
* **Exact log-probs.** The policy log-prob of a sampled token is
  `token_logprobs(logits, token)` on the raw model logits (the function the
  trainer uses), so sampler and trainer agree up to float reassociation; the
  log-prob under the processed (temperature/filtered) distribution is optional.
* **Deterministic keys.** Every draw uses `fold_in(fold_in(fold_in(rng,
  prompt_id), sample_index), step)`: results do not depend on batch size,
  padding, the number of devices, or how a prompt list is chunked.
* **Finished rows stop contributing**: after its stop token a row emits pad_id
  with mask 0 and log-prob 0, and the loop exits once every row is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from critic_jax.losses import token_logprobs
from critic_jax.models import Transformer
from critic_jax.models.attention import CACHE_AXES, VALUE_CACHE_AXES
from critic_jax.models.config import ModelConfig
from critic_jax.models.layers import constrain
from critic_jax.models.transformer import DecodeContext, fuse_projections
from critic_jax.parallel import (
  BATCH_AXES,
  DEFAULT_RULES,
  batch_sharding,
  logical_to_sharding,
  to_host,
)
from critic_jax.sampler.sampling import (
  SamplingConfig,
  processing_is_identity,
  sample_with_uniforms,
  step_uniforms,
)

__all__ = [
  "DEFAULT_PROMPT_BUCKETS",
  "GenerationConfig",
  "SampleOutput",
  "SampleState",
  "Sampler",
  "decode_model",
  "decode_params",
  "decode_step",
  "generate_on_device",
  "init_state",
  "prefill_prompts",
  "shard_params",
  "unscan_params",
]

CACHE_DTYPES = ("auto", "float32", "bfloat16")
DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """What to generate; every field is static (part of the compiled functions).

  Attributes:
    max_new_tokens: T, the most tokens sampled per response (stop token included).
    sampling: the sampling rule (`SamplingConfig`, chosen by name).
    stop_tokens: ids that end a response (EOS and any others); the stop token is
      kept in the response and counts in its mask.
    pad_id: what finished rows emit.
    vocab_limit: ids >= vocab_limit are never sampled (the model's vocabulary may
      be padded past the tokenizer's); None samples the whole vocabulary.
    kv_chunk: generated keys/values are stored in chunks of this many slots and a
      step reads only the chunks in use (one compiled step per chunk); None: one
      chunk of T - 1 slots; "auto" (default): `auto_kv_chunk` on a CPU backend, one
      chunk on accelerators.
    processed_logprobs: also record log-probs under the processed distribution.
    fused_projections: decode with q/k/v and the SwiGLU gate/up as one matmul each
      (`Transformer(..., fused_projections=True)`; the params are converted once per
      `generate` call by `fuse_projections`). Same math, fewer and larger matmuls per token;
      while generating, the fused kernels are a second copy of the q/k/v/gate/up weights
      (turn it off where memory is tighter than that).
    merge_prompt: with one sample per prompt (G = 1), store the prompt's keys/values in
      the first P slots of generated chunk 0 instead of a separate prefix, so each layer
      attends over one segment fewer (measured on a 2-core CPU, `bench_sampler.py`'s
      model, 150 calls alternating in one process: the whole generate call 0.97x the
      time). G > 1 always shares the prefix.
    cache_dtype: dtype of the cached prompt and generated keys/values: "float32",
      "bfloat16", or "auto": float32 when the default backend is the CPU (XLA:CPU
      upcasts a bfloat16 cache write to float32, rewriting the whole cache every step,
      and runs the small attention matmuls slower in bfloat16), else the model's compute
      dtype. Attention over the cache computes in the wider of the two dtypes.
  """

  max_new_tokens: int
  sampling: SamplingConfig = SamplingConfig()
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0
  vocab_limit: int | None = None
  kv_chunk: int | str | None = "auto"
  processed_logprobs: bool = False
  fused_projections: bool = True
  merge_prompt: bool = True
  cache_dtype: str = "auto"

  def __post_init__(self):
    if self.cache_dtype not in CACHE_DTYPES:
      raise ValueError(f"cache_dtype={self.cache_dtype!r} is not one of {CACHE_DTYPES}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    c = self.kv_chunk
    is_count = isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1
    if not (c is None or c == "auto" or is_count):
      raise ValueError(f"kv_chunk must be an int >= 1, None or 'auto', got {c!r}")
    object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))

  def resolved_cache_dtype(self, compute_dtype) -> jnp.dtype:
    """The KV cache dtype for a model computing in `compute_dtype`."""
    if self.cache_dtype != "auto":
      return jnp.dtype(self.cache_dtype)
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else compute_dtype)

  @property
  def cache_slots(self) -> int:
    """Generated tokens ever fed back (the last sampled one never is)."""
    return max(self.max_new_tokens - 1, 1)

  @property
  def chunk_size(self) -> int:
    """Generated-KV slots per chunk (`kv_chunk` resolved for the default backend)."""
    chunk = self.kv_chunk
    if chunk == "auto":
      chunk = auto_kv_chunk(self.cache_slots) if jax.default_backend() == "cpu" else None
    return min(int(chunk or self.cache_slots), self.cache_slots)

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.cache_slots / self.chunk_size)


def auto_kv_chunk(slots: int) -> int:
  """The CPU default chunk for `slots` generated-KV slots: about sqrt(8 * slots), rounded
  up to a multiple of 32, at most 8 chunks (each chunk is one more compiled step).

  A step attending over j chunks pays a fixed cost per chunk (its own small matmuls, mask,
  max and sum) and reads every slot of them; on average it reads C / 2 slots past the
  tokens it needs, so the best chunk C grows as sqrt(slots). Measured on a 2-core CPU
  (`bench_sampler.py`'s model, batch 16, prompt 32, alternating in one process): 64 new
  tokens, chunk 32 took 0.95x the time of one chunk; 128 new tokens, chunk 32 0.88-0.89x,
  64 0.91x, 48 0.93x, 24 0.98x, 16 1.05x (chunks that are not multiples of 32 slots ran
  slower than their size predicts). Accelerators keep one chunk: there a chunk's fixed
  cost (kernel launches) buys back far more slots.
  """
  if slots <= 32:
    return slots
  c = 32 * math.ceil(math.sqrt(8 * slots) / 32)
  return min(max(c, 32 * math.ceil(slots / (8 * 32))), slots)


@flax.struct.dataclass
class SampleState:
  """The decode loop's carry (R = B * G sample rows, prompt-major; T = max_new_tokens).

  Attributes:
    context: `DecodeContext` (prompt prefix keys `[B, K, H, P]` per layer, generated
      key chunks `[R, K, H, C]`; values with the last two axes swapped; with G = 1 and
      `merge_prompt`, no prefix and chunk 0 `[B, K, H, P + C]`).
    last: `[R]` int32 the token sampled last (fed at the next step).
    tokens: `[R, T]` int32 sampled tokens; pad_id after a row finished.
    logprobs: `[R, T]` float32 policy log-probs of `tokens` (0 after finishing).
    processed_logprobs: `[R, T]` float32 log-probs under the processed distribution,
      or None.
    lengths: `[R]` int32 tokens in each response so far (stop token included).
    finished: `[R]` bool rows that emitted a stop token.
    step: `[]` int32 tokens sampled so far (the index the next token goes to).
    uniforms: `[R, T]` float32, the draw of row r at step t: uniform(fold_in(key_r, t))
      with key_r = fold_in(fold_in(rng, prompt_id), sample_index), all drawn up front;
      None for greedy decoding.
  """

  context: DecodeContext
  last: jax.Array
  tokens: jax.Array
  logprobs: jax.Array
  processed_logprobs: jax.Array | None
  lengths: jax.Array
  finished: jax.Array
  step: jax.Array
  uniforms: jax.Array | None


@flax.struct.dataclass
class SampleOutput:
  """Generated responses on the host (numpy), rows prompt-major (R = B * G).

  Attributes:
    tokens: `[R, T]` int32 response ids, pad_id after the response.
    mask: `[R, T]` bool real response tokens (stop token included).
    logprobs: `[R, T]` float32 log pi(token) under the unmodified policy, 0 where masked.
    processed_logprobs: `[R, T]` float32 under the sampled-from distribution, or None.
    lengths: `[R]` int32 response lengths.
    finished: `[R]` bool ended by a stop token (else truncated at max_new_tokens).
    prompt_index: `[R]` int32 row of the prompt batch each sample belongs to.
  """

  tokens: np.ndarray
  mask: np.ndarray
  logprobs: np.ndarray
  processed_logprobs: np.ndarray | None
  lengths: np.ndarray
  finished: np.ndarray
  prompt_index: np.ndarray


def decode_model(model: Transformer, fused_projections: bool = False) -> Transformer:
  """The model to decode with: scanned layers become unrolled ones (per-layer caches), and
  with `fused_projections` q/k/v and gate/up are one matmul each (`decode_params` converts)."""
  if model.fused_projections and not fused_projections:
    raise ValueError(
      "the model has fused projections (its params hold qkv/gate_up kernels, which are not "
      "split back): decode it with GenerationConfig(fused_projections=True)"
    )
  if not model.config.scan_layers and model.fused_projections == fused_projections:
    return model
  cfg = model.config
  if cfg.scan_layers:
    cfg = cfg.replace(scan_layers=False, remat="none")
  return Transformer(cfg, fused_projections=fused_projections)


def unscan_params(params: Any, num_layers: int) -> Any:
  """`{"layers": stacked}` params of a scanned model -> `{"layer_i": ...}` for `decode_model`."""
  if "layers" not in params:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def decode_params(params: Any, config: ModelConfig, fused_projections: bool) -> Any:
  """The training model's params -> `decode_model(..., fused_projections)`'s (idempotent)."""
  params = unscan_params(params, config.num_layers)
  return fuse_projections(params, config) if fused_projections else params


def shard_params(model: Transformer, params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Places `params` with the shardings training uses (logical axes -> mesh axes)."""
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  )
  shardings = logical_to_sharding(abstract, mesh, rules)
  return jax.device_put(params, shardings)


def _constrain_k(x: jax.Array) -> jax.Array:
  return constrain(x, CACHE_AXES)


def _constrain_v(x: jax.Array) -> jax.Array:
  return constrain(x, VALUE_CACHE_AXES)


def prefill_prompts(
  model: Transformer, params, tokens: jax.Array, lengths: jax.Array
) -> tuple[jax.Array, tuple, tuple]:
  """Runs the prompts through the (training) forward once.

  Args:
    tokens: `[B, P]` right-padded prompt ids.
    lengths: `[B]` int32 real tokens per prompt (>= 1).
  Returns:
    (logits `[B, V]` float32 after each prompt's last token, per-layer prompt keys
    `[B, K, H, P]` and values `[B, K, P, H]` as L-tuples).
  """
  b, p = tokens.shape
  seg = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
  out = model.apply(
    {"params": params}, tokens, segment_ids=seg, packed=False, return_kv=True, heads=()
  )  # fmt: skip
  last = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)
  logits = model.apply({"params": params}, last, method="lm_logits")[:, 0].astype(jnp.float32)
  n = model.config.num_layers
  pk = tuple(_constrain_k(out.kv.k[i]) for i in range(n))
  pv = tuple(_constrain_v(out.kv.v[i]) for i in range(n))
  return logits, pk, pv


def _record(state: SampleState, logits: jax.Array, cfg: GenerationConfig) -> SampleState:
  """Samples the token at index `state.step` from `logits [R, V]` and records it."""
  t = state.step
  u = None
  if state.uniforms is not None:
    u = jax.lax.dynamic_slice_in_dim(state.uniforms, t, 1, axis=1)[:, 0]
  tok, plp = sample_with_uniforms(u, logits, cfg.sampling, cfg.vocab_limit)
  if processing_is_identity(cfg.sampling, cfg.vocab_limit, logits.shape[-1]):
    lp = plp  # the same log softmax of the same logits: skip a second pass over V
  else:
    lp = token_logprobs(logits, tok)
  active = ~state.finished
  tok = jnp.where(active, tok, jnp.int32(cfg.pad_id))

  def put(buf, col):
    return constrain(
      jax.lax.dynamic_update_slice(buf, col[:, None].astype(buf.dtype), (0, t)),
      ("act_batch", None),
    )

  stop = jnp.asarray(cfg.stop_tokens or (-1,), jnp.int32)
  return state.replace(
    last=tok,
    tokens=put(state.tokens, tok),
    logprobs=put(state.logprobs, jnp.where(active, lp, 0.0)),
    processed_logprobs=(
      None
      if state.processed_logprobs is None
      else put(state.processed_logprobs, jnp.where(active, plp, 0.0))
    ),
    lengths=state.lengths + active.astype(jnp.int32),
    finished=state.finished | (active & jnp.isin(tok, stop)),
    step=t + 1,
  )


def init_state(
  model: Transformer,
  cfg: GenerationConfig,
  num_samples: int,
  params,
  tokens: jax.Array,
  lengths: jax.Array,
  prompt_ids: jax.Array,
  rng: jax.Array,
) -> SampleState:
  """Prefills the prompts, allocates the generated-token cache and samples token 0.

  Args:
    num_samples: G samples per prompt (static).
    tokens: `[B, P]` right-padded prompts; lengths `[B]` int32 (>= 1).
    prompt_ids: `[B]` int32 global prompt ids (they seed each prompt's samples);
      -1 marks a padding row, which starts finished (emits nothing, never delays
      the early exit).
    rng: a PRNG key.
  """
  mcfg = model.config
  b = tokens.shape[0]
  r = b * num_samples
  logits, pk, pv = prefill_prompts(model, params, tokens, lengths)
  dtype = cfg.resolved_cache_dtype(mcfg.compute_dtype)
  pk, pv = (tuple(x.astype(dtype) for x in kv) for kv in (pk, pv))
  k_shape = (r, mcfg.num_kv_heads, mcfg.resolved_head_dim, cfg.chunk_size)
  v_shape = (r, mcfg.num_kv_heads, cfg.chunk_size, mcfg.resolved_head_dim)
  merge = cfg.merge_prompt and num_samples == 1

  def chunks(shape, put, prompt, axis):
    def chunk(j, prompt_kv):
      empty = jnp.zeros(shape, dtype)
      if merge and j == 0:  # chunk 0 = [the prompt's P slots | generated slots]
        return put(jnp.concatenate([prompt_kv, empty], axis=axis))
      return put(empty)

    return tuple(
      tuple(chunk(j, prompt[i]) for j in range(cfg.num_chunks)) for i in range(mcfg.num_layers)
    )

  context = DecodeContext(
    prefix_k=() if merge else pk, prefix_v=() if merge else pv,
    prefix_len=lengths.astype(jnp.int32),
    k=chunks(k_shape, _constrain_k, pk, 3), v=chunks(v_shape, _constrain_v, pv, 2),
    num_generated=jnp.zeros((), jnp.int32), prompt_slots=tokens.shape[1] if merge else 0,
  )  # fmt: skip
  ids = jnp.repeat(prompt_ids.astype(jnp.int32), num_samples)
  index = jnp.tile(jnp.arange(num_samples, dtype=jnp.int32), b)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, ids)
  keys = jax.vmap(jax.random.fold_in)(keys, index)
  t = cfg.max_new_tokens
  buf = functools.partial(jnp.zeros, (r, t))
  state = SampleState(
    context=context,
    last=jnp.zeros((r,), jnp.int32),
    tokens=constrain(jnp.full((r, t), cfg.pad_id, jnp.int32), ("act_batch", None)),
    logprobs=constrain(buf(jnp.float32), ("act_batch", None)),
    processed_logprobs=(
      constrain(buf(jnp.float32), ("act_batch", None)) if cfg.processed_logprobs else None
    ),
    lengths=jnp.zeros((r,), jnp.int32),
    finished=jnp.repeat(prompt_ids < 0, num_samples),
    step=jnp.zeros((), jnp.int32),
    uniforms=(
      None
      if cfg.sampling.method == "greedy"
      else constrain(step_uniforms(keys, t), ("act_batch", None))
    ),
  )
  return _record(state, jnp.repeat(logits, num_samples, axis=0), cfg)


def decode_step(
  model: Transformer, cfg: GenerationConfig, chunk: int, params, state: SampleState
) -> SampleState:
  """Feeds every row's last token, caches its keys/values, samples the next token.

  `chunk` (static) is the generated-cache chunk the fed token is written to:
  `state.step - 1` must lie in `[chunk * C, (chunk + 1) * C)`. Only chunks
  0..chunk are passed to the model (and read); it writes the token's keys/values
  into chunk `chunk` in place (the state is donated) before attending.
  """
  ctx = state.context
  view = ctx.replace(
    k=tuple(layer[: chunk + 1] for layer in ctx.k), v=tuple(layer[: chunk + 1] for layer in ctx.v)
  )
  out = model.apply({"params": params}, state.last[:, None], context=view, heads=("lm",))
  new = out.context
  ctx = new.replace(
    k=tuple(a + b[chunk + 1 :] for a, b in zip(new.k, ctx.k, strict=True)),
    v=tuple(a + b[chunk + 1 :] for a, b in zip(new.v, ctx.v, strict=True)),
  )
  return _record(state.replace(context=ctx), out.logits[:, 0].astype(jnp.float32), cfg)


def generate_on_device(
  model: Transformer,
  cfg: GenerationConfig,
  num_samples: int,
  params,
  tokens: jax.Array,
  lengths: jax.Array,
  prompt_ids: jax.Array,
  rng: jax.Array,
) -> SampleState:
  """The whole generation as one traceable function (jit it): prefill, then a
  `lax.while_loop` per cache chunk that exits as soon as every row has finished."""
  fused = cfg.fused_projections
  model, params = decode_model(model, fused), decode_params(params, model.config, fused)
  state = init_state(model, cfg, num_samples, params, tokens, lengths, prompt_ids, rng)
  c = cfg.chunk_size
  for j in range(cfg.num_chunks):
    end = min((j + 1) * c + 1, cfg.max_new_tokens)

    def cond(s, end=end):
      return (s.step < end) & ~jnp.all(s.finished)

    state = jax.lax.while_loop(cond, functools.partial(decode_step, model, cfg, j, params), state)
  return state


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (past the largest, the next multiple of it)."""
  for b in sorted(buckets):
    if b >= n:
      return b
  top = max(buckets)
  return math.ceil(n / top) * top


class Sampler:
  """Compiled generation for one model and `GenerationConfig`, driven from the host.

  `loop="host"` runs a Python loop over small jitted pieces: prefill + first
  token, then one decode step per token with the state donated (the cache is
  updated in place). The all-finished check reads the flag of the *previous*
  step, so it never stalls the device: the next step is already queued when the
  host blocks on it. `loop="device"` jits the whole loop (`generate_on_device`,
  one `lax.while_loop` per cache chunk, exiting when every row is done).
  `loop="auto"` (default) takes the device loop on CPU backends and the host
  loop on accelerators. The host loop's per-step dispatch costs about 0.3 ms of
  host CPU (cProfile: 23 ms over 63 steps of a 4-layer model); on an accelerator
  that overlaps the running step, on a CPU backend it competes with the
  computation for the same cores. Measured on a shared 2-core CPU: the two
  loops are within noise for steps of a few ms, and the device loop is up to
  1.5x faster when steps are ~0.5 ms (the 0.6M-parameter "tiny" preset). On one
  H100 (0.9B Llama shape, bfloat16, batch 64, 128 + 256 tokens) the device loop took
  543.8 ms and the host loop 585.5 ms, one run each: too little to change the default.

  Prompt lengths are padded up to a bucket (`prompt_buckets`) and the prompt
  batch up to a multiple of `batch_multiple`, so a run compiles once per
  (batch, bucket, G). With a `mesh`, the prompt batch is split over the batch
  axes ("data", "fsdp") (and padded to a multiple of their size); params keep
  whatever sharding they carry (use `shard_params` for training's); every
  function traces under the mesh and the logical-axis rules.
  """

  def __init__(
    self,
    model: Transformer,
    config: GenerationConfig,
    *,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
    batch_multiple: int = 1,
    loop: str = "auto",
  ):
    if loop not in ("auto", "host", "device"):
      raise ValueError(f"loop must be 'auto', 'host' or 'device', got {loop!r}")
    vocab = model.config.vocab_size
    if not 0 <= config.pad_id < vocab:
      # Prompts are padded with it: a row past the embedding table is NaN, and attention's
      # zero weights on the padding would spread it to every real token of the row.
      raise ValueError(
        f"GenerationConfig.pad_id={config.pad_id} is not a token id of the model "
        f"(model.vocab_size={vocab})"
      )
    if loop == "auto":
      devices = mesh.devices.flat if mesh is not None else jax.devices()
      loop = "device" if next(iter(devices)).platform == "cpu" else "host"
    self.train_model = model
    self.model = decode_model(model, config.fused_projections)
    self.config = config
    self.mesh, self.rules = mesh, rules
    self.prompt_buckets = tuple(prompt_buckets)
    self.batch_multiple = int(batch_multiple)
    self.loop = loop
    self._init = {}
    self._steps = {}
    self._device = {}
    self._decode_params = jax.jit(
      functools.partial(
        decode_params, config=model.config, fused_projections=config.fused_projections
      )
    )
    self.last_timing: dict[str, float] = {}

  # --- compiled pieces (one per static shape key) -----------------------------
  def _init_fn(self, g: int):
    if g not in self._init:
      self._init[g] = jax.jit(functools.partial(init_state, self.model, self.config, g))
    return self._init[g]

  def _step_fn(self, chunk: int):
    if chunk not in self._steps:

      def step(params, state):
        state = decode_step(self.model, self.config, chunk, params, state)
        return state, jnp.all(state.finished)

      self._steps[chunk] = jax.jit(step, donate_argnums=(1,))
    return self._steps[chunk]

  def _device_fn(self, g: int):
    if g not in self._device:
      self._device[g] = jax.jit(functools.partial(generate_on_device, self.model, self.config, g))
    return self._device[g]

  def compiled_count(self) -> int:
    """Compiled executables so far (for checking that a rerun does not recompile)."""
    fns = [*self._init.values(), *self._steps.values(), *self._device.values()]
    return sum(f._cache_size() for f in fns)

  # --- host side --------------------------------------------------------------
  def decode_params(self, params):
    """The training model's params -> what the compiled pieces (`self.model`) take:
    scanned layers unrolled and, with `fused_projections`, q/k/v and gate/up fused (a
    copy of those kernels; `generate` makes it once per call)."""
    if not (self.train_model.config.scan_layers or self.config.fused_projections):
      return params
    mesh_ctx, rules_ctx = self._contexts()
    with mesh_ctx, rules_ctx:
      return self._decode_params(params)

  def _contexts(self):
    if self.mesh is None:
      return contextlib.nullcontext(), contextlib.nullcontext()
    return jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules)

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

  def _prepare(self, tokens, lengths, prompt_offset):
    tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
      raise ValueError(
        f"tokens must be [B, P] and lengths [B], got {tokens.shape}, {lengths.shape}"
      )
    if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
      raise ValueError(f"prompt lengths must be in [1, {tokens.shape[1]}], got {lengths.tolist()}")
    mcfg = self.model.config
    if mcfg.position == "learned" and lengths.max() + self.config.max_new_tokens > mcfg.max_seq_len:
      raise ValueError(
        f"prompt ({lengths.max()}) + max_new_tokens ({self.config.max_new_tokens}) exceed the "
        f"model's learned positions (max_seq_len={mcfg.max_seq_len})"
      )
    b = tokens.shape[0]
    p = bucket_length(int(lengths.max()), self.prompt_buckets)
    multiple = self.batch_multiple
    if self.mesh is not None:
      multiple = math.lcm(multiple, int(np.prod([self.mesh.shape[a] for a in BATCH_AXES])))
    bp = math.ceil(b / multiple) * multiple
    padded = np.full((bp, p), self.config.pad_id, np.int32)
    width = min(p, tokens.shape[1])
    padded[:b, :width] = tokens[:, :width]
    lens = np.ones((bp,), np.int32)
    lens[:b] = lengths
    ids = np.full((bp,), -1, np.int32)  # padding rows start finished
    ids[:b] = np.arange(prompt_offset, prompt_offset + b, dtype=np.int32)
    return b, padded, lens, ids

  def generate(
    self,
    params,
    tokens: np.ndarray,
    lengths: np.ndarray,
    rng: jax.Array,
    *,
    num_samples: int = 1,
    prompt_offset: int = 0,
    timing: bool = False,
  ) -> SampleOutput:
    """Samples `num_samples` responses for each of the B prompts.

    Args:
      params: the (training) model's params.
      tokens: `[B, P']` right-padded prompt ids; lengths `[B]` real tokens (>= 1).
      rng: PRNG key; results are a function of (rng, prompt_offset + b, sample
        index) per row, nothing else.
      num_samples: G samples per prompt, sharing the prompt's prefill and cache.
      prompt_offset: global id of prompt row 0 (so chunking a prompt list into
        several calls gives the same samples as one call).
      timing: block after the prefill to time it (`last_timing`).
    Returns:
      `SampleOutput` with R = B * G rows, prompt-major.
    """
    b, tokens, lengths, ids = self._prepare(tokens, lengths, prompt_offset)
    g = int(num_samples)
    if g < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    t0 = time.perf_counter()
    params = self.decode_params(params)
    mesh_ctx, rules_ctx = self._contexts()
    with mesh_ctx, rules_ctx:
      args = (params, self._put(tokens), self._put(lengths), self._put(ids), rng)
      if self.loop == "device":
        state = self._device_fn(g)(*args)
        steps = None
      else:
        state = self._init_fn(g)(*args)
        if timing:
          jax.block_until_ready(state)
          self.last_timing["prefill_s"] = time.perf_counter() - t0
        steps = self._host_loop(params, state)
        state = steps.pop("state")
      out = _to_output(state, b * g, g)
    self.last_timing["total_s"] = time.perf_counter() - t0
    if steps is not None:
      self.last_timing["decode_steps"] = steps["steps"]
    return out

  def _host_loop(self, params, state: SampleState) -> dict[str, Any]:
    cfg = self.config
    c = cfg.chunk_size
    pending = None  # the previous step's all-finished flag (read one step late)
    step = 1
    while step < cfg.max_new_tokens:
      state, done = self._step_fn((step - 1) // c)(params, state)
      step += 1
      if pending is not None and bool(pending):
        break
      pending = done
    return {"state": state, "steps": step - 1}


def _to_output(state: SampleState, rows: int, g: int) -> SampleOutput:
  lengths = to_host(state.lengths)[:rows]
  t = state.tokens.shape[1]
  return SampleOutput(
    tokens=to_host(state.tokens)[:rows],
    mask=np.arange(t)[None, :] < lengths[:, None],
    logprobs=to_host(state.logprobs)[:rows],
    processed_logprobs=(
      None if state.processed_logprobs is None else to_host(state.processed_logprobs)[:rows]
    ),
    lengths=lengths,
    finished=to_host(state.finished)[:rows],
    prompt_index=np.repeat(np.arange(rows // g, dtype=np.int32), g),
  )
