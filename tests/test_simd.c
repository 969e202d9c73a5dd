/* The SIMD matmul kernels (src/backend/cpu/kernels_*.c) against the scalar oracle
 * fm_cpu_matmul_ref and, for a subset, against float64: every weight type, T = 1, 2, 7, 64 tokens,
 * shapes with K not a multiple of the vector width (float types) and several segments, every
 * group size and scale type (quantized), row counts that are not multiples of the row tile, 1 and 3
 * threads, misaligned weights. Each level the CPU has is forced in turn (fm_cpu_matmul_at).
 *
 * Tolerance: |simd - ref| <= 1e-5 * sum_c |W[r,c] x[t,c]| per output. Both sides are float32 sums
 * of the same products in different orders (quantized: the FMA form s * sum q x + b * sum x, whose
 * rounding error is bounded by a few ulps of sum (|q s| + |b|) |x|, at most ~4x sum |w x| for the
 * value ranges drawn here), so the observed errors are ~1e-7; 1e-5 leaves room and still catches
 * any wrong element (one wrong product among K is a relative error >> 1e-5 at these K).
 *
 * Fresh random inputs on every run; the seed is printed with each failure (SIMD_SEED=n repeats a
 * run). Outputs are poisoned with NaN and guarded on both sides. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/kernels.h"
#include "backend/cpu/ops.h"
#include "quant/quant.h"
#include "test.h"
#include "util/half.h"

static uint64_t seed0;
static void rng_seed(void) { seed0 = fm_test_rng_seed("SIMD_SEED"); }
#define rnd_u64 fm_test_rand_u64
#define rnd fm_test_rand

#define GUARD 16 /* floats of sentinel on each side of every output */

static const float SENTINEL = 12345.5f;

typedef struct wbuf {
    unsigned char *alloc;
    fm_weight w;
    float *deq; /* (rows, cols) the exact float32 weights */
} wbuf;

static void wbuf_free(wbuf *b) {
    free(b->alloc);
    free(b->deq);
}

/* A random weight of type dt (quantized: group gs, scales sd), its data `misalign` bytes past a
 * 64-byte boundary. Returns false on allocation failure. */
static bool make_weight(wbuf *b, fm_dtype dt, int64_t N, int64_t K, int gs, fm_dtype sd, int misalign) {
    memset(b, 0, sizeof *b);
    size_t bytes = fm_dtype_is_quant(dt) ? (size_t)fm_quant_nbytes(dt, N, K, gs, sd) : (size_t)(N * K) * fm_dtype_size(dt);
    b->alloc = aligned_alloc(64, (bytes + 64 + 63) & ~(size_t)63);
    b->deq = malloc(sizeof(float) * (size_t)(N * K));
    if (!b->alloc || !b->deq) return false;
    unsigned char *d = b->alloc + misalign;
    b->w = (fm_weight){.dtype = dt, .rows = N, .cols = K, .data = d, .group_size = gs, .scale_dtype = sd};
    if (!fm_dtype_is_quant(dt)) {
        for (int64_t i = 0; i < N * K; i++) {
            float v = (float)rnd();
            if (dt == FM_DTYPE_F32) memcpy(d + 4 * i, &v, 4);
            else {
                uint16_t h = dt == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                memcpy(d + 2 * i, &h, 2);
                v = dt == FM_DTYPE_BF16 ? fm_bf16_to_f32(h) : fm_f16_to_f32(h);
            }
            b->deq[i] = v;
        }
    } else {
        const int bits = fm_quant_bits(dt);
        const int64_t G = K / gs, qbytes = N * K * bits / 8;
        for (int64_t i = 0; i < qbytes; i++) d[i] = (unsigned char)rnd_u64();
        const size_t ss = sd == FM_DTYPE_F32 ? 4 : 2;
        unsigned char *sp = d + qbytes, *bp = sp + (size_t)(N * G) * ss;
        const float maxq = (float)((1 << bits) - 1);
        for (int64_t g = 0; g < N * G; g++) {
            /* weights in about [-1, 1]: s * maxq ~ the group's range, b ~ its minimum */
            float s = (float)(0.2 + 0.8 * fabs(rnd())) * 2.0f / maxq, bias = -(float)(0.5 + 0.5 * fabs(rnd()));
            for (int k = 0; k < 2; k++) {
                float v = k ? bias : s;
                unsigned char *p = (k ? bp : sp) + (size_t)g * ss;
                if (sd == FM_DTYPE_F32) memcpy(p, &v, 4);
                else {
                    uint16_t h = sd == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                    memcpy(p, &h, 2);
                }
            }
        }
    }
    if (fm_dtype_is_quant(dt)) /* fm_dequant_row reads any alignment */
        for (int64_t r = 0; r < N; r++) fm_cpu_get_row(b->deq + r * K, &b->w, r);
    return true;
}

static float *alloc_out(int64_t n) {
    float *o = malloc(sizeof(float) * (size_t)(n + 2 * GUARD));
    if (!o) return NULL;
    for (int64_t i = 0; i < GUARD; i++) o[i] = o[GUARD + n + i] = SENTINEL;
    for (int64_t i = 0; i < n; i++) o[GUARD + i] = NAN; /* poison: every output must be written */
    return o;
}

static bool guards_intact(const float *o, int64_t n) {
    for (int64_t i = 0; i < GUARD; i++)
        if (o[i] != SENTINEL || o[GUARD + n + i] != SENTINEL) return false;
    return true;
}

typedef struct stats {
    double worst_ref, worst_f64; /* worst error / sum |w x| */
    int cases;
} stats;

