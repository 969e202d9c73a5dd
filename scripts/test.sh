#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing, builds, runs the
# tests, then runs them again under AddressSanitizer + UndefinedBehaviorSanitizer.
# Each run closes with "N passed, N failed, N skipped"; the exit status is non-zero if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
jobs=$(nproc 2>/dev/null || echo 2)
make -j"$jobs"
make -j"$jobs" test
make -j"$jobs" test SAN=1
