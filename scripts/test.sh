#!/usr/bin/env bash
# Install what the tests need, then lint, type-check and run the suite.
# Works on a fresh machine: makes .venv, installs redis-server when it is missing.
# Extra arguments go to pytest (e.g. --run-slow for benchmark-grade runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
  # The package may start a system-wide server; the tests start their own on free ports.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi

echo "== ruff";  .venv/bin/ruff check .
echo "== mypy";  .venv/bin/mypy
echo "== wheel"
# The built wheel installs into a fresh environment and its CLI runs from there.
rm -rf build/wheel-check && mkdir -p build/wheel-check
.venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir build/wheel-check .
"$PY" -m venv build/wheel-check/venv
build/wheel-check/venv/bin/pip install --quiet build/wheel-check/*.whl
build/wheel-check/venv/bin/affinity-gateway check-config examples/gateway.yaml
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
