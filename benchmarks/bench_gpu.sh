#!/usr/bin/env bash
# Extraction on an accelerator with the JAX backend (GPU machines have JAX, not TensorFlow).
#
#   benchmarks/bench_gpu.sh            bare GPU machine: install, 2,000 JPEGs, report
#   benchmarks/bench_gpu.sh --cpu      reduced mode on CPU (a few dozen tiny images, no
#                                      install): what tests/test_bench_gpu.py runs, so the
#                                      script cannot rot on machines without an accelerator
#
# Installs from the project's own files (setup.cfg's `jax-gpu` extra) unless --no-install,
# then runs benchmarks/bench_gpu.py, which prints img/s end to end from JPEG, GPU memory,
# the share of time spent decoding and the bfloat16 drift against float32.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu install=1 args=()
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu install=0 ;;
    --no-install) install=0 ;;
    *) args+=("$arg") ;;
  esac
done

if [[ $install == 1 ]]; then
  python -m pip install --quiet -e ".[jax-gpu]"
fi
export KERAS_BACKEND=jax
if [[ $mode == cpu ]]; then
  export JAX_PLATFORMS=cpu
  exec python benchmarks/bench_gpu.py --images 16 --image-size 32 --batch-size 8 \
    --source-size 48 "${args[@]+"${args[@]}"}"
fi
# Let XLA take GPU memory as it needs it, so the peak printed is what extraction used.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec python benchmarks/bench_gpu.py --images 2000 --image-size 224 --batch-size 128 \
  --source-size 1024 "${args[@]+"${args[@]}"}"
