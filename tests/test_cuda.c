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

#include "backend/cpu/mixer_kernels.h"
#include "backend/cpu/ops.h"
#include "backend/cuda/cuda_backend.h"
#include "quant/quant.h"
#include "test.h"
#include "test_cuda_ctx.h"
#include "util/half.h"

/* ---- random numbers ---- */

#define rnd_u64 fm_test_rand_u64
#define rnd fm_test_rand

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
                        (long long)tt, (long long)r, g, exact, ref[tt * N + r], mag, (unsigned long long)fm_test_cuda_seed());
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

/* A batch of n products with token counts drawn from counts[0..n_counts) (70: two launches of at
 * most 64), some sharing x. */
static void check_batch(fm_test_ctx *t, fm_cuda *c, stats *st, fm_dtype dt, int64_t N, int64_t K, int gs, int n,
                        const int64_t *counts, int n_counts) {
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
        const int64_t T = counts[rnd_u64() % (uint64_t)n_counts];
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

/* Token counts 0..16 mixed; a batch of Q2 g32 [.., 96] products (general kernel). */
FM_TEST(cuda_matmul_batch) {
    CUDA_OR_SKIP(c);
    static const int64_t few[] = {0, 1, 2, 3, 4, 5, 9, 16};
    stats st = {0};
    check_batch(t, c, &st, FM_DTYPE_Q4, 200, 512, 64, 70, few, 8);
    check_batch(t, c, &st, FM_DTYPE_Q2, 33, 96, 32, 9, few, 8);
    check_batch(t, c, &st, FM_DTYPE_BF16, 64, 256, 0, 5, few, 8);
    stats_print("batches", &st);
}

/* The prefill GEMM (gemm.cu: Q4/Q8, cols a multiple of 64; forced on here from 16 tokens, whatever
 * the default): token counts around its 64-token tiles, rows around its 64-row tiles, every group
 * size and scale type, the 397B expert shapes, and batches whose products straddle the 16-token
 * threshold (the GEMM takes some, the FP32 kernels the rest, in one call). The bounds are
 * compare_out's: the GEMM's three bf16 parts of x leave ~2^-24 of mag, its f32 sums the rest. */
FM_TEST(cuda_matmul_gemm) {
    CUDA_OR_SKIP(c);
    const int old_min = fm_cuda_set_gemm_min_tokens(16); /* whatever FLASHMOE_CUDA_GEMM or the default say */
    static const fm_dtype types[] = {FM_DTYPE_Q4, FM_DTYPE_Q8};
    static const int groups[] = {32, 64, 128};
    static const int64_t tokens[] = {16, 17, 63, 64, 65, 130};
    static const int64_t shapes[][2] = {{64, 128}, {100, 384}, {37, 640}, {129, 2048}};
    stats st = {0};
    for (int ti = 0; ti < 2; ti++)
        for (int gi = 0; gi < 3; gi++)
            for (int si = 0; si < 4; si++)
                for (int k = 0; k < 6; k++) {
                    if (shapes[si][1] % groups[gi]) continue;
                    check_matmul(t, c, &st, types[ti], shapes[si][0], shapes[si][1], groups[gi], FM_DTYPE_BF16,
                                 tokens[(k + si) % 6], 0, 0);
                }
    for (int ti = 0; ti < 2; ti++) {
        check_matmul(t, c, &st, types[ti], 45, 640, 64, FM_DTYPE_F16, 40, 0, 0);
        check_matmul(t, c, &st, types[ti], 70, 256, 32, FM_DTYPE_F32, 100, 0, 0);
        check_matmul(t, c, &st, types[ti], 1024, 4096, 64, FM_DTYPE_BF16, 64, 0, 0);
        check_matmul(t, c, &st, types[ti], 4096, 1024, 64, FM_DTYPE_BF16, 33, 0, 0);
    }
    static const int64_t mixed[] = {0, 3, 15, 16, 17, 40, 64, 100};
    check_batch(t, c, &st, FM_DTYPE_Q4, 200, 512, 64, 70, mixed, 8);
    check_batch(t, c, &st, FM_DTYPE_Q8, 96, 256, 128, 9, mixed, 8);
    fm_cuda_set_gemm_min_tokens(old_min);
    stats_print("prefill GEMM", &st);
}

/* fm_cuda_matvec: n one-token products of random types (F32, F16, BF16, Q8, Q4 and Q2, which takes
 * the fallback), group sizes, scale types and shapes (rows of 1 to 1025, 1 to 520 chunks: one or
 * several chunks a lane; rows that are not whole chunks take the fallback) in one call, some sharing
 * x, some with x 4 bytes past 16-byte alignment (the fallback); n > FM_CUDA_MV_MAX splits a type's
 * launches. Outputs poisoned and guarded as check_matmul's; the same bounds. */
static void check_matvec(fm_test_ctx *t, fm_cuda *c, stats *st, int n) {
    static const fm_dtype types[] = {FM_DTYPE_F32, FM_DTYPE_F16, FM_DTYPE_BF16, FM_DTYPE_Q8, FM_DTYPE_Q4, FM_DTYPE_Q2};
    static const fm_dtype scales[] = {FM_DTYPE_BF16, FM_DTYPE_F16, FM_DTYPE_F32};
    static const int groups[] = {32, 64, 128};
    hweight *h = calloc((size_t)n, sizeof *h);
    fm_cuda_mv *mv = calloc((size_t)n, sizeof *mv);
    fm_weight *dw_shape = calloc((size_t)n, sizeof *dw_shape);
    float **x = calloc((size_t)n, sizeof *x), **out = calloc((size_t)n, sizeof *out);
    void **dw = calloc((size_t)n, sizeof *dw), **dx = calloc((size_t)n, sizeof *dx), **dout = calloc((size_t)n, sizeof *dout);
    char what[200];
    if (!h || !mv || !dw_shape || !x || !out || !dw || !dx || !dout) {
        t->failures++;
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const fm_dtype dt = types[rnd_u64() % 6];
        const bool q = fm_dtype_is_quant(dt);
        const int gs = q ? groups[rnd_u64() % 3] : 0;
        const fm_dtype sd = q ? scales[rnd_u64() % 3] : FM_DTYPE_UNKNOWN;
        const int64_t unit = q ? gs : 4;
        /* {rows, cols in units}: float units of 4 columns (9 units of BF16/F16 are not whole chunks) */
        static const int64_t shapes[][2] = {{1, 1}, {37, 3}, {300, 16}, {1025, 4}, {9, 65}, {2, 32}, {77, 9}, {5, 520}};
        const int si = (int)(rnd_u64() % 8);
        const int64_t N = shapes[si][0], K = shapes[si][1] * unit;
        const bool share = i > 0 && h[i - 1].w.cols == K && rnd_u64() % 2;
        const int x_off = !share && rnd_u64() % 6 == 0 ? 1 : 0; /* 4 bytes past alignment: the fallback */
        x[i] = malloc(sizeof(float) * (size_t)K);
        out[i] = poisoned(N);
        if (!make_hweight(&h[i], dt, N, K, gs, sd) || !x[i] || !out[i]) {
            t->failures++;
            goto done;
        }
        if (share) memcpy(x[i], x[i - 1], sizeof(float) * (size_t)K);
        else
            for (int64_t j = 0; j < K; j++) x[i][j] = (float)rnd() * (rnd_u64() % 16 == 0 ? 8.0f : 1.0f);
        if (fm_cuda_buf_alloc(c, h[i].bytes, &dw[i]) || fm_cuda_buf_upload(c, dw[i], h[i].data, h[i].bytes) ||
            (!share && (fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(K + 4), &dx[i]) ||
                        fm_cuda_buf_upload(c, (float *)dx[i] + x_off, x[i], sizeof(float) * (size_t)K))) ||
            fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(N + 2 * GUARD), &dout[i]) ||
            fm_cuda_buf_upload(c, dout[i], out[i], sizeof(float) * (size_t)(N + 2 * GUARD))) {
            t->failures++;
            fprintf(stderr, "  matvec: %s\n", fm_last_error());
            goto done;
        }
        dw_shape[i] = h[i].w;
        dw_shape[i].data = dw[i];
        mv[i] = (fm_cuda_mv){
            .w = &dw_shape[i], .x = share ? mv[i - 1].x : (float *)dx[i] + x_off, .out = (float *)dout[i] + GUARD};
    }
    if (fm_cuda_matvec(c, mv, n) != FM_OK) {
        t->failures++;
        fprintf(stderr, "  matvec: %s\n", fm_last_error());
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const int64_t N = h[i].w.rows;
        if (fm_cuda_buf_download(c, out[i], dout[i], sizeof(float) * (size_t)(N + 2 * GUARD)) != FM_OK) {
            t->failures++;
            fprintf(stderr, "  matvec: %s\n", fm_last_error());
            goto done;
        }
        snprintf(what, sizeof what, "matvec %s g%d %s [%lld, %lld] product %d of %d", fm_dtype_name(h[i].w.dtype),
                 h[i].w.group_size, fm_dtype_is_quant(h[i].w.dtype) ? fm_dtype_name(h[i].w.scale_dtype) : "",
                 (long long)N, (long long)h[i].w.cols, i, n);
        for (int64_t j = 0; j < GUARD; j++)
            if (out[i][j] != SENTINEL || out[i][GUARD + N + j] != SENTINEL) {
                t->failures++;
                fprintf(stderr, "  %s: wrote outside the output\n", what);
                goto done;
            }
        if (!compare_out(t, st, what, &h[i], x[i], 1, out[i] + GUARD)) goto done;
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
    free(h), free(mv), free(dw_shape), free(x), free(out), free(dw), free(dx), free(dout);
}

/* got (N) against silu(G x) * (U x) in float64, held to the bound carried through silu (|silu'| <=
 * 1.1): 1e-5 (1.1 mag_g |u| + |silu(g)| mag_u) + 1e-6 |out|, with mag as compare_out's; worst: the
 * largest error / bound * 1e-5 seen. False (reported once) on a failure. */
