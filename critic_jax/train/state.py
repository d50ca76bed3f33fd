"""Train state and its sharded initialisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from critic_jax.parallel import logical_to_sharding

__all__ = ["TrainState", "init_train_state", "abstract_with_shardings"]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to resume training bit-for-bit.

  Attributes:
    step: `[]` int32 optimizer steps taken.
    params: the model's parameter pytree.
    opt_state: the optimizer state pytree.
    rng: `[2]` uint32 base key; each step uses `fold_in(rng, step)`.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_train_state(
  init_params: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh: Mesh,
  rules,
) -> tuple[TrainState, Any]:
  """Sharded init: `eval_shape` -> shardings from logical axes -> `jit(out_shardings=...)`.

  Args:
    init_params: rng -> boxed params (as returned by `model.init(...)["params"]`).
    tx: the optimizer; its state inherits the parameters' logical axes.
    rng: `[2]` uint32 key.
  Returns:
    (state, shardings of the state), with no array ever materialised whole on a device.
  """
  init_rng, state_rng = jax.random.split(rng)

  def init(r):
    params = init_params(r)
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )

  abstract = jax.eval_shape(init, init_rng)
  shardings = logical_to_sharding(abstract, mesh, rules)
  with nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(init_rng)
  return state, shardings


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings, the restore target for checkpoints."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
