/* cuda_bench: throughput of the CUDA matmul kernels on expert-sized matrices at the
 * Qwen3.5-397B-A17B geometry (gate/up [1024, 4096], down [4096, 1024]), against the device-to-device
 * copy bandwidth measured in the same run. Built by `make CUDA=1` as build/cuda/cuda_bench; needs a
 * GPU. docs/CUDA.md records its output.
 *
 *   cuda_bench [--pool-mib N] [--reps N] [--no-check] [--only Q4|Q8|BF16] [--decode-only] [--phases]
 *
 * --phases alone: what a phase boundary of the decode step costs (fm_cuda_phase_bench): graph-replayed
 * PDL launches against the grid barrier of a persistent kernel, at 1, 2 and 4 blocks an SM (or the
 * most that fit), 1000 phases of almost no work, with each phase's visibility checked.
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
 * too (worst error <= 1e-5 of sum |w x|; --no-check skips it).
 *
 * Then (also with --decode-only) the routed experts of the 397B geometry as decode runs them (top-10
 * Q4 g64: one launch for gate+up, one for down; "tc" the tensor-core kernel through
 * fm_cuda_matmul_batch, "mv" the resident step's fm_cuda_expert_matvec), see experts397.
 *
 * Then (or alone, with --decode-only) the products of one decode step of the qwen3.5-35b-a3b
 * geometry (hidden 2048, Q8 g64 dense, Q4 g64 experts, top-8), each row one group of products
 * as the resident step launches them: "old" the way the step ran before 2026-11-22's one-token
 * kernel (fm_cuda_matmul per product, pairs of one shape batched; the experts through
 * fm_cuda_expert_matvec's first kernel, FLASHMOE_CUDA_EMV_OLD, SwiGLU fused into down's input),
 * "new" through fm_cuda_matvec (one launch per group) and the experts' one-token kernel (SwiGLU in
 * the gate+up output). Each group has enough copies of its weights (>= 256 MiB together,
 * replicated by device copies) that consecutive launches stream from HBM; us is the median of
 * --reps passes over all copies divided by the copies; GB/s counts the weight bytes once. The
 * experts' rows add what the shared expert's down (Q8 [2048, 512]) costs after the experts' down
 * as its own launch and inside that launch (fm_cuda_expert_matvec_with), and "mean layer, dense,
 * fused" is the mean layer with the sh_down row's time replaced by the latter. Last, the experts
 * with the shared down and the combine as the step launches them against fm_cuda_expert_ffn (one
 * launch of clusters, opt-in) for each cluster size the device holds, with the combine as its own
 * launch and inside. */
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

/* ---- the decode step's products (qwen3.5-35b-a3b) ---- */

typedef struct dgroup {
    const char *name;
    int n;             /* products */
    int64_t rows[4], cols;
} dgroup;