static bool compare_pair(fm_test_ctx *t, double *worst, const char *what, const hweight *hg, const hweight *hu,
                         const float *x, const float *got) {
    const int64_t N = hg->w.rows, K = hg->w.cols;
    for (int64_t r = 0; r < N; r++) {
        double gv = 0, gm = 0, uv = 0, um = 0;
        for (int64_t k = 0; k < K; k++) {
            gv += (double)hg->deq[r * K + k] * x[k];
            gm += (fabs((double)hg->deq[r * K + k]) + 2.0 * hg->absb[r * K + k]) * fabs((double)x[k]);
            uv += (double)hu->deq[r * K + k] * x[k];
            um += (fabs((double)hu->deq[r * K + k]) + 2.0 * hu->absb[r * K + k]) * fabs((double)x[k]);
        }
        const double sg = gv / (1.0 + exp(-gv)), ref = sg * uv;
        const double tol = 1e-5 * (1.1 * gm * fabs(uv) + fabs(sg) * um) + 1e-6 * fabs(ref) + 1e-30;
        const double err = isnan(got[r]) ? INFINITY : fabs((double)got[r] - ref);
        if (err / tol * 1e-5 > *worst) *worst = err / tol * 1e-5;
        if (!(err <= tol)) {
            t->failures++;
            fprintf(stderr, "  %s: out[%lld] = %.9g, float64 %.9g, tol %.3g (seed %llu)\n", what, (long long)r, got[r],
                    ref, tol, (unsigned long long)fm_test_cuda_seed());
            return false;
        }
    }
    return true;
}

/* fm_cuda_matvec's pair mode (w_up): out = silu(W x) * (W_up x) against float64 sums
 * (compare_pair), next to an ordinary product in the same launch. */
static void check_matvec_pair(fm_test_ctx *t, fm_cuda *c, double *worst, fm_dtype dt, int gs, fm_dtype sd, int64_t N,
                              int64_t K) {
    hweight hg, hu, ho;
    float *x = malloc(sizeof(float) * (size_t)K), *got = poisoned(N), *got2 = poisoned(N);
    void *dg = NULL, *du = NULL, *dox = NULL, *dx = NULL, *dout = NULL, *dout2 = NULL;
    const bool okh = make_hweight(&hg, dt, N, K, gs, sd) & make_hweight(&hu, dt, N, K, gs, sd) &
                     make_hweight(&ho, dt, N, K, gs, sd);
    if (!okh || !x || !got || !got2) {
        t->failures++;
        goto done;
    }
    for (int64_t j = 0; j < K; j++) x[j] = (float)rnd();
    if (fm_cuda_buf_alloc(c, hg.bytes, &dg) || fm_cuda_buf_alloc(c, hu.bytes, &du) || fm_cuda_buf_alloc(c, ho.bytes, &dox) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)K, &dx) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(N + 2 * GUARD), &dout) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(N + 2 * GUARD), &dout2) ||
        fm_cuda_buf_upload(c, dg, hg.data, hg.bytes) || fm_cuda_buf_upload(c, du, hu.data, hu.bytes) ||
        fm_cuda_buf_upload(c, dox, ho.data, ho.bytes) || fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)K) ||
        fm_cuda_buf_upload(c, dout, got, sizeof(float) * (size_t)(N + 2 * GUARD)) ||
        fm_cuda_buf_upload(c, dout2, got2, sizeof(float) * (size_t)(N + 2 * GUARD))) {
        t->failures++;
        fprintf(stderr, "  matvec pair: %s\n", fm_last_error());
        goto done;
    }
    fm_weight wg = hg.w, wu = hu.w, wo = ho.w;
    wg.data = dg, wu.data = du, wo.data = dox;
    CHECK(fm_cuda_matvec_takes(&wg, dx));
    fm_cuda_mv mv[2] = {{.w = &wo, .x = dx, .out = (float *)dout2 + GUARD},
                        {.w = &wg, .x = dx, .out = (float *)dout + GUARD, .w_up = &wu}};
    if (fm_cuda_matvec(c, mv, 2) != FM_OK || fm_cuda_buf_download(c, got, dout, sizeof(float) * (size_t)(N + 2 * GUARD)) ||
        fm_cuda_buf_download(c, got2, dout2, sizeof(float) * (size_t)(N + 2 * GUARD))) {
        t->failures++;
        fprintf(stderr, "  matvec pair: %s\n", fm_last_error());
        goto done;
    }
    for (int64_t j = 0; j < GUARD; j++)
        if (got[j] != SENTINEL || got[GUARD + N + j] != SENTINEL) {
            t->failures++;
            fprintf(stderr, "  matvec pair: wrote outside the output\n");
            goto done;
        }
    stats st = {0};
    char what[160];
    snprintf(what, sizeof what, "matvec pair's neighbour %s g%d [%lld, %lld]", fm_dtype_name(dt), gs, (long long)N,
             (long long)K);
    compare_out(t, &st, what, &ho, x, 1, got2 + GUARD);
    snprintf(what, sizeof what, "matvec pair %s g%d [%lld, %lld]", fm_dtype_name(dt), gs, (long long)N, (long long)K);
    compare_pair(t, worst, what, &hg, &hu, x, got + GUARD);
done:
    fm_cuda_buf_free(c, dg), fm_cuda_buf_free(c, du), fm_cuda_buf_free(c, dox), fm_cuda_buf_free(c, dx);
    fm_cuda_buf_free(c, dout), fm_cuda_buf_free(c, dout2);
    hweight_free(&hg), hweight_free(&hu), hweight_free(&ho);
    free(x), free(got), free(got2);
}

/* fm_cuda_mv's folded norm and residual: four products of type dt ([N, K]) in one call,
 *   0: W0 (rmsnorm(x) * nw) with norm_out, against float64 and the CPU on fm_cpu_rmsnorm's xn
 *      (compare_out), and norm_out against that xn within 1e-5 relative (the sum of squares is
 *      added in another order);
 *   1: the SwiGLU pair silu(Wg xn) * (Wu xn) with the norm (compare_pair on the CPU's xn);
 *   2: W2 x, no norm, the same raw x (a launch of its own);
 *   3: res + W2 x into res (residual == out): bit for bit res + product 2's output (the same rows
 *      of the same launch);
 * with NR chosen and forced to 2, 4, 8, outputs poisoned and guarded. */
static void check_matvec_fold(fm_test_ctx *t, fm_cuda *c, stats *st, double *worst_pair, fm_dtype dt, int gs,
                              fm_dtype sd, int64_t N, int64_t K) {
    hweight h[4];
    memset(h, 0, sizeof h);
    float *x = malloc(sizeof(float) * (size_t)K), *nw = malloc(sizeof(float) * (size_t)K);
    float *xn = malloc(sizeof(float) * (size_t)K), *res = malloc(sizeof(float) * (size_t)N), *gxn = poisoned(K);
    float *o[4] = {poisoned(N), poisoned(N), poisoned(N), poisoned(N)};
    void *dw[4] = {NULL, NULL, NULL, NULL}, *dout[4] = {NULL, NULL, NULL, NULL}, *dx = NULL, *dnw = NULL, *dxn = NULL;
    char what[200], sub[240];
    const bool q = fm_dtype_is_quant(dt);
    snprintf(what, sizeof what, "matvec fold %s g%d [%lld, %lld]", fm_dtype_name(dt), gs, (long long)N, (long long)K);
    bool ok = x && nw && xn && res && gxn && o[0] && o[1] && o[2] && o[3];
    for (int i = 0; i < 4; i++) ok = make_hweight(&h[i], dt, N, K, gs, q ? sd : FM_DTYPE_UNKNOWN) && ok;
    if (!ok) {
        t->failures++;
        goto done;
    }
    const float eps = 1e-6f;
    for (int64_t j = 0; j < K; j++) x[j] = (float)rnd() * 3.0f, nw[j] = (float)(0.5 + rnd());
    for (int64_t r = 0; r < N; r++) res[r] = (float)rnd();
    fm_cpu_rmsnorm(xn, x, nw, K, eps);
    for (int i = 0; i < 4; i++)
        if (fm_cuda_buf_alloc(c, h[i].bytes, &dw[i]) || fm_cuda_buf_upload(c, dw[i], h[i].data, h[i].bytes) ||
            fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(N + 2 * GUARD), &dout[i]))
            ok = false;
    if (!ok || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)K, &dx) ||
        fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)K) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)K, &dnw) ||
        fm_cuda_buf_upload(c, dnw, nw, sizeof(float) * (size_t)K) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(K + 2 * GUARD), &dxn)) {
        t->failures++;
        fprintf(stderr, "  %s: %s\n", what, fm_last_error());
        goto done;
    }
    fm_weight w[4];
    for (int i = 0; i < 4; i++) w[i] = h[i].w, w[i].data = dw[i];
    static const char *const rpt[] = {NULL, "2", "4", "8"};
    for (int ri = 0; ri < 4; ri++) {
        if (rpt[ri]) setenv("FLASHMOE_CUDA_MV_RPT", rpt[ri], 1);
        else unsetenv("FLASHMOE_CUDA_MV_RPT");
        float *out[4];
        for (int i = 0; i < 4; i++) out[i] = (float *)dout[i] + GUARD;
        fm_cuda_mv mv[4] = {{.w = &w[0], .x = dx, .out = out[0]},
                            {.w = &w[1], .x = dx, .out = out[1], .w_up = &w[2]},
                            {.w = &w[3], .x = dx, .out = out[2]},
                            {.w = &w[3], .x = dx, .out = out[3]}};
        mv[0].norm_w = mv[1].norm_w = dnw;
        mv[0].norm_eps = mv[1].norm_eps = eps;
        mv[0].norm_out = (float *)dxn + GUARD;
        mv[3].residual = out[3];
        bool run = true;
        for (int i = 0; i < 4; i++)
            run = run && fm_cuda_buf_upload(c, dout[i], o[i], sizeof(float) * (size_t)(N + 2 * GUARD)) == FM_OK;
        run = run && fm_cuda_buf_upload(c, out[3], res, sizeof(float) * (size_t)N) == FM_OK &&
              fm_cuda_buf_upload(c, dxn, gxn, sizeof(float) * (size_t)(K + 2 * GUARD)) == FM_OK &&
              fm_cuda_matvec(c, mv, 4) == FM_OK;
        float *got[4], *gotn = poisoned(K);
        for (int i = 0; i < 4; i++) got[i] = poisoned(N);
        REQUIRE(gotn && got[0] && got[1] && got[2] && got[3]);
        for (int i = 0; i < 4; i++)
            run = run && fm_cuda_buf_download(c, got[i], dout[i], sizeof(float) * (size_t)(N + 2 * GUARD)) == FM_OK;
        run = run && fm_cuda_buf_download(c, gotn, dxn, sizeof(float) * (size_t)(K + 2 * GUARD)) == FM_OK;
        snprintf(sub, sizeof sub, "%s NR %s", what, rpt[ri] ? rpt[ri] : "auto");
        bool good = run;
        if (!run) {
            t->failures++;
            fprintf(stderr, "  %s: %s\n", sub, fm_last_error());
        }
        for (int64_t j = 0; good && j < GUARD; j++) {
            bool guards = gotn[j] == SENTINEL && gotn[GUARD + K + j] == SENTINEL;
            for (int i = 0; i < 4; i++) guards = guards && got[i][j] == SENTINEL && got[i][GUARD + N + j] == SENTINEL;
            if (!guards) {
                t->failures++, good = false;
                fprintf(stderr, "  %s: wrote outside an output\n", sub);
            }
        }
        for (int64_t j = 0; good && j < K; j++)
            if (!(fabsf(gotn[GUARD + j] - xn[j]) <= 1e-5f * fabsf(xn[j]) + 1e-30f)) {
                t->failures++, good = false;
                fprintf(stderr, "  %s: norm_out[%lld] = %.9g, cpu %.9g (seed %llu)\n", sub, (long long)j,
                        gotn[GUARD + j], xn[j], (unsigned long long)fm_test_cuda_seed());
            }
        for (int64_t r = 0; good && r < N; r++) {
            const float want = res[r] + got[2][GUARD + r];
            if (memcmp(&want, &got[3][GUARD + r], sizeof want)) {
                t->failures++, good = false;
                fprintf(stderr, "  %s: residual out[%lld] = %.9g, res + W x %.9g\n", sub, (long long)r,
                        got[3][GUARD + r], want);
            }
        }
        good = good && compare_out(t, st, sub, &h[0], xn, 1, got[0] + GUARD);
        good = good && compare_pair(t, worst_pair, sub, &h[1], &h[2], xn, got[1] + GUARD);
        good = good && compare_out(t, st, sub, &h[3], x, 1, got[2] + GUARD);
        free(gotn);
        for (int i = 0; i < 4; i++) free(got[i]);
        if (!good) break;
        st->cases++;
    }
