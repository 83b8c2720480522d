#!/usr/bin/env bash
# Run deploy/Dockerfile's steps without Docker, in fresh virtual environments under a
# temporary directory, and check that what they install serves:
#
#   build stage    COPY lines (from the repository) into a scratch source tree (or, for
#                  /wheels, the directory the runtime stage mounts), then
#                  every `RUN ... python -m pip ...` line of the stage, in a fresh venv
#   runtime stage  every `RUN ... python -m pip ...` line, in another fresh venv
#   then           check-config on examples/gateway.yaml; the ENTRYPOINT (config path,
#                  bind address and port swapped for the example file, 127.0.0.1 and a
#                  free port); the HEALTHCHECK command against it; /readyz; SIGTERM,
#                  and the exit code must be 0.
#
# The commands are read from the Dockerfile itself, so the two cannot drift apart;
# each one is echoed as `build-check: [stage] RUN <the Dockerfile's text>`.
# Progress lines are `build-check: ok <step>`; a failure ends with
# `build-check: FAILED <step>: <why>` and a non-zero exit.
#
# Usage: deploy/build-check.sh          (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dockerfile="$root/deploy/Dockerfile"
example="$root/examples/gateway.yaml"
PY=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/affinity-gateway-build-check.XXXXXX")
server_pid=""

cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

say() { echo "build-check: $*"; }
fail() {
  say "FAILED $1: $2"
  exit 1
}

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail interpreter "$PY is older than Python 3.11 (the image's version)"

# A stage's `python -m pip` is the venv's. When this interpreter's pip can act on another
# environment (pip >= 22.3: --python), the venvs are made without pip of their own,
# which saves most of the time a venv takes; otherwise each gets its own pip.
if "$PY" -m pip --python "$PY" --version >/dev/null 2>&1; then
  make_venv=("$PY" -m venv --without-pip)
  run_pip=("$PY" -m pip --python @VENV@/bin/python)
else
  make_venv=("$PY" -m venv)
  run_pip=(@VENV@/bin/python -m pip)
fi

# The Dockerfile as logical lines: continuations joined, comments and blanks dropped.
mapfile -t lines < <(
  sed -e 's/\r$//' "$dockerfile" | awk '
    /^[[:space:]]*#/ { next }
    { sub(/[[:space:]]+$/, "") }
    /\\$/ { sub(/\\$/, ""); acc = acc $0 " "; next }
    { line = acc $0; acc = ""; if (line ~ /[^[:space:]]/) print line }
  '
)

stage=-1            # 0: build, 1: runtime (the Dockerfile's FROM order)
stage_names=(build runtime)
entrypoint=""
healthcheck=""
pip_runs=0
src="$work/src"     # the build stage's WORKDIR
wheels="$work/wheels"
mkdir -p "$src" "$wheels"

venv_for_stage() { echo "$work/venv-${stage_names[$stage]}"; }