/* One weight, T tokens, every supported SIMD level, 1 and 3 threads. */
static void check_case(fm_test_ctx *t, fm_pool *pool3, stats *st, fm_dtype dt, int64_t N, int64_t K, int gs,
                       fm_dtype sd, int64_t T, bool f64) {
    char what[160];
    snprintf(what, sizeof what, "%s%s%s g%d N=%lld K=%lld T=%lld (seed %llu)", fm_dtype_name(dt),
             fm_dtype_is_quant(dt) ? " scales " : "", fm_dtype_is_quant(dt) ? fm_dtype_name(sd) : "",
             fm_dtype_is_quant(dt) ? gs : 0, (long long)N, (long long)K, (long long)T, (unsigned long long)seed0);
    wbuf wb;
    int misalign = fm_dtype_is_quant(dt) ? (int)(rnd_u64() % 4) * 4 + (int)(rnd_u64() % 2) : (int)(rnd_u64() % 7);
    bool ok = make_weight(&wb, dt, N, K, gs, sd, misalign);
    float *x = malloc(sizeof(float) * (size_t)(T * K + 1));
    float *ref = alloc_out(T * N), *got = alloc_out(T * N), *got3 = alloc_out(T * N);
    double *mag = malloc(sizeof(double) * (size_t)(T * N)), *exact = malloc(sizeof(double) * (size_t)(T * N));
    if (!ok || !x || !ref || !got || !got3 || !mag || !exact) {
        t->failures++;
        fprintf(stderr, "  out of memory for %s\n", what);
        goto done;
    }
    float *xs = x + (rnd_u64() & 1); /* activations only 4-byte aligned, half the time */
    for (int64_t i = 0; i < T * K; i++) xs[i] = (float)rnd();
    for (int64_t tt = 0; tt < T; tt++)
        for (int64_t r = 0; r < N; r++) {
            double m = 0, e = 0;
            const float *wr = wb.deq + r * K, *xt = xs + tt * K;
            for (int64_t c = 0; c < K; c++) {
                m += fabs((double)wr[c] * xt[c]);
                if (f64) e += (double)wr[c] * xt[c];
            }
            mag[tt * N + r] = m + 1e-30;
            exact[tt * N + r] = e;
        }
    /* the oracle reads F32/BF16/F16 through typed pointers (element alignment); the kernels take
     * any byte offset, so the oracle gets an aligned copy of oddly placed float weights */
    fm_weight wref = wb.w;
    void *wcopy = NULL;
    if (!fm_dtype_is_quant(dt) && misalign % (int)fm_dtype_size(dt)) {
        size_t bytes = (size_t)(N * K) * fm_dtype_size(dt);
        wcopy = malloc(bytes);
        REQUIRE(wcopy);
        memcpy(wcopy, wb.w.data, bytes);
        wref.data = wcopy;
    }
    fm_cpu_matmul_ref(pool3, ref + GUARD, xs, T, &wref);
    free(wcopy);
    for (int lv = FM_CPU_AVX2; lv <= FM_CPU_AVX512; lv++) {
        if (!fm_cpu_level_supported((fm_cpu_level)lv)) continue;
        for (int i = 0; i < T * N; i++) got[GUARD + i] = got3[GUARD + i] = NAN;
        fm_cpu_level ran = fm_cpu_matmul_at((fm_cpu_level)lv, NULL, got + GUARD, xs, T, &wb.w);
        fm_cpu_matmul_at((fm_cpu_level)lv, pool3, got3 + GUARD, xs, T, &wb.w);
        CHECK_MSG((int)ran == lv, "%s: asked %s, ran %s", what, fm_cpu_level_name((fm_cpu_level)lv), fm_cpu_level_name(ran));
        CHECK_MSG(guards_intact(got, T * N) && guards_intact(got3, T * N), "%s %s: wrote outside the output", what,
                  fm_cpu_level_name((fm_cpu_level)lv));
        double worst = 0, worst64 = 0;
        int64_t at = -1, diff3 = 0;
        for (int64_t i = 0; i < T * N; i++) {
            double e = fabs((double)got[GUARD + i] - ref[GUARD + i]) / mag[i];
            if (!(e <= worst)) { /* NaN counts as worst */
                worst = isnan(e) ? INFINITY : e;
                at = i;
            }
            if (f64) {
                double e64 = fabs((double)got[GUARD + i] - exact[i]) / mag[i];
                worst64 = isnan(e64) ? INFINITY : fmax(worst64, e64);
            }
            /* the per-row arithmetic does not depend on how rows are split among threads */
            diff3 += memcmp(&got[GUARD + i], &got3[GUARD + i], sizeof(float)) != 0;
        }
        CHECK_MSG(worst < 1e-5, "%s %s: rel err vs ref %.3e at t=%lld r=%lld (got %.9g ref %.9g)", what,
                  fm_cpu_level_name((fm_cpu_level)lv), worst, (long long)(at < 0 ? 0 : at / N),
                  (long long)(at < 0 ? 0 : at % N), at < 0 ? 0.0 : got[GUARD + at], at < 0 ? 0.0 : ref[GUARD + at]);
        CHECK_MSG(!f64 || worst64 < 1e-5, "%s %s: rel err vs float64 %.3e", what, fm_cpu_level_name((fm_cpu_level)lv),
                  worst64);
        CHECK_MSG(diff3 == 0, "%s %s: %lld outputs differ between 1 and 3 threads", what,
                  fm_cpu_level_name((fm_cpu_level)lv), (long long)diff3);
        if (worst > st->worst_ref) st->worst_ref = worst;
        if (worst64 > st->worst_f64) st->worst_f64 = worst64;
        st->cases++;
    }
done:
    wbuf_free(&wb);
    free(x);
    free(ref);
    free(got);
    free(got3);
    free(mag);
    free(exact);
}

static const int64_t token_counts[] = {1, 2, 7, 64};

static bool any_simd(void) { return fm_cpu_level_supported(FM_CPU_AVX2) || fm_cpu_level_supported(FM_CPU_AVX512); }

