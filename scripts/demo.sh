#!/usr/bin/env bash
# The main job on the built-in default: from a fresh Debian 12 machine, install what is missing,
# build flashmoe, convert the bundled tiny Qwen3.5-MoE checkpoint (tests/fixtures; random weights)
# into the packed format with the default quantization (q4 experts, q8 dense), show what it is, and
# generate from it. Output goes to out/ (git-ignored).
# (Text prompts arrive with the tokenizer; a trained default model comes in a later version.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
make -j"$(nproc 2>/dev/null || echo 2)"
src=tests/fixtures/qwen35_moe_q64_bf16/model
dst=out/tiny-qwen35
echo "== convert $src -> $dst"
build/flashmoe convert --force "$src" "$dst"
echo "== info"
build/flashmoe info -m "$dst"
echo "== run: greedy continuation of 10 prompt ids"
build/flashmoe run -m "$dst" --prompt-ids 11,42,7,99,3,150,28,64,201,17 -n 16 --timing
