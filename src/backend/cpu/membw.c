#include "backend/cpu/membw.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "util/progress.h"

typedef struct sum_job {
    const uint64_t *buf;
    uint64_t sums[256]; /* per chunk, so the reads cannot be optimised away */
    int64_t chunk;
} sum_job;

static void sum_range(void *arg, int64_t begin, int64_t end) {
    sum_job *j = arg;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (int64_t i = begin; i + 4 <= end; i += 4) {
        a += j->buf[i];
        b += j->buf[i + 1];
        c += j->buf[i + 2];
        d += j->buf[i + 3];
    }
    j->sums[(begin / j->chunk) & 255] = a + b + c + d;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

double fm_ram_read_gbs(fm_pool *pool, size_t bytes, int repeats) {
    size_t n = bytes / sizeof(uint64_t);
    uint64_t *buf = malloc(n * sizeof(uint64_t));
    if (!buf || repeats < 1) {
        free(buf);
        return 0;
    }
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull; /* real pages, not the zero page */
    double rates[64];
    if (repeats > 64) repeats = 64;
    sum_job j = {.buf = buf};
    int threads = fm_pool_size(pool);
    j.chunk = (int64_t)((n + (size_t)threads - 1) / (size_t)threads);
    for (int r = 0; r < repeats; r++) {
        double t0 = fm_time_now();
        fm_pool_run(pool, sum_range, &j, (int64_t)n, j.chunk);
        rates[r] = (double)(n * sizeof(uint64_t)) / (fm_time_now() - t0) / 1e9;
    }
    free(buf);
    qsort(rates, (size_t)repeats, sizeof *rates, cmp_double);
    return rates[repeats / 2];
}