FM_TEST(simd_matmul_float_types) {
    if (!any_simd()) SKIP("this CPU has neither AVX2 nor AVX-512");
    rng_seed();
    fm_pool *pool = fm_pool_init(3);
    REQUIRE(pool);
    /* K: below one vector, odd, not multiples of 8/16/64, and past one 8192-column segment */
    static const int64_t shapes[][2] = {{1, 1}, {5, 13}, {3, 17}, {6, 64}, {9, 100}, {11, 257}, {7, 1000}, {5, 2500}, {3, 8195}};
    static const fm_dtype types[] = {FM_DTYPE_F32, FM_DTYPE_BF16, FM_DTYPE_F16};
    stats st = {0};
    for (size_t d = 0; d < 3; d++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
            for (size_t k = 0; k < 4; k++) {
                int64_t T = token_counts[k], K = shapes[s][1];
                if (T == 64 && K > 3000) continue; /* the oracle's time, not the kernels' */
                check_case(t, pool, &st, types[d], shapes[s][0], K, 0, FM_DTYPE_UNKNOWN, T, s % 3 == 1);
            }
    fprintf(stderr, "  %d cases, worst rel err vs ref %.2e, vs float64 %.2e\n", st.cases, st.worst_ref, st.worst_f64);
    fm_pool_free(pool);
}

static void quant_cases(fm_test_ctx *t, fm_dtype dt) {
    if (!any_simd()) SKIP("this CPU has neither AVX2 nor AVX-512");
    rng_seed();
    fm_pool *pool = fm_pool_init(3);
    REQUIRE(pool);
    static const int gss[] = {32, 64, 128};
    static const fm_dtype sds[] = {FM_DTYPE_BF16, FM_DTYPE_F16, FM_DTYPE_F32};
    stats st = {0};
    for (int gi = 0; gi < 3; gi++)
        for (int si = 0; si < 3; si++) {
            const int gs = gss[gi];
            /* K in groups: one group (less than one vector block at Q8), blocks with partial tails,
             * 1024 (the 397B expert's down), and past one 8192-column segment */
            const int64_t shapes[][2] = {{1, gs}, {5, 3 * gs}, {13, 5 * gs}, {7, 1024}, {3, 8192 + 3 * 128}};
            for (size_t s = 0; s < 5; s++)
                for (size_t k = 0; k < 4; k++) {
                    int64_t T = token_counts[k], K = shapes[s][1];
                    if (T == 64 && K > 2000) continue;
                    check_case(t, pool, &st, dt, shapes[s][0], K, gs, sds[si], T, s == 3 || (s == 1 && k == 2));
                }
        }
    fprintf(stderr, "  %d cases, worst rel err vs ref %.2e, vs float64 %.2e\n", st.cases, st.worst_ref, st.worst_f64);
    fm_pool_free(pool);
}

FM_TEST(simd_matmul_q8) { quant_cases(t, FM_DTYPE_Q8); }
FM_TEST(simd_matmul_q4) { quant_cases(t, FM_DTYPE_Q4); }
FM_TEST(simd_matmul_q2) { quant_cases(t, FM_DTYPE_Q2); }

/* Matrices large enough to be split among 3 threads (the dispatcher keeps small ones on the
 * caller): expert-sized ones at the 397B geometry, a prefill-sized batch with tile remainders at
 * T = 37, and 517 rows of each type (3 shares of 44 four-row groups, one lone row at the end). */
FM_TEST(simd_matmul_expert_shape) {
    if (!any_simd()) SKIP("this CPU has neither AVX2 nor AVX-512");
    rng_seed();
    fm_pool *pool = fm_pool_init(3);
    REQUIRE(pool);
    stats st = {0};
    check_case(t, pool, &st, FM_DTYPE_Q4, 1024, 4096, 64, FM_DTYPE_BF16, 1, true);
    check_case(t, pool, &st, FM_DTYPE_Q4, 4096, 1024, 64, FM_DTYPE_BF16, 37, false);
    check_case(t, pool, &st, FM_DTYPE_BF16, 1021, 1024, 0, FM_DTYPE_UNKNOWN, 37, false);
    static const struct { fm_dtype dt; int gs; fm_dtype sd; } split[] = {
        {FM_DTYPE_Q8, 32, FM_DTYPE_F16}, {FM_DTYPE_Q4, 128, FM_DTYPE_F32}, {FM_DTYPE_Q2, 64, FM_DTYPE_BF16},
        {FM_DTYPE_BF16, 0, FM_DTYPE_UNKNOWN}, {FM_DTYPE_F16, 0, FM_DTYPE_UNKNOWN}, {FM_DTYPE_F32, 0, FM_DTYPE_UNKNOWN}};
    for (size_t i = 0; i < sizeof split / sizeof *split; i++) {
        check_case(t, pool, &st, split[i].dt, 517, 2048, split[i].gs, split[i].sd, 1, false);
        check_case(t, pool, &st, split[i].dt, 517, 2048, split[i].gs, split[i].sd, 7, false);
    }
    fprintf(stderr, "  %d cases, worst rel err vs ref %.2e, vs float64 %.2e\n", st.cases, st.worst_ref, st.worst_f64);
    fm_pool_free(pool);
}

FM_TEST(simd_level_selection) {
    CHECK(fm_cpu_level_supported(FM_CPU_SCALAR));
    CHECK(fm_cpu_level_choose(NULL) == fm_cpu_level_best());
    CHECK(fm_cpu_level_choose("") == fm_cpu_level_best());
    CHECK(fm_cpu_level_choose("auto") == fm_cpu_level_best());
    CHECK(fm_cpu_level_choose("scalar") == FM_CPU_SCALAR);
    CHECK(fm_cpu_level_choose("nonsense") == fm_cpu_level_best()); /* with a line on stderr */
    for (int lv = FM_CPU_AVX2; lv <= FM_CPU_AVX512; lv++) {
        fm_cpu_level want = fm_cpu_level_supported((fm_cpu_level)lv) ? (fm_cpu_level)lv : fm_cpu_level_best();
        CHECK_MSG(fm_cpu_level_choose(fm_cpu_level_name((fm_cpu_level)lv)) == want, "%s",
                  fm_cpu_level_name((fm_cpu_level)lv));
    }
    if (fm_cpu_level_supported(FM_CPU_AVX512)) CHECK(fm_cpu_level_supported(FM_CPU_AVX2));
    CHECK(!strcmp(fm_cpu_level_name(FM_CPU_AVX512), "avx512") && !strcmp(fm_cpu_level_name(FM_CPU_AVX2), "avx2"));
    /* the scalar level and unsupported types run the oracle itself */
    float w[6] = {1, 2, 3, 4, 5, 6}, x[3] = {1, 1, 1}, out[2] = {NAN, NAN};
    fm_weight W = {.dtype = FM_DTYPE_F32, .rows = 2, .cols = 3, .data = w};
    CHECK(fm_cpu_matmul_at(FM_CPU_SCALAR, NULL, out, x, 1, &W) == FM_CPU_SCALAR && out[0] == 6 && out[1] == 15);
    fm_weight U = {.dtype = FM_DTYPE_I32, .rows = 2, .cols = 3, .data = w};
    CHECK(fm_cpu_matmul_at(FM_CPU_AVX512, NULL, out, x, 1, &U) == FM_CPU_SCALAR);
    /* a forced level the CPU lacks falls back below it; whichever ran, the answer is right */
    out[0] = out[1] = NAN;
    fm_cpu_level ran = fm_cpu_matmul_at(FM_CPU_AVX512, NULL, out, x, 1, &W);
    CHECK(ran == fm_cpu_level_best() && out[0] == 6 && out[1] == 15);
    /* the process-wide level is FLASHMOE_CPU's choice */
    fm_cpu_level cur = fm_cpu_matmul_level();
    CHECK(cur == fm_cpu_level_choose(getenv("FLASHMOE_CPU")));
}

/* ---- int8 activations (kernels_int8.c, kernels_int8_avx2.c) ----
 *
 * Each supported int8 path (AVX2, VNNI, AMX) is forced in turn (fm_cpu_matmul_int8), with one and two
 * activation levels, on Q8/Q4/Q2 × group 32/64/128 × BF16/F16/F32 scales × T = 1, 2, 3, 7, 16, 64,
 * odd row counts (partial 16-row blocks) and K of one group, several groups, and past one
 * 1024-column segment (at group 32, a half 64-column step), 1 and 3 threads. Two checks per
 * output, both with tolerances derived per output:
 *
 * 1. The integer part is exact: the test rounds the activations itself by the documented rule
 *    (kernels.h: d, q1, q2, dx, Q = q1 or 256 q1 + q2, in float32 as specified) and computes in
 *    float64  E = sum_g (s_g dx_g I_g + b_g X_g),  I_g = sum q Q (exact integers), X_g = dx_g sum Q.
 *    The kernel's float32 work is a product s dx, an int->float conversion (relative error <= u),
 *    an FMA chain of 2G terms and X_g rounded once, so
 *        |got - E| <= (2G + 4) u sum_g (|s_g dx_g I_g| + |b_g X_g|),   u = 2^-24.
 *    One wrong product q Q among K would exceed this by far.
 * 2. Against the float oracle fm_cpu_matmul_ref: the kernel computes the product with x^ = dx Q
 *    in place of x, so
 *        |got - ref| <= sum_c |w_c| |x^_c - x_c|  +  the bound of check 1  +  (K + 8) u sum_c |w_c x_c|
 *    (the last term: the oracle's own float32 error), w_c the oracle's dequantized weights.
 * The tests also print the RMS of (got - ref) over the RMS of ref per level count: the typical size
 * of the numerics change (inputs here include all-zero groups and groups with a 40x outlier, which
 * coarsen d). */

static uint32_t qval(const fm_weight *w, int64_t r, int64_t c) {
    const int bits = fm_quant_bits(w->dtype), V = 32 / bits;
    uint32_t word;
    memcpy(&word, (const unsigned char *)w->data + (r * (w->cols / V) + c / V) * 4, 4);
    return (word >> (bits * (c % V))) & ((1u << bits) - 1);
}

static float sbval(const fm_weight *w, int64_t i, bool bias) {
    const size_t ss = w->scale_dtype == FM_DTYPE_F32 ? 4 : 2;
    const int64_t n = w->rows * (w->cols / w->group_size);
    const unsigned char *p = (const unsigned char *)w->data + w->rows * w->cols * fm_quant_bits(w->dtype) / 8 +
                             (size_t)((bias ? n : 0) + i) * ss;
    if (ss == 4) {
        float v;
        memcpy(&v, p, 4);
        return v;
    }
    uint16_t h;
    memcpy(&h, p, 2);
    return w->scale_dtype == FM_DTYPE_BF16 ? fm_bf16_to_f32(h) : fm_f16_to_f32(h);
}

typedef struct i8stats {
    double worst_exact, worst_ref; /* error / its bound */
    double sq_err[2], sq_ref[2];   /* per level count: sums of (got - ref)^2 and ref^2 */
    int cases;
} i8stats;

/* The documented activation rounding of one group (kernels.h), in float32 as the kernel does it:
 * Q (integers) and dx; returns x^ = dx Q in xh. */
static float round_group(const float *x, int gs, int levels, int32_t *Q, double *xh) {
    float amax = 0;
    for (int c = 0; c < gs; c++) amax = fmaxf(amax, fabsf(x[c]));
    const float inv = amax >= FM_KERN_I8_AMAX_MIN ? 127.0f / amax : 0.0f, d = amax < FM_KERN_I8_AMAX_MIN ? 0.0f : amax / 127.0f,
                inv2 = inv * 256.0f;
    const float dx = levels == 2 ? d / 256.0f : d;
    for (int c = 0; c < gs; c++) {
        const float q1 = nearbyintf(x[c] * inv);
        Q[c] = (int32_t)q1;
        if (levels == 2) {
            const float q2 = fminf(fmaxf(nearbyintf(fmaf(-q1, d, x[c]) * inv2), -128.0f), 127.0f);
            Q[c] = 256 * Q[c] + (int32_t)q2;
        }
        xh[c] = (double)dx * Q[c];
    }
    return dx;
}

static void check_int8_case(fm_test_ctx *t, fm_pool *pool3, i8stats *st, fm_dtype dt, int64_t N, int64_t K, int gs,
                            fm_dtype sd, int64_t T) {
    char what[160];
    snprintf(what, sizeof what, "%s scales %s g%d N=%lld K=%lld T=%lld (seed %llu)", fm_dtype_name(dt),
             fm_dtype_name(sd), gs, (long long)N, (long long)K, (long long)T, (unsigned long long)seed0);
    const int64_t G = K / gs;
    wbuf wb;
    bool ok = make_weight(&wb, dt, N, K, gs, sd, (int)(rnd_u64() % 4) * 4 + (int)(rnd_u64() % 2));
    float *x = malloc(sizeof(float) * (size_t)(T * K));
    float *ref = alloc_out(T * N), *got = alloc_out(T * N), *got3 = alloc_out(T * N);
    double *exact = malloc(sizeof(double) * (size_t)(T * N)), *tol_e = malloc(sizeof(double) * (size_t)(T * N));
    double *tol_r = malloc(sizeof(double) * (size_t)(T * N)), *mag = malloc(sizeof(double) * (size_t)(T * N));
    int32_t *Q = malloc(sizeof(int32_t) * (size_t)(T * K));
    double *xh = malloc(sizeof(double) * (size_t)(T * K)), *dx = malloc(sizeof(double) * (size_t)(T * G));
    if (!ok || !x || !ref || !got || !got3 || !exact || !tol_e || !tol_r || !mag || !Q || !xh || !dx) {
        t->failures++;
        fprintf(stderr, "  out of memory for %s\n", what);
        goto done;
    }
    for (int64_t i = 0; i < T * K; i++) x[i] = (float)rnd();
    for (int64_t i = 0; i < T * G; i++) { /* some all-zero groups (amax = 0) and some outliers */
        const uint64_t u = rnd_u64() % 16;
        if (u == 0) memset(x + i * gs, 0, sizeof(float) * (size_t)gs);
        if (u == 1) x[i * gs + (int64_t)(rnd_u64() % (uint64_t)gs)] *= 40.0f;
    }
    fm_cpu_matmul_ref(pool3, ref + GUARD, x, T, &wb.w);
    const double u = 1.0 / 16777216.0;
    for (int levels = 1; levels <= 2; levels++) {
        for (int64_t i = 0; i < T * G; i++) dx[i] = round_group(x + i * gs, gs, levels, Q + i * gs, xh + i * gs);
        for (int64_t tt = 0; tt < T; tt++)
            for (int64_t r = 0; r < N; r++) {
                double e = 0, terms = 0, terms_t1 = 0, m = 0, round = 0;
                for (int64_t g = 0; g < G; g++) {
                    const double s = sbval(&wb.w, r * G + g, false), b = sbval(&wb.w, r * G + g, true);
                    int64_t isum = 0, qsum = 0, iabs = 0;
                    for (int64_t c = g * gs; c < (g + 1) * gs; c++) {
                        const double wv = wb.deq[r * K + c];
                        isum += (int64_t)qval(&wb.w, r, c) * Q[tt * K + c];
                        iabs += (int64_t)qval(&wb.w, r, c) * llabs((long long)Q[tt * K + c]);
                        qsum += Q[tt * K + c];
                        m += fabs(wv * x[tt * K + c]);
                        round += fabs(wv) * fabs(xh[tt * K + c] - x[tt * K + c]);
                    }
                    const double d = dx[tt * G + g], X = d * (double)qsum;
                    e += s * d * (double)isum + b * X;
                    terms += fabs(s * d * (double)isum) + fabs(b * X);
                    terms_t1 += fabs(s * d) * (double)iabs + fabs(b * X);
                }
                const int64_t o = tt * N + r;
                exact[o] = e;
                /* T = 1 (the in-place kernel, kernels.h): a group's integer sum is split over lanes
                 * and chunks, each partial converted and scaled alone (|partials| summed, at most
                 * sum |q Q|), then a chain of one FMA per 64-byte chunk, or per 16 groups for the
                 * bias terms, and the 16-lane sum */
                const double chunks = (double)((K * fm_quant_bits(dt) + 511) / 512);
                tol_e[o] = T == 1 ? (chunks + (double)G / 16 + 8) * u * terms_t1 + 1e-30
                                  : (2.0 * (double)G + 4) * u * terms + 1e-30;
                tol_r[o] = round + tol_e[o] + ((double)K + 8) * u * m;
            }
        for (int k = FM_CPU_INT8_AVX2; k <= FM_CPU_INT8_AMX; k++) {
            if (!fm_cpu_int8_supported((fm_cpu_int8)k)) continue;
            const char *kn = fm_cpu_int8_name((fm_cpu_int8)k);
            for (int64_t i = 0; i < T * N; i++) got[GUARD + i] = got3[GUARD + i] = NAN;
            fm_cpu_int8 ran = fm_cpu_matmul_int8((fm_cpu_int8)k, levels, NULL, got + GUARD, x, T, &wb.w);
            fm_cpu_matmul_int8((fm_cpu_int8)k, levels, pool3, got3 + GUARD, x, T, &wb.w);
            /* one token: the path's in-place kernel (AVX2, AVXVNNI), VNNI's for VNNI and AMX */
            const fm_cpu_int8 want = T == 1 && k >= FM_CPU_INT8_VNNI ? FM_CPU_INT8_VNNI : (fm_cpu_int8)k;
            CHECK_MSG(ran == want, "%s: asked %s, ran %s", what, kn, fm_cpu_int8_name(ran));
            CHECK_MSG(guards_intact(got, T * N) && guards_intact(got3, T * N), "%s %s: wrote outside the output",
                      what, kn);
            double we = 0, wr = 0;
            int64_t at_e = 0, at_r = 0, diff3 = 0;
            for (int64_t i = 0; i < T * N; i++) {
                const double g = got[GUARD + i];
                const double ee = fabs(g - exact[i]) / tol_e[i], er = fabs(g - ref[GUARD + i]) / tol_r[i];
                if (!(ee <= we)) { /* NaN counts as worst */
                    we = isnan(ee) ? INFINITY : ee;
                    at_e = i;
                }
                if (!(er <= wr)) {
                    wr = isnan(er) ? INFINITY : er;
                    at_r = i;
                }
                st->sq_err[levels - 1] += (g - ref[GUARD + i]) * (g - ref[GUARD + i]);
                st->sq_ref[levels - 1] += (double)ref[GUARD + i] * ref[GUARD + i];
                diff3 += memcmp(&got[GUARD + i], &got3[GUARD + i], sizeof(float)) != 0;
            }
            CHECK_MSG(we <= 1, "%s %s %d level(s): vs float64 of the rounded activations: error %.3g of its bound at "
                               "t=%lld r=%lld (got %.9g, exact %.9g, bound %.3g)",
                      what, kn, levels, we, (long long)(at_e / N), (long long)(at_e % N), got[GUARD + at_e],
                      exact[at_e], tol_e[at_e]);
            CHECK_MSG(wr <= 1, "%s %s %d level(s): vs the oracle: error %.3g of its bound at t=%lld r=%lld (got %.9g, "
                               "ref %.9g)",
                      what, kn, levels, wr, (long long)(at_r / N), (long long)(at_r % N), got[GUARD + at_r],
                      ref[GUARD + at_r]);
            CHECK_MSG(diff3 == 0, "%s %s %d level(s): %lld outputs differ between 1 and 3 threads", what, kn, levels,
                      (long long)diff3);
            st->worst_exact = fmax(st->worst_exact, we);
            st->worst_ref = fmax(st->worst_ref, wr);
            st->cases++;
        }
    }
done:
    wbuf_free(&wb);
    free(x);
    free(ref);
    free(got);
    free(got3);
    free(exact);
    free(tol_e);
    free(tol_r);
    free(mag);
    free(Q);
    free(xh);
    free(dx);
}

static void int8_cases(fm_test_ctx *t, fm_dtype dt) {
    if (!fm_cpu_int8_supported(FM_CPU_INT8_AVX2)) SKIP("this CPU has no AVX2/FMA/F16C");
    rng_seed();
    fm_pool *pool = fm_pool_init(3);
    REQUIRE(pool);
    static const int gss[] = {32, 64, 128};
    static const fm_dtype sds[] = {FM_DTYPE_BF16, FM_DTYPE_F16, FM_DTYPE_F32};
    static const int64_t Ts[] = {1, 2, 3, 7, 16, 64};
    i8stats st = {0};
    for (int gi = 0; gi < 3; gi++)
        for (int si = 0; si < 3; si++) {
            const int gs = gss[gi];
            const int64_t shapes[][2] = {{5, gs}, {37, 3 * gs}, {19, 1024 + 3 * gs}};
            for (size_t s = 0; s < 3; s++)
                for (size_t k = 0; k < 6; k++) check_int8_case(t, pool, &st, dt, shapes[s][0], shapes[s][1], gs, sds[si], Ts[k]);
        }
    /* large enough to be split among the 3 threads (partial last block: 517 = 32 * 16 + 5) */
    check_int8_case(t, pool, &st, dt, 517, 2048, 64, FM_DTYPE_BF16, 64);
    check_int8_case(t, pool, &st, dt, 128, 64, 64, FM_DTYPE_BF16, 113);
    check_int8_case(t, pool, &st, dt, 517, 2048, 128, FM_DTYPE_F16, 10);
    check_int8_case(t, pool, &st, dt, 2051, 1024, 64, FM_DTYPE_BF16, 1); /* one token, split too */
    fprintf(stderr, "  %d cases (avx2%s%s%s), worst error / bound: %.3f vs float64 of the rounded activations, %.3f vs "
                    "the oracle; RMS(got - ref) / RMS(ref): %.2e one level, %.2e two\n",
            st.cases, fm_cpu_int8_supported(FM_CPU_INT8_AVXVNNI) ? ", avxvnni" : "",
            fm_cpu_int8_supported(FM_CPU_INT8_VNNI) ? ", vnni" : "",
            fm_cpu_int8_supported(FM_CPU_INT8_AMX) ? ", amx" : "", st.worst_exact, st.worst_ref,
            sqrt(st.sq_err[0] / (st.sq_ref[0] + 1e-300)), sqrt(st.sq_err[1] / (st.sq_ref[1] + 1e-300)));
    fm_pool_free(pool);
}

FM_TEST(int8_matmul_q8) { int8_cases(t, FM_DTYPE_Q8); }
FM_TEST(int8_matmul_q4) { int8_cases(t, FM_DTYPE_Q4); }
FM_TEST(int8_matmul_q2) { int8_cases(t, FM_DTYPE_Q2); }

/* The AVX2 activation quantizer (fm_kern_avx2_i8_quant) gives, byte for byte, the documented
 * rounding (round_group above: Q, dx in float32) and, where the CPU has AVX-512, the output of
 * fm_kern_i8_quant: xq, xq2, dx, xs all bit-identical. Inputs: random groups, all-zero groups,
 * groups with a 40x outlier, groups of huge (~1e37), small (~1e-30) and tiny (< FM_KERN_I8_AMAX_MIN:
 * zeros) values, and groups with
 * amax = 127 (then 127 / amax = 1, d = 1) holding exact ties k + 0.5: round half to even in level 1,
 * and residuals of exactly d / 2 that round to 128 and are clamped to 127 in level 2. */
FM_TEST(int8_avx2_quant_bit_identical) {
    if (!fm_cpu_int8_supported(FM_CPU_INT8_AVX2)) SKIP("this CPU has no AVX2/FMA/F16C");
    rng_seed();
    const bool avx512 = fm_cpu_level_supported(FM_CPU_AVX512);
    int groups_checked = 0, ties = 0, clamped = 0, tiny_zero = 0;
    for (int gi = 0; gi < 3; gi++) {
        const int gs = 32 << gi;
        const int64_t G = 24, K = G * gs, T = 3, stride = K + 16;
        const fm_weight w = {.dtype = FM_DTYPE_Q4, .rows = 1, .cols = K, .group_size = gs, .scale_dtype = FM_DTYPE_BF16};
        float *x = malloc(sizeof(float) * (size_t)(T * K));
        int8_t *q[2][2]; /* [implementation][level] */
        float *dx[2], *xs[2];
        int32_t *Q = malloc(sizeof(int32_t) * (size_t)gs);
        double *xh = malloc(sizeof(double) * (size_t)gs);
        bool ok = x && Q && xh;
        for (int i = 0; i < 2; i++) {
            q[i][0] = malloc((size_t)(T * stride));
            q[i][1] = malloc((size_t)(T * stride));
            dx[i] = malloc(sizeof(float) * (size_t)(T * G));
            xs[i] = malloc(sizeof(float) * (size_t)(T * G));
            ok = ok && q[i][0] && q[i][1] && dx[i] && xs[i];
        }
        REQUIRE(ok);
        for (int64_t i = 0; i < T * K; i++) x[i] = (float)rnd();
        for (int64_t g = 0; g < T * G; g++) {
            float *p = x + g * gs;
            switch (g % 7) {
            case 0: memset(p, 0, sizeof(float) * (size_t)gs); break;
            case 1: p[rnd_u64() % (uint64_t)gs] *= 40.0f; break;
            case 2:
                for (int c = 0; c < gs; c++) p[c] *= 1e37f;
                break;
            case 3:
                for (int c = 0; c < gs; c++) p[c] *= 1e-30f;
                break;
            case 4: /* amax 127: ties k + 0.5, exact in float32 */
                for (int c = 0; c < gs; c++) p[c] = (float)((int)(rnd_u64() % 255) - 127) + (c % 2 ? 0.5f : 0.0f);
                p[0] = rnd_u64() % 2 ? 127.0f : -127.0f;
                break;
            case 5: /* amax < FM_KERN_I8_AMAX_MIN (subnormals too): zeros, d = 0 (127 / amax would overflow) */
                for (int c = 0; c < gs; c++) p[c] *= c % 3 ? 1e-36f : 1e-41f;
                break;
            default: break;
            }
        }
        for (int levels = 1; levels <= 2; levels++) {
            for (int i = 0; i < 2; i++) {
                memset(q[i][0], 0x55, (size_t)(T * stride));
                memset(q[i][1], 0x55, (size_t)(T * stride));
            }
            fm_kern_avx2_i8_quant(&w, x, 0, T, q[0][0], levels == 2 ? q[0][1] : NULL, stride, dx[0], xs[0]);
            if (avx512) fm_kern_i8_quant(&w, x, 0, T, q[1][0], levels == 2 ? q[1][1] : NULL, stride, dx[1], xs[1]);
            for (int64_t tk = 0; tk < T; tk++)
                for (int64_t g = 0; g < G; g++) {
                    const float *p = x + tk * K + g * gs;
                    const float want_dx = round_group(p, gs, levels, Q, xh);
                    int bad = 0;
                    for (int c = 0; c < gs; c++) {
                        const int8_t q1 = q[0][0][tk * stride + g * gs + c], q2 = levels == 2 ? q[0][1][tk * stride + g * gs + c] : 0;
                        bad += (levels == 2 ? 256 * q1 + q2 : q1) != Q[c];
                        const int64_t kind = (tk * G + g) % 7; /* the case of the input switch above */
                        if (kind == 4 && c % 2) ties++;
                        tiny_zero += kind == 5 && (q1 != 0 || q2 != 0);
                        clamped += levels == 2 && q2 == 127 && fabsf(p[c] - nearbyintf(p[c])) == 0.5f;
                    }
                    bad += memcmp(&dx[0][tk * G + g], &want_dx, sizeof(float)) != 0;
                    CHECK_MSG(!bad, "gs %d, %d level(s), token %lld group %lld: the AVX2 quantizer differs from the "
                                    "documented rounding in %d places (seed %llu)",
                              gs, levels, (long long)tk, (long long)g, bad, (unsigned long long)seed0);
                    groups_checked++;
                }
            if (avx512) {
                for (int64_t tk = 0; tk < T; tk++) {
                    CHECK_MSG(!memcmp(q[0][0] + tk * stride, q[1][0] + tk * stride, (size_t)K), "gs %d, %d level(s): level-1 "
                              "bytes differ from fm_kern_i8_quant's (seed %llu)", gs, levels, (unsigned long long)seed0);
                    CHECK_MSG(levels == 1 || !memcmp(q[0][1] + tk * stride, q[1][1] + tk * stride, (size_t)K),
                              "gs %d: level-2 bytes differ from fm_kern_i8_quant's (seed %llu)", gs,
                              (unsigned long long)seed0);
                }
                CHECK_MSG(!memcmp(dx[0], dx[1], sizeof(float) * (size_t)(T * G)) &&
                              !memcmp(xs[0], xs[1], sizeof(float) * (size_t)(T * G)),
                          "gs %d, %d level(s): dx or xs differ from fm_kern_i8_quant's (seed %llu)", gs, levels,
                          (unsigned long long)seed0);
            }
        }
        for (int i = 0; i < 2; i++) {
            free(q[i][0]);
            free(q[i][1]);
            free(dx[i]);
            free(xs[i]);
        }
        free(x);
        free(Q);
        free(xh);
    }
    CHECK(ties > 0 && clamped > 0); /* the inputs did reach the rounding ties and the level-2 clamp */
    CHECK_MSG(tiny_zero == 0, "%d values of groups below FM_KERN_I8_AMAX_MIN were not rounded to 0", tiny_zero);
    fprintf(stderr, "  %d groups against the documented rounding (%d ties, %d clamped residuals)%s\n", groups_checked,
            ties, clamped, avx512 ? "; bit-identical to fm_kern_i8_quant" : "; no AVX-512 here: not compared with fm_kern_i8_quant");
}

FM_TEST(int8_dispatch) {
    CHECK(fm_cpu_int8_supported(FM_CPU_INT8_OFF));
    if (fm_cpu_int8_supported(FM_CPU_INT8_AMX)) CHECK(fm_cpu_int8_supported(FM_CPU_INT8_VNNI));
    if (fm_cpu_int8_supported(FM_CPU_INT8_VNNI)) CHECK(fm_cpu_int8_supported(FM_CPU_INT8_AVX2));
    if (fm_cpu_int8_supported(FM_CPU_INT8_AVXVNNI)) CHECK(fm_cpu_int8_supported(FM_CPU_INT8_AVX2));
    CHECK(fm_cpu_int8_supported(FM_CPU_INT8_AVX2) == fm_cpu_level_supported(FM_CPU_AVX2));
    const fm_cpu_int8 best = fm_cpu_int8_best();
    CHECK(fm_cpu_int8_choose(NULL) == fm_cpu_int8_choose("")); /* the default, on or off (ops.c) */
    CHECK(fm_cpu_int8_choose(NULL) == best || fm_cpu_int8_choose(NULL) == FM_CPU_INT8_OFF);
    CHECK(fm_cpu_int8_choose("auto") == best && fm_cpu_int8_choose("1") == best);
    CHECK(fm_cpu_int8_choose("0") == FM_CPU_INT8_OFF && fm_cpu_int8_choose("off") == FM_CPU_INT8_OFF);
    CHECK(fm_cpu_int8_choose("nonsense") == best); /* with a line on stderr */
    for (int k = FM_CPU_INT8_AVX2; k <= FM_CPU_INT8_AMX; k++)
        CHECK(fm_cpu_int8_choose(fm_cpu_int8_name((fm_cpu_int8)k)) ==
              (fm_cpu_int8_supported((fm_cpu_int8)k) ? (fm_cpu_int8)k : best));
    /* the path per float level (FLASHMOE_CPU): AVX-512 keeps the choice; AVX2 (an AVX2-only CPU, or
     * FLASHMOE_CPU=avx2) keeps AVX2/AVXVNNI and takes the best of them in place of VNNI/AMX, so the
     * default there is an AVX2 path */
    if (fm_cpu_int8_supported(FM_CPU_INT8_AVX2)) {
        const fm_cpu_int8 avx2_best = fm_cpu_int8_supported(FM_CPU_INT8_AVXVNNI) ? FM_CPU_INT8_AVXVNNI : FM_CPU_INT8_AVX2;
        for (int k = FM_CPU_INT8_AVX2; k <= FM_CPU_INT8_AMX; k++) {
            CHECK(fm_cpu_int8_for_level(FM_CPU_AVX512, (fm_cpu_int8)k) == (fm_cpu_int8)k);
            CHECK(fm_cpu_int8_for_level(FM_CPU_AVX2, (fm_cpu_int8)k) ==
                  (k <= FM_CPU_INT8_AVXVNNI ? (fm_cpu_int8)k : avx2_best));
            CHECK(fm_cpu_int8_for_level(FM_CPU_SCALAR, (fm_cpu_int8)k) == FM_CPU_INT8_OFF);
        }
        CHECK(fm_cpu_int8_for_level(FM_CPU_AVX2, fm_cpu_int8_choose(NULL)) ==
              (fm_cpu_int8_choose(NULL) == FM_CPU_INT8_OFF ? FM_CPU_INT8_OFF : avx2_best));
        CHECK(fm_cpu_int8_for_level(FM_CPU_AVX2, fm_cpu_int8_choose("avx2")) == FM_CPU_INT8_AVX2);
        CHECK(fm_cpu_int8_for_level(FM_CPU_AVX512, fm_cpu_int8_choose("avx2")) == FM_CPU_INT8_AVX2);
    }
    for (int l = FM_CPU_SCALAR; l <= FM_CPU_AVX512; l++) CHECK(fm_cpu_int8_for_level((fm_cpu_level)l, FM_CPU_INT8_OFF) == FM_CPU_INT8_OFF);
    /* the process-wide mode: FLASHMOE_CPU_INT8's choice at the float level */
    const fm_cpu_int8 mode = fm_cpu_matmul_int8_mode();
    const char *lvenv = getenv("FLASHMOE_CPU_INT8_LEVELS");
    CHECK(fm_cpu_int8_levels() == (lvenv && !strcmp(lvenv, "1") ? 1 : 2));
    CHECK(mode == fm_cpu_int8_for_level(fm_cpu_matmul_level(), fm_cpu_int8_choose(getenv("FLASHMOE_CPU_INT8"))));
    /* which path a call takes: unquantized weights stay on the float kernels */
    fm_weight q = {.dtype = FM_DTYPE_Q4, .rows = 1, .cols = 64, .group_size = 64, .scale_dtype = FM_DTYPE_BF16};
    fm_weight f = {.dtype = FM_DTYPE_F32, .rows = 1, .cols = 64};
    for (int lv = 1; lv <= 2; lv++) {
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_AMX, lv, &q, 1) == FM_CPU_INT8_VNNI); /* one token: in place */
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_VNNI, lv, &q, 1) == FM_CPU_INT8_VNNI);
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_OFF, lv, &q, 1) == FM_CPU_INT8_OFF);
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_AMX, lv, &f, 64) == FM_CPU_INT8_OFF);
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_OFF, lv, &q, 64) == FM_CPU_INT8_OFF);
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_VNNI, lv, &q, 2) == FM_CPU_INT8_VNNI);
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_VNNI, lv, &q, 64) == FM_CPU_INT8_VNNI);
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_AMX, lv, &q, 2) == FM_CPU_INT8_VNNI);
        CHECK(fm_cpu_int8_pick(FM_CPU_INT8_AMX, lv, &q, 64) == FM_CPU_INT8_AMX);
    }
    for (int lv = 1; lv <= 2; lv++)
        for (int64_t T = 1; T <= 64; T *= 4)
            for (int k = FM_CPU_INT8_AVX2; k <= FM_CPU_INT8_AVXVNNI; k++) {
                fm_weight q8 = q;
                q8.dtype = FM_DTYPE_Q8;
                CHECK(fm_cpu_int8_pick((fm_cpu_int8)k, lv, &q, T) == (fm_cpu_int8)k);
                CHECK(fm_cpu_int8_pick((fm_cpu_int8)k, lv, &q8, T) == (T == 1 ? FM_CPU_INT8_OFF : (fm_cpu_int8)k));
                CHECK(fm_cpu_int8_pick((fm_cpu_int8)k, lv, &f, T) == FM_CPU_INT8_OFF);
            }
    CHECK(fm_cpu_int8_pick(FM_CPU_INT8_AMX, 2, &q, 6) == FM_CPU_INT8_AMX);
    CHECK(fm_cpu_int8_pick(FM_CPU_INT8_AMX, 1, &q, 6) == FM_CPU_INT8_VNNI);
    /* fm_cpu_matmul is exactly the path picked */
    rng_seed();
    wbuf wb;
    const int64_t N = 37, K = 256;
    float x[7 * 256], a[7 * 37], b[7 * 37];
    REQUIRE(make_weight(&wb, FM_DTYPE_Q4, N, K, 64, FM_DTYPE_BF16, 0));
    for (int i = 0; i < 7 * 256; i++) x[i] = (float)rnd();
    /* the process's mode, then the AVX2 path set as the mode (fm_cpu_set_int8_mode), as an AVX2-only
     * CPU or FLASHMOE_CPU=avx2 gets it */
    for (int m = 0; m < 2; m++) {
        if (m == 1 && !fm_cpu_int8_supported(FM_CPU_INT8_AVX2)) break;
        const fm_cpu_int8 was = m ? fm_cpu_set_int8_mode(FM_CPU_INT8_AVX2) : mode, cur = fm_cpu_matmul_int8_mode();
        CHECK(cur == (m ? FM_CPU_INT8_AVX2 : mode));
        for (int64_t T = 1; T <= 7; T += 6) {
            fm_cpu_matmul(NULL, a, x, T, &wb.w);
            const fm_cpu_int8 k = fm_cpu_int8_pick(cur, fm_cpu_int8_levels(), &wb.w, T);
            CHECK(!m || k == FM_CPU_INT8_AVX2);
            if (k == FM_CPU_INT8_OFF) fm_cpu_matmul_at(fm_cpu_matmul_level(), NULL, b, x, T, &wb.w);
            else CHECK(fm_cpu_matmul_int8(k, fm_cpu_int8_levels(), NULL, b, x, T, &wb.w) == k);
            CHECK_MSG(!memcmp(a, b, sizeof(float) * (size_t)(T * N)), "T=%lld: fm_cpu_matmul differs from path %s",
                      (long long)T, fm_cpu_int8_name(k));
        }
        if (m) fm_cpu_set_int8_mode(was);
    }
    wbuf_free(&wb);
    /* an unquantized weight: no int8 path runs, the float kernels do */
    float w[6] = {1, 2, 3, 4, 5, 6}, ones[6] = {1, 1, 1, 1, 1, 1}, out[4] = {NAN, NAN, NAN, NAN};
    fm_weight W = {.dtype = FM_DTYPE_F32, .rows = 2, .cols = 3, .data = w};
    CHECK(fm_cpu_matmul_int8(FM_CPU_INT8_AMX, 2, NULL, out, ones, 2, &W) == FM_CPU_INT8_OFF);
    CHECK(out[0] == 6 && out[1] == 15 && out[2] == 6 && out[3] == 15);
}

