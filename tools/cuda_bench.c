/* cuda_bench: throughput of the CUDA matmul kernels on expert-sized matrices at the
 * Qwen3.5-397B-A17B geometry (gate/up [1024, 4096], down [4096, 1024]), against the device-to-device
 * copy bandwidth measured in the same run. Built by `make CUDA=1` as build/cuda/cuda_bench; needs a
 * GPU. docs/CUDA.md records its output.
 *
 *   cuda_bench [--pool-mib N] [--reps N] [--no-check] [--only Q4|Q8|BF16]
 *
 * Before timing each type, the product of one gate/up and one down matrix for T = 1, 3, 16 is
 * checked against fm_cpu_matmul (worst error <= 1e-5 of sum |w x|; --no-check skips it).
 * For each weight type (Q4 g64, Q8 g64, BF16) a pool of N MiB of experts (default 2048: ~40x the
 * L2 of an H100, so every pass streams from HBM; 4 distinct random matrices per shape replicated
 * to distinct addresses) is multiplied in three ways:
 *   stream   all gate and up products of the pool, then all down products, 64 per launch
 *   decode   10 experts at a time (a token's top-10): one launch of 20 gate/up products sharing
 *            x, one launch of 10 down products with their own x (T = 1)
 *   single   one launch per product (fm_cuda_matmul), T = 1: the cost of launching one by one
 * GB/s counts the weight bytes read (q words + scales + biases) once per pass; the copy counts
 * bytes read plus bytes written. Each figure is the median of --reps timed passes (CUDA events)
 * after 2 untimed ones. After the stream and decode passes with T = 1, every output of the pass's
 * last group of launches (the batched kernels exactly as timed) is checked against fm_cpu_matmul
 * too (worst error <= 1e-5 of sum |w x|; --no-check skips it). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/ops.h"
#include "backend/cuda/cuda_backend.h"
#include "quant/quant.h"
#include "util/half.h"

static uint64_t rng_state = 0x2545F4914F6CDD1Dull;
static uint64_t rnd_u64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double rnd(void) { return (double)(rnd_u64() >> 11) / (double)(1ull << 52) - 1.0; }

static int die(const char *what) {
    fprintf(stderr, "cuda_bench: %s: %s\n", what, fm_last_error());
    return 1;
}

static size_t wbytes(fm_dtype dt, int64_t N, int64_t K) {
    return fm_dtype_is_quant(dt) ? (size_t)fm_quant_nbytes(dt, N, K, 64, FM_DTYPE_BF16) : (size_t)(N * K) * 2;
}

/* Random weight bytes of type dt (Q4/Q8 g64 BF16 scales, or BF16) into buf. */
static void fill_weight(unsigned char *buf, fm_dtype dt, int64_t N, int64_t K) {
    if (dt == FM_DTYPE_BF16) {
        for (int64_t i = 0; i < N * K; i++) {
            uint16_t u = fm_f32_to_bf16((float)(rnd() * 0.05));
            memcpy(buf + 2 * i, &u, 2);
        }
        return;
    }
    const int64_t qbytes = N * K * fm_quant_bits(dt) / 8, G = N * (K / 64);
    for (int64_t i = 0; i < qbytes; i++) buf[i] = (unsigned char)rnd_u64();
    for (int64_t g = 0; g < 2 * G; g++) {
        uint16_t u = fm_f32_to_bf16(g < G ? (float)(0.001 + 0.004 * (rnd() + 1)) : (float)(-0.03 * (rnd() + 1)));
        memcpy(buf + qbytes + 2 * g, &u, 2);
    }
}


/* A smoke check before timing: the product of host weight h (type dt, [N, K], uploaded at dev)
 * for T tokens against fm_cpu_matmul; returns the worst |gpu - cpu| / sum |w x| (-1 on error). */
