#!/usr/bin/env bash
# The test command: sets up ./.venv with the test extra, lints, runs the suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh test
py="${CRITIC_JAX_VENV:-$root/.venv}/bin/python"
"$py" -m ruff check critic_jax configs scripts tests
set +e
"$py" -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests (e.g. a -k filter matched nothing).
if [ "$rc" -eq 5 ]; then
  echo "pytest: no tests collected"
  rc=0
fi
exit "$rc"
