#!/usr/bin/env bash
# The CUDA backend's device run (docs/CUDA.md): build here, run on a machine with a GPU.
#
#   tools/cuda_device.sh build   on the build machine (nvcc, no GPU needed): make CUDA=1, then
#                                variants of the matmul kernel ($VARIANTS: compile-time switches of
#                                src/backend/cuda/matmul.cu) linked into build/cuda/variants/
#                                cuda_bench_<name> and run_tests_<name>, sm_90 only
#   tools/cuda_device.sh run     on the GPU machine, from the repository root, with build/cuda/
#                                run_tests, build/cuda/cuda_bench (and the variants) copied there:
#                                GPU state, the cuda_ tests, cuda_bench, the variants' tests and Q4
#                                benchmarks, the SASS of the one-token Q4 kernels (tensor-core and
#                                FP32), then compute-sanitizer memcheck / racecheck of the default
#                                build and of the variants named in $SANITIZE. Logs go to $OUT
#                                (default build/cuda/device-out).
#
# The binaries depend only on libc/libm and the driver (cudart and libstdc++ are static), so they
# run on the GPU machine as built here. Each step is time-limited so the whole run stays under
# about 2.5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

# variants of the matmul kernel, as name:MACRO=VALUE[,MACRO=VALUE...] (macros of
# src/backend/cuda/matmul.cu): fp32 is the FP32 Q4 kernel that was the default before the
# tensor-core one, sps2 and s5b2 the tensor-core kernel with stages of 2 spans (docs/CUDA.md
# "Measurements" lists each run's VARIANTS)
VARIANTS=${VARIANTS:-"fp32:FM_CUDA_Q4_MMA=0 sps2:FM_CUDA_MMA_SPS=2,FM_CUDA_MMA_STAGES=3,FM_CUDA_MMA_MIN_BLOCKS=3 s5b2:FM_CUDA_MMA_SPS=2,FM_CUDA_MMA_STAGES=5"}
# variants (by name) whose tests also run under compute-sanitizer (the default build's always do)
SANITIZE=${SANITIZE:-""}

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
        n=${v%%:*}
        defs=$(echo "${v#*:}" | tr ',' ' ' | sed 's/[^ ][^ ]*/-D&/g')
        "$NVCC" -Iinclude -Isrc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 $defs \
            -c src/backend/cuda/matmul.cu -o "build/cuda/variants/matmul_$n.o" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done # set -e: a failed compile stops the build
    for v in $VARIANTS; do
        n=${v%%:*}
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
        timeout 40 "$b" cuda_matmul 2>&1 | tail -3 | tee -a "$out/variants.txt"
    done
    for b in build/cuda/variants/cuda_bench_*; do
        [ -x "$b" ] || continue
        echo "== $(basename "$b")" | tee -a "$out/variants.txt"
        timeout 30 "$b" --reps 8 --only Q4 --no-check 2>&1 | tee -a "$out/variants.txt"
    done
    if command -v cuobjdump >/dev/null; then # the one-token Q4 kernels, for reading their schedule
        cuobjdump --dump-sass -arch sm_90 build/cuda/cuda_bench |
            awk '/Function : / {p = /mm_q4_tc|mm_fastILi4ELi1E/} p' | gzip >"$out/sass.txt.gz"
        # static opcode counts per kernel (the whole kernel, not executed counts)
        zcat "$out/sass.txt.gz" | awk '/Function : / {f = $3} /^ +\/\*[0-9a-f]+\*\// {op = $2; if (op ~ /^@/) op = $3; sub(/\..*/, "", op); n[f " " op]++}
            END {for (k in n) print n[k], k}' | sort -k2,2 -k1,1nr >"$out/sass_ops.txt"
    fi
    if command -v compute-sanitizer >/dev/null; then
        for b in build/cuda/run_tests $(for n in $SANITIZE; do echo "build/cuda/variants/run_tests_$n"; done); do
            echo "== compute-sanitizer memcheck $b cuda_matmul" | tee -a "$out/sanitizer.log"
            timeout 60 compute-sanitizer --tool memcheck --leak-check no --report-api-errors no --error-exitcode 9 "$b" cuda_matmul \
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
