"""Data: tokenizers, synthetic tasks, JSONL loaders and grain pipelines."""

from critic_jax.data.jsonl import JsonlError, load_sft_jsonl, read_jsonl, render_chat
from critic_jax.data.pipeline import encode_prompts, pad_example, sft_dataset, tokenize_example
from critic_jax.data.tasks import TASKS, Addition, ArithmeticSteps, Example, make_task
from critic_jax.data.tokenizers import TOKENIZERS, CharTokenizer, HFTokenizer, make_tokenizer

__all__ = [
  "TASKS",
  "TOKENIZERS",
  "Addition",
  "ArithmeticSteps",
  "CharTokenizer",
  "Example",
  "HFTokenizer",
  "JsonlError",
  "encode_prompts",
  "load_sft_jsonl",
  "make_task",
  "make_tokenizer",
  "pad_example",
  "read_jsonl",
  "render_chat",
  "sft_dataset",
  "tokenize_example",
]
