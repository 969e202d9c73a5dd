/* Token-mixer kernels: scalar references and AVX-512 / AVX2 versions (mixer_kernels.h). The SIMD
 * functions carry their own target attributes, so this file needs no special compiler flags and
 * the dispatch only calls them on CPUs that have the instructions. */
#include "backend/cpu/mixer_kernels.h"

#include <immintrin.h>
#include <math.h>

/* ------------------------------------------------------------------------ scalar references */

/* Columns of S are independent: the rule runs on blocks of at most 128 columns (no scratch
 * beyond the stack), with the same order of operations as the unblocked form. */
static void delta_ref(float *S, int64_t dk, int64_t dv, const float *k, const float *q, const float *v, float decay,
                      float beta, float *o) {
    float d[128];
    for (int64_t j0 = 0; j0 < dv; j0 += 128) {
        int64_t nb = dv - j0 < 128 ? dv - j0 : 128;
        for (int64_t j = 0; j < nb; j++) d[j] = 0;
        for (int64_t i = 0; i < dk; i++) {
            float *Si = S + i * dv + j0;
            for (int64_t j = 0; j < nb; j++) {
                Si[j] *= decay;
                d[j] += Si[j] * k[i];
            }
        }
        for (int64_t j = 0; j < nb; j++) d[j] = beta * (v[j0 + j] - d[j]);
        float *oj = o + j0;
        for (int64_t j = 0; j < nb; j++) oj[j] = 0;
        for (int64_t i = 0; i < dk; i++) {
            float *Si = S + i * dv + j0;
            for (int64_t j = 0; j < nb; j++) {
                Si[j] += k[i] * d[j];
                oj[j] += Si[j] * q[i];
            }
        }
    }
}

static float dot_ref(const float *a, const float *b, int64_t n) {
    float s = 0;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void scale_axpy_ref(float *y, float s, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = y[i] * s + a * x[i];
}

static int64_t argmax_ref(const float *x, int64_t n, float *max_out) {
    if (n < 1) return -1;
    int64_t best = 0;
    for (int64_t i = 0; i < n; i++) {
        if (x[i] != x[i]) return -1;
        if (x[i] > x[best]) best = i;
    }
    *max_out = x[best];
    return best;
}

/* ------------------------------------------------------------------------ AVX-512 */

#define AVX512_TARGET __attribute__((target("avx512f,fma")))
#define AVX2_TARGET __attribute__((target("avx2,fma")))

/* One block of nv <= 8 vectors of 16 columns; the last vector masked by `tail`. */
AVX512_TARGET static inline void delta_block_avx512(float *S, int64_t dk, int64_t dv, const float *k, const float *q,
                                                    const float *v, float decay, float beta, float *o, int nv,
                                                    __mmask16 tail) {
    __m512 acc[8], d[8];
    __m512 vdec = _mm512_set1_ps(decay), vbeta = _mm512_set1_ps(beta);
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++) acc[u] = d[u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < dk; i++) {
        float *Si = S + i * dv;
        __m512 ki = _mm512_set1_ps(k[i]);
#pragma GCC unroll 8
        for (int u = 0; u < 8; u++) {
            if (u >= nv) break;
            __mmask16 m = u == nv - 1 ? tail : (__mmask16)0xffff;
            __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, Si + 16 * u), vdec);
            _mm512_mask_storeu_ps(Si + 16 * u, m, s);
            acc[u] = _mm512_fmadd_ps(s, ki, acc[u]);
        }
    }
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
        if (u >= nv) break;
        __mmask16 m = u == nv - 1 ? tail : (__mmask16)0xffff;
        d[u] = _mm512_mul_ps(vbeta, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + 16 * u), acc[u]));
        acc[u] = _mm512_setzero_ps(); /* now o */
    }
    for (int64_t i = 0; i < dk; i++) {
        float *Si = S + i * dv;
        __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
#pragma GCC unroll 8
        for (int u = 0; u < 8; u++) {
            if (u >= nv) break;
            __mmask16 m = u == nv - 1 ? tail : (__mmask16)0xffff;
            __m512 s = _mm512_fmadd_ps(ki, d[u], _mm512_maskz_loadu_ps(m, Si + 16 * u));
            _mm512_mask_storeu_ps(Si + 16 * u, m, s);
            acc[u] = _mm512_fmadd_ps(s, qi, acc[u]);
        }
    }