done:
    unsetenv("FLASHMOE_CUDA_MV_RPT");
    for (int i = 0; i < 4; i++) {
        hweight_free(&h[i]);
        fm_cuda_buf_free(c, dw[i]), fm_cuda_buf_free(c, dout[i]);
        free(o[i]);
    }
    fm_cuda_buf_free(c, dx), fm_cuda_buf_free(c, dnw), fm_cuda_buf_free(c, dxn);
    free(x), free(nw), free(xn), free(res), free(gxn);
}

/* fm_cuda_mv's conv epilogue: a product [N, K] of type dt whose outputs feed the one-token conv
 * (kernel ck) against the product and then fm_cuda_conv1d_silu: out, conv_out and the state bit
 * for bit, over three tokens in a row (the state carried), with the folded norm too. */
static void check_matvec_conv(fm_test_ctx *t, fm_cuda *c, fm_dtype dt, int gs, int64_t N, int64_t K, int ck) {
    hweight h;
    const bool q = fm_dtype_is_quant(dt);
    float *x = malloc(sizeof(float) * (size_t)K), *nw = malloc(sizeof(float) * (size_t)K);
    float *cw = malloc(sizeof(float) * (size_t)(N * ck)), *st = malloc(sizeof(float) * (size_t)(N * (ck - 1)));
    float *got[2][3];
    void *dw = NULL, *dx = NULL, *dnw = NULL, *dcw = NULL, *dst[2] = {NULL, NULL}, *dout[2] = {NULL, NULL},
         *dco[2] = {NULL, NULL};
    const size_t so = sizeof(float) * (size_t)N, ss = sizeof(float) * (size_t)(N * (ck - 1));
    char what[160];
    snprintf(what, sizeof what, "matvec conv %s [%lld, %lld] K %d", fm_dtype_name(dt), (long long)N, (long long)K, ck);
    for (int a = 0; a < 2; a++)
        got[a][0] = malloc(so), got[a][1] = malloc(so), got[a][2] = malloc(ss);
    bool ok = make_hweight(&h, dt, N, K, gs, q ? FM_DTYPE_BF16 : FM_DTYPE_UNKNOWN) && x && nw && cw && st;
    for (int a = 0; a < 2; a++) ok = ok && got[a][0] && got[a][1] && got[a][2];
    if (!ok) {
        t->failures++;
        goto done;
    }
    for (int64_t j = 0; j < K; j++) nw[j] = (float)(0.5 + rnd());
    for (int64_t j = 0; j < N * ck; j++) cw[j] = (float)rnd();
    for (int64_t j = 0; j < N * (ck - 1); j++) st[j] = (float)rnd();
    if (fm_cuda_buf_alloc(c, h.bytes, &dw) || fm_cuda_buf_upload(c, dw, h.data, h.bytes) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)K, &dx) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)K, &dnw) ||
        fm_cuda_buf_upload(c, dnw, nw, sizeof(float) * (size_t)K) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(N * ck), &dcw) ||
        fm_cuda_buf_upload(c, dcw, cw, sizeof(float) * (size_t)(N * ck)))
        ok = false;
    for (int a = 0; a < 2; a++)
        if (!ok || fm_cuda_buf_alloc(c, so, &dout[a]) || fm_cuda_buf_alloc(c, so, &dco[a]) ||
            fm_cuda_buf_alloc(c, ss, &dst[a]) || fm_cuda_buf_upload(c, dst[a], st, ss))
            ok = false;
    if (!ok) {
        t->failures++;
        fprintf(stderr, "  %s: %s\n", what, fm_last_error());
        goto done;
    }
    fm_weight w = h.w;
    w.data = dw;
    for (int tok = 0; tok < 3; tok++) {
        for (int64_t j = 0; j < K; j++) x[j] = (float)rnd() * 2.0f;
        fm_cuda_mv two = {.w = &w, .x = dx, .out = dout[0], .norm_w = dnw, .norm_eps = 1e-6f};
        fm_cuda_mv one = two;
        one.out = dout[1], one.conv_w = dcw, one.conv_state = dst[1], one.conv_out = dco[1], one.conv_k = ck;
        if (fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)K) || fm_cuda_matvec(c, &two, 1) ||
            fm_cuda_conv1d_silu(c, dco[0], dout[0], dst[0], dcw, 1, N, ck) || fm_cuda_matvec(c, &one, 1)) {
            t->failures++;
            fprintf(stderr, "  %s: %s\n", what, fm_last_error());
            goto done;
        }
        for (int a = 0; a < 2; a++)
            if (fm_cuda_buf_download(c, got[a][0], dout[a], so) || fm_cuda_buf_download(c, got[a][1], dco[a], so) ||
                fm_cuda_buf_download(c, got[a][2], dst[a], ss)) {
                t->failures++;
                fprintf(stderr, "  %s: %s\n", what, fm_last_error());
                goto done;
            }
        CHECK_MSG(!memcmp(got[0][0], got[1][0], so) && !memcmp(got[0][1], got[1][1], so) &&
                      !memcmp(got[0][2], got[1][2], ss),
                  "%s token %d: out, conv out or state not the two launches' bit for bit (seed %llu)", what, tok,
                  (unsigned long long)fm_test_cuda_seed());
        bool finite = true;
        for (int64_t r = 0; r < N; r++) finite = finite && isfinite(got[1][1][r]);
        CHECK_MSG(finite, "%s token %d: a conv output is not finite", what, tok);
    }
done:
    hweight_free(&h);
    fm_cuda_buf_free(c, dw), fm_cuda_buf_free(c, dx), fm_cuda_buf_free(c, dnw), fm_cuda_buf_free(c, dcw);
    for (int a = 0; a < 2; a++) {
        fm_cuda_buf_free(c, dst[a]), fm_cuda_buf_free(c, dout[a]), fm_cuda_buf_free(c, dco[a]);
        free(got[a][0]), free(got[a][1]), free(got[a][2]);
    }
    free(x), free(nw), free(cw), free(st);
}

