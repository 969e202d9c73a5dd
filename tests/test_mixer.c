/* The token-mixer kernels (src/backend/cpu/mixer_kernels.c): each SIMD level the CPU has against the
 * scalar reference and against float64, on fresh random inputs (MIXER_SEED=n repeats a run).
 *
 * Delta rule: several tokens in a row on one state, shapes with dv not a multiple of the vector
 * width and wider than one 128-column block. Tolerance per element: |simd - ref| and |simd - f64|
 * <= 1e-5 * mag, mag = the float64 sum of |terms| that produced the element (|S||q| for o, |S| for the
 * state): both sides are float32 sums of the same products in different orders (and with fused
 * multiply-adds), whose rounding error is a few ulps of mag per token; one wrong term is >> 1e-5 mag.
 * Outputs are poisoned with NaN and guarded by sentinels. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/mixer_kernels.h"
#include "test.h"

static uint64_t seed0;
static void rng_seed(void) { seed0 = fm_test_rng_seed("MIXER_SEED"); }
#define rnd fm_test_rand

#define GUARD 16
static const float SENTINEL = 12345.5f;

FM_TEST(mixer_delta_rule_levels_match_reference_and_f64) {
    rng_seed();
    static const int64_t shapes[][2] = {{128, 128}, {16, 16}, {8, 12}, {32, 40}, {64, 200}, {3, 129}, {128, 256}};
    const int steps = 5;
    double worst = 0;
    for (fm_cpu_level lv = FM_CPU_SCALAR; lv <= FM_CPU_AVX512; lv++) {
        if (!fm_cpu_level_supported(lv)) {
            fprintf(stderr, "  %s: not supported by this CPU, skipped\n", fm_cpu_level_name(lv));
            continue;
        }
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            int64_t dk = shapes[si][0], dv = shapes[si][1];
            float *S = malloc(sizeof(float) * (size_t)(dk * dv)), *Sr = malloc(sizeof(float) * (size_t)(dk * dv));
            double *S64 = malloc(sizeof(double) * (size_t)(dk * dv)), *mag = malloc(sizeof(double) * (size_t)(dk * dv));
            float *k = malloc(sizeof(float) * (size_t)dk), *q = malloc(sizeof(float) * (size_t)dk);
            float *v = malloc(sizeof(float) * (size_t)dv), *o = malloc(sizeof(float) * (size_t)(dv + 2 * GUARD));
            float *orf = malloc(sizeof(float) * (size_t)dv);
            REQUIRE(S && Sr && S64 && mag && k && q && v && o && orf);
            for (int64_t i = 0; i < dk * dv; i++) S[i] = Sr[i] = (float)rnd(), S64[i] = S[i], mag[i] = fabs(S64[i]);
            for (int step = 0; step < steps; step++) {
                for (int64_t i = 0; i < dk; i++) k[i] = (float)(rnd() / sqrt((double)dk)), q[i] = (float)rnd();
                for (int64_t j = 0; j < dv; j++) v[j] = (float)rnd();
                float decay = (float)(0.5 + 0.5 * fabs(rnd())), beta = (float)fabs(rnd());
                for (int i = 0; i < dv + 2 * GUARD; i++) o[i] = (i < GUARD || i >= GUARD + dv) ? SENTINEL : NAN;
                fm_cpu_delta_rule_token_at(lv, S, dk, dv, k, q, v, decay, beta, o + GUARD);
                fm_cpu_delta_rule_token_at(FM_CPU_SCALAR, Sr, dk, dv, k, q, v, decay, beta, orf);
                /* float64 oracle and the magnitudes of the terms */
                for (int64_t j = 0; j < dv; j++) {
                    double kv = 0, kvm = 0;
                    for (int64_t i = 0; i < dk; i++) {
                        S64[i * dv + j] *= decay, mag[i * dv + j] *= decay;
                        kv += S64[i * dv + j] * k[i], kvm += mag[i * dv + j] * fabs(k[i]);
                    }
                    double d = beta * (v[j] - kv), dm = beta * (fabs(v[j]) + kvm), ov = 0, om = 0;
                    for (int64_t i = 0; i < dk; i++) {
                        S64[i * dv + j] += k[i] * d, mag[i * dv + j] += fabs(k[i]) * dm;
                        ov += S64[i * dv + j] * q[i], om += mag[i * dv + j] * fabs(q[i]);
                    }
                    float got = o[GUARD + j];
                    double e1 = fabs(got - orf[j]) / om, e2 = fabs(got - ov) / om;
                    if (!(e1 <= 1e-5 && e2 <= 1e-5)) {
                        CHECK_MSG(false, "%s dk %lld dv %lld step %d o[%lld] = %.9g, ref %.9g, f64 %.9g (mag %.3g, seed %llu)",
                                  fm_cpu_level_name(lv), (long long)dk, (long long)dv, step, (long long)j, got, orf[j], ov,
                                  om, (unsigned long long)seed0);
                        goto next;
                    }
                    worst = fmax(worst, fmax(e1, e2));
                }
                for (int64_t i = 0; i < dk * dv; i++) {
                    double e = fmax(fabs(S[i] - Sr[i]), fabs(S[i] - S64[i])) / mag[i];
                    if (!(e <= 1e-5)) {
                        CHECK_MSG(false, "%s dk %lld dv %lld step %d S[%lld] = %.9g, ref %.9g, f64 %.9g (seed %llu)",
                                  fm_cpu_level_name(lv), (long long)dk, (long long)dv, step, (long long)i, S[i], Sr[i],
                                  S64[i], (unsigned long long)seed0);
                        goto next;
                    }
                }
                for (int i = 0; i < GUARD; i++)
                    CHECK_MSG(o[i] == SENTINEL && o[GUARD + dv + i] == SENTINEL, "%s dv %lld: wrote outside o",
                              fm_cpu_level_name(lv), (long long)dv);
            }
        next:
            free(S), free(Sr), free(S64), free(mag), free(k), free(q), free(v), free(o), free(orf);
        }
    }
    fprintf(stderr, "  worst error %.2e of the terms' magnitude (seed %llu)\n", worst, (unsigned long long)seed0);
}