/* Times `copies` launches of the group (old or new way) over distinct weight copies; *us per launch. */
static int time_group(fm_cuda *c, const dgroup *g, unsigned char *w, size_t gbytes, int copies, const size_t off[4],
                      const float *x, float *out, bool is_new, int reps, double *us) {
    double t[64];
    if (reps > 64) reps = 64;
    for (int it = 0; it < 2 + reps; it++) {
        if (fm_cuda_timer_start(c)) return die("timer");
        for (int cp = 0; cp < copies; cp++) {
            fm_weight ws[4];
            fm_cuda_mv mv[4];
            for (int i = 0; i < g->n; i++) {
                ws[i] = (fm_weight){.dtype = FM_DTYPE_Q8, .rows = g->rows[i], .cols = g->cols,
                                    .data = w + (size_t)cp * gbytes + off[i], .group_size = 64,
                                    .scale_dtype = FM_DTYPE_BF16};
                mv[i] = (fm_cuda_mv){.w = &ws[i], .x = x, .out = out + (size_t)i * 8192};
            }
            if (is_new) {
                if (fm_cuda_matvec(c, mv, g->n)) return die("matvec");
                continue;
            }
            for (int i = 0; i < g->n; i++) { /* the earlier step: one launch a product, pairs of one shape batched */
                if (i + 1 < g->n && g->rows[i + 1] == g->rows[i]) {
                    fm_cuda_mat m[2] = {{ws[i].data, x, mv[i].out, 1}, {ws[i + 1].data, x, mv[i + 1].out, 1}};
                    if (fm_cuda_matmul_batch(c, &ws[i], m, 2)) return die("matmul batch");
                    i++;
                } else if (fm_cuda_matmul(c, mv[i].out, x, 1, &ws[i])) {
                    return die("matmul");
                }
            }
        }
        double v;
        if (fm_cuda_timer_stop(c, &v)) return die("timer");
        if (it >= 2) t[it - 2] = v;
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    *us = t[reps / 2] * 1e3 / copies;
    return 0;
}

/* The routed experts of the 397B geometry as decode runs them: top-10 Q4 g64 experts, gate and up
 * [1024, 4096] with x shared, down [4096, 1024] with its own x, one launch for gate+up and one for
 * down, over a pool of 64 experts (~450 MiB, several times the L2) so that consecutive sets stream
 * from HBM. "tc": fm_cuda_matmul_batch (20 gate/up products, then 10 down; the tensor-core kernel
 * mm_q4_tc); "mv": fm_cuda_expert_matvec (the resident step's one-token kernel: gate+up as SwiGLU
 * pairs into one output, then down). The outputs of the last set are checked against
 * fm_cpu_matmul (tc: gate, up and down; mv: down of the gate+up launch's output, i.e. the whole
 * expert) with the bound of the other checks. */
static int experts397(fm_cuda *c, double copy_gbs, int reps, int check) {
    const int E = 64, K = 10, NSETS = 64;
    const int64_t I = 1024, H = 4096;
    const size_t gb = wbytes(FM_DTYPE_Q4, I, H), db = wbytes(FM_DTYPE_Q4, H, I);
    const size_t gpart = (gb + 255) / 256 * 256, blk = 2 * gpart + (db + 255) / 256 * 256;
    void *ew, *tab, *ids, *x, *G, *U, *Y;
    if (fm_cuda_buf_alloc(c, blk * E, &ew) || fm_cuda_buf_alloc(c, sizeof(void *) * E, &tab) ||
        fm_cuda_buf_alloc(c, sizeof(int32_t) * K * NSETS, &ids) || fm_cuda_buf_alloc(c, sizeof(float) * H, &x) ||
        fm_cuda_buf_alloc(c, sizeof(float) * K * I, &G) || fm_cuda_buf_alloc(c, sizeof(float) * K * I, &U) ||
        fm_cuda_buf_alloc(c, sizeof(float) * K * H, &Y))
        return die("alloc");
    unsigned char *hb = malloc(blk);
    float *hx = malloc(sizeof(float) * H);
    if (!hb || !hx) return 1;
    memset(hb, 0, blk);
    fill_weight(hb, FM_DTYPE_Q4, I, H);
    fill_weight(hb + gpart, FM_DTYPE_Q4, I, H);
    fill_weight(hb + 2 * gpart, FM_DTYPE_Q4, H, I);
    for (int i = 0; i < H; i++) hx[i] = (float)rnd();
    if (fm_cuda_buf_upload(c, ew, hb, blk) || fm_cuda_buf_upload(c, x, hx, sizeof(float) * H)) return die("upload");
    void *htab[64];
    for (int e = 0; e < E; e++) {
        htab[e] = (unsigned char *)ew + (size_t)e * blk;
        if (e && fm_cuda_buf_copy(c, htab[e], ew, blk)) return die("copy");
    }
    int32_t hids[10 * 64];
    for (int s = 0; s < NSETS; s++)
        for (int j = 0; j < K; j++) hids[s * K + j] = (s * 10 + j * 7) % E; /* distinct within a set */
    if (fm_cuda_buf_upload(c, tab, htab, sizeof(void *) * E) || fm_cuda_buf_upload(c, ids, hids, sizeof hids))
        return die("upload");
    fm_weight sg = {.dtype = FM_DTYPE_Q4, .rows = I, .cols = H, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_weight sd = sg;
    sd.rows = H, sd.cols = I;
    const double mb_gu = (double)K * 2 * gb / 1e6, mb_d = (double)K * db / 1e6;
    printf("\nexperts, 397B shapes (Q4 g64, top-10: gate+up [1024, 4096] x2 in one launch, down [4096, 1024] in one)\n");
    printf("%-4s %9s %9s %7s %9s %9s %7s %9s %7s\n", "kern", "g+u us", "GB/s", "of D2D", "down us", "GB/s", "of D2D",
           "all GB/s", "of D2D");
    for (int kern = 0; kern < 2; kern++) { /* 0: tc (matmul_batch), 1: mv (expert matvec) */
        double t[64], tg[64];
        const int r = reps > 64 ? 64 : reps;
        for (int pass = 0; pass < 2; pass++) /* pass 0: gate+up alone, pass 1: gate+up and down */
            for (int it = 0; it < 2 + r; it++) {
                if (fm_cuda_timer_start(c)) return die("timer");
                for (int s = 0; s < NSETS; s++) {
                    if (kern == 0) {
                        fm_cuda_mat m[20];
                        for (int j = 0; j < K; j++) {
                            const unsigned char *b = htab[hids[s * K + j]];
                            m[2 * j] = (fm_cuda_mat){b, x, (float *)G + (size_t)j * I, 1};
                            m[2 * j + 1] = (fm_cuda_mat){b + gpart, x, (float *)U + (size_t)j * I, 1};
                        }
                        if (fm_cuda_matmul_batch(c, &sg, m, 2 * K)) return die("matmul batch");
                        if (!pass) continue;
                        for (int j = 0; j < K; j++)
                            m[j] = (fm_cuda_mat){(const unsigned char *)htab[hids[s * K + j]] + 2 * gpart,
                                                 (float *)G + (size_t)j * I, (float *)Y + (size_t)j * H, 1};
                        if (fm_cuda_matmul_batch(c, &sd, m, K)) return die("matmul batch");
                        continue;
                    }
                    fm_cuda_expert_mv gu = {.table = tab, .ids = (int32_t *)ids + s * K, .k = K, .n_parts = 2,
                                            .n_experts = E, .part_off = {0, (int64_t)gpart}, .x = x,
                                            .out = {G, U}, .out_stride = I, .swiglu_out = 1};
                    if (fm_cuda_expert_matvec(c, &sg, &gu)) return die("expert matvec");
                    if (!pass) continue;
                    fm_cuda_expert_mv dn = {.table = tab, .ids = (int32_t *)ids + s * K, .k = K, .n_parts = 1,
                                            .n_experts = E, .part_off = {(int64_t)(2 * gpart), 0}, .x = G,
                                            .x_stride = I, .out = {Y, NULL}, .out_stride = H};
                    if (fm_cuda_expert_matvec(c, &sd, &dn)) return die("expert matvec");
                }
                double v;
                if (fm_cuda_timer_stop(c, &v)) return die("timer");
                if (it >= 2) (pass ? t : tg)[it - 2] = v;
            }
        qsort(t, (size_t)r, sizeof t[0], cmp_double);
        qsort(tg, (size_t)r, sizeof tg[0], cmp_double);
        const double us = t[r / 2] * 1e3 / NSETS, usg = tg[r / 2] * 1e3 / NSETS, usd = us - usg;
        const double g1 = mb_gu * 1e3 / usg, g2 = mb_d * 1e3 / usd, g3 = (mb_gu + mb_d) * 1e3 / us;
        printf("%-4s %9.2f %9.0f %6.1f%% %9.2f %9.0f %6.1f%% %9.0f %6.1f%%\n", kern ? "mv" : "tc", usg, g1,
               100.0 * g1 / copy_gbs, usd, g2, 100.0 * g2 / copy_gbs, g3, 100.0 * g3 / copy_gbs);
        fflush(stdout);
        if (!check) continue;
        /* the last set's outputs against the CPU: expert j = hids[(NSETS - 1) * K + j] (all the same bytes) */
        float *hG = malloc(sizeof(float) * K * I), *hY = malloc(sizeof(float) * K * H), *ref = malloc(sizeof(float) * H);
        float *rg = malloc(sizeof(float) * I), *ru = malloc(sizeof(float) * I), *row = malloc(sizeof(float) * H);
        if (!hG || !hY || !ref || !rg || !ru || !row) return 1;
        if (fm_cuda_buf_download(c, hG, G, sizeof(float) * K * I) || fm_cuda_buf_download(c, hY, Y, sizeof(float) * K * H))
            return die("download");
        fm_weight wg = sg, wu = sg, wd = sd;
        wg.data = hb, wu.data = hb + gpart, wd.data = hb + 2 * gpart;
        fm_cpu_matmul(NULL, rg, hx, 1, &wg);
        fm_cpu_matmul(NULL, ru, hx, 1, &wu);
        double worst = 0;
        for (int j = 0; j < K; j++) {
            const float *gin = hG + (size_t)j * I; /* down's input as the GPU computed it */
            fm_cpu_matmul(NULL, ref, gin, 1, &wd);
            for (int64_t rr = 0; rr < H; rr++) {
                fm_cpu_get_row(row, &wd, rr);
                double mag = 1e-30;
                for (int64_t q = 0; q < I; q++) mag += fabs((double)row[q] * gin[q]);
                const double e = fabs((double)hY[(size_t)j * H + rr] - ref[rr]) / mag;
                if (!(e <= worst)) worst = e;
            }
            if (kern == 1) /* gate+up's output silu(g) * u against the CPU's g and u, with test_cuda.c's
                              pair bound 1.1 mag_g |u| + |silu(g)| mag_u (mag = sum |w x|) */
                for (int64_t rr = 0; rr < I; rr++) {
                    double mg = 1e-30, mu = 1e-30;
                    fm_cpu_get_row(row, &wg, rr);
                    for (int64_t q = 0; q < H; q++) mg += fabs((double)row[q] * hx[q]);
                    fm_cpu_get_row(row, &wu, rr);
                    for (int64_t q = 0; q < H; q++) mu += fabs((double)row[q] * hx[q]);
                    const double g = rg[rr], u = ru[rr], sg_ = g / (1 + exp(-g)), want = sg_ * u;
                    const double e = fabs((double)gin[rr] - want) / (1.1 * mg * fabs(u) + fabs(sg_) * mu + 1e-30);
                    if (!(e <= worst)) worst = e;
                }
        }
        printf("check %s: the last set's outputs against the CPU: worst %.2e%s\n", kern ? "mv" : "tc", worst,
               worst <= 1e-5 ? "" : "  FAILED");
        free(hG), free(hY), free(ref), free(rg), free(ru), free(row);
        if (!(worst <= 1e-5)) return 1;
    }
    free(hb), free(hx);
    fm_cuda_buf_free(c, ew), fm_cuda_buf_free(c, tab), fm_cuda_buf_free(c, ids), fm_cuda_buf_free(c, x);
    fm_cuda_buf_free(c, G), fm_cuda_buf_free(c, U), fm_cuda_buf_free(c, Y);
    return 0;
}

/* The 35B experts of decode_shapes (top-8, one set of ids a token, NSETS sets streaming from HBM),
 * each set with the shared expert's down and the MoE combine: mode 0 the resident step's launches
 * (gate+up, down with the shared down, fm_cuda_moe_combine_topk), 1 fm_cuda_expert_ffn then
 * fm_cuda_moe_combine_parts, 2 fm_cuda_expert_ffn with the combine inside. *us: median per set. */
typedef struct ffn_bench {
    void *tab, *ids, *x, *G, *Y, *shw, *Ysh, *xr, *tw, *shl;
    size_t gpart, shb;
    int E, K, nsets, parts;
} ffn_bench;

static int ffn_time(fm_cuda *c, const ffn_bench *b, int mode, int reps, double *us) {
    fm_weight sg = {.dtype = FM_DTYPE_Q4, .rows = 512, .cols = 2048, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_weight sd = sg, shd_w = {.dtype = FM_DTYPE_Q8, .rows = 2048, .cols = 512, .group_size = 64,
                                .scale_dtype = FM_DTYPE_BF16};
    sd.rows = 2048, sd.cols = 512;
    double t[64];
    const int r = reps > 64 ? 64 : reps;
    for (int it = 0; it < 2 + r; it++) {
        if (fm_cuda_timer_start(c)) return die("timer");
        for (int s = 0; s < b->nsets; s++) {
            const int32_t *ids = (const int32_t *)b->ids + s * b->K;
            shd_w.data = (unsigned char *)b->shw + (size_t)s * b->shb;
            fm_cuda_mv shmv = {.w = &shd_w, .x = b->G, .out = b->Ysh};
            if (mode == 0) {
                fm_cuda_expert_mv gu = {.table = b->tab, .ids = ids, .k = b->K, .n_parts = 2, .n_experts = b->E,
                                        .part_off = {0, (int64_t)b->gpart}, .x = b->x, .out = {b->G, b->G},
                                        .out_stride = 512, .swiglu_out = 1};
                fm_cuda_expert_mv dn = {.table = b->tab, .ids = ids, .k = b->K, .n_parts = 1, .n_experts = b->E,
                                        .part_off = {(int64_t)(2 * b->gpart), 0}, .x = b->G, .x_stride = 512,
                                        .out = {b->Y, NULL}, .out_stride = 2048};
                if (fm_cuda_expert_matvec(c, &sg, &gu) || fm_cuda_expert_matvec_with(c, &sd, &dn, &shmv) ||
                    fm_cuda_moe_combine_topk(c, b->xr, b->Ysh, b->shl, b->Y, ids, b->tw, 1, b->K, 2048))
                    return die("experts' launches");
                continue;
            }
            fm_cuda_expert_ffn_args f = {.table = b->tab, .ids = ids, .k = b->K, .n_experts = b->E, .gate_off = 0,
                                         .up_off = (int64_t)b->gpart, .down_off = (int64_t)(2 * b->gpart), .x = b->x,
                                         .out = b->Y, .combine_x = mode == 2 ? b->xr : NULL, .shared_logit = b->shl,
                                         .weights = b->tw};
            if (fm_cuda_expert_ffn(c, &sg, &sd, &f, &shmv) ||
                (mode == 1 && fm_cuda_moe_combine_parts(c, b->xr, b->Ysh, b->shl, b->Y, ids, b->tw, b->K, b->parts, 2048)))
                return die("expert FFN");
        }
        double v;
        if (fm_cuda_timer_stop(c, &v)) return die("timer");
        if (it >= 2) t[it - 2] = v;
    }
    qsort(t, (size_t)r, sizeof t[0], cmp_double);
    *us = t[r / 2] * 1e3 / b->nsets;
    return 0;
}

static int decode_shapes(fm_cuda *c, double copy_gbs, int reps) {
    static const dgroup groups[] = {
        {"in_proj qkv+z+b+a", 4, {8192, 4096, 32, 32}, 2048},
        {"out_proj", 1, {2048}, 4096},
        {"attn q+k+v", 3, {8192, 512, 512}, 2048},
        {"o_proj", 1, {2048}, 4096},
        {"router+sh gate/up+gate", 4, {256, 512, 512, 1}, 2048},
        {"sh_down", 1, {2048}, 512},
        {"lm_head", 1, {248320}, 2048},
    };
    const size_t pool_bytes = (size_t)256 << 20;
    void *x, *out;
    if (fm_cuda_buf_alloc(c, sizeof(float) * 8192, &x) || fm_cuda_buf_alloc(c, sizeof(float) * (4 * 8192 + 248320), &out))
        return die("alloc");
    float hx[8192];
    for (int i = 0; i < 8192; i++) hx[i] = (float)rnd();
    if (fm_cuda_buf_upload(c, x, hx, sizeof hx)) return die("upload");
    printf("\ndecode step, qwen3.5-35b-a3b shapes (Q8 g64 dense; one token)\n");
    printf("%-24s %8s %6s %9s %8s %9s %8s %7s\n", "group", "MB", "copies", "old us", "old GB/s", "new us", "new GB/s",
           "of D2D");
    double sum_old = 0, sum_new = 0, sum_mb = 0, us_sh_new = 0;
    for (size_t gi = 0; gi < sizeof groups / sizeof groups[0]; gi++) {
        const dgroup *g = &groups[gi];
        size_t off[4], gbytes = 0;
        for (int i = 0; i < g->n; i++) {
            off[i] = gbytes;
            gbytes += (wbytes(FM_DTYPE_Q8, g->rows[i], g->cols) + 255) / 256 * 256;
        }
        int copies = (int)((pool_bytes + gbytes - 1) / gbytes);
        if (copies < 2) copies = 2;
        void *w;
        unsigned char *hw = malloc(gbytes);
        if (!hw || fm_cuda_buf_alloc(c, gbytes * (size_t)copies, &w)) return die("alloc");
        for (int i = 0; i < g->n; i++) fill_weight(hw + off[i], FM_DTYPE_Q8, g->rows[i], g->cols);
        if (fm_cuda_buf_upload(c, w, hw, gbytes)) return die("upload");
        for (int cp = 1; cp < copies; cp++)
            if (fm_cuda_buf_copy(c, (unsigned char *)w + (size_t)cp * gbytes, w, gbytes)) return die("copy");
        free(hw);
        double us_old, us_new;
        if (time_group(c, g, w, gbytes, copies, off, x, out, false, reps, &us_old) ||
            time_group(c, g, w, gbytes, copies, off, x, out, true, reps, &us_new))
            return 1;
        size_t bytes = 0;
        for (int i = 0; i < g->n; i++) bytes += wbytes(FM_DTYPE_Q8, g->rows[i], g->cols);
        const double mb = (double)bytes / 1e6, go = mb / 1e3 / (us_old * 1e-6), gn = mb / 1e3 / (us_new * 1e-6);
        printf("%-24s %8.2f %6d %9.2f %8.0f %9.2f %8.0f %6.1f%%\n", g->name, mb, copies, us_old, go, us_new, gn,
               100.0 * gn / copy_gbs);
        fflush(stdout);
        /* a layer's dense part: 3 DeltaNet layers (in_proj, out_proj) per attention layer (q/k/v,
         * o_proj), and router + shared expert in each */
        const double wl = gi == 0 || gi == 1 ? 0.75 : gi == 2 || gi == 3 ? 0.25 : gi == 6 ? 0 : 1;
        sum_old += wl * us_old, sum_new += wl * us_new, sum_mb += wl * mb;
        if (gi == 5) us_sh_new = us_new;
        fm_cuda_buf_free(c, w);
    }
    printf("%-24s %8.2f %6s %9.2f %8.0f %9.2f %8.0f %6.1f%%   (3/4 DeltaNet + 1/4 attention + MoE dense)\n",
           "mean layer, dense", sum_mb, "", sum_old, sum_mb / 1e3 / (sum_old * 1e-6), sum_new,
           sum_mb / 1e3 / (sum_new * 1e-6), 100.0 * sum_mb / 1e3 / (sum_new * 1e-6) / copy_gbs);

    /* routed experts: top-8 of 256 Q4 g64 experts, gate+up [512, 2048] and down [2048, 512] */
    const int E = 256, K = 8, NSETS = 64;
    const size_t gb = wbytes(FM_DTYPE_Q4, 512, 2048), db = wbytes(FM_DTYPE_Q4, 2048, 512);
    const size_t gpart = (gb + 255) / 256 * 256, blk = 2 * gpart + (db + 255) / 256 * 256;
    void *ew, *tab, *ids, *G, *U, *Y, *shw, *Ysh;
    /* the shared expert's down (Q8 g64 [2048, 512]), one copy per set: for the fused rows */
    const size_t shb = (wbytes(FM_DTYPE_Q8, 2048, 512) + 255) / 256 * 256;
    if (fm_cuda_buf_alloc(c, blk * E, &ew) || fm_cuda_buf_alloc(c, sizeof(void *) * E, &tab) ||
        fm_cuda_buf_alloc(c, sizeof(int32_t) * K * NSETS, &ids) || fm_cuda_buf_alloc(c, sizeof(float) * K * 512, &G) ||
        fm_cuda_buf_alloc(c, sizeof(float) * K * 512, &U) || fm_cuda_buf_alloc(c, sizeof(float) * K * 2048, &Y) ||
        fm_cuda_buf_alloc(c, shb * NSETS, &shw) || fm_cuda_buf_alloc(c, sizeof(float) * 2048, &Ysh))
        return die("alloc");
    {
        unsigned char *hs = malloc(shb);
        if (!hs) return 1;
        memset(hs, 0, shb);
        fill_weight(hs, FM_DTYPE_Q8, 2048, 512);
        if (fm_cuda_buf_upload(c, shw, hs, shb)) return die("upload");
        for (int i = 1; i < NSETS; i++)
            if (fm_cuda_buf_copy(c, (unsigned char *)shw + (size_t)i * shb, shw, shb)) return die("copy");
        free(hs);
    }
    unsigned char *hb = malloc(blk);
    if (!hb) return 1;
    fill_weight(hb, FM_DTYPE_Q4, 512, 2048);
    fill_weight(hb + gpart, FM_DTYPE_Q4, 512, 2048);
    fill_weight(hb + 2 * gpart, FM_DTYPE_Q4, 2048, 512);
    if (fm_cuda_buf_upload(c, ew, hb, blk)) return die("upload");
    free(hb);
    void *htab[256];
    for (int e = 0; e < E; e++) {
        htab[e] = (unsigned char *)ew + (size_t)e * blk;
        if (e && fm_cuda_buf_copy(c, htab[e], ew, blk)) return die("copy");
    }
    int32_t hids[8 * 64];
    for (int s = 0; s < NSETS; s++)
        for (int j = 0; j < K; j++) hids[s * K + j] = (s * 37 + j * 29) % E; /* distinct within a set */
    if (fm_cuda_buf_upload(c, tab, htab, sizeof(void *) * E) || fm_cuda_buf_upload(c, ids, hids, sizeof hids))
        return die("upload");
    fm_weight sg = {.dtype = FM_DTYPE_Q4, .rows = 512, .cols = 2048, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_weight sd = sg;
    sd.rows = 2048, sd.cols = 512;
    const double emb = (double)K * (2 * gb + db) / 1e6;
    fm_weight shd_w = {.dtype = FM_DTYPE_Q8, .rows = 2048, .cols = 512, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    for (int is_new = 0; is_new < 2; is_new++) {
        if (is_new) unsetenv("FLASHMOE_CUDA_EMV_OLD");
        else setenv("FLASHMOE_CUDA_EMV_OLD", "1", 1);
        double t[64], tg[64], ts[64], tf[64];
        const int r = reps > 64 ? 64 : reps;
        /* pass 0: gate+up alone, 1: gate+up and down; new only: 2: and the shared down (separate
         * launch), 3: the shared down in the experts' down launch (fm_cuda_expert_matvec_with) */
        for (int pass = 0; pass < (is_new ? 4 : 2); pass++)
            for (int it = 0; it < 2 + r; it++) {
                if (fm_cuda_timer_start(c)) return die("timer");
                for (int s = 0; s < NSETS; s++) {
                    fm_cuda_expert_mv gu = {.table = tab, .ids = (int32_t *)ids + s * K, .k = K, .n_parts = 2,
                                            .n_experts = E, .part_off = {0, (int64_t)gpart}, .x = x,
                                            .out = {G, U}, .out_stride = 512, .swiglu_out = is_new};
                    if (fm_cuda_expert_matvec(c, &sg, &gu)) return die("expert matvec");
                    if (!pass) continue;
                    fm_cuda_expert_mv dn = {.table = tab, .ids = (int32_t *)ids + s * K, .k = K, .n_parts = 1,
                                            .n_experts = E, .part_off = {(int64_t)(2 * gpart), 0}, .x = G,
                                            .x_up = is_new ? NULL : U, .x_stride = 512, .out = {Y, NULL},
                                            .out_stride = 2048};
                    shd_w.data = (unsigned char *)shw + (size_t)s * shb;
                    fm_cuda_mv shmv = {.w = &shd_w, .x = G, .out = Ysh};
                    if (pass == 3) {
                        if (fm_cuda_expert_matvec_with(c, &sd, &dn, &shmv)) return die("expert matvec with");
                        continue;
                    }
                    if (fm_cuda_expert_matvec(c, &sd, &dn)) return die("expert matvec");
                    if (pass == 2 && fm_cuda_matvec(c, &shmv, 1)) return die("matvec");
                }
                double v;
                if (fm_cuda_timer_stop(c, &v)) return die("timer");
                if (it >= 2) (pass == 0 ? tg : pass == 1 ? t : pass == 2 ? ts : tf)[it - 2] = v;
            }
        qsort(t, (size_t)r, sizeof t[0], cmp_double);
        qsort(tg, (size_t)r, sizeof tg[0], cmp_double);
        const double us = t[r / 2] * 1e3 / NSETS, usg = tg[r / 2] * 1e3 / NSETS;
        if (is_new) {
            qsort(ts, (size_t)r, sizeof ts[0], cmp_double);
            qsort(tf, (size_t)r, sizeof tf[0], cmp_double);
            const double uss = ts[r / 2] * 1e3 / NSETS, usf = tf[r / 2] * 1e3 / NSETS;
            /* the dense part with the shared down inside the experts' launch: its own row's time
             * replaced by what it adds to that launch (fused - experts alone) */
            const double fused_layer = sum_new - us_sh_new + (usf - us);
            printf("experts top-8 new + sh_down: separate launch %.2f us more, in the experts' down launch %.2f us more"
                   " (experts gate+up+down %.2f us)\n", uss - us, usf - us, us);
            printf("%-24s %8.2f %6s %9s %8s %9.2f %8.0f %6.1f%%   (sh_down counted as what it adds to the experts' down launch)\n",
                   "mean layer, dense, fused", sum_mb, "", "", "", fused_layer, sum_mb / 1e3 / (fused_layer * 1e-6),
                   100.0 * sum_mb / 1e3 / (fused_layer * 1e-6) / copy_gbs);
        }
        printf("experts top-8 %-10s %8.2f MB   gate+up %7.2f us (%5.0f GB/s)   + down %7.2f us (%5.0f GB/s)   all %5.0f GB/s = %5.1f%% of D2D\n",
               is_new ? "new" : "old", emb, usg, (double)K * 2 * gb / 1e3 / usg, us - usg,
               (double)K * db / 1e3 / (us - usg), emb * 1e3 / us, 100.0 * emb * 1e3 / us / copy_gbs);
    }
    unsetenv("FLASHMOE_CUDA_EMV_OLD");
    /* the fused FFN (fm_cuda_expert_ffn, opt-in) per cluster size against the launches it replaces,
     * both with the shared down and the combine */
    void *xr, *tw, *shl, *Yp;
    if (fm_cuda_buf_alloc(c, sizeof(float) * 2048, &xr) || fm_cuda_buf_alloc(c, sizeof(float) * K, &tw) ||
        fm_cuda_buf_alloc(c, sizeof(float), &shl) || fm_cuda_buf_alloc(c, sizeof(float) * K * 8 * 2048, &Yp))
        return die("alloc");
    {
        float hw[8], z = 0.f;
        for (int j = 0; j < K; j++) hw[j] = 1.0f / (float)K;
        if (fm_cuda_buf_upload(c, tw, hw, sizeof(float) * K) || fm_cuda_buf_upload(c, shl, &z, sizeof z) ||
            fm_cuda_buf_fill(c, xr, 0, sizeof(float) * 2048))
            return die("upload");
    }
    ffn_bench fb = {.tab = tab, .ids = ids, .x = x, .G = G, .Y = Yp, .shw = shw, .Ysh = Ysh, .xr = xr, .tw = tw,
                    .shl = shl, .gpart = gpart, .shb = shb, .E = E, .K = K, .nsets = NSETS, .parts = 1};
    double us_base;
    if (ffn_time(c, &fb, 0, reps, &us_base)) return 1;
    printf("experts top-8 + sh_down + combine, the step's launches: %.2f us a token\n", us_base);
    static const char *const cls[] = {"16", "8", "4", "2"};
    for (int ci = 0; ci < 4; ci++) {
        setenv("FLASHMOE_CUDA_FFN", cls[ci], 1);
        shd_w.data = shw;
        fm_cuda_mv probe = {.w = &shd_w, .x = G, .out = Ysh};
        fb.parts = fm_cuda_expert_ffn_parts(c, &sg, &sd, K, &probe, true);
        if (!fb.parts) {
            printf("expert FFN, clusters of %2s: not taken here (too few of its clusters resident)\n", cls[ci]);
            continue;
        }
        double us1, us2;
        if (ffn_time(c, &fb, 1, reps, &us1) || ffn_time(c, &fb, 2, reps, &us2)) return 1;
        printf("expert FFN, clusters of %2s, %d parts: + combine launch %.2f us (%.2fx), combine inside %.2f us (%.2fx)\n",
               cls[ci], fb.parts, us1, us_base / us1, us2, us_base / us2);
    }
    unsetenv("FLASHMOE_CUDA_FFN");
    fm_cuda_buf_free(c, xr), fm_cuda_buf_free(c, tw), fm_cuda_buf_free(c, shl), fm_cuda_buf_free(c, Yp);
    fm_cuda_buf_free(c, ew), fm_cuda_buf_free(c, tab), fm_cuda_buf_free(c, ids);
    fm_cuda_buf_free(c, G), fm_cuda_buf_free(c, U), fm_cuda_buf_free(c, Y);
    fm_cuda_buf_free(c, shw), fm_cuda_buf_free(c, Ysh);
    fm_cuda_buf_free(c, x), fm_cuda_buf_free(c, out);
    return 0;
}

int main(int argc, char **argv) {
    long pool_mib = 2048;
    int reps = 10, check = 1, failed = 0, decode_only = 0, phases = 0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--pool-mib") && i + 1 < argc) pool_mib = atol(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-check")) check = 0;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--decode-only")) decode_only = 1;
        else if (!strcmp(argv[i], "--phases")) phases = 1;
        else {
            fprintf(stderr, "usage: cuda_bench [--pool-mib N] [--reps N] [--no-check] [--only Q4|Q8|BF16] [--decode-only] "
                            "[--phases]\n");
            return 2;
        }
    }
    if (pool_mib < 64 || reps < 1) {
        fprintf(stderr, "cuda_bench: --pool-mib >= 64 and --reps >= 1\n");
        return 2;
    }
    /* the checks hold the GPU to the CPU's float kernels, as the cuda_ tests do: the default int8
     * activations differ from them by ~1e-5 (and failed the 1e-5 check of the Q4 matvec) */
    fm_cpu_set_int8_mode(FM_CPU_INT8_OFF);
    int n = 0;
    fm_cuda_device_count(&n);
    if (n == 0) {
        fprintf(stderr, "cuda_bench: no CUDA device: %s\n", fm_last_error());
        return 1;
    }
    fm_cuda *c;
    if (fm_cuda_init(0, &c) != FM_OK) return die("init");
    printf("device: %s (L2 %.0f MiB)\n", fm_cuda_device_desc(c), (double)fm_cuda_l2_bytes(c) / 1048576.0);
    if (phases) {
        fm_cuda_phase_times pt;
        if (fm_cuda_phase_bench(c, 1, 2, 1, &pt)) return die("phase bench");
        const int most = pt.most_blocks, sms = fm_cuda_sm_count(c);
        printf("phase boundary, 1000 phases of almost no work, median of %d runs (us a phase):\n", reps);
        printf("%8s %14s %14s %8s\n", "blocks", "graph+PDL", "grid barrier", "stale");
        for (int per = 1; per <= 4; per *= 2) {
            const int b = per * sms < most ? per * sms : most;
            if (fm_cuda_phase_bench(c, b, 1000, reps, &pt)) return die("phase bench");
            printf("%8d %14.2f %14.2f %8u\n", b, pt.launch_us, pt.barrier_us, pt.launch_errors + pt.barrier_errors);
            failed |= pt.launch_errors + pt.barrier_errors != 0;
            if (b == most) break;
        }
        fm_cuda_free(c);
        return failed;
    }

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
    if (decode_only) {
        const int rc = experts397(c, copy_gbs, reps, check) || decode_shapes(c, copy_gbs, reps);
        fm_cuda_free(c);
        return rc;
    }

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
    if (experts397(c, copy_gbs, reps, check) || decode_shapes(c, copy_gbs, reps)) return 1;
    fm_cuda_free(c);
    if (failed) fprintf(stderr, "cuda_bench: a check against the CPU oracle FAILED\n");
    return failed;
}