FM_TEST(cuda_matvec_norm_fold) {
    CUDA_OR_SKIP(c);
    stats st = {0};
    double worst_pair = 0;
    check_matvec_fold(t, c, &st, &worst_pair, FM_DTYPE_Q8, 64, FM_DTYPE_BF16, 512, 2048); /* 35B: 128 lanes a row */
    check_matvec_fold(t, c, &st, &worst_pair, FM_DTYPE_Q4, 64, FM_DTYPE_BF16, 300, 4096);
    check_matvec_fold(t, c, &st, &worst_pair, FM_DTYPE_Q4, 128, FM_DTYPE_F16, 64, 512); /* 16 lanes a row */
    check_matvec_fold(t, c, &st, &worst_pair, FM_DTYPE_Q8, 32, FM_DTYPE_F32, 1025, 96); /* 8 lanes */
    check_matvec_fold(t, c, &st, &worst_pair, FM_DTYPE_BF16, 0, FM_DTYPE_UNKNOWN, 37, 256);
    check_matvec_fold(t, c, &st, &worst_pair, FM_DTYPE_F32, 0, FM_DTYPE_UNKNOWN, 100, 1100); /* 275 chunks: 2 a lane */
    check_matvec_fold(t, c, &st, &worst_pair, FM_DTYPE_F16, 0, FM_DTYPE_UNKNOWN, 33, 64);
    check_matvec_conv(t, c, FM_DTYPE_Q8, 64, 8192, 2048, 4); /* 35B in_proj_qkv and its conv */
    check_matvec_conv(t, c, FM_DTYPE_Q4, 32, 300, 256, 2);
    check_matvec_conv(t, c, FM_DTYPE_F32, 0, 77, 96, 8);
    /* errors: nothing enqueued */
    fm_weight wq8 = {.dtype = FM_DTYPE_Q8, .rows = 8, .cols = 64, .data = (void *)256, .group_size = 32};
    wq8.scale_dtype = FM_DTYPE_BF16;
    fm_weight wq2 = wq8;
    wq2.dtype = FM_DTYPE_Q2;
    fm_cuda_mv bad = {.w = &wq8, .x = (const float *)256, .out = (float *)4096};
    bad.norm_out = (float *)8192; /* without norm_w */
    CHECK(fm_cuda_matvec(c, &bad, 1) == FM_ERR_ARG);
    bad.norm_w = (const float *)1024;
    bad.norm_eps = -1.f;
    CHECK(fm_cuda_matvec(c, &bad, 1) == FM_ERR_ARG);
    bad.norm_eps = 1e-6f;
    bad.norm_out = (float *)(256 + 4 * 10); /* overlaps x */
    CHECK(fm_cuda_matvec(c, &bad, 1) == FM_ERR_ARG);
    bad.norm_out = NULL;
    bad.norm_w = (const float *)1028; /* not 16-byte aligned */
    CHECK(fm_cuda_matvec(c, &bad, 1) == FM_ERR_UNSUPPORTED);
    fm_cuda_mv pair = {.w = &wq8, .x = (const float *)256, .out = (float *)4096, .w_up = &wq8};
    pair.residual = (const float *)4096;
    CHECK(fm_cuda_matvec(c, &pair, 1) == FM_ERR_ARG);
    fm_cuda_mv q2 = {.w = &wq2, .x = (const float *)256, .out = (float *)4096};
    q2.residual = (const float *)4096; /* Q2 takes the fallback, which has no residual */
    CHECK(fm_cuda_matvec(c, &q2, 1) == FM_ERR_UNSUPPORTED);
    fm_cuda_mv conv = {.w = &wq8, .x = (const float *)256, .out = (float *)4096, .conv_w = (const float *)8192,
                       .conv_state = (float *)16384, .conv_out = (float *)32768, .conv_k = 9}; /* K > 8 */
    CHECK(fm_cuda_matvec(c, &conv, 1) == FM_ERR_ARG);
    conv.conv_k = 4, conv.conv_state = NULL;
    CHECK(fm_cuda_matvec(c, &conv, 1) == FM_ERR_ARG);
    CHECK_OK(fm_cuda_sync(c));
    stats_print("one-token matvec with the folded norm", &st);
    fprintf(stderr, "  folded pair: worst error / bound * 1e-5 = %.2e\n", worst_pair);
}

/* fm_cuda_expert_matvec_with: the routed experts' down (KE of NE experts, type dt, [N, K], x_up
 * given: silu(x) * x_up is the input) and a dense product of type dt2 ([N2, K2]) in one launch,
 * against the two calls: bit-identical outputs (the same sums in the same order), with NR chosen and
 * forced to 2, 4, 8; the dense output also against float64 (compare_out's bounds). fused: whether
 * this pair of types is fused (else the call takes the two launches; the same check holds). */
static void check_expert_with(fm_test_ctx *t, fm_cuda *c, stats *st, fm_dtype dt, fm_dtype dt2, int64_t N, int64_t K,
                              int64_t N2, int64_t K2) {
    enum { KE = 6, NE = 9 };
    hweight hw[NE], hd;
    void *dw = NULL, *tab = NULL, *ids = NULL, *dx = NULL, *dxu = NULL, *dd = NULL, *dx2 = NULL, *dY = NULL, *dO = NULL;
    float *x = malloc(sizeof(float) * (size_t)(KE * K)), *xu = malloc(sizeof(float) * (size_t)(KE * K));
    float *x2 = malloc(sizeof(float) * (size_t)K2), *y0 = malloc(sizeof(float) * (size_t)(KE * N));
    float *y1 = malloc(sizeof(float) * (size_t)(KE * N)), *o0 = poisoned(N2), *o1 = poisoned(N2);
    bool ok = x && xu && x2 && y0 && y1 && o0 && o1;
    size_t off[NE], tot = 0;
    const bool q = fm_dtype_is_quant(dt), q2 = fm_dtype_is_quant(dt2);
    for (int e = 0; e < NE; e++) {
        ok &= make_hweight(&hw[e], dt, N, K, q ? 64 : 0, q ? FM_DTYPE_BF16 : FM_DTYPE_UNKNOWN);
        off[e] = tot;
        tot += (hw[e].bytes + 255) / 256 * 256;
    }
    ok &= make_hweight(&hd, dt2, N2, K2, q2 ? 32 : 0, q2 ? FM_DTYPE_F16 : FM_DTYPE_UNKNOWN);
    if (!ok) {
        t->failures++;
        goto done;
    }
    for (int64_t j = 0; j < KE * K; j++) x[j] = (float)rnd(), xu[j] = (float)rnd();
    for (int64_t j = 0; j < K2; j++) x2[j] = (float)rnd();
    if (fm_cuda_buf_alloc(c, tot, &dw) || fm_cuda_buf_alloc(c, sizeof(void *) * NE, &tab) ||
        fm_cuda_buf_alloc(c, sizeof(int32_t) * KE, &ids) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(KE * K), &dx) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(KE * K), &dxu) || fm_cuda_buf_alloc(c, hd.bytes, &dd) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)K2, &dx2) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(KE * N), &dY) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(N2 + 2 * GUARD), &dO)) {
        t->failures++;
        goto done;
    }
    void *htab[NE];
    for (int e = 0; e < NE; e++) {
        htab[e] = (unsigned char *)dw + off[e];
        if (fm_cuda_buf_upload(c, htab[e], hw[e].data, hw[e].bytes)) ok = false;
    }
    int32_t hids[KE];
    for (int j = 0; j < KE; j++) hids[j] = (int32_t)((j * 4 + 3) % NE);
    if (!ok || fm_cuda_buf_upload(c, tab, htab, sizeof htab) || fm_cuda_buf_upload(c, ids, hids, sizeof hids) ||
        fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)(KE * K)) ||
        fm_cuda_buf_upload(c, dxu, xu, sizeof(float) * (size_t)(KE * K)) || fm_cuda_buf_upload(c, dd, hd.data, hd.bytes) ||
        fm_cuda_buf_upload(c, dx2, x2, sizeof(float) * (size_t)K2)) {
        t->failures++;
        goto done;
    }
    fm_weight shape = hw[0].w, wd = hd.w;
    shape.data = NULL, wd.data = dd;
    fm_cuda_expert_mv dn = {.table = tab, .ids = ids, .k = KE, .n_parts = 1, .n_experts = NE, .part_off = {0, 0},
                            .x = dx, .x_up = dxu, .x_stride = K, .out = {dY, NULL}, .out_stride = N};
    fm_cuda_mv extra = {.w = &wd, .x = dx2, .out = (float *)dO + GUARD};
    static const char *const rpt[] = {NULL, "2", "4", "8"};
    char what[160];
    snprintf(what, sizeof what, "experts %s [%lld, %lld] with %s [%lld, %lld]", fm_dtype_name(dt), (long long)N,
             (long long)K, fm_dtype_name(dt2), (long long)N2, (long long)K2);
    for (int ri = 0; ri < 4; ri++) {
        if (rpt[ri]) setenv("FLASHMOE_CUDA_MV_RPT", rpt[ri], 1);
        else unsetenv("FLASHMOE_CUDA_MV_RPT");
        for (int fused = 0; fused < 2; fused++) {
            float *y = fused ? y1 : y0, *o = fused ? o1 : o0;
            if (fm_cuda_buf_fill(c, dY, 0xff, sizeof(float) * (size_t)(KE * N)) ||
                fm_cuda_buf_upload(c, dO, o, sizeof(float) * (size_t)(N2 + 2 * GUARD)) ||
                (fused ? fm_cuda_expert_matvec_with(c, &shape, &dn, &extra)
                       : (fm_cuda_expert_matvec(c, &shape, &dn) || fm_cuda_matvec(c, &extra, 1))) ||
                fm_cuda_buf_download(c, y, dY, sizeof(float) * (size_t)(KE * N)) ||
                fm_cuda_buf_download(c, o, dO, sizeof(float) * (size_t)(N2 + 2 * GUARD))) {
                t->failures++;
                fprintf(stderr, "  %s: %s\n", what, fm_last_error());
                goto done;
            }
        }
        for (int64_t j = 0; j < GUARD; j++)
            if (o1[j] != SENTINEL || o1[GUARD + N2 + j] != SENTINEL) {
                t->failures++;
                fprintf(stderr, "  %s: wrote outside the output\n", what);
                goto done;
            }
        for (int64_t i = 0; i < KE * N; i++)
            if (memcmp(&y0[i], &y1[i], 4) || isnan(y1[i])) {
                t->failures++;
                fprintf(stderr, "  %s NR %s: expert output %lld = %.9g, two launches %.9g\n", what,
                        rpt[ri] ? rpt[ri] : "auto", (long long)i, y1[i], y0[i]);
                goto done;
            }
        for (int64_t i = 0; i < N2; i++)
            if (memcmp(&o0[GUARD + i], &o1[GUARD + i], 4)) {
                t->failures++;
                fprintf(stderr, "  %s NR %s: dense output %lld = %.9g, two launches %.9g\n", what,
                        rpt[ri] ? rpt[ri] : "auto", (long long)i, o1[GUARD + i], o0[GUARD + i]);
                goto done;
            }
        if (!compare_out(t, st, what, &hd, x2, 1, o1 + GUARD)) goto done;
        st->cases++;
    }
done:
    unsetenv("FLASHMOE_CUDA_MV_RPT");
    for (int e = 0; e < NE; e++) hweight_free(&hw[e]);
    hweight_free(&hd);
    fm_cuda_buf_free(c, dw), fm_cuda_buf_free(c, tab), fm_cuda_buf_free(c, ids), fm_cuda_buf_free(c, dx);
    fm_cuda_buf_free(c, dxu), fm_cuda_buf_free(c, dd), fm_cuda_buf_free(c, dx2), fm_cuda_buf_free(c, dY);
    fm_cuda_buf_free(c, dO);
    free(x), free(xu), free(x2), free(y0), free(y1), free(o0), free(o1);
}

