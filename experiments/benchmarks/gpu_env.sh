# Sourced by gpu_run*.sh: the output folder, keras/keras-hub wheels from .whl/ when the device lacks them,
# and the environment every GPU run uses.
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
