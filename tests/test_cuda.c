/* The CUDA backend (src/backend/cuda/) against the CPU oracle. Compiled only with `make CUDA=1`;
 * without a usable GPU (no driver, a stub driver, no device: cudaGetDeviceCount fails or finds 0)
 * every cuda_ test SKIPs with the reason.
 *
 * Matmul: every weight type (F32, F16, BF16, Q8, Q4, Q2 with groups 32/64/128 and BF16, F16, F32
 * scales), T = 1, 3, 16 tokens, odd row counts, shapes that take the general kernel (rows not a
 * whole number of 16-byte chunks, misaligned pointers) and several column segments, batches of
 * products with different token counts, and the 397B expert shapes. Each output is compared with
 *   - a float64 sum of the decoded weights times x:  |gpu - f64| <= 1e-5 * mag
 *   - the CPU oracle fm_cpu_matmul:                  |gpu - cpu| <= 2e-5 * mag
 * where mag = sum_c |w_c x_c| (float types) or sum_c (|w_c| + 2 |b_c|) |x_c| (quantized: an upper
 * bound of sum (|q s| + |b|) |x|, the size of the terms of the FMA form s * sum q x + b * sum x).
 * Both sides are float32 sums in different orders, so observed errors are ~1e-7 of mag; one wrong
 * product is far above 1e-5 at these sizes. Outputs are poisoned with NaN before each run and
 * guarded by sentinels on both sides.
 *
 * RMSNorm: |gpu - f64| <= 1e-5 |f64| and |gpu - cpu| <= 2e-5 |cpu| (+1e-30) per element.
 * SwiGLU: |gpu - cpu| <= 2e-6 |cpu| (+1e-30): expf differs by a few ulps between libm and CUDA.
 *
 * Fresh random inputs each run; the seed is printed on failure (CUDA_SEED=n repeats a run). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/ops.h"
#include "backend/cuda/cuda_backend.h"
#include "quant/quant.h"
#include "test.h"
#include "util/half.h"

/* ---- random numbers ---- */

static uint64_t seed0;
static void rng_seed(void) { /* once per process */
    if (!seed0) seed0 = fm_test_rng_seed("CUDA_SEED");
}
#define rnd_u64 fm_test_rand_u64
#define rnd fm_test_rand

/* ---- the shared context ---- */

static fm_cuda *g_ctx;
static bool g_tried;
static char g_why[600];

/* The process's context on device 0, or NULL with the reason in g_why (no device: the test skips;
 * a device that fails to open: the test fails). */
