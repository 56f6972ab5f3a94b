#!/usr/bin/env bash
# GPU check of the packed kernels (correctness vs the torch reference, decode/prefill speed, GB/s); needs CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_kernels.py "$@"
