#!/usr/bin/env bash
# The whole test suite, once under KERAS_BACKEND=jax and once under tensorflow.
# Exits non-zero if either backend fails. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -x tests/library/layers/`); BACKENDS="jax" runs one.
#
# The two passes run at the same time when the machine has 2 or more cores (much of
# the suite is single-threaded: interpreter start-up, imports, tracing, compiling), each
# line prefixed with its backend; SERIAL=1 runs them one after the other instead.
set -u
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_ERROR_REPORTING=false WANDB_SILENT=true
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
backends=(${BACKENDS:-jax tensorflow})
# Both passes: the backend-independent tests (@pytest.mark.one_backend) are shared between them (each
# test file in one pass, tests/conftest.py) instead of all running in the JAX pass.
if [[ " ${backends[*]} " == *" jax "* && " ${backends[*]} " == *" tensorflow "* ]]; then
  export LORA3_SPLIT_ONE_BACKEND=1
fi
ncpu=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
status_dir=$(mktemp -d)
trap 'rm -rf "$status_dir"' EXIT

run_pass() {  # backend, then pytest arguments; writes the exit status to $status_dir/<backend>
  local backend=$1; shift
  set -o pipefail
  KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider --durations=15 "$@" 2>&1 | sed -u "s/^/[$backend] /"
  echo $? > "$status_dir/$backend"
}

if [ "${SERIAL:-0}" = 1 ] || [ "$ncpu" -lt 2 ] || [ ${#backends[@]} -lt 2 ]; then
  for backend in "${backends[@]}"; do
    echo "=== KERAS_BACKEND=$backend ==="
    run_pass "$backend" "$@"
  done
else
  echo "=== KERAS_BACKEND=${backends[*]} (at the same time; SERIAL=1 for one after the other) ==="
  pids=()
  for backend in "${backends[@]}"; do
    run_pass "$backend" "$@" &
    pids+=($!)
  done
  trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$status_dir"' INT TERM
  wait "${pids[@]}"
fi

failed=()
for backend in "${backends[@]}"; do
  [ "$(cat "$status_dir/$backend" 2>/dev/null)" = 0 ] || failed+=("$backend")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED on: ${failed[*]}"
  exit 1
fi
echo "all tests passed on: ${backends[*]}"