static fm_cuda *cuda_get(bool *broken) {
    *broken = false;
    if (!g_tried) {
        g_tried = true;
        rng_seed();
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

#define CUDA_OR_SKIP(c)                                                                            \
    bool broken_;                                                                                  \
    fm_cuda *c = cuda_get(&broken_);                                                               \
    do {                                                                                           \
        if (broken_) {                                                                             \
            t->failures++;                                                                         \
            fprintf(stderr, "  %s\n", g_why);                                                      \
            return;                                                                                \
        }                                                                                          \
        if (!c) SKIP("%s", g_why);                                                                 \
    } while (0)

/* ---- host weights ---- */

#define GUARD 16
static const float SENTINEL = 12345.5f;

typedef struct hweight {
    unsigned char *data; /* host bytes in the fm_weight layout */
    size_t bytes;
    fm_weight w;         /* .data = data */
    float *deq;          /* (rows, cols) decoded weights */
    float *absb;         /* (rows, cols) |bias| of each element's group (quantized), else 0 */
} hweight;

static void hweight_free(hweight *h) {
    free(h->data);
    free(h->deq);
    free(h->absb);
}

static size_t weight_bytes(fm_dtype dt, int64_t N, int64_t K, int gs, fm_dtype sd) {
    return fm_dtype_is_quant(dt) ? (size_t)fm_quant_nbytes(dt, N, K, gs, sd) : (size_t)(N * K) * fm_dtype_size(dt);
}

/* Random weights of type dt: float types uniform in [-1, 1); quantized: random q and, per group,
 * a scale and bias giving values in about [-1, 1] (random magnitudes so groups differ). */
static bool make_hweight(hweight *h, fm_dtype dt, int64_t N, int64_t K, int gs, fm_dtype sd) {
    memset(h, 0, sizeof *h);
    h->bytes = weight_bytes(dt, N, K, gs, sd);
    h->data = malloc(h->bytes + 16);
    h->deq = malloc(sizeof(float) * (size_t)(N * K));
    h->absb = calloc((size_t)(N * K), sizeof(float));
    if (!h->data || !h->deq || !h->absb) return false;
    unsigned char *d = h->data;
    h->w = (fm_weight){.dtype = dt, .rows = N, .cols = K, .data = d, .group_size = gs, .scale_dtype = sd};
    if (!fm_dtype_is_quant(dt)) {
        for (int64_t i = 0; i < N * K; i++) {
            float v = (float)rnd();
            if (dt == FM_DTYPE_F32) memcpy(d + 4 * i, &v, 4);
            else {
                uint16_t u = dt == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                memcpy(d + 2 * i, &u, 2);
                v = dt == FM_DTYPE_BF16 ? fm_bf16_to_f32(u) : fm_f16_to_f32(u);
            }
            h->deq[i] = v;
        }
        return true;
    }
    const int bits = fm_quant_bits(dt);
    const int64_t G = K / gs, qbytes = N * K * bits / 8;
    for (int64_t i = 0; i < qbytes; i++) d[i] = (unsigned char)rnd_u64();
    const size_t ss = sd == FM_DTYPE_F32 ? 4 : 2;
    unsigned char *sp = d + qbytes, *bp = sp + (size_t)(N * G) * ss;
    const float maxq = (float)((1 << bits) - 1);
    for (int64_t g = 0; g < N * G; g++) {
        float s = (float)(0.2 + 0.8 * fabs(rnd())) * 2.0f / maxq, b = -(float)(0.5 + 0.5 * fabs(rnd()));
        if (rnd_u64() % 8 == 0) s = -s, b = -b; /* some negative scales */
        for (int k = 0; k < 2; k++) {
            float v = k ? b : s;
            unsigned char *p = (k ? bp : sp) + (size_t)g * ss;
            if (sd == FM_DTYPE_F32) memcpy(p, &v, 4);
            else {
                uint16_t u = sd == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                memcpy(p, &u, 2);
                v = sd == FM_DTYPE_BF16 ? fm_bf16_to_f32(u) : fm_f16_to_f32(u);
            }
            if (k)
                for (int64_t c = 0; c < gs; c++) h->absb[(g / G) * K + (g % G) * gs + c] = fabsf(v);
        }
    }
    for (int64_t r = 0; r < N; r++) fm_cpu_get_row(h->deq + r * K, &h->w, r);
    return true;
}

/* ---- one matmul case ---- */

typedef struct stats {
    double worst_f64, worst_cpu; /* worst error / mag */
    int cases;
} stats;

static void stats_print(const char *name, const stats *st) {
    fprintf(stderr, "  %s: %d cases, worst |gpu - f64| / mag = %.2e, |gpu - cpu| / mag = %.2e\n", name, st->cases,
            st->worst_f64, st->worst_cpu);
}

static float *poisoned(int64_t n) {
    float *o = malloc(sizeof(float) * (size_t)(n + 2 * GUARD));
    if (!o) return NULL;
    for (int64_t i = 0; i < GUARD; i++) o[i] = o[GUARD + n + i] = SENTINEL;
    for (int64_t i = 0; i < n; i++) o[GUARD + i] = NAN;
    return o;
}

/* Compares got (T x N) with the float64 product and the CPU oracle; returns false on failure (and
 * reports it once). */
static bool compare_out(fm_test_ctx *t, stats *st, const char *what, const hweight *h, const float *x, int64_t T,
                        const float *got) {
    const int64_t N = h->w.rows, K = h->w.cols;
    float *ref = malloc(sizeof(float) * (size_t)(T * N + 1));
    if (!ref) {
        t->failures++;
        return false;
    }
    fm_cpu_matmul(NULL, ref, x, T, &h->w);
    bool ok = true;
    for (int64_t tt = 0; tt < T && ok; tt++)
        for (int64_t r = 0; r < N; r++) {
            double exact = 0, mag = 0;
            const float *wr = h->deq + r * K, *br = h->absb + r * K, *xr = x + tt * K;
            for (int64_t c = 0; c < K; c++) {
                exact += (double)wr[c] * xr[c];
                mag += (fabs((double)wr[c]) + 2.0 * br[c]) * fabs((double)xr[c]);
            }
            const float g = got[tt * N + r];
            const double e64 = fabs((double)g - exact), ecpu = fabs((double)g - (double)ref[tt * N + r]);
            mag += 1e-30;
            if (!(e64 <= 1e-5 * mag) || !(ecpu <= 2e-5 * mag)) {
                t->failures++;
                fprintf(stderr, "  %s: out[%lld, %lld] = %.9g, float64 %.9g, cpu %.9g, mag %.3g (seed %llu)\n", what,
                        (long long)tt, (long long)r, g, exact, ref[tt * N + r], mag, (unsigned long long)seed0);
                ok = false;
                break;
            }
            if (e64 / mag > st->worst_f64) st->worst_f64 = e64 / mag;
            if (ecpu / mag > st->worst_cpu) st->worst_cpu = ecpu / mag;
        }
    free(ref);
    return ok;
}

/* One weight, T tokens; the weight `w_off` bytes and x `x_off` floats past 256-byte aligned device
 * allocations (non-zero offsets take the general kernel). */
static void check_matmul(fm_test_ctx *t, fm_cuda *c, stats *st, fm_dtype dt, int64_t N, int64_t K, int gs,
                         fm_dtype sd, int64_t T, int w_off, int x_off) {
    char what[200];
    snprintf(what, sizeof what, "%s%s%s g%d [%lld, %lld] T=%lld w+%d x+%d", fm_dtype_name(dt),
             fm_dtype_is_quant(dt) ? " scales " : "", fm_dtype_is_quant(dt) ? fm_dtype_name(sd) : "",
             fm_dtype_is_quant(dt) ? gs : 0, (long long)N, (long long)K, (long long)T, w_off, x_off);
    hweight h;
    float *x = malloc(sizeof(float) * (size_t)(T * K));
    float *out = poisoned(T * N);
    void *dw = NULL, *dx = NULL, *dout = NULL;
    if (!make_hweight(&h, dt, N, K, gs, sd) || !x || !out) {
        t->failures++;
        fprintf(stderr, "  %s: out of memory\n", what);
        goto done;
    }
    for (int64_t i = 0; i < T * K; i++) x[i] = (float)rnd() * (rnd_u64() % 16 == 0 ? 8.0f : 1.0f);
    if (fm_cuda_buf_alloc(c, h.bytes + 16, &dw) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(T * K + 4), &dx) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(T * N + 2 * GUARD), &dout) ||
        fm_cuda_buf_upload(c, (char *)dw + w_off, h.data, h.bytes) ||
        fm_cuda_buf_upload(c, (float *)dx + x_off, x, sizeof(float) * (size_t)(T * K)) ||
        fm_cuda_buf_upload(c, dout, out, sizeof(float) * (size_t)(T * N + 2 * GUARD))) {
        t->failures++;
        fprintf(stderr, "  %s: %s\n", what, fm_last_error());
        goto done;
    }
    fm_weight dwt = h.w;
    dwt.data = (char *)dw + w_off;
    fm_status s = fm_cuda_matmul(c, (float *)dout + GUARD, (float *)dx + x_off, T, &dwt);
    if (s == FM_OK) s = fm_cuda_buf_download(c, out, dout, sizeof(float) * (size_t)(T * N + 2 * GUARD));
    if (s != FM_OK) {
        t->failures++;
        fprintf(stderr, "  %s: %s\n", what, fm_last_error());
        goto done;
    }
    for (int64_t i = 0; i < GUARD; i++)
        if (out[i] != SENTINEL || out[GUARD + T * N + i] != SENTINEL) {
            t->failures++;
            fprintf(stderr, "  %s: wrote outside the output\n", what);
            goto done;
        }
    compare_out(t, st, what, &h, x, T, out + GUARD);
    st->cases++;
done:
    fm_cuda_buf_free(c, dw);
    fm_cuda_buf_free(c, dx);
    fm_cuda_buf_free(c, dout);
    hweight_free(&h);
    free(x);
    free(out);
}