FM_TEST(mixer_dot_and_scale_axpy_levels_match_f64) {
    rng_seed();
    static const int64_t ns[] = {1, 7, 16, 31, 33, 128, 256, 1000};
    double worst = 0;
    for (fm_cpu_level lv = FM_CPU_SCALAR; lv <= FM_CPU_AVX512; lv++) {
        if (!fm_cpu_level_supported(lv)) continue;
        for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
            int64_t n = ns[ni];
            float a[1000], b[1000], y[1000 + 2 * GUARD];
            double want = 0, m = 0;
            for (int64_t i = 0; i < n; i++) {
                a[i] = (float)rnd(), b[i] = (float)rnd();
                want += (double)a[i] * b[i], m += fabs((double)a[i] * b[i]);
            }
            float got = fm_cpu_dot_at(lv, a, b, n);
            CHECK_MSG(fabs(got - want) <= 1e-6 * m, "%s dot n %lld: %.9g, f64 %.9g", fm_cpu_level_name(lv), (long long)n,
                      got, want);
            worst = fmax(worst, fabs(got - want) / m);
            float s = (float)rnd(), al = (float)rnd();
            for (int64_t i = 0; i < n + 2 * GUARD; i++) y[i] = (i < GUARD || i >= GUARD + n) ? SENTINEL : (float)rnd();
            float y0[1000];
            memcpy(y0, y + GUARD, sizeof(float) * (size_t)n);
            fm_cpu_scale_axpy_at(lv, y + GUARD, s, al, a, n);
            for (int64_t i = 0; i < n; i++) {
                double w = (double)y0[i] * s + (double)al * a[i], mg = fabs((double)y0[i] * s) + fabs((double)al * a[i]);
                CHECK_MSG(fabs(y[GUARD + i] - w) <= 2e-7 * mg + 1e-30, "%s axpy n %lld [%lld]: %.9g, f64 %.9g",
                          fm_cpu_level_name(lv), (long long)n, (long long)i, y[GUARD + i], w);
            }
            for (int i = 0; i < GUARD; i++)
                CHECK_MSG(y[i] == SENTINEL && y[GUARD + n + i] == SENTINEL, "%s axpy n %lld wrote outside y",
                          fm_cpu_level_name(lv), (long long)n);
        }
    }
    fprintf(stderr, "  dot: worst error %.2e of sum |a b| (seed %llu)\n", worst, (unsigned long long)seed0);
}

/* fm_cpu_argmax at every level against the definition (the first i with x[i] > every earlier x),
 * on fresh random rows: lengths around the 32-float step and a vocabulary's, the maximum placed
 * in the head, the body and the tail, ties (the first must win), -0 against +0, rows of -inf, and
 * a NaN anywhere (-1). */
FM_TEST(mixer_argmax_levels_match_definition) {
    rng_seed();
    static const int64_t ns[] = {0, 1, 7, 31, 32, 33, 63, 100, 1000, 248320};
    float *x = malloc(sizeof(float) * 248320);
    REQUIRE(x);
    int cases = 0;
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const int64_t n = ns[ni];
        for (int kind = 0; kind < 7; kind++) {
            for (int64_t i = 0; i < n; i++) x[i] = (float)rnd() * 10.0f;
            int64_t at = n ? (int64_t)((rnd() * 0.5 + 0.5) * (double)n) % n : 0;
            if (kind == 1 && n) x[n - 1] = 20.0f;                   /* the max in the tail */
            if (kind == 2 && n > 3) x[at] = x[n - 1] = x[n / 2] = 30.0f; /* ties: the first wins */
            if (kind == 3)                                           /* zeros of both signs are the max */
                for (int64_t i = 0; i < n; i++) x[i] = i == at ? 0.0f : i % 3 ? -0.0f : -fabsf(x[i]) - 1.0f;
            if (kind == 4)
                for (int64_t i = 0; i < n; i++) x[i] = -INFINITY;
            if (kind == 5 && n) x[at] = NAN;
            if (kind == 6 && n) x[n - 1] = NAN;
            int64_t want = n ? 0 : -1;
            for (int64_t i = 0; i < n; i++) {
                if (x[i] != x[i]) {
                    want = -1;
                    break;
                }
                if (x[i] > x[want]) want = i;
            }
            for (fm_cpu_level lv = FM_CPU_SCALAR; lv <= FM_CPU_AVX512; lv++) {
                if (!fm_cpu_level_supported(lv)) continue;
                float m = 12345.0f;
                int64_t got = fm_cpu_argmax_at(lv, x, n, &m);
                CHECK_MSG(got == want, "%s argmax n %lld kind %d: %lld, want %lld", fm_cpu_level_name(lv),
                          (long long)n, kind, (long long)got, (long long)want);
                if (got == want && want >= 0)
                    CHECK_MSG(memcmp(&m, &x[want], sizeof m) == 0, "%s argmax n %lld kind %d: max %g, want %g",
                              fm_cpu_level_name(lv), (long long)n, kind, m, x[want]);
                cases++;
            }
        }
    }
    CHECK(cases >= 70);
    free(x);
}