#pragma GCC unroll 8
    for (int u = 0; u < 8; u++) {
        if (u >= nv) break;
        __mmask16 m = u == nv - 1 ? tail : (__mmask16)0xffff;
        _mm512_mask_storeu_ps(o + 16 * u, m, acc[u]);
    }
}

AVX512_TARGET static void delta_avx512(float *S, int64_t dk, int64_t dv, const float *k, const float *q, const float *v,
                                       float decay, float beta, float *o) {
    for (int64_t j0 = 0; j0 < dv; j0 += 128) {
        int64_t nb = dv - j0 < 128 ? dv - j0 : 128;
        int nv = (int)((nb + 15) / 16);
        int rem = (int)(nb - 16 * (nv - 1));
        __mmask16 tail = (__mmask16)(rem == 16 ? 0xffff : (1u << rem) - 1);
        if (nv == 8 && rem == 16)
            delta_block_avx512(S + j0, dk, dv, k, q, v + j0, decay, beta, o + j0, 8, 0xffff); /* constant nv: registers */
        else
            delta_block_avx512(S + j0, dk, dv, k, q, v + j0, decay, beta, o + j0, nv, tail);
    }
}

AVX512_TARGET static float dot_avx512(const float *a, const float *b, int64_t n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

AVX512_TARGET static void scale_axpy_avx512(float *y, float s, float a, const float *x, int64_t n) {
    __m512 vs = _mm512_set1_ps(s), va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 r = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + i), vs));
        _mm512_mask_storeu_ps(y + i, m, r);
    }
}

/* ------------------------------------------------------------------------ AVX2 */

/* Blocks of 32 columns (4 vectors of 8; 16 registers); a partial block falls back to the
 * reference for its columns (same math). */
AVX2_TARGET static void delta_avx2(float *S, int64_t dk, int64_t dv, const float *k, const float *q, const float *v,
                                   float decay, float beta, float *o) {
    int64_t j0 = 0;
    __m256 vdec = _mm256_set1_ps(decay), vbeta = _mm256_set1_ps(beta);
    for (; j0 + 32 <= dv; j0 += 32) {
        __m256 acc[4], d[4];
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) acc[u] = _mm256_setzero_ps();
        for (int64_t i = 0; i < dk; i++) {
            float *Si = S + i * dv + j0;
            __m256 ki = _mm256_set1_ps(k[i]);
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                __m256 s = _mm256_mul_ps(_mm256_loadu_ps(Si + 8 * u), vdec);
                _mm256_storeu_ps(Si + 8 * u, s);
                acc[u] = _mm256_fmadd_ps(s, ki, acc[u]);
            }
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            d[u] = _mm256_mul_ps(vbeta, _mm256_sub_ps(_mm256_loadu_ps(v + j0 + 8 * u), acc[u]));
            acc[u] = _mm256_setzero_ps();
        }
        for (int64_t i = 0; i < dk; i++) {
            float *Si = S + i * dv + j0;
            __m256 ki = _mm256_set1_ps(k[i]), qi = _mm256_set1_ps(q[i]);
#pragma GCC unroll 4
            for (int u = 0; u < 4; u++) {
                __m256 s = _mm256_fmadd_ps(ki, d[u], _mm256_loadu_ps(Si + 8 * u));
                _mm256_storeu_ps(Si + 8 * u, s);
                acc[u] = _mm256_fmadd_ps(s, qi, acc[u]);
            }
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(o + j0 + 8 * u, acc[u]);
    }
    if (j0 < dv) { /* the remaining columns, as a narrower state */
        float d[32];
        int64_t nb = dv - j0;
        for (int64_t j = 0; j < nb; j++) d[j] = 0;
        for (int64_t i = 0; i < dk; i++) {
            float *Si = S + i * dv + j0;
            for (int64_t j = 0; j < nb; j++) {
                Si[j] *= decay;
                d[j] += Si[j] * k[i];
            }
        }
        for (int64_t j = 0; j < nb; j++) d[j] = beta * (v[j0 + j] - d[j]), o[j0 + j] = 0;
        for (int64_t i = 0; i < dk; i++) {
            float *Si = S + i * dv + j0;
            for (int64_t j = 0; j < nb; j++) {
                Si[j] += k[i] * d[j];
                o[j0 + j] += Si[j] * q[i];
            }
        }
    }
}