static const int64_t TOKENS[] = {1, 3, 16};

FM_TEST(cuda_matmul_float_types) {
    CUDA_OR_SKIP(c);
    static const fm_dtype types[] = {FM_DTYPE_F32, FM_DTYPE_F16, FM_DTYPE_BF16};
    /* K = 7, 4099 and 36 for BF16/F16 are not whole 16-byte chunks: the general kernel */
    static const int64_t shapes[][2] = {{1, 4}, {37, 7}, {100, 36}, {33, 1000}, {9, 4099}, {65, 4096}, {5, 12288}};
    stats st = {0};
    for (int ti = 0; ti < 3; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (int k = 0; k < 3; k++)
                check_matmul(t, c, &st, types[ti], shapes[si][0], shapes[si][1], 0, FM_DTYPE_UNKNOWN, TOKENS[k], 0, 0);
    stats_print("float types", &st);
}

FM_TEST(cuda_matmul_quant_types) {
    CUDA_OR_SKIP(c);
    static const fm_dtype types[] = {FM_DTYPE_Q8, FM_DTYPE_Q4, FM_DTYPE_Q2};
    static const int groups[] = {32, 64, 128};
    stats st = {0};
    for (int ti = 0; ti < 3; ti++)
        for (int gi = 0; gi < 3; gi++) {
            const int gs = groups[gi];
            /* K = 3 gs: Q2 g32 is not whole chunks (general kernel); K > 8192: several segments */
            const int64_t shapes[][2] = {{1, gs}, {37, 3 * gs}, {100, 4096}, {9, 8192 + gs}};
            for (int si = 0; si < 4; si++)
                for (int k = 0; k < 3; k++)
                    check_matmul(t, c, &st, types[ti], shapes[si][0], shapes[si][1], gs, FM_DTYPE_BF16, TOKENS[k], 0, 0);
        }
    stats_print("quantized, BF16 scales", &st);
}

FM_TEST(cuda_matmul_scale_types) {
    CUDA_OR_SKIP(c);
    static const fm_dtype types[] = {FM_DTYPE_Q8, FM_DTYPE_Q4, FM_DTYPE_Q2};
    static const fm_dtype scales[] = {FM_DTYPE_F16, FM_DTYPE_F32};
    stats st = {0};
    for (int ti = 0; ti < 3; ti++)
        for (int si = 0; si < 2; si++)
            for (int k = 0; k < 3; k++) {
                check_matmul(t, c, &st, types[ti], 45, 640, 64, scales[si], TOKENS[k], 0, 0);
                check_matmul(t, c, &st, types[ti], 7, 256, 32, scales[si], TOKENS[k], 0, 0);
            }
    stats_print("quantized, F16/F32 scales", &st);
}

FM_TEST(cuda_matmul_misaligned) {
    CUDA_OR_SKIP(c);
    stats st = {0};
    static const fm_dtype types[] = {FM_DTYPE_F32, FM_DTYPE_F16, FM_DTYPE_BF16, FM_DTYPE_Q8, FM_DTYPE_Q4, FM_DTYPE_Q2};
    for (int ti = 0; ti < 6; ti++) {
        const int align = types[ti] == FM_DTYPE_F16 || types[ti] == FM_DTYPE_BF16 ? 2 : 4;
        for (int k = 0; k < 3; k++) {
            check_matmul(t, c, &st, types[ti], 37, 512, 64, FM_DTYPE_BF16, TOKENS[k], align, 0); /* weight */
            check_matmul(t, c, &st, types[ti], 37, 512, 64, FM_DTYPE_BF16, TOKENS[k], 0, 1);     /* x */
        }
    }
    stats_print("misaligned (general kernel)", &st);
}

/* The 397B expert shapes: gate/up [1024, 4096] and down [4096, 1024], Q4 g64 (the MLX release),
 * Q8 and BF16. */
FM_TEST(cuda_matmul_expert_shapes) {
    CUDA_OR_SKIP(c);
    stats st = {0};
    static const fm_dtype types[] = {FM_DTYPE_Q4, FM_DTYPE_Q8, FM_DTYPE_BF16};
    for (int ti = 0; ti < 3; ti++)
        for (int k = 0; k < 3; k++) {
            check_matmul(t, c, &st, types[ti], 1024, 4096, 64, FM_DTYPE_BF16, TOKENS[k], 0, 0);
            check_matmul(t, c, &st, types[ti], 4096, 1024, 64, FM_DTYPE_BF16, TOKENS[k], 0, 0);
        }
    stats_print("expert shapes", &st);
}

/* A batch of 70 products (two launches of at most 64) with token counts 0..16 mixed, some sharing
 * x; and a batch of Q2 g32 [.., 96] products (general kernel). */
static void check_batch(fm_test_ctx *t, fm_cuda *c, stats *st, fm_dtype dt, int64_t N, int64_t K, int gs, int n) {
    static const int64_t counts[] = {0, 1, 2, 3, 4, 5, 9, 16};
    hweight *h = calloc((size_t)n, sizeof *h);
    fm_cuda_mat *m = calloc((size_t)n, sizeof *m);
    float **x = calloc((size_t)n, sizeof *x), **out = calloc((size_t)n, sizeof *out);
    void **dw = calloc((size_t)n, sizeof *dw), **dx = calloc((size_t)n, sizeof *dx), **dout = calloc((size_t)n, sizeof *dout);
    char what[160];
    if (!h || !m || !x || !out || !dw || !dx || !dout) {
        t->failures++;
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const int64_t T = counts[rnd_u64() % 8];
        const bool share = i > 0 && m[i - 1].n_tokens == T && rnd_u64() % 2; /* x of the previous product */
        x[i] = malloc(sizeof(float) * (size_t)(T * K + 1));
        out[i] = poisoned(T * N);
        if (!make_hweight(&h[i], dt, N, K, gs, FM_DTYPE_BF16) || !x[i] || !out[i]) {
            t->failures++;
            goto done;
        }
        if (share) memcpy(x[i], x[i - 1], sizeof(float) * (size_t)(T * K));
        else
            for (int64_t j = 0; j < T * K; j++) x[i][j] = (float)rnd();
        if (fm_cuda_buf_alloc(c, h[i].bytes, &dw[i]) || fm_cuda_buf_upload(c, dw[i], h[i].data, h[i].bytes) ||
            (!share && (fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(T * K + 1), &dx[i]) ||
                        fm_cuda_buf_upload(c, dx[i], x[i], sizeof(float) * (size_t)(T * K)))) ||
            fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(T * N + 2 * GUARD), &dout[i]) ||
            fm_cuda_buf_upload(c, dout[i], out[i], sizeof(float) * (size_t)(T * N + 2 * GUARD))) {
            t->failures++;
            fprintf(stderr, "  batch: %s\n", fm_last_error());
            goto done;
        }
        m[i] = (fm_cuda_mat){.w = dw[i], .x = share ? m[i - 1].x : dx[i], .out = (float *)dout[i] + GUARD, .n_tokens = T};
    }
    fm_weight shape = h[0].w;
    shape.data = NULL;
    if (fm_cuda_matmul_batch(c, &shape, m, n) != FM_OK) {
        t->failures++;
        fprintf(stderr, "  batch: %s\n", fm_last_error());
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const int64_t T = m[i].n_tokens;
        if (fm_cuda_buf_download(c, out[i], dout[i], sizeof(float) * (size_t)(T * N + 2 * GUARD)) != FM_OK) {
            t->failures++;
            fprintf(stderr, "  batch: %s\n", fm_last_error());
            goto done;
        }
        snprintf(what, sizeof what, "batch %s g%d [%lld, %lld] product %d of %d, T=%lld", fm_dtype_name(dt), gs,
                 (long long)N, (long long)K, i, n, (long long)T);
        for (int64_t j = 0; j < GUARD; j++)
            if (out[i][j] != SENTINEL || out[i][GUARD + T * N + j] != SENTINEL) {
                t->failures++;
                fprintf(stderr, "  %s: wrote outside the output\n", what);
                goto done;
            }
        if (T && !compare_out(t, st, what, &h[i], x[i], T, out[i] + GUARD)) goto done;
        st->cases++;
    }
