#include "backend/cpu/ops.h"

#include <stdlib.h>
#include <string.h>

#include "quant/quant.h"
#include "util/half.h"

void fm_cpu_get_row(float *out, const fm_weight *w, int64_t row) {
    int64_t n = w->cols;
    switch (w->dtype) {
    case FM_DTYPE_F32: memcpy(out, (const float *)w->data + row * n, sizeof(float) * (size_t)n); break;
    case FM_DTYPE_BF16: {
        const uint16_t *p = (const uint16_t *)w->data + row * n;
        for (int64_t i = 0; i < n; i++) out[i] = fm_bf16_to_f32(p[i]);
        break;
    }
    case FM_DTYPE_F16: {
        const uint16_t *p = (const uint16_t *)w->data + row * n;
        for (int64_t i = 0; i < n; i++) out[i] = fm_f16_to_f32(p[i]);
        break;
    }
    case FM_DTYPE_Q8:
    case FM_DTYPE_Q4:
    case FM_DTYPE_Q2: fm_dequant_row(out, w, row, 0, n); break;
    default: /* the loaders reject every other dtype before a weight reaches a kernel */
        memset(out, 0, sizeof(float) * (size_t)n);
        break;
    }
}

static float dot_f32(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

typedef struct matmul_job {
    float *out;
    const float *x;
    int64_t n_tokens;
    const fm_weight *w;
} matmul_job;

#define MATMUL_SEG 2048 /* columns converted at a time into a stack buffer; a multiple of 128 */

static void matmul_rows(void *arg, int64_t r0, int64_t r1) {
    const matmul_job *j = arg;
    int64_t K = j->w->cols, N = j->w->rows;
    if (j->w->dtype == FM_DTYPE_F32) {
        for (int64_t r = r0; r < r1; r++) {
            const float *row = (const float *)j->w->data + r * K;
            for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * N + r] = dot_f32(row, j->x + t * K, K);
        }
        return;
    }
    float seg[MATMUL_SEG];
    const bool quant = fm_dtype_is_quant(j->w->dtype);
    fm_weight part = *j->w; /* a view of one row segment, converted through fm_cpu_get_row */
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * N + r] = 0;
        for (int64_t c0 = 0; c0 < K; c0 += MATMUL_SEG) {
            int64_t n = K - c0 < MATMUL_SEG ? K - c0 : MATMUL_SEG;
            if (quant) { /* c0 is a multiple of MATMUL_SEG, hence of the group size */
                fm_dequant_row(seg, j->w, r, c0, n);
            } else {
                part.cols = n;
                part.data = (const char *)j->w->data + (r * K + c0) * (int64_t)fm_dtype_size(j->w->dtype);
                fm_cpu_get_row(seg, &part, 0);
            }
            for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * N + r] += dot_f32(seg, j->x + t * K + c0, n);
        }
    }
}

void fm_cpu_matmul(fm_pool *pool, float *out, const float *x, int64_t n_tokens, const fm_weight *w) {
    matmul_job j = {out, x, n_tokens, w};
    /* enough rows per chunk that a thread's work outweighs waking it */
    int64_t min_rows = (int64_t)(16384 / (w->cols * n_tokens + 1)) + 1;
    fm_pool_run(pool, matmul_rows, &j, w->rows, min_rows);
}

void fm_cpu_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * (w ? w[i] : 1.0f);
}

void fm_cpu_rope_neox(float *x, int rot_dim, int64_t pos, double theta) {
    int half = rot_dim / 2;
    for (int i = 0; i < half; i++) {
        /* as transformers: inv_freq in float32, angle = pos * inv_freq in float32 */
        float inv_freq = (float)(1.0 / pow(theta, (double)(2 * i) / (double)rot_dim));
        float f = (float)pos * inv_freq;
        float c = cosf(f), s = sinf(f);
        float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}