FM_TEST(cuda_matvec_experts_with_dense) {
    CUDA_OR_SKIP(c);
    stats st = {0};
    check_expert_with(t, c, &st, FM_DTYPE_Q4, FM_DTYPE_Q8, 2048, 512, 2048, 512);   /* 35B: experts' and shared down */
    check_expert_with(t, c, &st, FM_DTYPE_Q4, FM_DTYPE_Q8, 4096, 1024, 4096, 1024); /* 397B */
    check_expert_with(t, c, &st, FM_DTYPE_Q8, FM_DTYPE_BF16, 333, 256, 1025, 64);    /* more dense rows than expert rows */
    check_expert_with(t, c, &st, FM_DTYPE_Q4, FM_DTYPE_Q4, 96, 2048, 7, 4096);
    check_expert_with(t, c, &st, FM_DTYPE_Q4, FM_DTYPE_F32, 64, 512, 33, 128);       /* not fused: two launches */
    setenv("FLASHMOE_CUDA_MV_FUSE", "0", 1);
    check_expert_with(t, c, &st, FM_DTYPE_Q4, FM_DTYPE_Q8, 512, 256, 100, 512);
    unsetenv("FLASHMOE_CUDA_MV_FUSE");
    /* errors: nothing enqueued, the message of the call that refuses */
    fm_weight q2 = {.dtype = FM_DTYPE_Q2, .rows = 8, .cols = 64, .data = (void *)16, .group_size = 32,
                    .scale_dtype = FM_DTYPE_BF16};
    fm_weight shape = {.dtype = FM_DTYPE_Q4, .rows = 64, .cols = 256, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_cuda_mv bad = {.w = &q2, .x = NULL, .out = (float *)16};
    fm_cuda_expert_mv dn = {.table = (const void *const *)16, .ids = (const int32_t *)16, .k = 2, .n_parts = 1,
                            .n_experts = 4, .x = (const float *)16, .out = {(float *)16, NULL}};
    CHECK(fm_cuda_expert_matvec_with(c, &shape, &dn, &bad) == FM_ERR_ARG);
    fm_cuda_expert_mv dn0 = dn;
    dn0.k = 0;
    fm_weight wok = shape;
    wok.data = (void *)256;
    fm_cuda_mv good = {.w = &wok, .x = (const float *)16, .out = (float *)16};
    CHECK(fm_cuda_expert_matvec_with(c, &shape, &dn0, &good) == FM_ERR_ARG);
    CHECK_OK(fm_cuda_sync(c));
    stats_print("experts + a dense product in one launch", &st);
}

/* fm_cuda_expert_ffn (gate+up, down and the shared down in one launch of clusters) against float64
 * sums of the decoded weights. The expert output goes through two float32 products, so its bound
 * carries the first one's error: with mag_g, mag_u the usual bounds of gate's and up's sums (see
 * compare_out) and g, u, h = silu(g) u in float64,
 *   dh = 1e-5 (1.1 |u| mag_g + max(|g|, 0.28) mag_u)    (|silu'| <= 1.1, |silu(g)| <= max(g, 0.28))
 *   |y_r - sum_c D_rc h_c| <= 1e-5 sum_c (|D_rc| + 2 |b_rc|) |h_c| + sum_c |D_rc| dh_c.
 * The parts of a slot's output are added as fm_cuda_moe_combine_parts adds them; that combine is
 * checked too (|gpu - cpu| <= 1e-5 of the sum of the magnitudes of its terms), then the launch with
 * the combine inside must give the same outputs and x bit for bit; the dense product is checked as
 * every matmul (compare_out). Outputs poisoned with NaN and guarded by sentinels. cluster: the
 * FLASHMOE_CUDA_FFN value (NULL: 1, the automatic choice). Returns false when the fused launch does not
 * take the case (nothing checked). */
static bool check_expert_ffn(fm_test_ctx *t, fm_cuda *c, stats *st, int64_t H, int64_t I, int k, fm_dtype dt2,
                             const char *cluster) {
    enum { NE = 19 };
    hweight hw[NE][3], hd;
    memset(hw, 0, sizeof hw), memset(&hd, 0, sizeof hd);
    const bool dense = dt2 != FM_DTYPE_UNKNOWN;
    void *dw = NULL, *tab = NULL, *ids = NULL, *dx = NULL, *dd = NULL, *dx2 = NULL, *dY = NULL, *dO = NULL;
    void *dlg = NULL, *dwt = NULL, *dxr = NULL;
    float *x = malloc(sizeof(float) * (size_t)H), *x2 = malloc(sizeof(float) * (size_t)I);
    float *Y = NULL, *o = poisoned(H), *xr = malloc(sizeof(float) * (size_t)H);
    float *xr_gpu = malloc(sizeof(float) * (size_t)H), *yv = malloc(sizeof(float) * (size_t)(k * H));
    float *xr_fused = malloc(sizeof(float) * (size_t)H), *Y2 = NULL;
    double *g = malloc(sizeof(double) * (size_t)I), *u = malloc(sizeof(double) * (size_t)I);
    double *h = malloc(sizeof(double) * (size_t)I), *dh = malloc(sizeof(double) * (size_t)I);
    bool ok = x && x2 && o && xr && xr_gpu && xr_fused && yv && g && u && h && dh, taken = false;
    size_t off[NE], part_off[3], tot = 0;
    char what[160];
    snprintf(what, sizeof what, "expert FFN H %lld I %lld top-%d, dense %s, cluster %s", (long long)H, (long long)I, k,
             dense ? fm_dtype_name(dt2) : "none", cluster ? cluster : "auto");
    for (int e = 0; e < NE && ok; e++) {
        size_t at = 0;
        for (int pi = 0; pi < 3; pi++) {
            ok &= make_hweight(&hw[e][pi], FM_DTYPE_Q4, pi < 2 ? I : H, pi < 2 ? H : I, 64, FM_DTYPE_BF16);
            part_off[pi] = at;
            at += (hw[e][pi].bytes + 255) / 256 * 256;
        }
        off[e] = tot;
        tot += at;
    }
    if (dense) ok &= make_hweight(&hd, dt2, H, I, fm_dtype_is_quant(dt2) ? 32 : 0,
                                  fm_dtype_is_quant(dt2) ? FM_DTYPE_F16 : FM_DTYPE_UNKNOWN);
    if (!ok) {
        t->failures++;
        goto done;
    }
    for (int64_t j = 0; j < H; j++) x[j] = (float)rnd(), xr[j] = (float)rnd();
    for (int64_t j = 0; j < I; j++) x2[j] = (float)rnd();
    fm_weight gshape = hw[0][0].w, dshape = hw[0][2].w, wd = hd.w;
    gshape.data = dshape.data = NULL;
    if (fm_cuda_buf_alloc(c, tot, &dw) || fm_cuda_buf_alloc(c, sizeof(void *) * NE, &tab) ||
        fm_cuda_buf_alloc(c, sizeof(int32_t) * (size_t)k, &ids) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)H, &dx) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)I, &dx2) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(H + 2 * GUARD), &dO) ||
        fm_cuda_buf_alloc(c, sizeof(float), &dlg) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)k, &dwt) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)H, &dxr) ||
        (dense && fm_cuda_buf_alloc(c, hd.bytes, &dd))) {
        t->failures++;
        goto done;
    }
    wd.data = dd;
    void *htab[NE];
    for (int e = 0; e < NE; e++) {
        htab[e] = (unsigned char *)dw + off[e];
        for (int pi = 0; pi < 3; pi++)
            if (fm_cuda_buf_upload(c, (unsigned char *)htab[e] + part_off[pi], hw[e][pi].data, hw[e][pi].bytes)) ok = false;
    }
    int32_t hids[16];
    float hwt[16], logit = (float)rnd();
    for (int j = 0; j < k; j++) hids[j] = (int32_t)((j * 7 + 3) % NE), hwt[j] = (float)fabs(rnd()); /* NE prime: distinct */
    if (!ok || fm_cuda_buf_upload(c, tab, htab, sizeof htab) || fm_cuda_buf_upload(c, ids, hids, sizeof(int32_t) * (size_t)k) ||
        fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)H) || fm_cuda_buf_upload(c, dx2, x2, sizeof(float) * (size_t)I) ||
        fm_cuda_buf_upload(c, dO, o, sizeof(float) * (size_t)(H + 2 * GUARD)) ||
        fm_cuda_buf_upload(c, dlg, &logit, sizeof logit) ||
        fm_cuda_buf_upload(c, dwt, hwt, sizeof(float) * (size_t)k) || fm_cuda_buf_upload(c, dxr, xr, sizeof(float) * (size_t)H) ||
        (dense && fm_cuda_buf_upload(c, dd, hd.data, hd.bytes))) {
        t->failures++;
        goto done;
    }
    setenv("FLASHMOE_CUDA_FFN", cluster ? cluster : "1", 1); /* (off by default) */
    fm_cuda_mv extra = {.w = &wd, .x = dx2, .out = (float *)dO + GUARD};
    const int parts = fm_cuda_expert_ffn_parts(c, &gshape, &dshape, k, dense ? &extra : NULL, false);
    if (parts == 0) goto done;
    if (fm_cuda_expert_ffn_parts(c, &gshape, &dshape, k, dense ? &extra : NULL, true) != parts) {
        t->failures++;
        fprintf(stderr, "  %s: the combine changes the parts\n", what);
        goto done;
    }
    taken = true;
    const int64_t ny = (int64_t)k * parts * H;
    if (!(Y = poisoned(ny)) || !(Y2 = malloc(sizeof(float) * (size_t)(ny + 2 * GUARD))) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)(ny + 2 * GUARD), &dY) ||
        fm_cuda_buf_upload(c, dY, Y, sizeof(float) * (size_t)(ny + 2 * GUARD))) {
        t->failures++;
        goto done;
    }
    fm_cuda_expert_ffn_args f = {.table = tab, .ids = ids, .k = k, .n_experts = NE, .gate_off = (int64_t)part_off[0],
                                 .up_off = (int64_t)part_off[1], .down_off = (int64_t)part_off[2], .x = dx,
                                 .out = (float *)dY + GUARD};
    if (fm_cuda_expert_ffn(c, &gshape, &dshape, &f, dense ? &extra : NULL) ||
        fm_cuda_moe_combine_parts(c, dxr, dense ? (float *)dO + GUARD : NULL, dlg, (float *)dY + GUARD, ids, dwt, k,
                                  parts, H) ||
        fm_cuda_buf_download(c, Y, dY, sizeof(float) * (size_t)(ny + 2 * GUARD)) ||
        fm_cuda_buf_download(c, o, dO, sizeof(float) * (size_t)(H + 2 * GUARD)) ||
        fm_cuda_buf_download(c, xr_gpu, dxr, sizeof(float) * (size_t)H)) {
        t->failures++;
        fprintf(stderr, "  %s: %s\n", what, fm_last_error());
        goto done;
    }
    /* again with the combine in the launch: the same outputs and x bit for bit */
    f.combine_x = dxr, f.shared_logit = dlg, f.weights = dwt;
    if (fm_cuda_buf_upload(c, dxr, xr, sizeof(float) * (size_t)H) ||
        fm_cuda_expert_ffn(c, &gshape, &dshape, &f, dense ? &extra : NULL) ||
        fm_cuda_buf_download(c, Y2, dY, sizeof(float) * (size_t)(ny + 2 * GUARD)) ||
        fm_cuda_buf_download(c, xr_fused, dxr, sizeof(float) * (size_t)H)) {
        t->failures++;
        fprintf(stderr, "  %s, combine in the launch: %s\n", what, fm_last_error());
        goto done;
    }
    if (memcmp(Y, Y2, sizeof(float) * (size_t)(ny + 2 * GUARD)) || memcmp(xr_gpu, xr_fused, sizeof(float) * (size_t)H)) {
        t->failures++;
        fprintf(stderr, "  %s: the combine in the launch differs from fm_cuda_moe_combine_parts\n", what);
        goto done;
    }
    for (int64_t j = 0; j < GUARD; j++)
        if (Y[j] != SENTINEL || Y[GUARD + ny + j] != SENTINEL || o[j] != SENTINEL || o[GUARD + H + j] != SENTINEL) {
            t->failures++;
            fprintf(stderr, "  %s: wrote outside its outputs\n", what);
            goto done;
        }
    for (int j = 0; j < k; j++) {
        const int e = hids[j];
        const hweight *G = &hw[e][0], *U = &hw[e][1], *D = &hw[e][2];
        for (int64_t i = 0; i < I; i++) {
            double sg = 0, su = 0, mg = 0, mu = 0;
            for (int64_t cc = 0; cc < H; cc++) {
                const double xc = x[cc];
                sg += (double)G->deq[i * H + cc] * xc, su += (double)U->deq[i * H + cc] * xc;
                mg += (fabs((double)G->deq[i * H + cc]) + 2.0 * G->absb[i * H + cc]) * fabs(xc);
                mu += (fabs((double)U->deq[i * H + cc]) + 2.0 * U->absb[i * H + cc]) * fabs(xc);
            }
            g[i] = sg, u[i] = su, h[i] = sg / (1.0 + exp(-sg)) * su;
            dh[i] = 1e-5 * (1.1 * fabs(su) * mg + fmax(fabs(sg), 0.28) * mu);
        }
        for (int64_t r = 0; r < H; r++) {
            double y = 0, tol = 0;
            for (int64_t i = 0; i < I; i++) {
                const double w = D->deq[r * I + i];
                y += w * h[i];
                tol += 1e-5 * (fabs(w) + 2.0 * D->absb[r * I + i]) * fabs(h[i]) + fabs(w) * dh[i];
            }
            float got = 0.f;
            for (int p = 0; p < parts; p++) got += Y[GUARD + ((int64_t)j * parts + p) * H + r];
            yv[j * H + r] = got;
            const double err = fabs((double)got - y);
            if (!(err <= tol + 1e-30)) {
                t->failures++;
                fprintf(stderr, "  %s: slot %d (expert %d) row %lld = %.9g, float64 %.9g, bound %.3g (seed %llu)\n",
                        what, j, e, (long long)r, got, y, tol, (unsigned long long)fm_test_cuda_seed());
                goto done;
            }
            if (err / (tol + 1e-30) * 1e-5 > st->worst_f64) st->worst_f64 = err / (tol + 1e-30) * 1e-5;
        }
    }
    /* the combine of the parts: x + sigmoid(logit) shared (the dense product's output) + the experts in
     * ascending id */
    int order[16];
    for (int j = 0; j < k; j++) order[j] = j;
    for (int a = 1; a < k; a++)
        for (int b = a; b > 0 && hids[order[b]] < hids[order[b - 1]]; b--) {
            const int tmp = order[b];
            order[b] = order[b - 1], order[b - 1] = tmp;
        }
    const double sgm = dense ? 1.0 / (1.0 + exp(-(double)logit)) : 0.0;
    for (int64_t r = 0; r < H; r++) {
        const double shr = dense ? sgm * o[GUARD + r] : 0.0;
        double want = xr[r] + shr, mag = fabs(xr[r]) + fabs(shr);
        for (int j = 0; j < k; j++) {
            const int s = order[j];
            want += (double)hwt[s] * yv[s * H + r], mag += fabs((double)hwt[s] * yv[s * H + r]);
        }
        if (!(fabs(xr_gpu[r] - want) <= 1e-5 * mag + 1e-30)) {
            t->failures++;
            fprintf(stderr, "  %s: combine of %d parts, x[%lld] = %.9g, float64 %.9g\n", what, parts, (long long)r,
                    xr_gpu[r], want);
            goto done;
        }
    }
    if (dense && !compare_out(t, st, what, &hd, x2, 1, o + GUARD)) goto done;
    st->cases++;