done:
    for (int i = 0; h && i < n; i++) {
        hweight_free(&h[i]);
        if (x) free(x[i]);
        if (out) free(out[i]);
        if (dw) fm_cuda_buf_free(c, dw[i]);
        if (dx) fm_cuda_buf_free(c, dx[i]);
        if (dout) fm_cuda_buf_free(c, dout[i]);
    }
    free(h), free(m), free(x), free(out), free(dw), free(dx), free(dout);
}

FM_TEST(cuda_matmul_batch) {
    CUDA_OR_SKIP(c);
    stats st = {0};
    check_batch(t, c, &st, FM_DTYPE_Q4, 200, 512, 64, 70);
    check_batch(t, c, &st, FM_DTYPE_Q2, 33, 96, 32, 9);
    check_batch(t, c, &st, FM_DTYPE_BF16, 64, 256, 0, 5);
    stats_print("batches", &st);
}

FM_TEST(cuda_matmul_errors) {
    CUDA_OR_SKIP(c);
    void *d = NULL;
    CHECK_OK(fm_cuda_buf_alloc(c, 1 << 20, &d));
    float *x = (float *)d, *out = (float *)d + 1024;
    fm_weight w = {.dtype = FM_DTYPE_I32, .rows = 4, .cols = 64, .data = (char *)d + 65536, .group_size = 64,
                   .scale_dtype = FM_DTYPE_BF16};
    CHECK(fm_cuda_matmul(c, out, x, 1, &w) == FM_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(fm_last_error(), "I32") != NULL, "%s", fm_last_error());
    w.dtype = FM_DTYPE_Q4;
    w.group_size = 48;
    CHECK(fm_cuda_matmul(c, out, x, 1, &w) == FM_ERR_UNSUPPORTED);
    w.group_size = 64;
    w.cols = 100;
    CHECK(fm_cuda_matmul(c, out, x, 1, &w) == FM_ERR_FORMAT);
    w.cols = 64;
    w.data = (char *)d + 65537;
    CHECK(fm_cuda_matmul(c, out, x, 1, &w) == FM_ERR_ARG);
    CHECK_MSG(strstr(fm_last_error(), "aligned") != NULL, "%s", fm_last_error());
    w.data = (char *)d + 65536;
    CHECK(fm_cuda_matmul(c, out, x, -1, &w) == FM_ERR_ARG);
    CHECK(fm_cuda_matmul(c, NULL, x, 1, &w) == FM_ERR_ARG);
    CHECK(fm_cuda_matmul(NULL, out, x, 1, &w) == FM_ERR_ARG);
    CHECK(fm_cuda_matmul(c, out, x, 0, &w) == FM_OK); /* nothing to do */
    CHECK(fm_cuda_rmsnorm(c, out, x, NULL, 1, 0, 1e-6f) == FM_ERR_ARG);
    CHECK(fm_cuda_swiglu(c, out, NULL, x, 4) == FM_ERR_ARG);
    /* an allocation the device cannot satisfy names the call, the file and the line */
    void *huge = NULL;
    CHECK(fm_cuda_buf_alloc(c, (size_t)1 << 50, &huge) == FM_ERR_NOMEM);
    CHECK_MSG(strstr(fm_last_error(), "cudaMalloc") && strstr(fm_last_error(), "cuda_backend.cu:"), "%s",
              fm_last_error());
    CHECK(huge == NULL);
    /* the context still works */
    CHECK_OK(fm_cuda_buf_fill(c, d, 0, 1 << 20));
    CHECK_OK(fm_cuda_sync(c));
    fm_cuda_buf_free(c, d);
}

