"""The notebooks run: every code cell of `notebooks/quickstart.ipynb`, in order, fewer steps."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_cells(name: str) -> list[str]:
  with open(os.path.join(ROOT, "notebooks", name)) as f:
    nb = json.load(f)
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_quickstart_runs(tmp_path, monkeypatch):
  pytest.importorskip("matplotlib")
  import matplotlib

  matplotlib.use("Agg")
  cells = _code_cells("quickstart.ipynb")
  # The notebook's own values, shrunk: each substitution must find its text.
  subs = {
    "config.train.num_steps = 1500": "config.train.num_steps = 20",
    "config.train.eval_every = 500": "config.train.eval_every = 10; config.eval.num_examples = 64",
    "/tmp/critic_jax_quickstart": str(tmp_path / "run"),
  }
  source = "\n\n".join(cells)
  for old, new in subs.items():
    assert old in source, f"the notebook no longer contains {old!r}: update this test"
    source = source.replace(old, new)
  monkeypatch.chdir(os.path.join(ROOT, "notebooks"))  # as Jupyter runs it
  scope: dict = {}
  exec(compile(source, "quickstart.ipynb", "exec"), scope)  # noqa: S102
  final = scope["final"]
  assert 0.0 <= final["eval/accuracy"] <= 1.0 and final["eval/loss"] > 0, final
  assert len(scope["tr"]) >= 1  # train/loss rows plotted from metrics.jsonl
  assert scope["plt"].gca().get_ylabel() == "train loss"
