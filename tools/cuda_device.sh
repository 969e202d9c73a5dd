#!/usr/bin/env bash
# The CUDA backend's device run (docs/CUDA.md): build here, run on a machine with a GPU.
#
#   tools/cuda_device.sh build   on the build machine (nvcc, no GPU needed): make CUDA=1, then
#                                variants of the matmul kernel's tuning constants ($VARIANTS) linked
#                                into build/cuda/variants/cuda_bench_R<rows>_B<blocks>_S<prefetch>
#                                [_M<ksplit>] (and run_tests_... for each), sm_90 only
#   tools/cuda_device.sh run     on the GPU machine, from the repository root, with build/cuda/
#                                run_tests, build/cuda/cuda_bench (and the variants) copied there:
#                                GPU state, the cuda_ tests, cuda_bench, the variants' tests and
#                                benchmarks, the SASS of the one-token Q4 kernels, then
#                                compute-sanitizer memcheck / racecheck of the default build and of
#                                the variants named in $SANITIZE. Logs go to $OUT (default
#                                build/cuda/device-out).
#
# The binaries depend only on libc/libm and the driver (cudart and libstdc++ are static), so they
# run on the GPU machine as built here. Each step is time-limited so the whole run stays under
# about 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

# variants of the matmul tuning constants (src/backend/cuda/matmul.cu), as
# ROWS_PER_WARP:MIN_BLOCKS:SCALE_PREFETCH[:MMA_KSPLIT]: a fourth field > 0 builds the Q4 tensor-core
# kernel (FM_CUDA_Q4_MMA=1) with that many warps per 16-row tile; each variant gets a test binary
# (docs/CUDA.md's run of 2026-11-22 used VARIANTS="4:3:1 2:4:1 4:2:1 4:3:1:4 4:3:1:2" and
# SANITIZE="R4_B3_S1 R4_B3_S1_M4" with a default build that had SCALE_PREFETCH=0)
VARIANTS=${VARIANTS:-"4:3:0 2:4:1 4:2:1 4:3:1:4 4:3:1:2"}
# variants (names as R4_B3_S1_M4) whose tests also run under compute-sanitizer (the default build's always do)
SANITIZE=${SANITIZE:-"R4_B3_S1_M4"}

vname() { # R:B:S[:K] -> R<r>_B<b>_S<s>[_M<k>]
    local r b sp k
    IFS=: read -r r b sp k <<<"$1"
    echo "R${r}_B${b}_S${sp}$([ "${k:-0}" -gt 0 ] && echo "_M$k")"
}

