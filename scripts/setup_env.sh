#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs critic_jax into it with the given extras.
# Usage: source scripts/setup_env.sh [extras]   e.g. "test" or "test,bench"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
venv="${CRITIC_JAX_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.critic_jax_installed_${extras:-core}"
if [ ! -f "$stamp" ] || [ "$root/setup.cfg" -nt "$stamp" ]; then
  spec="$root"
  [ -n "$extras" ] && spec="$root[$extras]"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$venv/bin/python" -c "import critic_jax, jax, flax, optax, orbax.checkpoint, grain" \
    || { echo "critic_jax: environment set-up failed" >&2; exit 1; }
  touch "$stamp"
fi
