"""The loss registry: `LOSSES.get(name)` returns a pure `(loss, metrics)` function."""

from critic_jax.registry import Registry

__all__ = ["LOSSES"]

LOSSES: Registry = Registry("loss")
