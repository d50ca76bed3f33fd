"""Trainers, picked by `config.trainer` from `TRAINERS`; each is `(config, workdir) -> metrics`."""

from critic_jax.registry import Registry

__all__ = ["TRAINERS", "get_trainer"]

TRAINERS: Registry = Registry("trainer")


def _sft(config, workdir):
  from critic_jax.train.sft import train_and_evaluate

  return train_and_evaluate(config, workdir)


TRAINERS.register("sft", _sft)


def _reward_model(config, workdir):
  from critic_jax.train.reward import train_and_evaluate

  return train_and_evaluate(config, workdir)


TRAINERS.register("reward_model", _reward_model)


def _preference(config, workdir):
  from critic_jax.train.preference import train_and_evaluate

  return train_and_evaluate(config, workdir)


TRAINERS.register("preference", _preference)


def get_trainer(name: str):
  return TRAINERS.get(name)
