import pytest

from critic_jax.registry import Registry


def test_unknown_name_lists_known_and_suggests():
  reg = Registry("loss")
  reg.register("dpo", 1)
  reg.register("ipo", 2)
  with pytest.raises(KeyError) as e:
    reg.get("dpp")
  msg = str(e.value)
  assert "Did you mean 'dpo'" in msg
  assert "dpo, ipo" in msg


def test_duplicate_raises_and_decorator_works():
  reg = Registry("model")

  @reg.register("a")
  def f():
    return 3

  assert reg.get("a")() == 3
  with pytest.raises(ValueError, match="already registered"):
    reg.register("a", 5)
  assert "a" in reg and len(reg) == 1