done:
    unsetenv("FLASHMOE_CUDA_FFN");
    for (int e = 0; e < NE; e++)
        for (int pi = 0; pi < 3; pi++) hweight_free(&hw[e][pi]);
    hweight_free(&hd);
    fm_cuda_buf_free(c, dw), fm_cuda_buf_free(c, tab), fm_cuda_buf_free(c, ids), fm_cuda_buf_free(c, dx);
    fm_cuda_buf_free(c, dd), fm_cuda_buf_free(c, dx2), fm_cuda_buf_free(c, dY), fm_cuda_buf_free(c, dO);
    fm_cuda_buf_free(c, dlg), fm_cuda_buf_free(c, dwt), fm_cuda_buf_free(c, dxr);
    free(xr_fused), free(Y2);
    free(x), free(x2), free(Y), free(o), free(xr), free(xr_gpu), free(yv), free(g), free(u), free(h), free(dh);
    return taken;
}

FM_TEST(cuda_expert_ffn_fused) {
    CUDA_OR_SKIP(c);
    const char *desc = fm_cuda_device_desc(c);
    const bool sm90 = strstr(desc, "sm_9") || strstr(desc, "sm_1");
    stats st = {0};
    /* the 35B-A3B shapes (Q8 shared down): the automatic choice must take them on sm_90; each cluster
     * size where k * parts of its clusters are resident on this device */
    if (!check_expert_ffn(t, c, &st, 2048, 512, 8, FM_DTYPE_Q8, NULL) && sm90) {
        t->failures++;
        fprintf(stderr, "  the 35B shapes were not taken on %s: %s\n", desc, fm_last_error());
    }
    if (!sm90) SKIP("the fused expert FFN needs compute capability 9 or later (%s)", desc);
    static const char *const cl[] = {"16", "8", "4", "2"};
    int sizes = 0;
    for (int i = 0; i < 4; i++) sizes += check_expert_ffn(t, c, &st, 2048, 512, 8, FM_DTYPE_Q8, cl[i]);
    for (int i = 0; i < 4; i++) sizes += check_expert_ffn(t, c, &st, 2048, 512, 4, FM_DTYPE_UNKNOWN, cl[i]);
    fprintf(stderr, "  expert FFN: %d of 8 forced cluster sizes resident here\n", sizes);
    /* other shapes and dense kinds; I / parts under 128 (fewer than 4 lanes a down row) */
    CHECK(check_expert_ffn(t, c, &st, 1024, 256, 4, FM_DTYPE_BF16, NULL));
    CHECK(check_expert_ffn(t, c, &st, 512, 512, 3, FM_DTYPE_Q4, NULL));
    CHECK(check_expert_ffn(t, c, &st, 256, 64, 4, FM_DTYPE_BF16, NULL));
    CHECK(check_expert_ffn(t, c, &st, 128, 64, 10, FM_DTYPE_Q8, NULL));
    /* off by default: parts 0 even for the shapes it takes */
    fm_weight g35 = {.dtype = FM_DTYPE_Q4, .rows = 512, .cols = 2048, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_weight d35 = g35;
    d35.rows = 2048, d35.cols = 512;
    CHECK(fm_cuda_expert_ffn_parts(c, &g35, &d35, 4, NULL, false) == 0);
    setenv("FLASHMOE_CUDA_FFN", "1", 1);
    CHECK(fm_cuda_expert_ffn_parts(c, &g35, &d35, 4, NULL, false) > 0);
    /* shapes it does not take: parts 0, and fm_cuda_expert_ffn refuses with nothing enqueued */
    fm_weight gu = {.dtype = FM_DTYPE_Q4, .rows = 1024, .cols = 4096, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_weight dn = gu;
    dn.rows = 4096, dn.cols = 1024;
    CHECK(fm_cuda_expert_ffn_parts(c, &gu, &dn, 10, NULL, false) == 0); /* the 397B shapes: H > 2048 */
    fm_weight gq8 = gu, dq8 = dn;
    gq8.dtype = dq8.dtype = FM_DTYPE_Q8, gq8.cols = dq8.rows = 1024, gq8.rows = dq8.cols = 256;
    CHECK(fm_cuda_expert_ffn_parts(c, &gq8, &dq8, 4, NULL, false) == 0); /* Q8 experts */
    fm_cuda_expert_ffn_args f = {.table = (const void *const *)16, .ids = (const int32_t *)16, .k = 10, .n_experts = 16,
                                 .x = (const float *)16, .out = (float *)16};
    CHECK(fm_cuda_expert_ffn(c, &gu, &dn, &f, NULL) == FM_ERR_UNSUPPORTED);
    f.x = NULL;
    CHECK(fm_cuda_expert_ffn(c, &gu, &dn, &f, NULL) == FM_ERR_ARG);
    f.x = (const float *)16, f.up_off = 8;
    CHECK(fm_cuda_expert_ffn(c, &gu, &dn, &f, NULL) == FM_ERR_ARG);
    f.up_off = 0, f.combine_x = (float *)16; /* a combine without the routing weights */
    CHECK(fm_cuda_expert_ffn(c, &gu, &dn, &f, NULL) == FM_ERR_ARG);
    CHECK(fm_cuda_moe_combine_parts(c, (float *)16, NULL, NULL, (const float *)16, (const int32_t *)16,
                                    (const float *)16, 17, 1, 64) == FM_ERR_ARG);
    unsetenv("FLASHMOE_CUDA_FFN");
    CHECK_OK(fm_cuda_sync(c));
    fprintf(stderr, "  expert FFN: %d cases, worst error / bound = %.2e\n", st.cases, st.worst_f64 / 1e-5);
    if (st.worst_cpu > 0) stats_print("expert FFN's dense product", &st);
}

/* fm_cuda_matvec_topk against its two calls (fm_cuda_matvec, then fm_cuda_router_topk of product
 * 0's output): the same logits, ids and weights bit for bit, the other products' outputs too; the
 * fused launch repeated (its block count must be back at 0 after each launch), NR forced 2/4/8 (more
 * or fewer blocks counting), rows duplicated in the float routers (exact ties, to the lower id), and
 * cases the fusion does not take (E > 1024, k > 32: two launches). The two calls' top-k itself is
 * held to the CPU by cuda_layer_router_topk. fold: every product with the folded RMSNorm of x and
 * the router's with norm_out (the one-token step's router group), in both forms. */
static void check_matvec_topk(fm_test_ctx *t, fm_cuda *c, fm_dtype dt, int64_t E, int64_t H, int k, int norm, bool ties,
                              bool fold) {
    const bool q = fm_dtype_is_quant(dt);
    const int64_t I = 512;
    hweight hr, hg, hu, hs;
    memset(&hg, 0, sizeof hg), memset(&hu, 0, sizeof hu), memset(&hs, 0, sizeof hs);
    void *dr = NULL, *dg = NULL, *du = NULL, *ds = NULL, *dx = NULL, *dl = NULL, *dsh = NULL, *dsl = NULL, *dids = NULL,
         *dwt = NULL, *dnw = NULL, *dxn = NULL;
    float *nw = malloc(sizeof(float) * (size_t)H), *x = malloc(sizeof(float) * (size_t)H),
          *l0 = malloc(sizeof(float) * (size_t)E), *l1 = malloc(sizeof(float) * (size_t)E);
    float *sh0 = malloc(sizeof(float) * (size_t)I), *sh1 = malloc(sizeof(float) * (size_t)I), sl0 = 0, sl1 = 0;
    int32_t i0[64], i1[64];
    float w0[64], w1[64];
    char what[160];
    snprintf(what, sizeof what, "matvec_topk %s [%lld, %lld] top-%d norm %d%s%s", fm_dtype_name(dt), (long long)E,
             (long long)H, k, norm, ties ? " ties" : "", fold ? " folded rmsnorm" : "");
    bool ok = nw && x && l0 && l1 && sh0 && sh1 &&
              make_hweight(&hr, dt, E, H, q ? 64 : 0, q ? FM_DTYPE_BF16 : FM_DTYPE_UNKNOWN) &&
              make_hweight(&hg, FM_DTYPE_Q8, I, H, 64, FM_DTYPE_BF16) &&
              make_hweight(&hu, FM_DTYPE_Q8, I, H, 64, FM_DTYPE_BF16) &&
              make_hweight(&hs, FM_DTYPE_Q8, 1, H, 64, FM_DTYPE_BF16);
    if (!ok) {
        t->failures++;
        goto done;
    }
    if (ties && !q) /* every third row a copy of the one before: equal logits */
        for (int64_t r = 1; r < E; r += 3) {
            const size_t rb = (size_t)H * fm_dtype_size(dt);
            memcpy(hr.data + (size_t)r * rb, hr.data + (size_t)(r - 1) * rb, rb);
        }
    for (int64_t j = 0; j < H; j++) x[j] = (float)rnd() * 0.5f, nw[j] = (float)(0.5 + rnd());
    if (fm_cuda_buf_alloc(c, sizeof(float) * (size_t)H, &dnw) ||
        fm_cuda_buf_upload(c, dnw, nw, sizeof(float) * (size_t)H) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)H, &dxn) || fm_cuda_buf_alloc(c, hr.bytes, &dr) ||
        fm_cuda_buf_upload(c, dr, hr.data, hr.bytes) || fm_cuda_buf_alloc(c, hg.bytes, &dg) ||
        fm_cuda_buf_upload(c, dg, hg.data, hg.bytes) || fm_cuda_buf_alloc(c, hu.bytes, &du) ||
        fm_cuda_buf_upload(c, du, hu.data, hu.bytes) || fm_cuda_buf_alloc(c, hs.bytes, &ds) ||
        fm_cuda_buf_upload(c, ds, hs.data, hs.bytes) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)H, &dx) ||
        fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)H) ||
        fm_cuda_buf_alloc(c, sizeof(float) * (size_t)E, &dl) || fm_cuda_buf_alloc(c, sizeof(float) * (size_t)I, &dsh) ||
        fm_cuda_buf_alloc(c, sizeof(float), &dsl) || fm_cuda_buf_alloc(c, sizeof(int32_t) * 64, &dids) ||
        fm_cuda_buf_alloc(c, sizeof(float) * 64, &dwt)) {
        t->failures++;
        fprintf(stderr, "  %s: %s\n", what, fm_last_error());
        goto done;
    }
    fm_weight wr = hr.w, wg = hg.w, wu = hu.w, ws = hs.w;
    wr.data = dr, wg.data = dg, wu.data = du, ws.data = ds;
    fm_cuda_mv mv[3] = {
        {.w = &wr, .x = dx, .out = dl}, {.w = &wg, .x = dx, .out = dsh, .w_up = &wu}, {.w = &ws, .x = dx, .out = dsl}};
    for (int i = 0; fold && i < 3; i++) mv[i].norm_w = dnw, mv[i].norm_eps = 1e-6f;
    if (fold) mv[0].norm_out = dxn;
    static const char *const rpt[] = {NULL, "2", "4", "8"};
    for (int ri = 0; ri < 4; ri++) {
        if (rpt[ri]) setenv("FLASHMOE_CUDA_MV_RPT", rpt[ri], 1);
        else unsetenv("FLASHMOE_CUDA_MV_RPT");
        for (int rep = 0; rep < 4; rep++) { /* rep 0: the two calls; then the fused launch, three times */
            float *l = rep ? l1 : l0, *sh = rep ? sh1 : sh0, *sl = rep ? &sl1 : &sl0, *w = rep ? w1 : w0;
            int32_t *ids = rep ? i1 : i0;
            setenv("FLASHMOE_CUDA_TOPK_FUSE", "1", 1); /* the fusion (the default; whatever the environment says) */
            if (fm_cuda_buf_fill(c, dl, 0xff, sizeof(float) * (size_t)E) || fm_cuda_buf_fill(c, dids, 0xff, sizeof(int32_t) * 64) ||
                fm_cuda_buf_fill(c, dwt, 0xff, sizeof(float) * 64) ||
                (rep ? fm_cuda_matvec_topk(c, mv, 3, dids, dwt, k, norm)
                     : (fm_cuda_matvec(c, mv, 3) || fm_cuda_router_topk(c, dids, dwt, dl, 1, (int)E, k, norm))) ||
                fm_cuda_buf_download(c, l, dl, sizeof(float) * (size_t)E) ||
                fm_cuda_buf_download(c, sh, dsh, sizeof(float) * (size_t)I) || fm_cuda_buf_download(c, sl, dsl, sizeof(float)) ||
                fm_cuda_buf_download(c, ids, dids, sizeof(int32_t) * (size_t)k) ||
                fm_cuda_buf_download(c, w, dwt, sizeof(float) * (size_t)k)) {
                t->failures++;
                fprintf(stderr, "  %s: %s\n", what, fm_last_error());
                goto done;
            }
            if (!rep) continue;
            const bool same = !memcmp(l0, l1, sizeof(float) * (size_t)E) && !memcmp(sh0, sh1, sizeof(float) * (size_t)I) &&
                              !memcmp(&sl0, &sl1, sizeof(float)) && !memcmp(i0, i1, sizeof(int32_t) * (size_t)k) &&
                              !memcmp(w0, w1, sizeof(float) * (size_t)k);
            if (!same) {
                t->failures++;
                fprintf(stderr, "  %s NR %s run %d: not bit-identical to the two calls (ids %d/%d, weights %g/%g; seed %llu)\n",
                        what, rpt[ri] ? rpt[ri] : "auto", rep, i1[0], i0[0], w1[0], w0[0],
                        (unsigned long long)fm_test_cuda_seed());
                goto done;
            }
        }
    }
    fprintf(stderr, "  %s: bit-identical to the two calls (ids[0] %d)\n", what, i1[0]);
