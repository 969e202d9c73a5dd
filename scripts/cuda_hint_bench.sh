#!/usr/bin/env bash
# Device runs for docs/SPEED.md "CUDA: next-layer hints" (issue #6): the 4-layer 397B q4 slice,
# 112 of 2048 VRAM slots (--vram-budget 2530753216, the 5.45% that 20 GiB leaves of the full
# model), O_DIRECT reads, a small RAM cache (1G, ~150 experts) for the hinted reads to land in;
# variants alternated within each round, one process per run.
#   [TESTS="filters"] [ONCE="lru flru"] scripts/cuda_hint_bench.sh BUILD ROUNDS GEN "VARIANTS" [tests]
#   VARIANTS: words of off (--prefetch=0), early (--prefetch=2, FLASHMOE_CUDA_HINT=early: guess from
#   layer l's MoE input), late (from layer l's output; the default), early3 / late3 (--prefetch=3),
#   lru / flru (no hints, --io pread from the page cache, which holds the just-written model: the
#   VRAM policies' hit rates only; LGEN=N tokens, LVB=budget)
# JSON lines go to $OUT/runs.jsonl (variant added), a summary to stdout.
set -u
B=$1 ROUNDS=$2 GEN=$3 VARIANTS=$4
M=/tmp/s4 O=${OUT:-/tmp/hint_out}
mkdir -p "$O"
nvidia-smi --query-gpu=name --format=csv,noheader
df -h /tmp | tail -1
if [ "${5:-}" = tests ]; then
    for t in ${TESTS:-cuda_forward_cli_prefetch cuda_forward_hints cuda_forward_overlap}; do
        FLASHMOE_BIN=$B/flashmoe FM_TEST_TMP=/tmp/tt "$B/run_tests" $t >>"$O/tests.log" 2>&1
        grep -E "^(ok|FAIL)|passed|failed" "$O/tests.log" | tail -3
    done
    rm -rf /tmp/tt
fi
t0=$(date +%s)
"$B/flashmoe" synth --preset qwen3.5-397b-a17b --layers 4 --quant q4 $M >/dev/null 2>&1 || { echo synth failed; exit 1; }
sync
echo "synth $(($(date +%s) - t0)) s"
run_variant() { # $1 variant, $2 round
    local v=$1 r=$2
    env=() args=(--cache 1G --prefetch=0) vb=2530753216
    case $v in
    early) env=(FLASHMOE_CUDA_HINT=early) args=(--cache 1G --prefetch=2) ;;
    late) env=(FLASHMOE_CUDA_HINT=late) args=(--cache 1G --prefetch=2) ;;
    early3) env=(FLASHMOE_CUDA_HINT=early) args=(--cache 1G --prefetch=3) ;;
    late3) env=(FLASHMOE_CUDA_HINT=late) args=(--cache 1G --prefetch=3) ;;
    lru) args=(--io pread --prefetch=0 --vram-policy lru --gen "${LGEN:-$GEN}") vb=${LVB:-$vb} ;;
    flru) args=(--io pread --prefetch=0 --vram-policy flru --gen "${LGEN:-$GEN}") vb=${LVB:-$vb} ;;
    esac
    sync
    t1=$(date +%s.%N)
    j=$(env "${env[@]}" "$B/flashmoe" bench -m $M --backend cuda --io direct --prompt 16 --gen "$GEN" --json \
        --vram-budget $vb "${args[@]}" 2>>"$O/stderr.log")
    echo "{\"variant\": \"$v\", \"round\": $r, \"wall_s\": $(awk "BEGIN{print $(date +%s.%N) - $t1}"), ${j#\{}" >>"$O/runs.jsonl"
    python3 - "$v" "$j" <<'PY'
import json, sys
v, j = sys.argv[1], json.loads(sys.argv[2])
g = lambda k: j.get(k, float("nan"))
print(f"{v:6s} tok/s {g('decode_tok_s'):6.2f} layer {g('layer_ms'):6.2f} floor {g('floor_ms'):6.2f} ratio {g('floor_ratio'):.3f} "
      f"disk {g('disk_gbs'):.2f} vram {g('vram_hit_rate'):.4f} hit {g('hit_rate'):.3f} acc {g('prefetch_accuracy'):.3f} "
      f"spec {g('spec_reads')}/{g('spec_hits')} wasted {g('spec_wasted_bytes')/7077888:.0f} slots {g('vram_slots')}")
PY
}
for r in $(seq 1 "$ROUNDS"); do
    order=$VARIANTS
    [ $((r % 2)) = 0 ] && order=$(echo $VARIANTS | tr ' ' '\n' | tac | tr '\n' ' ') # even rounds reversed (drift)
    for v in $order; do run_variant $v $r; done
done
for v in ${ONCE:-}; do run_variant $v 1; done
rm -rf $M