/* Opening a device that does not exist fails cleanly (checked with or without a GPU). */
FM_TEST(cuda_init_errors) {
    int n = -1;
    CHECK_OK(fm_cuda_device_count(&n));
    CHECK(n >= 0);
    fm_cuda *c = (fm_cuda *)1;
    CHECK(fm_cuda_init(n, &c) == FM_ERR_UNSUPPORTED);
    CHECK(c == NULL);
    CHECK_MSG(strstr(fm_last_error(), "CUDA") != NULL, "%s", fm_last_error());
    if (n == 0) {
        char why[600];
        snprintf(why, sizeof why, "%s", fm_last_error());
        SKIP("no CUDA device (fm_cuda_init fails cleanly: %s)", why);
    }
}

/* ---- elementwise ---- */

FM_TEST(cuda_rmsnorm) {
    CUDA_OR_SKIP(c);
    static const int64_t ns[] = {1, 7, 256, 4096, 5000};
    double worst = 0;
    for (int ni = 0; ni < 5; ni++)
        for (int k = 0; k < 3; k++)
            for (int variant = 0; variant < 3; variant++) { /* 0: weights, 1: no weights, 2: in place */
                const int64_t n = ns[ni], T = TOKENS[k];
                float *x = malloc(sizeof(float) * (size_t)(T * n)), *w = malloc(sizeof(float) * (size_t)n);
                float *got = malloc(sizeof(float) * (size_t)(T * n)), *ref = malloc(sizeof(float) * (size_t)(T * n));
                void *dx = NULL, *dw = NULL, *dout = NULL;
                REQUIRE(x && w && got && ref);
                const float eps = 1e-6f, amp = (float)pow(10.0, (double)(rnd_u64() % 7) - 3.0);
                for (int64_t i = 0; i < T * n; i++) x[i] = (float)rnd() * amp;
                for (int64_t i = 0; i < n; i++) w[i] = (float)(1.0 + rnd());
                const float *wp = variant == 1 ? NULL : w;
                bool ok = fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(T * n), &dx) == FM_OK &&
                          fm_cuda_buf_alloc(c, sizeof(float) * (size_t)n, &dw) == FM_OK &&
                          fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(T * n), &dout) == FM_OK &&
                          fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)(T * n)) == FM_OK &&
                          fm_cuda_buf_upload(c, dw, w, sizeof(float) * (size_t)n) == FM_OK &&
                          fm_cuda_buf_fill(c, dout, 0xff, sizeof(float) * (size_t)(T * n)) == FM_OK; /* NaN */
                float *dst = variant == 2 ? (float *)dx : (float *)dout;
                ok = ok && fm_cuda_rmsnorm(c, dst, (float *)dx, wp ? (float *)dw : NULL, T, n, eps) == FM_OK &&
                     fm_cuda_buf_download(c, got, dst, sizeof(float) * (size_t)(T * n)) == FM_OK;
                CHECK_MSG(ok, "%s", fm_last_error());
                for (int64_t tt = 0; ok && tt < T; tt++) {
                    fm_cpu_rmsnorm(ref + tt * n, x + tt * n, wp, n, eps);
                    double ss = 0;
                    for (int64_t i = 0; i < n; i++) ss += (double)x[tt * n + i] * x[tt * n + i];
                    const double scale = 1.0 / sqrt(ss / (double)n + eps);
                    for (int64_t i = 0; i < n; i++) {
                        const double exact = (double)x[tt * n + i] * scale * (wp ? wp[i] : 1.0);
                        const double g = got[tt * n + i], r = ref[tt * n + i];
                        if (!(fabs(g - exact) <= 1e-5 * fabs(exact) + 1e-30) || !(fabs(g - r) <= 2e-5 * fabs(r) + 1e-30)) {
                            CHECK_MSG(0, "rmsnorm n=%lld T=%lld variant %d: out[%lld, %lld] = %.9g, f64 %.9g, cpu %.9g (seed %llu)",
                                      (long long)n, (long long)T, variant, (long long)tt, (long long)i, g, exact, r,
                                      (unsigned long long)seed0);
                            ok = false;
                            break;
                        }
                        if (exact != 0 && fabs(g - exact) / fabs(exact) > worst) worst = fabs(g - exact) / fabs(exact);
                    }
                }
                fm_cuda_buf_free(c, dx), fm_cuda_buf_free(c, dw), fm_cuda_buf_free(c, dout);
                free(x), free(w), free(got), free(ref);
            }
    fprintf(stderr, "  rmsnorm: worst |gpu - f64| / |f64| = %.2e\n", worst);
}

