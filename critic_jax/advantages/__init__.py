"""Advantage estimators (pure JAX), registered by name in `ADVANTAGES`."""

from critic_jax.advantages.registry import ADVANTAGES

__all__ = ["ADVANTAGES"]
