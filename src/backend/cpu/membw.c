#include "backend/cpu/membw.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "util/progress.h"

typedef struct read_job {
    const unsigned char *buf;
    size_t bytes;
    int parts;
    fm_cpu_level level;
    uint64_t sums[256]; /* per part, so the reads cannot be optimised away */
} read_job;

static void read_range(void *arg, int64_t b, int64_t e) {
    read_job *j = arg;
    size_t per = j->bytes / (size_t)j->parts;
    for (int64_t i = b; i < e; i++) {
        size_t n = i == j->parts - 1 ? j->bytes - per * (size_t)i : per;
        j->sums[i & 255] += fm_cpu_read_sum(j->level, j->buf + per * (size_t)i, n);
    }
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

double fm_ram_read_gbs_buf(fm_pool *pool, fm_cpu_level level, const void *buf, size_t bytes, int repeats) {
    double r[64];
    if (repeats < 1) repeats = 1;
    if (repeats > 64) repeats = 64;
    read_job j = {.buf = buf, .bytes = bytes, .parts = fm_pool_size(pool), .level = level};
    for (int k = 0; k < repeats; k++) {
        double t0 = fm_time_now();
        fm_pool_run(pool, read_range, &j, j.parts, 1);
        r[k] = (double)bytes / (fm_time_now() - t0) / 1e9;
    }
    qsort(r, (size_t)repeats, sizeof *r, cmp_double);
    return r[repeats / 2];
}

double fm_ram_read_gbs(fm_pool *pool, size_t bytes, int repeats) {
    size_t n = bytes / sizeof(uint64_t);
    uint64_t *buf = malloc(n * sizeof(uint64_t));
    if (!buf) return 0;
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    double r = fm_ram_read_gbs_buf(pool, fm_cpu_level_best(), buf, n * sizeof(uint64_t), repeats);
    free(buf);
    return r;
}
