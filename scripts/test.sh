#!/usr/bin/env bash
# The test command: sets up ./.venv with the test extra, lints, runs the suite.
# Usage: bash scripts/test.sh [pytest args]
# Tests run in PYTEST_WORKERS (default 2) pytest-xdist processes: most of the suite's time is
# single-threaded XLA compilation, so two workers finish it in about 2/3 of the time on 2 cores.
# PYTEST_WORKERS=0 runs everything in this process (pytest's own -n 0 works too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh test
py="${CRITIC_JAX_VENV:-$root/.venv}/bin/python"
"$py" -m ruff check critic_jax configs scripts tests
set +e
"$py" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests (e.g. a -k filter matched nothing).
if [ "$rc" -eq 5 ]; then
  echo "pytest: no tests collected"
  rc=0
fi
exit "$rc"