AVX2_TARGET static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AVX2_TARGET static void scale_axpy_avx2(float *y, float s, float a, const float *x, int64_t n) {
    __m256 vs = _mm256_set1_ps(s), va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_mul_ps(_mm256_loadu_ps(y + i), vs)));
    for (; i < n; i++) y[i] = y[i] * s + a * x[i];
}

/* Two passes: the largest value (and whether any is NaN) over 32 floats a step, then the first
 * index holding it. A row of logits (1 MB) stays in cache between the passes. */
AVX2_TARGET static int64_t argmax_avx2(const float *x, int64_t n, float *max_out) {
    if (n < 32) return argmax_ref(x, n, max_out);
    __m256 m[4], nan = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int u = 0; u < 4; u++) m[u] = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * u);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            m[u] = _mm256_max_ps(m[u], v);
        }
    }
    if (_mm256_movemask_ps(nan)) return -1;
    __m256 mm = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
    float lanes[8];
    _mm256_storeu_ps(lanes, mm);
    float best = lanes[0];
    for (int u = 1; u < 8; u++) best = lanes[u] > best ? lanes[u] : best;
    for (; i < n; i++) {
        if (x[i] != x[i]) return -1;
        if (x[i] > best) best = x[i];
    }
    const __m256 vb = _mm256_set1_ps(best);
    for (i = 0; i + 8 <= n; i += 8) {
        int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vb, _CMP_EQ_OQ));
        if (hit) {
            i += __builtin_ctz((unsigned)hit);
            break;
        }
    }
    while (x[i] != best) i++; /* the tail; found above, x[i] == best already */
    *max_out = x[i];           /* x's own zero, where best is -0 or +0 */
    return i;
}

/* ------------------------------------------------------------------------ dispatch */

static fm_cpu_level usable(fm_cpu_level level) {
    while (level > FM_CPU_SCALAR && !fm_cpu_level_supported(level)) level = (fm_cpu_level)(level - 1);
    return level;
}

void fm_cpu_delta_rule_token_at(fm_cpu_level level, float *S, int64_t dk, int64_t dv, const float *k, const float *q,
                                const float *v, float decay, float beta, float *o) {
    switch (usable(level)) {
    case FM_CPU_AVX512: delta_avx512(S, dk, dv, k, q, v, decay, beta, o); break;
    case FM_CPU_AVX2: delta_avx2(S, dk, dv, k, q, v, decay, beta, o); break;
    default: delta_ref(S, dk, dv, k, q, v, decay, beta, o); break;
    }
}

void fm_cpu_delta_rule_token(float *S, int64_t dk, int64_t dv, const float *k, const float *q, const float *v,
                             float decay, float beta, float *o) {
    fm_cpu_delta_rule_token_at(fm_cpu_matmul_level(), S, dk, dv, k, q, v, decay, beta, o);
}

float fm_cpu_dot_at(fm_cpu_level level, const float *a, const float *b, int64_t n) {
    switch (usable(level)) {
    case FM_CPU_AVX512: return dot_avx512(a, b, n);
    case FM_CPU_AVX2: return dot_avx2(a, b, n);
    default: return dot_ref(a, b, n);
    }
}

float fm_cpu_dot(const float *a, const float *b, int64_t n) { return fm_cpu_dot_at(fm_cpu_matmul_level(), a, b, n); }

void fm_cpu_scale_axpy_at(fm_cpu_level level, float *y, float s, float a, const float *x, int64_t n) {
    switch (usable(level)) {
    case FM_CPU_AVX512: scale_axpy_avx512(y, s, a, x, n); break;
    case FM_CPU_AVX2: scale_axpy_avx2(y, s, a, x, n); break;
    default: scale_axpy_ref(y, s, a, x, n); break;
    }
}

void fm_cpu_scale_axpy(float *y, float s, float a, const float *x, int64_t n) {
    fm_cpu_scale_axpy_at(fm_cpu_matmul_level(), y, s, a, x, n);
}

int64_t fm_cpu_argmax_at(fm_cpu_level level, const float *x, int64_t n, float *max_out) {
    return usable(level) >= FM_CPU_AVX2 ? argmax_avx2(x, n, max_out) : argmax_ref(x, n, max_out);
}

int64_t fm_cpu_argmax(const float *x, int64_t n, float *max_out) {
    return fm_cpu_argmax_at(fm_cpu_matmul_level(), x, n, max_out);
}
