"""The advantage-estimator registry."""

from critic_jax.registry import Registry

__all__ = ["ADVANTAGES"]

ADVANTAGES: Registry = Registry("advantage estimator")