static double check_one(fm_cuda *c, const unsigned char *h, const void *dev, fm_dtype dt, int64_t N, int64_t K,
                        int64_t T, float *dx, float *dout) {
    fm_weight w = {.dtype = dt, .rows = N, .cols = K, .data = h, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    float *x = malloc(sizeof(float) * (size_t)(T * K)), *ref = malloc(sizeof(float) * (size_t)(T * N));
    float *got = malloc(sizeof(float) * (size_t)(T * N)), *row = malloc(sizeof(float) * (size_t)K);
    double worst = -1;
    if (!x || !ref || !got || !row) goto done;
    for (int64_t i = 0; i < T * K; i++) x[i] = (float)rnd();
    fm_cpu_matmul(NULL, ref, x, T, &w);
    w.data = dev;
    if (fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)(T * K)) || fm_cuda_buf_fill(c, dout, 0xff, sizeof(float) * (size_t)(T * N)) ||
        fm_cuda_matmul(c, dout, dx, T, &w) || fm_cuda_buf_download(c, got, dout, sizeof(float) * (size_t)(T * N))) {
        die("check");
        goto done;
    }
    w.data = h;
    worst = 0;
    for (int64_t r = 0; r < N; r++) {
        fm_cpu_get_row(row, &w, r);
        for (int64_t t = 0; t < T; t++) {
            double mag = 1e-30;
            for (int64_t k = 0; k < K; k++) mag += fabs((double)row[k] * x[t * K + k]);
            const double e = fabs((double)got[t * N + r] - ref[t * N + r]) / mag;
            if (!(e <= worst)) worst = e; /* NaN sticks */
        }
    }
done:
    free(x), free(ref), free(got), free(row);
    return worst;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct pool {
    fm_dtype dt;
    int experts;
    size_t gate_bytes, down_bytes; /* one matrix */
    unsigned char *gate, *up, *down; /* device: experts matrices each, back to back */
    float *x_gate, *x_down, *out;    /* device activations and outputs */
} pool;

enum { MODE_STREAM, MODE_DECODE, MODE_SINGLE };

