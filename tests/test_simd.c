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

#include "backend/cpu/ops.h"
#include "quant/quant.h"
#include "test.h"
#include "util/half.h"

static uint64_t seed0, rng_state;
static void rng_seed(void) {
    seed0 = getenv("SIMD_SEED") ? (uint64_t)atoll(getenv("SIMD_SEED")) : (uint64_t)time(NULL);
    rng_state = seed0 * 0x9E3779B97F4A7C15ull | 1;
}
static uint64_t rnd_u64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double rnd(void) { return (double)(rnd_u64() >> 11) / (double)(1ull << 52) - 1.0; } /* [-1, 1) */

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
