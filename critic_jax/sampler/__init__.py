"""Sampling: jitted prefill/decode pieces over a KV cache and the host-side loop."""

from critic_jax.sampler.decode import decode_step, greedy_generate, prefill

__all__ = ["decode_step", "greedy_generate", "prefill"]
