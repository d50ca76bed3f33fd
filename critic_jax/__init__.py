"""critic_jax: train language models and their critics from feedback, in JAX."""

__version__ = "0.1.0"
