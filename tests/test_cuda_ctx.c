/* The CUDA tests' shared device context: see test_cuda_ctx.h. */
#ifdef FM_HAVE_CUDA

#include "test_cuda_ctx.h"

#include <stdio.h>
#include <string.h>

#include "util/error.h"

static fm_cuda *g_ctx;
static bool g_tried;
static char g_why[600];
static uint64_t g_seed;

fm_cuda *fm_test_cuda(bool *broken) {
    *broken = false;
    if (!g_tried) {
        g_tried = true;
        g_seed = fm_test_rng_seed("CUDA_SEED");
        int n = 0;
        if (fm_cuda_device_count(&n) != FM_OK || n == 0) {
            snprintf(g_why, sizeof g_why, "no CUDA device (%s)", fm_last_error());
        } else if (fm_cuda_init(0, &g_ctx) != FM_OK) {
            snprintf(g_why, sizeof g_why, "fm_cuda_init(0) failed: %s", fm_last_error());
            g_ctx = NULL;
        } else {
            fprintf(stderr, "  CUDA device 0: %s\n", fm_cuda_device_desc(g_ctx));
        }
    }
    if (!g_ctx && strncmp(g_why, "no CUDA device", 14)) *broken = true;
    return g_ctx;
}

const char *fm_test_cuda_why(void) { return g_why; }

uint64_t fm_test_cuda_seed(void) { return g_seed; }

#else
typedef int fm_test_cuda_ctx_unused; /* a build without CUDA has no device context */
#endif
