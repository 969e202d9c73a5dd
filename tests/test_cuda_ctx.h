/* The CUDA tests' shared device context (tests/test_cuda_ctx.c): one fm_cuda on device 0 for the
 * whole test process, opened by the first test that asks. Only in builds with FM_HAVE_CUDA. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "backend/cpu/ops.h"
#include "backend/cuda/cuda_backend.h"
#include "test.h"

/* The context, or NULL with the reason in fm_test_cuda_why(): *broken is false when there is no
 * device (the test skips) and true when a device is present but fails to open (the test fails).
 * The first call seeds the tests' random numbers (fm_test_rng_seed("CUDA_SEED")) and prints the
 * device. */
fm_cuda *fm_test_cuda(bool *broken);
const char *fm_test_cuda_why(void);

/* The seed of the tests' random numbers, for failure messages (0 before the first fm_test_cuda). */
uint64_t fm_test_cuda_seed(void);

/* Restores the CPU's int8 mode saved by CUDA_OR_SKIP (a cleanup handler). */
static inline void fm_test_restore_int8_mode(fm_cpu_int8 *was) { fm_cpu_set_int8_mode(*was); }

/* In an FM_TEST: c = the context; a missing device skips the test, a broken one fails it. Until the
 * test returns, the CPU runs its float kernels (fm_cpu_set_int8_mode(OFF)): the CPU is the GPU's
 * oracle here, and its int8-activation path computes an approximation of the product. */
#define CUDA_OR_SKIP(c)                                                                            \
    __attribute__((cleanup(fm_test_restore_int8_mode))) fm_cpu_int8 int8_mode_was_ =               \
        fm_cpu_set_int8_mode(FM_CPU_INT8_OFF);                                                     \
    bool broken_;                                                                                  \
    fm_cuda *c = fm_test_cuda(&broken_);                                                           \
    do {                                                                                           \
        if (broken_) {                                                                             \
            t->failures++;                                                                         \
            fprintf(stderr, "  %s\n", fm_test_cuda_why());                                         \
            return;                                                                                \
        }                                                                                          \
        if (!c) SKIP("%s", fm_test_cuda_why());                                                    \
    } while (0)
