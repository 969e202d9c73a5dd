#!/usr/bin/env bash
# The CUDA backend's device run (docs/CUDA.md): build here, run on a machine with a GPU.
#
#   tools/cuda_device.sh build   on the build machine (nvcc, no GPU needed): make CUDA=1, then
#                                variants of the matmul kernel's tuning constants ($VARIANTS) linked
#                                into build/cuda/variants/cuda_bench_R<rows>_B<blocks>_S<prefetch>
#                                (and run_tests_... for S1), sm_90 only
#   tools/cuda_device.sh run     on the GPU machine, from the repository root, with build/cuda/
#                                run_tests, build/cuda/cuda_bench (and the variants) copied there:
#                                GPU state, the cuda_ tests, cuda_bench, the variants' tests and
#                                benchmarks, then compute-sanitizer memcheck / racecheck.
#                                Logs go to $OUT (default build/cuda/device-out).
#
# The binaries depend only on libc/libm and the driver (cudart and libstdc++ are static), so they
# run on the GPU machine as built here. Each step is time-limited so the whole run stays under
# about 5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

# variants of the matmul tuning constants (src/backend/cuda/matmul.cu), as
# ROWS_PER_WARP:MIN_BLOCKS:SCALE_PREFETCH; those with SCALE_PREFETCH=1 also get a test binary
VARIANTS=${VARIANTS:-"4:3:1 2:4:1 4:2:1 2:4:0"}

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
    for v in $VARIANTS; do
        IFS=: read -r r b sp <<<"$v"
        "$NVCC" -Iinclude -Isrc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 \
            -DFM_CUDA_ROWS_PER_WARP="$r" -DFM_CUDA_MIN_BLOCKS="$b" -DFM_CUDA_SCALE_PREFETCH="$sp" \
            -c src/backend/cuda/matmul.cu -o "build/cuda/variants/matmul_R${r}_B${b}_S${sp}.o" &
    done
    wait
    for v in $VARIANTS; do
        IFS=: read -r r b sp <<<"$v"
        n=R${r}_B${b}_S${sp}
        # the variant's matmul object comes first, so the archive's matmul.o is not pulled in
        cc -pthread build/cuda/obj/tools/cuda_bench.o "build/cuda/variants/matmul_$n.o" build/cuda/libflashmoe.a \
            $ldlibs -o "build/cuda/variants/cuda_bench_$n"
        if [ "$sp" = 1 ]; then
            cc -pthread $testobj "build/cuda/variants/matmul_$n.o" build/cuda/libflashmoe.a $ldlibs \
                -o "build/cuda/variants/run_tests_$n"
        fi
    done
    rm -f build/cuda/variants/*.o
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
    timeout 240 build/cuda/run_tests cuda_ 2>&1 | tee "$out/tests.log"
    echo "== cuda_bench"
    timeout 120 build/cuda/cuda_bench 2>&1 | tee "$out/bench.txt"
    for b in build/cuda/variants/run_tests_*; do
        [ -x "$b" ] || continue
        echo "== $(basename "$b")" | tee -a "$out/variants.txt"
        timeout 120 "$b" cuda_ 2>&1 | tee -a "$out/variants.txt"
    done
    for b in build/cuda/variants/cuda_bench_*; do
        [ -x "$b" ] || continue
        echo "== $(basename "$b")" | tee -a "$out/variants.txt"
        timeout 60 "$b" --reps 8 2>&1 | tee -a "$out/variants.txt"
    done
    if command -v compute-sanitizer >/dev/null; then
        echo "== compute-sanitizer memcheck"
        timeout 100 compute-sanitizer --tool memcheck --leak-check no --report-api-errors no --error-exitcode 9 build/cuda/run_tests cuda_ \
            >"$out/memcheck.log" 2>&1
        echo "memcheck exit $? (9: errors, 124: time limit)"; tail -5 "$out/memcheck.log"
        echo "== compute-sanitizer racecheck"
        timeout 60 compute-sanitizer --tool racecheck --error-exitcode 9 build/cuda/run_tests cuda_matmul_batch \
            >"$out/racecheck.log" 2>&1
        echo "racecheck exit $?"; tail -5 "$out/racecheck.log"
    fi
    ;;
*)
    echo "usage: tools/cuda_device.sh build|run" >&2
    exit 2
    ;;
esac