case "${1:-}" in
build)
    set -e
    make CUDA=1 -j"$(nproc)" build/cuda/run_tests build/cuda/cuda_bench
    rm -rf build/cuda/variants
    mkdir -p build/cuda/variants
    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    NVCC=$(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")
    # the link line and test objects of the CUDA=1 build, as the Makefile has them
    ldlibs=$(make -s CUDA=1 --eval='fm-print-ldlibs: ; @echo $(LDLIBS)' fm-print-ldlibs)
    testobj=$(make -s CUDA=1 --eval='fm-print-testobj: ; @echo $(TEST_OBJ)' fm-print-testobj)
    pids=()
    for v in $VARIANTS; do
        IFS=: read -r r b sp k <<<"$v"
        k=${k:-0}
        "$NVCC" -Iinclude -Isrc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 \
            -DFM_CUDA_ROWS_PER_WARP="$r" -DFM_CUDA_MIN_BLOCKS="$b" -DFM_CUDA_SCALE_PREFETCH="$sp" \
            -DFM_CUDA_Q4_MMA=$([ "$k" -gt 0 ] && echo 1 || echo 0) -DFM_CUDA_MMA_KSPLIT=$([ "$k" -gt 0 ] && echo "$k" || echo 4) \
            -c src/backend/cuda/matmul.cu -o "build/cuda/variants/matmul_$(vname "$v").o" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done # set -e: a failed compile stops the build
    for v in $VARIANTS; do
        n=$(vname "$v")
        # the variant's matmul object comes first, so the archive's matmul.o is not pulled in
        cc -pthread build/cuda/obj/tools/cuda_bench.o "build/cuda/variants/matmul_$n.o" build/cuda/libflashmoe.a \
            $ldlibs -o "build/cuda/variants/cuda_bench_$n"
        cc -pthread $testobj "build/cuda/variants/matmul_$n.o" build/cuda/libflashmoe.a $ldlibs \
            -o "build/cuda/variants/run_tests_$n"
    done
    rm -f build/cuda/variants/*.o
    strip -g build/cuda/variants/* # the device tool carries at most 64 MiB
    ls -la build/cuda/run_tests build/cuda/cuda_bench build/cuda/variants/
    ;;
run)
    out=${OUT:-build/cuda/device-out}
    mkdir -p "$out"
    {
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used,memory.total --format=csv
        nvidia-smi -q -d PERFORMANCE | grep -iE "throttle|slowdown|active|idle" | head -20
    } 2>&1 | tee "$out/gpu.txt"
    echo "== tests"
    timeout 60 build/cuda/run_tests cuda_ 2>&1 | tee "$out/tests.log"
    echo "== cuda_bench"
    timeout 60 build/cuda/cuda_bench 2>&1 | tee "$out/bench.txt"
    for b in build/cuda/variants/run_tests_*; do
        [ -x "$b" ] || continue
        echo "== $(basename "$b")" | tee -a "$out/variants.txt"
        timeout 60 "$b" cuda_ 2>&1 | tee -a "$out/variants.txt"
    done
    for b in build/cuda/variants/cuda_bench_*; do
        [ -x "$b" ] || continue
        echo "== $(basename "$b")" | tee -a "$out/variants.txt"
        timeout 40 "$b" --reps 8 2>&1 | tee -a "$out/variants.txt"
    done
    if command -v cuobjdump >/dev/null; then # the one-token Q4 kernels, for reading their schedule
        for b in build/cuda/cuda_bench $(for n in $SANITIZE; do echo "build/cuda/variants/cuda_bench_$n"; done); do
            echo "== $b"
            cuobjdump --dump-sass "$b" |
                awk '/Function : .*mm_fastILi4ELi1E|Function : .*mm_q4_mma/ {p = 1} /Function : / && !/mm_fastILi4ELi1E|mm_q4_mma/ {p = 0} p'
        done 2>&1 | gzip >"$out/sass.txt.gz"
    fi
    if command -v compute-sanitizer >/dev/null; then
        for b in build/cuda/run_tests $(for n in $SANITIZE; do echo "build/cuda/variants/run_tests_$n"; done); do
            echo "== compute-sanitizer memcheck $b" | tee -a "$out/sanitizer.log"
            timeout 60 compute-sanitizer --tool memcheck --leak-check no --report-api-errors no --error-exitcode 9 "$b" cuda_ \
                >"$out/memcheck.tmp" 2>&1
            echo "memcheck exit $? (9: errors, 124: time limit)" | tee -a "$out/sanitizer.log"
            tail -5 "$out/memcheck.tmp" | tee -a "$out/sanitizer.log"
            echo "== compute-sanitizer racecheck $b cuda_matmul_batch" | tee -a "$out/sanitizer.log"
            timeout 40 compute-sanitizer --tool racecheck --error-exitcode 9 "$b" cuda_matmul_batch \
                >"$out/memcheck.tmp" 2>&1
            echo "racecheck exit $?" | tee -a "$out/sanitizer.log"
            tail -5 "$out/memcheck.tmp" | tee -a "$out/sanitizer.log"
        done
        rm -f "$out/memcheck.tmp"
    fi
    ;;
*)
    echo "usage: tools/cuda_device.sh build|run" >&2
    exit 2
    ;;
esac
