#include "quant/quant.h"

#include <math.h>
#include <string.h>

#include "util/error.h"
#include "util/half.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "quant.c reads and writes little-endian words with memcpy: a big-endian port must swap bytes"
#endif

#define FM_QUANT_MAX_GROUP 128

/* MSE search (see mse_search): STEPS shrinks of STEP * (max - min) on each side (up to half the
 * range), then up to LLOYD refit iterations. Chosen on Gaussian / Laplace / Student-t data for
 * about 90% of the gain of an exhaustive 21x21 joint grid with 4 refits, at about 20x its speed. */
#define FM_QUANT_MSE_STEPS 20
#define FM_QUANT_MSE_STEP 0.025f
#define FM_QUANT_MSE_LLOYD 8

bool fm_dtype_is_quant(fm_dtype t) { return t == FM_DTYPE_Q8 || t == FM_DTYPE_Q4 || t == FM_DTYPE_Q2; }

int fm_quant_bits(fm_dtype t) {
    switch (t) {
    case FM_DTYPE_Q8: return 8;
    case FM_DTYPE_Q4: return 4;
    case FM_DTYPE_Q2: return 2;
    default: return 0;
    }
}

fm_dtype fm_quant_type_for_bits(int bits) {
    switch (bits) {
    case 8: return FM_DTYPE_Q8;
    case 4: return FM_DTYPE_Q4;
    case 2: return FM_DTYPE_Q2;
    default: return FM_DTYPE_UNKNOWN;
    }
}

static bool group_size_ok(int g) { return g == 32 || g == 64 || g == 128; }

/* bytes of one scale / bias; 0 for an unsupported scale type */
static size_t scale_size(fm_dtype sd) {
    switch (sd) {
    case FM_DTYPE_BF16:
    case FM_DTYPE_F16: return 2;
    case FM_DTYPE_F32: return 4;
    default: return 0;
    }
}

uint64_t fm_quant_nbytes(fm_dtype t, int64_t rows, int64_t cols, int group_size, fm_dtype scale_dtype) {
    int bits = fm_quant_bits(t);
    size_t ss = scale_size(scale_dtype);
    if (!bits || !ss || !group_size_ok(group_size) || rows < 0 || cols <= 0 || cols % group_size) return 0;
    if (cols > INT64_MAX / 8) return 0;
    /* per row: cols*bits/8 bytes of words + 2 * groups * ss; cols/4 + cols/16 < 2^61: no overflow */
    uint64_t per_row = (uint64_t)cols * (uint64_t)bits / 8 + 2 * (uint64_t)(cols / group_size) * ss;
    if (rows && per_row > (uint64_t)INT64_MAX / (uint64_t)rows) return 0;
    return per_row * (uint64_t)rows;
}

void fm_quant_part_offsets(const fm_weight *w, int64_t *scale_off, int64_t *bias_off) {
    *scale_off = w->rows * w->cols * fm_quant_bits(w->dtype) / 8;
    *bias_off = *scale_off + w->rows * (w->cols / w->group_size) * (int64_t)scale_size(w->scale_dtype);
}

fm_status fm_quant_check(const char *what, fm_dtype t, int64_t cols, int group_size, fm_dtype scale_dtype) {
    if (!what) what = "matrix";
    if (!fm_dtype_is_quant(t))
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s: type %s is not a quantized type (Q8, Q4, Q2)", what,
                            fm_dtype_name(t));
    if (!group_size_ok(group_size))
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s: group size %d is not supported (32, 64 or 128)", what,
                            group_size);
    if (!scale_size(scale_dtype))
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s: scale type %s is not supported (BF16, F16 or F32)", what,
                            fm_dtype_name(scale_dtype));
    if (cols <= 0 || cols % group_size)
        return fm_error_set(FM_ERR_FORMAT, "%s: %lld columns is not a positive multiple of the group size %d",
                            what, (long long)cols, group_size);
    return FM_OK;
}

/* ---- scales and biases ---- */