done:
    unsetenv("FLASHMOE_CUDA_MV_RPT");
    unsetenv("FLASHMOE_CUDA_TOPK_FUSE");
    hweight_free(&hr), hweight_free(&hg), hweight_free(&hu), hweight_free(&hs);
    fm_cuda_buf_free(c, dr), fm_cuda_buf_free(c, dg), fm_cuda_buf_free(c, du), fm_cuda_buf_free(c, ds);
    fm_cuda_buf_free(c, dx), fm_cuda_buf_free(c, dl), fm_cuda_buf_free(c, dsh), fm_cuda_buf_free(c, dsl);
    fm_cuda_buf_free(c, dids), fm_cuda_buf_free(c, dwt), fm_cuda_buf_free(c, dnw), fm_cuda_buf_free(c, dxn);
    free(nw), free(x), free(l0), free(l1), free(sh0), free(sh1);
}

FM_TEST(cuda_matvec_topk_fused) {
    CUDA_OR_SKIP(c);
    for (int fold = 0; fold < 2; fold++) {
        check_matvec_topk(t, c, FM_DTYPE_Q8, 256, 2048, 8, 1, false, fold);  /* the 35B router */
        check_matvec_topk(t, c, FM_DTYPE_Q8, 512, 4096, 10, 1, false, fold); /* the 397B router */
        check_matvec_topk(t, c, FM_DTYPE_Q4, 128, 512, 8, 0, false, fold);
        check_matvec_topk(t, c, FM_DTYPE_BF16, 300, 256, 32, 1, true, fold);
        check_matvec_topk(t, c, FM_DTYPE_F32, 1024, 128, 5, 0, true, fold);
        check_matvec_topk(t, c, FM_DTYPE_F32, 40, 64, 40, 1, false, fold);  /* k > 32: two launches */
        check_matvec_topk(t, c, FM_DTYPE_BF16, 1500, 64, 8, 1, true, fold); /* E > 1024: two launches */
    }
    /* errors: nothing enqueued */
    fm_weight w = {.dtype = FM_DTYPE_F32, .rows = 8, .cols = 64, .data = (void *)256};
    fm_cuda_mv mv = {.w = &w, .x = (const float *)256, .out = (float *)256};
    CHECK(fm_cuda_matvec_topk(c, &mv, 0, (int32_t *)256, (float *)256, 2, true) == FM_ERR_ARG);
    CHECK(fm_cuda_matvec_topk(c, &mv, 1, (int32_t *)256, (float *)256, 9, true) == FM_ERR_ARG);
    CHECK(fm_cuda_matvec_topk(c, &mv, 1, NULL, (float *)256, 2, true) == FM_ERR_ARG);
    CHECK_OK(fm_cuda_sync(c));
}

