/* The scalar CPU kernels against float64 arithmetic on fresh random inputs, and the half-precision
 * conversions against their definitions. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/ops.h"
#include "test.h"
#include "util/half.h"

static void rng_seed(void) { fm_test_rng_seed(NULL); }
#define rnd fm_test_rand

static void check_matmul(fm_test_ctx *t, fm_pool *pool, fm_dtype dt, int64_t T, int64_t N, int64_t K) {
    size_t es = fm_dtype_size(dt);
    unsigned char *w = malloc((size_t)(N * K) * es);
    float *x = malloc(sizeof(float) * (size_t)(T * K)), *out = malloc(sizeof(float) * (size_t)(T * N));
    double *wf = malloc(sizeof(double) * (size_t)(N * K));
    REQUIRE(w && x && out && wf);
    for (int64_t i = 0; i < N * K; i++) {
        float v = (float)rnd();
        if (dt == FM_DTYPE_F32) {
            memcpy(w + 4 * i, &v, 4);
            wf[i] = v;
        } else {
            uint16_t h = dt == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
            memcpy(w + 2 * i, &h, 2);
            wf[i] = dt == FM_DTYPE_BF16 ? fm_bf16_to_f32(h) : fm_f16_to_f32(h);
        }
    }
    for (int64_t i = 0; i < T * K; i++) x[i] = (float)rnd();
    for (int64_t i = 0; i < T * N; i++) out[i] = NAN; /* poison: every output must be written */
    fm_weight W = {.dtype = dt, .rows = N, .cols = K, .data = w};
    fm_cpu_matmul(pool, out, x, T, &W);
    double worst = 0;
    for (int64_t tt = 0; tt < T; tt++)
        for (int64_t r = 0; r < N; r++) {
            double ref = 0, mag = 0;
            for (int64_t c = 0; c < K; c++) {
                ref += wf[r * K + c] * x[tt * K + c];
                mag += fabs(wf[r * K + c] * x[tt * K + c]);
            }
            double e = fabs(out[tt * N + r] - ref) / (mag + 1e-30);
            if (!(e <= worst)) worst = isnan(out[tt * N + r]) ? INFINITY : fmax(worst, e);
        }
    /* float32 accumulation of K products: error well under 1e-5 of the sum of magnitudes */
    CHECK_MSG(worst < 1e-5, "%s T=%lld N=%lld K=%lld: rel err %.3e", fm_dtype_name(dt), (long long)T, (long long)N,
              (long long)K, worst);
    free(w);
    free(x);
    free(out);
    free(wf);
}

FM_TEST(kernel_matmul_matches_float64) {
    rng_seed();
    fm_pool *pool = fm_pool_init(3);
    REQUIRE(pool);
    static const int64_t shapes[][3] = {{1, 1, 1}, {1, 37, 13}, {5, 64, 96}, {3, 9, 2500}, {17, 130, 4099}};
    static const fm_dtype types[] = {FM_DTYPE_F32, FM_DTYPE_BF16, FM_DTYPE_F16};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (size_t d = 0; d < 3; d++) {
            check_matmul(t, NULL, types[d], shapes[s][0], shapes[s][1], shapes[s][2]);
            check_matmul(t, pool, types[d], shapes[s][0], shapes[s][1], shapes[s][2]);
        }
    fm_pool_free(pool);
}