/* One pass over the pool in the given mode with T tokens. */
static int run_pass(fm_cuda *c, const pool *p, int mode, int64_t T) {
    fm_weight gshape = {.dtype = p->dt, .rows = 1024, .cols = 4096, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_weight dshape = gshape;
    dshape.rows = 4096;
    dshape.cols = 1024;
    fm_cuda_mat m[64];
    const int step = mode == MODE_DECODE ? 10 : mode == MODE_STREAM ? 32 : 1;
    for (int e0 = 0; e0 < p->experts; e0 += step) {
        const int ne = e0 + step <= p->experts ? step : p->experts - e0;
        /* gate and up of experts [e0, e0 + ne): outputs side by side, x shared */
        for (int i = 0; i < ne; i++) {
            const size_t off = (size_t)(e0 + i) * p->gate_bytes;
            m[2 * i] = (fm_cuda_mat){p->gate + off, p->x_gate, p->out + (size_t)(2 * i) * 1024 * T, T};
            m[2 * i + 1] = (fm_cuda_mat){p->up + off, p->x_gate, p->out + (size_t)(2 * i + 1) * 1024 * T, T};
        }
        if (mode == MODE_SINGLE) {
            for (int i = 0; i < 2 * ne; i++) {
                gshape.data = m[i].w;
                if (fm_cuda_matmul(c, m[i].out, m[i].x, T, &gshape) != FM_OK) return die("matmul");
            }
        } else if (fm_cuda_matmul_batch(c, &gshape, m, 2 * ne) != FM_OK)
            return die("matmul batch (gate/up)");
        /* down of the same experts, each its own x */
        for (int i = 0; i < ne; i++)
            m[i] = (fm_cuda_mat){p->down + (size_t)(e0 + i) * p->down_bytes, p->x_down + (size_t)i * 1024 * T,
                                 p->out + (size_t)64 * 1024 * T + (size_t)i * 4096 * T, T};
        if (mode == MODE_SINGLE) {
            for (int i = 0; i < ne; i++) {
                dshape.data = m[i].w;
                if (fm_cuda_matmul(c, m[i].out, m[i].x, T, &dshape) != FM_OK) return die("matmul");
            }
        } else if (fm_cuda_matmul_batch(c, &dshape, m, ne) != FM_OK)
            return die("matmul batch (down)");
    }
    return 0;
}

static int time_median(fm_cuda *c, const pool *p, int mode, int64_t T, int reps, double *ms) {
    double t[64];
    if (reps > 64) reps = 64;
    for (int i = 0; i < 2 + reps; i++) {
        if (fm_cuda_timer_start(c) != FM_OK) return die("timer");
        if (run_pass(c, p, mode, T)) return 1;
        double v;
        if (fm_cuda_timer_stop(c, &v) != FM_OK) return die("timer");
        if (i >= 2) t[i - 2] = v;
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    *ms = t[reps / 2];
    return 0;
}

/* Checks the outputs that the last pass of run_pass(mode, T = 1) left: those of its last group of
 * experts (gate, up: x_gate; down: x_down + i * 1024), against fm_cpu_matmul of the host copies
 * hg / hu / hd of the 4 distinct matrices per shape (expert e is copy e % 4). Returns the worst
 * |gpu - cpu| / sum |w x| (-1 on error). */
static double verify_pass(fm_cuda *c, const pool *p, int mode, unsigned char *const hg[4], unsigned char *const hu[4],
                          unsigned char *const hd[4], const float *hx) {
    const int step = mode == MODE_DECODE ? 10 : mode == MODE_STREAM ? 32 : 1;
    const int e0 = (p->experts - 1) / step * step, ne = p->experts - e0 < step ? p->experts - e0 : step;
    const size_t n_out = (size_t)64 * 1024 + (size_t)64 * 4096;
    float *got = malloc(sizeof(float) * n_out), *ref = malloc(sizeof(float) * 4096), *row = malloc(sizeof(float) * 4096);
    double worst = -1;
    if (!got || !ref || !row) goto done;
    if (fm_cuda_buf_download(c, got, p->out, sizeof(float) * n_out) != FM_OK) {
        die("verify download");
        goto done;
    }
    worst = 0;
    for (int i = 0; i < ne; i++)
        for (int k = 0; k < 3; k++) { /* gate, up, down */
            const int e = (e0 + i) % 4;
            const int64_t N = k < 2 ? 1024 : 4096, K = k < 2 ? 4096 : 1024;
            fm_weight w = {.dtype = p->dt, .rows = N, .cols = K, .data = k == 0 ? hg[e] : k == 1 ? hu[e] : hd[e],
                           .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
            const float *x = k < 2 ? hx : hx + (size_t)i * 1024;
            const float *o = k < 2 ? got + (size_t)(2 * i + k) * 1024 : got + (size_t)64 * 1024 + (size_t)i * 4096;
            fm_cpu_matmul(NULL, ref, x, 1, &w);
            for (int64_t r = 0; r < N; r++) {
                fm_cpu_get_row(row, &w, r);
                double mag = 1e-30;
                for (int64_t j = 0; j < K; j++) mag += fabs((double)row[j] * x[j]);
                const double err = fabs((double)o[r] - ref[r]) / mag;
                if (!(err <= worst)) worst = err; /* NaN sticks */
            }
        }
done:
    free(got), free(ref), free(row);
    return worst;
}

int main(int argc, char **argv) {
    long pool_mib = 2048;
    int reps = 10, check = 1, failed = 0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--pool-mib") && i + 1 < argc) pool_mib = atol(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-check")) check = 0;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else {
            fprintf(stderr, "usage: cuda_bench [--pool-mib N] [--reps N] [--no-check] [--only Q4|Q8|BF16]\n");
            return 2;
        }
    }
    if (pool_mib < 64 || reps < 1) {
        fprintf(stderr, "cuda_bench: --pool-mib >= 64 and --reps >= 1\n");
        return 2;
    }
    int n = 0;
    fm_cuda_device_count(&n);
    if (n == 0) {
        fprintf(stderr, "cuda_bench: no CUDA device: %s\n", fm_last_error());
        return 1;
    }
    fm_cuda *c;
    if (fm_cuda_init(0, &c) != FM_OK) return die("init");
    printf("device: %s (L2 %.0f MiB)\n", fm_cuda_device_desc(c), (double)fm_cuda_l2_bytes(c) / 1048576.0);

    /* device-to-device copy bandwidth: 1 GiB, bytes read + written */
    const size_t cb = (size_t)1 << 30;
    void *src, *dst;
    if (fm_cuda_buf_alloc(c, cb, &src) || fm_cuda_buf_alloc(c, cb, &dst)) return die("alloc");
    if (fm_cuda_buf_fill(c, src, 0x5a, cb)) return die("fill");
    double ct[64];
    for (int i = 0; i < 2 + reps && i < 66; i++) {
        double v;
        if (fm_cuda_timer_start(c) || fm_cuda_buf_copy(c, dst, src, cb) || fm_cuda_timer_stop(c, &v)) return die("copy");
        if (i >= 2) ct[i - 2] = v;
    }
    qsort(ct, (size_t)(reps < 64 ? reps : 64), sizeof ct[0], cmp_double);
    const double copy_gbs = 2.0 * (double)cb / (ct[(reps < 64 ? reps : 64) / 2] * 1e-3) / 1e9;
    printf("D2D copy (cudaMemcpyAsync, 1 GiB, read + write): %.0f GB/s\n\n", copy_gbs);
    fm_cuda_buf_free(c, src);
    fm_cuda_buf_free(c, dst);

    printf("%-5s %-7s %3s %8s %9s %8s %7s %10s\n", "type", "mode", "T", "MiB", "ms/pass", "GB/s", "of D2D",
           "us/10 exp");
    static const fm_dtype types[] = {FM_DTYPE_Q4, FM_DTYPE_Q8, FM_DTYPE_BF16};
    for (int ti = 0; ti < 3; ti++) {
        if (only && strcmp(only, fm_dtype_name(types[ti]))) continue;
        pool p = {.dt = types[ti]};
        p.gate_bytes = wbytes(p.dt, 1024, 4096);
        p.down_bytes = wbytes(p.dt, 4096, 1024);
        const size_t per_expert = 2 * p.gate_bytes + p.down_bytes;
        p.experts = (int)(((size_t)pool_mib << 20) / per_expert) / 10 * 10;
        if (p.experts < 10) p.experts = 10;
        const size_t gb = (size_t)p.experts * p.gate_bytes, db = (size_t)p.experts * p.down_bytes;
        void *g, *u, *d, *xg, *xd, *o;
        if (fm_cuda_buf_alloc(c, gb, &g) || fm_cuda_buf_alloc(c, gb, &u) || fm_cuda_buf_alloc(c, db, &d) ||
            fm_cuda_buf_alloc(c, sizeof(float) * 16 * 4096, &xg) ||
            fm_cuda_buf_alloc(c, sizeof(float) * 16 * 1024 * 64, &xd) ||
            fm_cuda_buf_alloc(c, sizeof(float) * 16 * (64 * 1024 + 64 * 4096), &o))
            return die("alloc");
        p.gate = g, p.up = u, p.down = d, p.x_gate = xg, p.x_down = xd, p.out = o;
        /* 4 distinct random matrices per shape, replicated over the pool */
        /* host copies of the 4 distinct matrices per shape (for the checks) */
        unsigned char *hg[4], *hu[4], *hd[4];
        for (int v = 0; v < 4; v++) {
            hg[v] = malloc(p.gate_bytes), hu[v] = malloc(p.gate_bytes), hd[v] = malloc(p.down_bytes);
            if (!hg[v] || !hu[v] || !hd[v]) return 1;
        }
        float *hx = malloc(sizeof(float) * 16 * 1024 * 64);
        if (!hx) return 1;
        for (int v = 0; v < 4 && v < p.experts; v++) {
            unsigned char *h = hg[v];
            fill_weight(h, p.dt, 1024, 4096);
            if (fm_cuda_buf_upload(c, p.gate + (size_t)v * p.gate_bytes, h, p.gate_bytes)) return die("upload");
            h = hu[v];
            fill_weight(h, p.dt, 1024, 4096);
            if (fm_cuda_buf_upload(c, p.up + (size_t)v * p.gate_bytes, h, p.gate_bytes)) return die("upload");
            if (v == 0 && check) /* gate/up shape */
                for (int64_t T = 1; T <= 16; T = T == 1 ? 3 : T == 3 ? 16 : 17) {
                    const double e = check_one(c, h, p.up, p.dt, 1024, 4096, T, p.x_down, p.out);
                    printf("check %s [1024, 4096] T=%-2lld worst |gpu - cpu| / sum|wx| = %.2e%s\n", fm_dtype_name(p.dt),
                           (long long)T, e, e >= 0 && e <= 1e-5 ? "" : "  FAILED");
                    if (!(e >= 0 && e <= 1e-5)) failed = 1;
                }
            h = hd[v];
            fill_weight(h, p.dt, 4096, 1024);
            if (fm_cuda_buf_upload(c, p.down + (size_t)v * p.down_bytes, h, p.down_bytes)) return die("upload");
            if (v == 0 && check)
                for (int64_t T = 1; T <= 16; T = T == 1 ? 3 : T == 3 ? 16 : 17) {
                    const double e = check_one(c, h, p.down, p.dt, 4096, 1024, T, p.x_down, p.out);
                    printf("check %s [4096, 1024] T=%-2lld worst |gpu - cpu| / sum|wx| = %.2e%s\n", fm_dtype_name(p.dt),
                           (long long)T, e, e >= 0 && e <= 1e-5 ? "" : "  FAILED");
                    if (!(e >= 0 && e <= 1e-5)) failed = 1;
                }
        }
        for (int e = 4; e < p.experts; e++)
            if (fm_cuda_buf_copy(c, p.gate + (size_t)e * p.gate_bytes, p.gate + (size_t)(e % 4) * p.gate_bytes, p.gate_bytes) ||
                fm_cuda_buf_copy(c, p.up + (size_t)e * p.gate_bytes, p.up + (size_t)(e % 4) * p.gate_bytes, p.gate_bytes) ||
                fm_cuda_buf_copy(c, p.down + (size_t)e * p.down_bytes, p.down + (size_t)(e % 4) * p.down_bytes, p.down_bytes))
                return die("copy");
        for (int i = 0; i < 16 * 1024 * 64; i++) hx[i] = (float)rnd();
        if (fm_cuda_buf_upload(c, p.x_gate, hx, sizeof(float) * 16 * 4096) ||
            fm_cuda_buf_upload(c, p.x_down, hx, sizeof(float) * 16 * 1024 * 64))
            return die("upload");

        const double mib = (double)(2 * gb + db) / 1048576.0;
        struct { int mode; int64_t T; } runs[] = {{MODE_STREAM, 1}, {MODE_DECODE, 1}, {MODE_SINGLE, 1},
                                                  {MODE_STREAM, 3}, {MODE_STREAM, 16}};
        static const char *names[] = {"stream", "decode", "single"};
        for (size_t ri = 0; ri < sizeof runs / sizeof runs[0]; ri++) {
            double ms;
            if (time_median(c, &p, runs[ri].mode, runs[ri].T, reps, &ms)) return 1;
            const double gbs = (double)(2 * gb + db) / (ms * 1e-3) / 1e9;
            printf("%-5s %-7s %3lld %8.0f %9.3f %8.0f %6.1f%% %10.1f\n", fm_dtype_name(p.dt), names[runs[ri].mode],
                   (long long)runs[ri].T, mib, ms, gbs, 100.0 * gbs / copy_gbs, ms * 1e3 / (p.experts / 10.0));
            fflush(stdout);
            if (check && runs[ri].T == 1 && runs[ri].mode != MODE_SINGLE) {
                const double e = verify_pass(c, &p, runs[ri].mode, hg, hu, hd, hx);
                printf("check %s %s T=1 (the timed batches' last group) worst |gpu - cpu| / sum|wx| = %.2e%s\n",
                       fm_dtype_name(p.dt), names[runs[ri].mode], e, e >= 0 && e <= 1e-5 ? "" : "  FAILED");
                if (!(e >= 0 && e <= 1e-5)) failed = 1;
            }
        }
        for (int v = 0; v < 4; v++) free(hg[v]), free(hu[v]), free(hd[v]);
        free(hx);
        fm_cuda_buf_free(c, g), fm_cuda_buf_free(c, u), fm_cuda_buf_free(c, d);
        fm_cuda_buf_free(c, xg), fm_cuda_buf_free(c, xd), fm_cuda_buf_free(c, o);
    }
    fm_cuda_free(c);
    if (failed) fprintf(stderr, "cuda_bench: a check against the CPU oracle FAILED\n");
    return failed;
}
