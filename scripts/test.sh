#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing, builds, runs the
# tests, then runs them again under AddressSanitizer + UndefinedBehaviorSanitizer, and compiles the
# CUDA sources when nvcc is present (no GPU needed; CUDA tests run on a GPU machine, docs/CUDA.md).
# Each test run closes with "N passed, N failed, N skipped"; the exit status is non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc 2>/dev/null || echo 2)
make -j"$jobs"
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  make cuda-check
else
  echo "test.sh: nvcc not found: the CUDA sources are not compiled"
fi
make -j"$jobs" test
make -j"$jobs" test SAN=1
