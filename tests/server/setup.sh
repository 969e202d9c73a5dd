#!/usr/bin/env bash
# Installs the official OpenAI Node client that the server tests drive, into the git-ignored
# .cache/npm/ (a no-op when it is there). openai 6.x: the newest line that supports Node 20
# (7.x needs Node 22) and has no dependencies.
#
# Exit status: 0 ready; 3 node/npm missing or the registry cannot be reached (tests skip); 1 other.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir="$root/.cache/npm"
pkg="openai@6.49.0"
if [ -f "$dir/node_modules/openai/package.json" ] && grep -q '"version": "6.49.0"' "$dir/node_modules/openai/package.json"; then
  exit 0
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "tests/server/setup.sh: node or npm is not installed" >&2
  exit 3
fi
mkdir -p "$dir"
[ -f "$dir/package.json" ] || echo '{"name": "flashmoe-test-deps", "private": true}' >"$dir/package.json"
if ! (cd "$dir" && timeout 180 npm install --no-audit --no-fund --loglevel=error --fetch-retries=1 \
        --fetch-retry-mintimeout=2000 --fetch-retry-maxtimeout=5000 "$pkg" >npm.log 2>&1); then
  echo "tests/server/setup.sh: npm install $pkg failed (registry unreachable?): $(grep -v '^npm warn' "$dir/npm.log" | head -n 2 | tr '\n' ' ')" >&2
  exit 3
fi