FM_TEST(kernel_rmsnorm_and_rope) {
    rng_seed();
    float x[64], w[64], out[64];
    for (int i = 0; i < 64; i++) {
        x[i] = (float)rnd() * 3;
        w[i] = (float)rnd();
    }
    fm_cpu_rmsnorm(out, x, w, 64, 1e-6f);
    double ss = 0;
    for (int i = 0; i < 64; i++) ss += (double)x[i] * x[i];
    double sc = 1 / sqrt(ss / 64 + 1e-6), worst = 0;
    for (int i = 0; i < 64; i++) worst = fmax(worst, fabs(out[i] - x[i] * sc * w[i]));
    CHECK_MSG(worst < 1e-5, "rmsnorm err %.3e", worst);
    /* RoPE: rotate dims [0, 16) of a 64-dim head at position 1234; the rest passes through */
    float y[64];
    memcpy(y, x, sizeof y);
    fm_cpu_rope_neox(y, 16, 1234, 1e7);
    worst = 0;
    for (int i = 0; i < 8; i++) {
        double f = 1234.0 * pow(1e7, -2.0 * i / 16);
        double a = x[i] * cos(f) - x[i + 8] * sin(f), b = x[i + 8] * cos(f) + x[i] * sin(f);
        worst = fmax(worst, fmax(fabs(y[i] - a), fabs(y[i + 8] - b)));
    }
    CHECK_MSG(worst < 2e-3, "rope err %.3e", worst); /* angles up to 1234 rad in float32 */
    CHECK(memcmp(y + 16, x + 16, sizeof(float) * 48) == 0);
}

FM_TEST(kernel_half_conversions) {
    /* every finite f16 survives f16 -> f32 -> f16; every bf16 survives bf16 -> f32 -> bf16 */
    int bad16 = 0, badbf = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = fm_f16_to_f32((uint16_t)h);
        if (!isnan(f) && fm_f32_to_f16(f) != h) bad16++;
        float g = fm_bf16_to_f32((uint16_t)h);
        if (!isnan(g) && fm_f32_to_bf16(g) != h) badbf++;
    }
    CHECK_MSG(bad16 == 0, "%d f16 values do not round-trip", bad16);
    CHECK_MSG(badbf == 0, "%d bf16 values do not round-trip", badbf);
    /* known values and round-to-nearest-even */
    CHECK(fm_f16_to_f32(0x3c00) == 1.0f && fm_f16_to_f32(0xc000) == -2.0f && fm_f16_to_f32(0x0001) == ldexpf(1, -24));
    CHECK(fm_f32_to_f16(1.0f + ldexpf(1, -11)) == 0x3c00);       /* halfway, even stays */
    CHECK(fm_f32_to_f16(1.0f + 3 * ldexpf(1, -11)) == 0x3c02);   /* halfway, odd rounds up */
    CHECK(fm_f32_to_f16(70000.0f) == 0x7c00 && fm_f32_to_f16(ldexpf(1, -26)) == 0x0000);
    CHECK(fm_f32_to_bf16(1.0f + ldexpf(1, -8)) == 0x3f80 && fm_f32_to_bf16(1.0f + 3 * ldexpf(1, -8)) == 0x3f82);
    /* random floats: the nearest representable value */
    rng_seed();
    int far = 0;
    for (int i = 0; i < 100000; i++) {
        float v = (float)(rnd() * 1000);
        float r = fm_f16_to_f32(fm_f32_to_f16(v));
        uint16_t h = fm_f32_to_f16(v);
        float up = fm_f16_to_f32((uint16_t)(h + 1)), dn = fm_f16_to_f32((uint16_t)(h - 1));
        if (fabsf(up - v) < fabsf(r - v) || fabsf(dn - v) < fabsf(r - v)) far++;
    }
    CHECK_MSG(far == 0, "%d values not rounded to the nearest f16", far);
}

static void sum_range(void *arg, int64_t b, int64_t e) {
    int64_t *hits = arg;
    for (int64_t i = b; i < e; i++) __atomic_fetch_add(&hits[i], 1, __ATOMIC_RELAXED);
}

FM_TEST(kernel_pool_covers_each_item_once) {
    fm_pool *pool = fm_pool_init(4);
    REQUIRE(pool);
    for (int64_t n = 1; n < 200; n += 7) {
        int64_t hits[200] = {0};
        for (int rep = 0; rep < 3; rep++) fm_pool_run(pool, sum_range, hits, n, 1 + n % 5);
        int bad = 0;
        for (int64_t i = 0; i < 200; i++) bad += hits[i] != (i < n ? 3 : 0);
        CHECK_MSG(bad == 0, "n=%lld: %d items covered the wrong number of times", (long long)n, bad);
    }
    fm_pool_free(pool);
}
