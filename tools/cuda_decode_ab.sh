#!/usr/bin/env bash
# Decode A/B runs (docs/SPEED.md's CUDA decode rows): a synthetic slice made once with `flashmoe
# synth`, then `flashmoe bench --json` once per configuration and round, the configurations
# alternated within each round (the device drifts between minutes), one process a run. Prints every
# run, then each configuration's median decode tok/s and its ratio to the first configuration's.
#
#   [FLASHMOE_BIN=build/cuda/flashmoe] tools/cuda_decode_ab.sh ROUNDS CONFIG [CONFIG ...]
#
# CONFIG: "default", or environment settings joined by commas, e.g.
#   tools/cuda_decode_ab.sh 3 default FLASHMOE_CUDA_NORM_FOLD=0,FLASHMOE_CUDA_CONV_FOLD=0
# A setting FLASHMOE_BIN=PATH runs that binary for the configuration (two builds A/B'd):
#   tools/cuda_decode_ab.sh 3 default FLASHMOE_BIN=/tmp/old/flashmoe
# Settings (environment): PRESET (qwen3.5-35b-a3b), LAYERS (40), QUANT (q4), PROMPT (16), GEN (64),
# BACKEND (cuda), MODEL (/tmp/decode_ab_model: made if missing), OUT (/tmp/decode_ab: JSON lines
# in $OUT/runs.jsonl, each with the configuration added).
set -u
if [ $# -lt 2 ]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"
    exit 2
fi
ROUNDS=$1
shift
BIN=${FLASHMOE_BIN:-build/cuda/flashmoe}
PRESET=${PRESET:-qwen3.5-35b-a3b} LAYERS=${LAYERS:-40} QUANT=${QUANT:-q4}
PROMPT=${PROMPT:-16} GEN=${GEN:-64} BACKEND=${BACKEND:-cuda}
MODEL=${MODEL:-/tmp/decode_ab_model} O=${OUT:-/tmp/decode_ab}
case "$ROUNDS" in '' | *[!0-9]* | 0) echo "cuda_decode_ab: ROUNDS must be a positive number" >&2; exit 2 ;; esac
[ -x "$BIN" ] || { echo "cuda_decode_ab: no flashmoe binary at $BIN (set FLASHMOE_BIN)" >&2; exit 2; }
mkdir -p "$O"
: >"$O/runs.jsonl"
if [ ! -f "$MODEL/model.json" ]; then
    "$BIN" synth --preset "$PRESET" --layers "$LAYERS" --quant "$QUANT" --no-progress "$MODEL" >"$O/synth.txt" 2>&1 ||
        { echo "cuda_decode_ab: synth failed: $(tail -1 "$O/synth.txt")" >&2; exit 1; }
fi
for ((r = 1; r <= ROUNDS; r++)); do
    for cfg in "$@"; do
        envs=()
        [ "$cfg" = default ] || IFS=, read -r -a envs <<<"$cfg"
        bin=$BIN
        for e in ${envs[@]+"${envs[@]}"}; do
            case "$e" in FLASHMOE_BIN=*) bin=${e#FLASHMOE_BIN=} ;; esac
        done
        [ -x "$bin" ] || { echo "cuda_decode_ab: no flashmoe binary at $bin" >&2; exit 2; }
        line=$(env ${envs[@]+"${envs[@]}"} "$bin" bench -m "$MODEL" --backend "$BACKEND" --prompt "$PROMPT" --gen "$GEN" \
            --json 2>"$O/stderr.txt")
        tok=$(printf '%s' "$line" | grep -o '"decode_tok_s": [0-9.]*' | grep -o '[0-9.]*$')
        if [ -z "$tok" ]; then
            echo "cuda_decode_ab: round $r, $cfg: no result ($(tail -1 "$O/stderr.txt"))" >&2
            exit 1
        fi
        printf '%s\n' "${line%\}}, \"config\": \"$cfg\", \"round\": $r}" >>"$O/runs.jsonl"
        echo "round $r  $cfg  $tok tok/s"
    done
done
# medians per configuration, in the order given, and each one's ratio to the first
first=""
for cfg in "$@"; do
    med=$(grep -F "\"config\": \"$cfg\"" "$O/runs.jsonl" | grep -o '"decode_tok_s": [0-9.]*' | grep -o '[0-9.]*$' |
        sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')
    [ -n "$first" ] || first=$med
    awk -v c="$cfg" -v m="$med" -v f="$first" 'BEGIN {printf "median  %-60s %9.2f tok/s  %.3fx\n", c, m, m / f}'
done