/* fm_cpu_matvec_many: each product's output is bit-identical to fm_cpu_matmul of one token, for
 * every int8 path this CPU has (and the float kernels), 1 to 3 threads, fresh random weights of
 * mixed types and shapes (two sharing x, as gate and up do); every output written, no write
 * outside it; batches the one-dispatch path cannot take (a float weight among them, more than
 * FM_CPU_MV_MANY products) give the same answers through one call each. */
FM_TEST(matvec_many_equals_one_by_one) {
    rng_seed();
    static const struct {
        fm_dtype dt;
        int64_t N, K;
        int gs;
        fm_dtype sd;
    } shapes[] = {{FM_DTYPE_Q4, 512, 2048, 64, FM_DTYPE_BF16}, {FM_DTYPE_Q4, 512, 2048, 64, FM_DTYPE_BF16},
                  {FM_DTYPE_Q4, 2048, 512, 64, FM_DTYPE_BF16}, {FM_DTYPE_Q8, 96, 256, 32, FM_DTYPE_F16},
                  {FM_DTYPE_Q2, 40, 128, 64, FM_DTYPE_F32},    {FM_DTYPE_Q4, 1, 256, 128, FM_DTYPE_BF16},
                  {FM_DTYPE_Q8, 300, 1024, 64, FM_DTYPE_BF16}, {FM_DTYPE_F32, 24, 64, 0, FM_DTYPE_F32}};
    enum { NS = sizeof shapes / sizeof *shapes, NB = 40 };
    wbuf wb[NS];
    float *xs[NS], *got[NB], *want[NB];
    fm_cpu_mv mv[NB];
    for (int i = 0; i < NS; i++) {
        REQUIRE(make_weight(&wb[i], shapes[i].dt, shapes[i].N, shapes[i].K, shapes[i].gs, shapes[i].sd, 0));
        xs[i] = malloc(sizeof(float) * (size_t)shapes[i].K);
        REQUIRE(xs[i]);
        for (int64_t c = 0; c < shapes[i].K; c++) xs[i][c] = (float)rnd();
    }
    memcpy(xs[1], xs[0], sizeof(float) * 2048); /* the first two share their input */
    /* batch b of product j: weight j % n_w (n_w = NS - 1 leaves the float weight out) */
    const fm_cpu_int8 was = fm_cpu_matmul_int8_mode();
    const fm_cpu_int8 modes[] = {FM_CPU_INT8_OFF, FM_CPU_INT8_AVX2, FM_CPU_INT8_AVXVNNI, FM_CPU_INT8_VNNI};
    for (size_t mi = 0; mi < sizeof modes / sizeof *modes; mi++) {
        if (!fm_cpu_int8_supported(modes[mi])) continue;
        fm_cpu_set_int8_mode(modes[mi]);
        for (int threads = 1; threads <= 3; threads++) {
            fm_pool *pool = fm_pool_init(threads);
            REQUIRE(pool);
            const struct {
                int n, n_w;
            } batches[] = {{2, 2}, {NS - 1, NS - 1}, {NS, NS}, {NB, NS - 1}, {16, NS - 1}};
            for (size_t bi = 0; bi < sizeof batches / sizeof *batches; bi++) {
                const int n = batches[bi].n;
                for (int j = 0; j < n; j++) {
                    const int wi = j % batches[bi].n_w;
                    got[j] = alloc_out(shapes[wi].N);
                    want[j] = alloc_out(shapes[wi].N);
                    REQUIRE(got[j] && want[j]);
                    mv[j] = (fm_cpu_mv){got[j] + GUARD, xs[wi], &wb[wi].w};
                    fm_cpu_matmul(pool, want[j] + GUARD, xs[wi], 1, &wb[wi].w);
                }
                fm_cpu_matvec_many(pool, mv, n);
                for (int j = 0; j < n; j++) {
                    const int wi = j % batches[bi].n_w;
                    CHECK_MSG(!memcmp(got[j] + GUARD, want[j] + GUARD, sizeof(float) * (size_t)shapes[wi].N) &&
                                  guards_intact(got[j], shapes[wi].N),
                              "path %s, %d threads, batch of %d: product %d (%s %lldx%lld) differs",
                              fm_cpu_int8_name(modes[mi]), threads, n, j, fm_dtype_name(shapes[wi].dt),
                              (long long)shapes[wi].N, (long long)shapes[wi].K);
                    free(got[j]);
                    free(want[j]);
                }
            }
            fm_pool_free(pool);
        }
    }
    fm_cpu_set_int8_mode(was);
    for (int i = 0; i < NS; i++) {
        wbuf_free(&wb[i]);
        free(xs[i]);
    }
}