static inline float load_sb(const unsigned char *p, fm_dtype sd, int64_t i) {
    if (sd == FM_DTYPE_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return sd == FM_DTYPE_BF16 ? fm_bf16_to_f32(h) : fm_f16_to_f32(h);
}

/* v rounded (to nearest even) to the scale type, as float32 */
static inline float round_sb(fm_dtype sd, float v) {
    if (sd == FM_DTYPE_BF16) return fm_bf16_to_f32(fm_f32_to_bf16(v));
    if (sd == FM_DTYPE_F16) return fm_f16_to_f32(fm_f32_to_f16(v));
    return v;
}

/* stores v (already representable in sd) */
static inline void store_sb(unsigned char *p, fm_dtype sd, int64_t i, float v) {
    if (sd == FM_DTYPE_F32) {
        memcpy(p + 4 * i, &v, 4);
        return;
    }
    uint16_t h = sd == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
    memcpy(p + 2 * i, &h, 2);
}

/* ---- dequantization ---- */

/* The format's value: fl(fl(q * s) + b). Kept in one place so that every path agrees. With
 * -std=c11 GCC and Clang do not contract this into a fused multiply-add (ISO C mode). */
static inline float deq1(int q, float s, float b) { return (float)q * s + b; }

/* cnt values of one group starting at the word at p (cnt <= group size) */
static inline __attribute__((always_inline)) void deq_span(float *o, const unsigned char *p, int64_t cnt, float s,
                                                           float b, const int bits) {
    const int per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1;
    int64_t k = 0;
    for (; k + per <= cnt; k += per, p += 4) {
        uint32_t u;
        memcpy(&u, p, 4);
        for (int e = 0; e < per; e++) o[k + e] = deq1((int)((u >> (e * bits)) & mask), s, b);
    }
    if (k < cnt) {
        uint32_t u;
        memcpy(&u, p, 4);
        for (int e = 0; k + e < cnt; e++) o[k + e] = deq1((int)((u >> (e * bits)) & mask), s, b);
    }
}

void fm_dequant_row(float *out, const fm_weight *w, int64_t row, int64_t col0, int64_t n) {
    const int bits = fm_quant_bits(w->dtype);
    const int64_t gs = w->group_size, gpr = w->cols / gs, row_bytes = w->cols * bits / 8;
    const fm_dtype sd = w->scale_dtype;
    const unsigned char *base = w->data;
    const unsigned char *sp = base + w->rows * row_bytes;          /* scales */
    const unsigned char *bp = sp + w->rows * gpr * (int64_t)scale_size(sd); /* biases */
    const unsigned char *p = base + row * row_bytes + col0 * bits / 8;
    const int64_t group_bytes = gs * bits / 8;
    int64_t g = row * gpr + col0 / gs;
    for (int64_t done = 0; done < n; done += gs, g++, p += group_bytes) {
        int64_t cnt = n - done < gs ? n - done : gs;
        float s = load_sb(sp, sd, g), b = load_sb(bp, sd, g);
        switch (bits) {
        case 8: deq_span(out + done, p, cnt, s, b, 8); break;
        case 4: deq_span(out + done, p, cnt, s, b, 4); break;
        default: deq_span(out + done, p, cnt, s, b, 2); break;
        }
    }
}

double fm_quant_sq_error(const float *w, const fm_weight *q) {
    float buf[FM_QUANT_MAX_GROUP];
    const int64_t gs = q->group_size;
    double e = 0;
    for (int64_t r = 0; r < q->rows; r++)
        for (int64_t c0 = 0; c0 < q->cols; c0 += gs) {
            fm_dequant_row(buf, q, r, c0, gs);
            const float *x = w + r * q->cols + c0;
            for (int64_t i = 0; i < gs; i++) {
                double d = (double)buf[i] - (double)x[i];
                e += d * d;
            }
        }
    return e;
}

/* ---- quantization of one group ---- */

typedef struct qparams {
    int bits, maxq, n; /* n: group size */
    fm_dtype sd;
} qparams;

/* For each value the q in [0, maxq] whose deq1(q, s, b) is nearest to it (s, b: stored values).
 * s <= 0 (a constant group, or a scale that rounded to zero) gives q = 0: every q then decodes to b. */
static void q_nearest(uint8_t *q, const float *x, int n, float s, float b, int maxq) {
    if (!(s > 0)) {
        memset(q, 0, (size_t)n);
        return;
    }
    for (int i = 0; i < n; i++) {
        float v = (x[i] - b) / s; /* not NaN: s > 0, x and b finite */
        if (!(v > 0)) v = 0;
        if (v > (float)maxq) v = (float)maxq;
        int k = (int)(v + 0.5f);
        /* the rounding above may be off by one step near midpoints; deq1 is monotone in q, so walk
         * while closer (distances in double: the difference of two floats is exact there) */
        const double xi = x[i];
        double d = fabs((double)deq1(k, s, b) - xi);
        while (k > 0 && fabs((double)deq1(k - 1, s, b) - xi) < d) d = fabs((double)deq1(--k, s, b) - xi);
        while (k < maxq && fabs((double)deq1(k + 1, s, b) - xi) < d) d = fabs((double)deq1(++k, s, b) - xi);
        q[i] = (uint8_t)k;
    }
}

/* squared error of the group as stored, in double, in column order (as fm_quant_sq_error) */
static double group_err(const float *x, const uint8_t *q, int n, float s, float b) {
    double e = 0;
    for (int i = 0; i < n; i++) {
        double d = (double)deq1(q[i], s, b) - (double)x[i];
        e += d * d;
    }
    return e;
}

/* Search pass for one candidate (s, b): rounds every value to the nearest step (fast, float,
 * without the exact neighbour check) and returns the float32 squared error; if sums is not NULL
 * also the least-squares sums {sum q, sum q^2, sum q*x} for a refit. n is a multiple of 8. */
static float search_pass(const float *x, int n, float s, float b, float maxq, double *sums) {
    float inv = 1.0f / s;
    float acc[8] = {0}, aq[8] = {0}, aqq[8] = {0}, aqx[8] = {0};
    for (int i = 0; i < n; i += 8)
        for (int l = 0; l < 8; l++) {
            float v = (x[i + l] - b) * inv;
            v = v > 0 ? v : 0;
            v = v < maxq ? v : maxq;
            float qf = (float)(int)(v + 0.5f);
            float d = qf * s + b - x[i + l];
            acc[l] += d * d;
            aq[l] += qf;
            aqq[l] += qf * qf;
            aqx[l] += qf * x[i + l];
        }
    float e = 0;
    double sq = 0, sqq = 0, sqx = 0;
    for (int l = 0; l < 8; l++) {
        e += acc[l];
        sq += aq[l]; /* sums of integers below 2^24: exact */
        sqq += aqq[l];
        sqx += aqx[l];
    }
    if (sums) {
        sums[0] = sq;
        sums[1] = sqq;
        sums[2] = sqx;
    }
    return e;
}

/* s, b usable as a candidate: positive finite step, and every q decodes to a finite value */
static bool sb_ok(float s, float b, int maxq) {
    return s > 0 && isfinite(s) && isfinite(b) && isfinite(deq1(maxq, s, b));
}

/* MSE search state for one group */
typedef struct mse_state {
    const qparams *P;
    const float *x;
    double sum_x;
    float best_e, best_s, best_b;
} mse_state;

static void mse_try_sb(mse_state *S, float s, float b, double *sums) {
    float e = search_pass(S->x, S->P->n, s, b, (float)S->P->maxq, sums);
    if (e < S->best_e) {
        S->best_e = e;
        S->best_s = s;
        S->best_b = b;
    }
}

/* Candidate range [lo, hi]: s, b rounded to the storage type; then `refit` times a least-squares
 * refit of (s, b) for the q the last one gave (minimise sum (q s + b - x)^2), rounded too. */
static void mse_try(mse_state *S, float lo, float hi, int refit) {
    const qparams *P = S->P;
    if (!(hi > lo)) return;
    float s = round_sb(P->sd, (hi - lo) / (float)P->maxq), b = round_sb(P->sd, lo);
    if (!sb_ok(s, b, P->maxq)) return;
    double sums[3];
    mse_try_sb(S, s, b, sums);
    const double n = P->n;
    for (int it = 0; it < refit; it++) {
        double det = n * sums[1] - sums[0] * sums[0];
        if (!(det > 0)) return;
        double s2 = (n * sums[2] - sums[0] * S->sum_x) / det, b2 = (S->sum_x - s2 * sums[0]) / n;
        float rs = round_sb(P->sd, (float)s2), rb = round_sb(P->sd, (float)b2);
        if (!sb_ok(rs, rb, P->maxq)) return;
        mse_try_sb(S, rs, rb, sums);
    }
}

/* One Lloyd step from the best candidate so far: the q it gives, then (s, b) refitted to them.
 * Returns whether the candidate improved. */
static bool mse_lloyd_step(mse_state *S) {
    double sums[3];
    float e0 = S->best_e;
    search_pass(S->x, S->P->n, S->best_s, S->best_b, (float)S->P->maxq, sums);
    const double n = S->P->n, det = n * sums[1] - sums[0] * sums[0];
    if (!(det > 0)) return false;
    double s2 = (n * sums[2] - sums[0] * S->sum_x) / det, b2 = (S->sum_x - s2 * sums[0]) / n;
    float rs = round_sb(S->P->sd, (float)s2), rb = round_sb(S->P->sd, (float)b2);
    if (!sb_ok(rs, rb, S->P->maxq)) return false;
    mse_try_sb(S, rs, rb, NULL);
    return S->best_e < e0;
}

/* MSE search over clipping ranges (s_io, b_io: the RTN values on entry, the best found on exit).
 * With r = max - min and d = r * FM_QUANT_MSE_STEP:
 *   1. hi = max - j*d for j = 0..STEPS with lo = min, each candidate refitted once;
 *   2. lo = min + i*d for i = 1..STEPS with the best j of step 1, each refitted once;
 *   3. up to FM_QUANT_MSE_LLOYD alternations (q for the best s, b; then s, b for those q).
 * Errors here are float32 sums of the fast rounding (search_pass); the caller then compares the
 * winner exactly against RTN, so the choice can only lower the stored group's error. */
static void mse_search(const qparams *P, const float *x, float mn, float mx, double sum_x, float *s_io, float *b_io) {
    mse_state S = {P, x, sum_x, 0, *s_io, *b_io};
    S.best_e = search_pass(x, P->n, S.best_s, S.best_b, (float)P->maxq, NULL);
    const float d = (mx - mn) * FM_QUANT_MSE_STEP;
    int best_j = 0;
    for (int j = 0; j <= FM_QUANT_MSE_STEPS; j++) {
        float e0 = S.best_e;
        mse_try(&S, mn, mx - (float)j * d, 1);
        if (S.best_e < e0) best_j = j;
    }
    for (int i = 1; i <= FM_QUANT_MSE_STEPS; i++) mse_try(&S, mn + (float)i * d, mx - (float)best_j * d, 1);
    for (int it = 0; it < FM_QUANT_MSE_LLOYD; it++)
        if (!mse_lloyd_step(&S)) break;
    *s_io = S.best_s;
    *b_io = S.best_b;
}

/* Quantizes one group: q (n values), stored s and b. Returns FM_OK or an error naming (row, col0). */
static fm_status quant_group(const qparams *P, fm_quant_method method, const float *x, int64_t row, int64_t col0,
                             uint8_t *q, float *s_out, float *b_out) {
    float mn = x[0], mx = x[0];
    double sum_x = 0;
    for (int i = 0; i < P->n; i++) {
        if (!isfinite(x[i]))
            return fm_error_set(FM_ERR_FORMAT, "non-finite weight at row %lld col %lld", (long long)row,
                                (long long)(col0 + i));
        mn = x[i] < mn ? x[i] : mn;
        mx = x[i] > mx ? x[i] : mx;
        sum_x += x[i];
    }
    /* RTN, the MLX formula, with s and b rounded to the storage type before q is chosen */
    float s = round_sb(P->sd, (float)(((double)mx - (double)mn) / P->maxq));
    float b = round_sb(P->sd, mn);
    if (!isfinite(s) || !isfinite(b) || !isfinite(deq1(P->maxq, s, b)))
        return fm_error_set(FM_ERR_UNSUPPORTED,
                            "weights in [%g, %g] at row %lld cols %lld..%lld do not fit %s scales/biases",
                            (double)mn, (double)mx, (long long)row, (long long)col0, (long long)(col0 + P->n - 1),
                            fm_dtype_name(P->sd));
    q_nearest(q, x, P->n, s, b, P->maxq);
    if (method == FM_QUANT_MSE && s > 0) {
        float ms = s, mb = b;
        mse_search(P, x, mn, mx, sum_x, &ms, &mb);
        if (ms != s || mb != b) {
            uint8_t q2[FM_QUANT_MAX_GROUP];
            q_nearest(q2, x, P->n, ms, mb, P->maxq);
            /* exact comparison with the RTN candidate in the metric of fm_quant_sq_error */
            if (group_err(x, q2, P->n, ms, mb) < group_err(x, q, P->n, s, b)) {
                memcpy(q, q2, (size_t)P->n);
                s = ms;
                b = mb;
            }
        }
    }
    *s_out = s;
    *b_out = b;
    return FM_OK;
}

fm_status fm_quantize_rows(const float *w, int64_t rows, int64_t cols, fm_dtype t, int group_size,
                           fm_dtype scale_dtype, fm_quant_method method, int64_t row0, int64_t row1, void *out) {
    fm_status st = fm_quant_check(NULL, t, cols, group_size, scale_dtype);
    if (st != FM_OK) return st;
    if (rows < 0 || row0 < 0 || row1 < row0 || row1 > rows)
        return fm_error_set(FM_ERR_ARG, "quantize: rows [%lld, %lld) outside a matrix of %lld rows", (long long)row0,
                            (long long)row1, (long long)rows);
    if (method != FM_QUANT_RTN && method != FM_QUANT_MSE)
        return fm_error_set(FM_ERR_ARG, "quantize: unknown method %d", (int)method);
    if (fm_quant_nbytes(t, rows, cols, group_size, scale_dtype) == 0 && rows > 0)
        return fm_error_set(FM_ERR_ARG, "quantize: a [%lld, %lld] matrix is too large", (long long)rows,
                            (long long)cols);
    const qparams P = {fm_quant_bits(t), (1 << fm_quant_bits(t)) - 1, group_size, scale_dtype};
    const int bits = P.bits, per = 32 / bits;
    const int64_t gpr = cols / group_size, row_bytes = cols * bits / 8;
    const size_t ss = scale_size(scale_dtype);
    unsigned char *base = out;
    unsigned char *sp = base + rows * row_bytes, *bp = sp + rows * gpr * (int64_t)ss;
    uint8_t q[FM_QUANT_MAX_GROUP];
    for (int64_t r = row0; r < row1; r++)
        for (int64_t g = 0; g < gpr; g++) {
            float s = 0, b = 0;
            st = quant_group(&P, method, w + r * cols + g * group_size, r, g * group_size, q, &s, &b);
            if (st != FM_OK) return st;
            unsigned char *p = base + r * row_bytes + g * group_size * bits / 8;
            for (int k = 0; k < group_size / per; k++) {
                uint32_t u = 0;
                for (int e = 0; e < per; e++) u |= (uint32_t)q[k * per + e] << (e * bits);
                memcpy(p + 4 * k, &u, 4);
            }
            store_sb(sp, scale_dtype, r * gpr + g, s);
            store_sb(bp, scale_dtype, r * gpr + g, b);
        }
    return FM_OK;
}

fm_status fm_quantize(const float *w, int64_t rows, int64_t cols, fm_dtype t, int group_size, fm_dtype scale_dtype,
                      fm_quant_method method, void *out) {
    return fm_quantize_rows(w, rows, cols, t, group_size, scale_dtype, method, 0, rows, out);
}