for line in "${lines[@]}"; do
  read -r instr rest <<<"$line"
  case "${instr^^}" in
    FROM)
      stage=$((stage + 1))
      [ "$stage" -le 1 ] || fail dockerfile "more than two stages; teach build-check.sh the new one"
      "${make_venv[@]}" "$(venv_for_stage)"
      say "ok ${stage_names[$stage]} stage: fresh venv"
      ;;
    COPY)
      case "$rest" in --from=*) continue ;; esac   # stage-to-stage copies: nothing to mirror
      [ "$stage" -eq 0 ] || fail dockerfile "COPY from the build context outside the build stage"
      read -r -a args <<<"$rest"
      dest=${args[-1]}
      unset 'args[-1]'
      case "$dest" in
        /wheels*) dest="$wheels${dest#/wheels}" ;;   # the directory the runtime stage mounts
        /*) fail dockerfile "COPY to $dest: teach build-check.sh where that is" ;;
        *) dest="$src/$dest" ;;
      esac
      mkdir -p "$dest"
      for item in "${args[@]}"; do
        [ -e "$root/$item" ] || fail copy "COPY source $item does not exist"
        if [ -d "$root/$item" ]; then
          cp -R "$root/$item/." "$dest"
        else
          cp "$root/$item" "$dest"
        fi
      done
      ;;
    RUN)
      case "$rest" in *"python -m pip "*) ;; *) continue ;; esac
      say "[${stage_names[$stage]}] RUN $rest"
      cmd=$rest
      while [[ $cmd == --* ]]; do cmd=${cmd#* }; done   # --mount=...: the paths below stand in
      cmd=${cmd//\/wheels/$wheels}
      [[ $cmd == "python -m pip "* ]] || fail dockerfile "a pip step must start with python -m pip: $rest"
      cmd="${run_pip[*]} ${cmd#python -m pip }"
      cmd=${cmd//@VENV@/$(venv_for_stage)}
      if [ "$stage" -eq 0 ]; then dir=$src; else dir=$work; fi
      (cd "$dir" && PIP_DISABLE_PIP_VERSION_CHECK=1 bash -c "$cmd") \
        || fail "${stage_names[$stage]} stage" "pip step failed: RUN $rest"
      pip_runs=$((pip_runs + 1))
      ;;
    ENTRYPOINT) entrypoint=$rest ;;
    HEALTHCHECK) healthcheck=${rest#*CMD } ;;
  esac
done

[ "$stage" -eq 1 ] || fail dockerfile "expected a build and a runtime stage"
[ "$pip_runs" -ge 2 ] || fail dockerfile "expected pip steps in both stages, found $pip_runs"
[ -n "$entrypoint" ] || fail dockerfile "no ENTRYPOINT"
[ -n "$healthcheck" ] || fail dockerfile "no HEALTHCHECK ... CMD"
ls "$wheels"/affinity_gateway-*.whl >/dev/null 2>&1 || fail "build stage" "no wheel in $wheels"
say "ok build stage: $(cd "$wheels" && ls affinity_gateway-*.whl)"
say "ok runtime stage: wheel and dependencies installed"

runtime="$work/venv-runtime"
rpy="$runtime/bin/python"

"$runtime/bin/affinity-gateway" check-config "$example" \
  || fail check-config "the installed CLI rejects examples/gateway.yaml"
say "ok check-config"

port=$("$rpy" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# The exec-form JSON of ENTRYPOINT and HEALTHCHECK, with the container's fixed
# path, bind address and port swapped for this machine's.
mapfile -t serve < <("$rpy" - "$entrypoint" "$example" "$port" "$runtime/bin" <<'PY'
import json, sys
argv, example, port, bindir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
swap = {"/etc/affinity-gateway/gateway.yaml": example, "0.0.0.0": "127.0.0.1", "8080": port}
argv = [swap.get(a, a) for a in argv]
argv[0] = f"{bindir}/{argv[0]}"
print("\n".join(argv))
PY
)
mapfile -t probe < <("$rpy" - "$healthcheck" "$port" "$rpy" <<'PY'
import json, sys
argv, port, python = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
argv = [a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in argv]
if argv[0] == "python":
    argv[0] = python
print("\n".join(argv))
PY
)
[[ "${serve[*]}" == *"--port $port"* ]] || fail entrypoint "ENTRYPOINT does not set --port 8080"
[[ "${probe[*]}" == *"127.0.0.1:$port/livez"* ]] || fail healthcheck "HEALTHCHECK does not ask 127.0.0.1:8080/livez"

say "serve: ${serve[*]}"
(cd "$work" && exec "${serve[@]}") >"$work/serve.log" 2>&1 &
server_pid=$!

ready() {
  "$rpy" -c 'import sys, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$port/readyz" 2>/dev/null
}
live=0
for _ in $(seq 1 100); do
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log"; fail serve "the gateway exited during startup"; }
  if "${probe[@]}" 2>/dev/null; then live=1; break; fi
  sleep 0.2
done
[ "$live" -eq 1 ] || { cat "$work/serve.log"; fail healthcheck "/livez did not answer 200 within 20 s"; }
say "ok healthcheck /livez"
ready || { cat "$work/serve.log"; fail readyz "/readyz did not answer 200 once /livez did"; }
say "ok readyz"

kill -TERM "$server_pid"
code=0
wait "$server_pid" || code=$?
server_pid=""
if [ "$code" -ne 0 ]; then
  cat "$work/serve.log"
  fail sigterm "exit code $code after SIGTERM, want 0"
fi
say "ok sigterm exit 0"
say "ok all"
