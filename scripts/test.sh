#!/usr/bin/env bash
# The whole test suite, once under KERAS_BACKEND=jax and once under tensorflow.
# Exits non-zero if either backend fails. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -x tests/test_layers.py`); BACKENDS="jax" runs one.
set -u
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}" WANDB_ERROR_REPORTING=false WANDB_SILENT=true
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
failed=()
for backend in ${BACKENDS:-jax tensorflow}; do
  echo "=== KERAS_BACKEND=$backend ==="
  KERAS_BACKEND=$backend python -m pytest -p no:cacheprovider "$@" || failed+=("$backend")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED on: ${failed[*]}"
  exit 1
fi
echo "all tests passed on: ${BACKENDS:-jax tensorflow}"