FM_TEST(cuda_matvec_one_token) {
    CUDA_OR_SKIP(c);
    stats st = {0};
    static const char *const rpt[] = {NULL, "2", "4", "8"}; /* the launch's choice, then forced */
    for (int ri = 0; ri < 4; ri++) {
        if (rpt[ri]) setenv("FLASHMOE_CUDA_MV_RPT", rpt[ri], 1);
        else unsetenv("FLASHMOE_CUDA_MV_RPT");
        for (int rep = 0; rep < 6; rep++) check_matvec(t, c, &st, rep == 0 ? 40 : 1 + (int)(rnd_u64() % 12));
    }
    double worst_pair = 0;
    static const fm_dtype ptypes[] = {FM_DTYPE_F32, FM_DTYPE_BF16, FM_DTYPE_F16, FM_DTYPE_Q8, FM_DTYPE_Q4};
    for (int ri = 0; ri < 4; ri++) {
        if (rpt[ri]) setenv("FLASHMOE_CUDA_MV_RPT", rpt[ri], 1);
        else unsetenv("FLASHMOE_CUDA_MV_RPT");
        for (int ti = 0; ti < 5; ti++) {
            const bool q = fm_dtype_is_quant(ptypes[ti]);
            check_matvec_pair(t, c, &worst_pair, ptypes[ti], q ? 64 : 0, q ? FM_DTYPE_BF16 : FM_DTYPE_UNKNOWN, 512, 2048);
            check_matvec_pair(t, c, &worst_pair, ptypes[ti], q ? 32 : 0, q ? FM_DTYPE_F16 : FM_DTYPE_UNKNOWN, 37, 96);
        }
    }
    unsetenv("FLASHMOE_CUDA_MV_RPT");
    fprintf(stderr, "  matvec pair: worst error / bound * 1e-5 = %.2e\n", worst_pair);
    /* errors: nothing enqueued */
    fm_weight q2 = {.dtype = FM_DTYPE_Q2, .rows = 8, .cols = 64, .data = (void *)16, .group_size = 32,
                    .scale_dtype = FM_DTYPE_BF16};
    fm_cuda_mv bad = {.w = &q2, .x = NULL, .out = (float *)16};
    CHECK(fm_cuda_matvec(c, &bad, 1) == FM_ERR_ARG);
    CHECK(fm_cuda_matvec(c, NULL, 1) == FM_ERR_ARG);
    CHECK_OK(fm_cuda_matvec(c, NULL, 0));
    CHECK_OK(fm_cuda_sync(c));
    stats_print("one-token matvec", &st);
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

/* The grid barrier of a persistent kernel (fm_grid_barrier), through fm_cuda_phase_bench: with every
 * resident block, 500 phases in which each block must see what its neighbour wrote in the phase
 * before (and the same phases as graph-replayed launches); the bench's argument checks. */
FM_TEST(cuda_grid_barrier) {
    CUDA_OR_SKIP(c);
    fm_cuda_phase_times pt;
    CHECK_OK(fm_cuda_phase_bench(c, 1, 2, 1, &pt));
    REQUIRE(pt.most_blocks >= 1);
    const int most = pt.most_blocks;
    CHECK_OK(fm_cuda_phase_bench(c, most, 500, 3, &pt));
    CHECK_MSG(pt.launch_errors == 0 && pt.barrier_errors == 0, "stale reads: %u across launches, %u across barriers",
              pt.launch_errors, pt.barrier_errors);
    CHECK(pt.blocks == most && pt.launch_us > 0 && pt.barrier_us > 0);
    fprintf(stderr, "  %d blocks: a phase boundary %.2f us as graph-replayed PDL launches, %.2f us as a grid barrier\n",
            most, pt.launch_us, pt.barrier_us);
    CHECK(fm_cuda_phase_bench(c, most + 1, 10, 1, &pt) == FM_ERR_ARG);
    CHECK(fm_cuda_phase_bench(c, 0, 10, 1, &pt) == FM_ERR_ARG);
    CHECK(fm_cuda_phase_bench(c, 1, 1, 1, &pt) == FM_ERR_ARG);
    CHECK(fm_cuda_phase_bench(c, 1, 10, 1, NULL) == FM_ERR_ARG);
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
                                      (unsigned long long)fm_test_cuda_seed());
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
                              (long long)i, got[i], r, g[i], u[i], (unsigned long long)fm_test_cuda_seed());
                    break;
                }
                if (r != 0 && fabs(got[i] - r) / fabs(r) > worst) worst = fabs(got[i] - r) / fabs(r);
            }
            fm_cuda_buf_free(c, dg), fm_cuda_buf_free(c, du), fm_cuda_buf_free(c, dout);
            free(g), free(u), free(got);
        }
    fprintf(stderr, "  swiglu: worst |gpu - cpu| / |cpu| = %.2e\n", worst);
}

/* fm_cuda_argmax against fm_cpu_argmax (the first largest; -1 with a NaN): random vectors of
 * lengths around the kernel's part and block boundaries, the maximum planted at several places
 * (equal values: the lowest index), -0 against +0, every value -inf, one NaN; bad arguments. */
FM_TEST(cuda_argmax) {
    CUDA_OR_SKIP(c);
    static const int64_t ns[] = {1, 2, 31, 257, 2048, 2049, 65539, 248320, 540673, 2000003};
    void *scratch = NULL, *dout = NULL, *dx = NULL;
    const int64_t nmax = 2000003;
    float *x = malloc(sizeof(float) * (size_t)nmax);
    REQUIRE(x);
    bool ok = fm_cuda_buf_alloc(c, fm_cuda_argmax_scratch_bytes(), &scratch) == FM_OK &&
              fm_cuda_buf_alloc(c, sizeof(int32_t), &dout) == FM_OK &&
              fm_cuda_buf_alloc(c, sizeof(float) * (size_t)nmax, &dx) == FM_OK;
    CHECK_MSG(ok, "%s", fm_last_error());
    int cases = 0;
    for (int ni = 0; ok && ni < (int)(sizeof ns / sizeof *ns); ni++)
        for (int kind = 0; ok && kind < 6; kind++) {
            const int64_t n = ns[ni];
            for (int64_t i = 0; i < n; i++) x[i] = (float)(rnd() * 8.0);
            if (kind == 1) /* the maximum at several places, the last one first in no block order */
                for (int j = 0; j < 5; j++) x[(int64_t)(rnd_u64() % (uint64_t)n)] = 100.f;
            if (kind == 2 && n > 1) { /* ties between +0 and -0 as the largest */
                for (int64_t i = 0; i < n; i++) x[i] = -fabsf(x[i]) - 1.f;
                x[n - 1] = 0.f, x[n / 2] = -0.f;
            }
            if (kind == 3)
                for (int64_t i = 0; i < n; i++) x[i] = -INFINITY;
            if (kind == 4) x[(int64_t)(rnd_u64() % (uint64_t)n)] = NAN;
            if (kind == 5) x[n - 1] = INFINITY, x[0] = INFINITY; /* +inf twice: the first */
            float top;
            const int64_t want = fm_cpu_argmax(x, n, &top);
            int32_t got = -7;
            ok = fm_cuda_buf_upload(c, dx, x, sizeof(float) * (size_t)n) == FM_OK &&
                 fm_cuda_buf_fill(c, dout, 0x5a, sizeof(int32_t)) == FM_OK &&
                 fm_cuda_argmax(c, (int32_t *)dout, (const float *)dx, n, scratch) == FM_OK &&
                 fm_cuda_buf_download(c, &got, dout, sizeof got) == FM_OK;
            CHECK_MSG(ok, "%s", fm_last_error());
            CHECK_MSG(!ok || got == want, "argmax n=%lld case %d: gpu %d, cpu %lld (seed %llu)", (long long)n, kind, got,
                      (long long)want, (unsigned long long)fm_test_cuda_seed());
            cases++;
        }
    fprintf(stderr, "  argmax: %d cases\n", cases);
    CHECK(fm_cuda_argmax(c, (int32_t *)dout, (const float *)dx, 0, scratch) == FM_ERR_ARG);
    CHECK(fm_cuda_argmax(c, (int32_t *)dout, (const float *)dx, 4, NULL) == FM_ERR_ARG);
    CHECK(fm_cuda_argmax(c, NULL, (const float *)dx, 4, scratch) == FM_ERR_ARG);
    CHECK(fm_cuda_argmax(NULL, (int32_t *)dout, (const float *)dx, 4, scratch) == FM_ERR_ARG);
    fm_cuda_buf_free(c, scratch), fm_cuda_buf_free(c, dout), fm_cuda_buf_free(c, dx);
    free(x);
}