FM_TEST(cuda_swiglu) {
    CUDA_OR_SKIP(c);
    static const int64_t ns[] = {1, 1000, 100003};
    double worst = 0;
    for (int ni = 0; ni < 3; ni++)
        for (int inplace = 0; inplace < 2; inplace++) {
            const int64_t n = ns[ni];
            float *g = malloc(sizeof(float) * (size_t)n), *u = malloc(sizeof(float) * (size_t)n);
            float *got = malloc(sizeof(float) * (size_t)n);
            void *dg = NULL, *du = NULL, *dout = NULL;
            REQUIRE(g && u && got);
            for (int64_t i = 0; i < n; i++) {
                g[i] = (float)(rnd() * (rnd_u64() % 4 == 0 ? 30.0 : 4.0));
                u[i] = (float)rnd();
            }
            bool ok = fm_cuda_buf_alloc(c, sizeof(float) * (size_t)n, &dg) == FM_OK &&
                      fm_cuda_buf_alloc(c, sizeof(float) * (size_t)n, &du) == FM_OK &&
                      fm_cuda_buf_alloc(c, sizeof(float) * (size_t)n, &dout) == FM_OK &&
                      fm_cuda_buf_upload(c, dg, g, sizeof(float) * (size_t)n) == FM_OK &&
                      fm_cuda_buf_upload(c, du, u, sizeof(float) * (size_t)n) == FM_OK &&
                      fm_cuda_buf_fill(c, dout, 0xff, sizeof(float) * (size_t)n) == FM_OK;
            float *dst = inplace ? (float *)dg : (float *)dout;
            ok = ok && fm_cuda_swiglu(c, dst, (float *)dg, (float *)du, n) == FM_OK &&
                 fm_cuda_buf_download(c, got, dst, sizeof(float) * (size_t)n) == FM_OK;
            CHECK_MSG(ok, "%s", fm_last_error());
            for (int64_t i = 0; ok && i < n; i++) {
                const double r = (double)(fm_silu(g[i]) * u[i]);
                if (!(fabs(got[i] - r) <= 2e-6 * fabs(r) + 1e-30)) {
                    CHECK_MSG(0, "swiglu n=%lld: out[%lld] = %.9g, cpu %.9g (g %.9g, u %.9g; seed %llu)", (long long)n,
                              (long long)i, got[i], r, g[i], u[i], (unsigned long long)seed0);
                    break;
                }
                if (r != 0 && fabs(got[i] - r) / fabs(r) > worst) worst = fabs(got[i] - r) / fabs(r);
            }
            fm_cuda_buf_free(c, dg), fm_cuda_buf_free(c, du), fm_cuda_buf_free(c, dout);
            free(g), free(u), free(got);
        }
    fprintf(stderr, "  swiglu: worst |gpu - cpu| / |cpu| = %.2e\n", worst);
}
