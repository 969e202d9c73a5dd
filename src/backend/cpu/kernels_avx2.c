/* AVX2 + FMA + F16C matmul kernels; compiled with -mavx2 -mfma -mf16c and only entered after the
 * dispatcher (ops.c) has checked the CPU. Layouts, the prepared activations and the FMA form:
 * kernels.h. The structure is that of kernels_avx512.c with 8 lanes and 16 registers:
 *
 * One token: quantized rows 2 at a time (per block, two FMA chains per row for sum_e q_e xp_e, then
 * one FMA with the lanes' scales), float rows 4 at a time.
 * Several tokens: rows 2 at a time, each KSEG-column segment dequantized once into an L1 buffer as
 * the oracle's float32 weights, then tiles of 5 tokens with 2 x 5 accumulators.
 *
 * AVX2 has no byte- or half-masked loads: a block that runs past the row end is read through a
 * zeroed copy. */
#include "backend/cpu/kernels.h"

#include <immintrin.h>

#include "util/half.h"

#define L FM_KERN_AVX2_LANES
#define SEG 8192         /* one token: columns per scale segment (a multiple of every block and group) */
#define SEG_G (SEG / 32) /* groups per segment, at most */
#define KSEG 1024        /* several tokens: columns per dequantized segment (likewise a multiple) */
#define R1Q 2            /* rows per tile, one token, quantized */
#define R1F 4            /* rows per tile, one token, float types */
#define RN 2             /* rows per tile, several tokens */
#define TTN 5            /* tokens per tile */
#define RMAX 4
#define AI inline __attribute__((always_inline))

enum { KIND_F32, KIND_F16, KIND_BF16, KIND_Q8, KIND_Q4, KIND_Q2 };

static AI int kind_bits(const int kind) {
    return kind == KIND_Q8 ? 8 : kind == KIND_Q4 ? 4 : kind == KIND_Q2 ? 2 : kind == KIND_BF16 ? 16 : 32;
}
static AI int kind_quant(const int kind) { return kind >= KIND_Q8; }
static AI int kind_direct(const int kind) { return kind == KIND_F32 || kind == KIND_F16; }

static AI float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static AI __m256 loadu_ps(const float *p) { return _mm256_loadu_ps(p); }
static AI __m256i loadu_si(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* Converts n scales (or biases) of type sd starting at element i of p into out[0, n), and zeroes
 * out[n, n + 8). */
static void load_sb(float *out, const unsigned char *p, fm_dtype sd, int64_t i, int64_t n) {
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 v;
        if (sd == FM_DTYPE_F32) v = _mm256_loadu_ps((const float *)(const void *)(p + 4 * (i + k)));
        else {
            __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(p + 2 * (i + k)));
            v = sd == FM_DTYPE_F16 ? _mm256_cvtph_ps(h)
                                   : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        _mm256_storeu_ps(out + k, v);
    }
    for (; k < n; k++) {
        if (sd == FM_DTYPE_F32) memcpy(out + k, p + 4 * (i + k), 4);
        else {
            uint16_t h;
            memcpy(&h, p + 2 * (i + k), 2);
            out[k] = sd == FM_DTYPE_F16 ? fm_f16_to_f32(h) : fm_bf16_to_f32(h);
        }
    }
    _mm256_storeu_ps(out + n, _mm256_setzero_ps());
}

static float dot_n(const float *a, const float *b, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    float r = hsum(s);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

typedef struct geom {
    const unsigned char *base, *sp, *bp; /* data; quantized: scales, biases */
    int64_t K, N, row_bytes, G;          /* G: groups per row (quantized) */
    int gs, bits, V, B;                  /* B = L * V values per block */
    int gshift, wide;                    /* log2(gs); a block spans several groups (B > gs) */
    fm_dtype sd;
    __m256i sidx; /* quantized: lane -> group within a block's window of scales */
} geom;

static AI geom geom_of(const fm_weight *w, const int kind) {
    geom g = {.base = w->data, .K = w->cols, .N = w->rows, .bits = kind_bits(kind)};
    g.V = 32 / g.bits > 1 ? 32 / g.bits : 1;
    g.B = L * g.V;
    g.gs = 1 << 30;
    if (kind_quant(kind)) {
        g.gs = w->group_size; /* 32, 64 or 128 */
        g.sd = w->scale_dtype;
        g.row_bytes = g.K * g.bits / 8;
        g.G = g.K / g.gs;
        g.gshift = __builtin_ctz((unsigned)g.gs);
        g.wide = g.B > g.gs;
        g.sp = g.base + g.N * g.row_bytes;
        g.bp = g.sp + g.N * g.G * (g.sd == FM_DTYPE_F32 ? 4 : 2);
        int idx[8];
        for (int i = 0; i < 8; i++) idx[i] = i * g.V / g.gs;
        g.sidx = loadu_si(idx);
    } else {
        g.row_bytes = g.K * (kind == KIND_F32 ? 4 : 2);
    }
    return g;
}

static AI int64_t col_bytes(const geom *g, const int kind, int64_t c0) {
    return kind == KIND_F32 ? 4 * c0 : kind_quant(kind) ? c0 * g->bits / 8 : 2 * c0;
}

static AI int64_t units(const geom *g, const int kind, int64_t c0, int64_t n) {
    return kind == KIND_BF16 ? (c0 + n) / 2 - c0 / 2 : n / g->V;
}

/* bytes per unit: F16 2, otherwise 4 (a float or a u32 word) */
static AI int unit_bytes(const int kind) { return kind == KIND_F16 ? 2 : 4; }

static AI __m256 lane_sb(const geom *g, const float *buf, int64_t b) {
    const float *p = buf + ((b * g->B) >> g->gshift);
    return g->wide ? _mm256_permutevar8x32_ps(loadu_ps(p), g->sidx) : _mm256_set1_ps(*p);
}

static AI __m256 unpack_q(__m256i v, int e, const int bits, const int V) {
    __m256i qi = e == V - 1 ? _mm256_srli_epi32(v, bits * (V - 1))
                            : _mm256_and_si256(v, _mm256_set1_epi32((int)(((1u << bits) - 1) << (bits * e))));
    return _mm256_cvtepi32_ps(qi);
}

static AI __m256 unpack_bf16(__m256i v, int e) {
    return _mm256_castsi256_ps(e == 0 ? _mm256_slli_epi32(v, 16) : _mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* L units of block b of a row at p; `left` < L units when the block runs past the end */
static AI __m256i load_block(const unsigned char *p, int64_t b, int64_t left, const int ub, const int tail) {
    if (!tail) return loadu_si(p + (int64_t)ub * L * b);
    unsigned char tmp[32] = {0};
    memcpy(tmp, p + (int64_t)ub * L * b, (size_t)(ub * left));
    return loadu_si(tmp);
}

/* a float or F16 block as float32 */
static AI __m256 direct_w(const unsigned char *p, int64_t b, int64_t left, const int kind, const int tail) {
    if (kind == KIND_F32) return _mm256_castsi256_ps(load_block(p, b, left, 4, tail));
    const unsigned char *q = p + 16 * b;
    if (!tail) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)q));
    unsigned char tmp[16] = {0};
    memcpy(tmp, q, (size_t)(2 * left));
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)tmp));
}

/* L floats of x at p, `left` valid when tail */
static AI __m256 load_x(const float *p, int64_t left, const int tail) {
    if (!tail) return loadu_ps(p);
    float tmp[L] = {0};
    memcpy(tmp, p, sizeof(float) * (size_t)left);
    return loadu_ps(tmp);
}

static void bf16_odd_column(const fm_kern_job *j, const geom *g, int64_t r, int R) {
    for (int rho = 0; rho < R; rho++) {
        uint16_t h;
        memcpy(&h, g->base + (r + rho) * g->row_bytes + 2 * (g->K - 1), 2);
        const float wl = fm_bf16_to_f32(h);
        for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * g->N + r + rho] += wl * j->x[t * g->K + g->K - 1];
    }
}

/* ---- one token ---- */

/* Block b (L units) of R rows into acc; `tail`: the block runs past the segment end. */
static AI void t1_block(const geom *g, const unsigned char *const *wq, const float (*sbuf)[SEG_G + 8], const float *xt,
                        int64_t b, int64_t nu, const unsigned char *pf, __m256 *acc, const int kind, const int R,
                        const int tail) {
    const int V = g->V, B = g->B, bits = g->bits;
    const int64_t left = nu - b * L;
    /* the next row group's bytes, as many as this group reads per block (32 per row) */
    const int ub = kind == KIND_F16 ? 16 : 32;
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho += 64 / ub) _mm_prefetch((const char *)(pf + ub * (R * b + rho)), _MM_HINT_T0);
    if (kind_direct(kind)) {
        const __m256 xv = load_x(xt + b * L, left, tail);
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) acc[rho] = _mm256_fmadd_ps(direct_w(wq[rho], b, left, kind, tail), xv, acc[rho]);
        return;
    }
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++) {
        const __m256i v = load_block(wq[rho], b, left, 4, tail);
        if (kind == KIND_BF16) {
            acc[rho] = _mm256_fmadd_ps(unpack_bf16(v, 0), loadu_ps(xt + b * B), acc[rho]);
            acc[rho] = _mm256_fmadd_ps(unpack_bf16(v, 1), loadu_ps(xt + b * B + L), acc[rho]);
            continue;
        }
        __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();
#pragma GCC unroll 16
        for (int e = 0; e < V; e += 2) {
            p0 = _mm256_fmadd_ps(unpack_q(v, e, bits, V), loadu_ps(xt + b * B + e * L), p0);
            p1 = _mm256_fmadd_ps(unpack_q(v, e + 1, bits, V), loadu_ps(xt + b * B + (e + 1) * L), p1);
        }
        acc[rho] = _mm256_fmadd_ps(lane_sb(g, sbuf[rho], b), _mm256_add_ps(p0, p1), acc[rho]);
    }
}

static AI void t1_group(const fm_kern_job *j, const geom *g, int64_t r, const int kind, const int R) {
    float sbuf[RMAX][SEG_G + 8], bbuf[RMAX][SEG_G + 8];
    float total[RMAX] = {0};
    for (int64_t c0 = 0; c0 < g->K; c0 += SEG) {
        const int64_t n = g->K - c0 < SEG ? g->K - c0 : SEG, nu = units(g, kind, c0, n), full = nu / L;
        const unsigned char *wq[RMAX];
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) wq[rho] = g->base + (r + rho) * g->row_bytes + col_bytes(g, kind, c0);
        const unsigned char *pf = wq[0] + R * g->row_bytes; /* same columns, rows r + R .. */
        const float *xt = kind_direct(kind) ? j->x + c0 : j->xp + c0;
        int64_t ng = 0, g0 = 0;
        if (kind_quant(kind)) {
            ng = n >> g->gshift;
            g0 = c0 >> g->gshift;
#pragma GCC unroll 8
            for (int rho = 0; rho < R; rho++) {
                load_sb(sbuf[rho], g->sp, g->sd, (r + rho) * g->G + g0, ng);
                load_sb(bbuf[rho], g->bp, g->sd, (r + rho) * g->G + g0, ng);
            }
        }
        __m256 acc[RMAX];
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) acc[rho] = _mm256_setzero_ps();
        for (int64_t b = 0; b < full; b++) t1_block(g, wq, (const float(*)[SEG_G + 8])sbuf, xt, b, nu, pf, acc, kind, R, 0);
        if (full * L < nu) t1_block(g, wq, (const float(*)[SEG_G + 8])sbuf, xt, full, nu, pf, acc, kind, R, 1);
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) {
            total[rho] += hsum(acc[rho]);
            if (kind_quant(kind)) total[rho] += dot_n(bbuf[rho], j->xsum + g0, ng);
        }
    }
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++) j->out[r + rho] = total[rho];
    if (kind == KIND_BF16 && (g->K & 1)) bf16_odd_column(j, g, r, R);
}

/* ---- several tokens ---- */

/* Row `row`'s columns [c0, c0 + n) as float32 into dst: see kernels_avx512.c. */
static AI void dequant_seg(const geom *g, const int kind, int64_t row, int64_t c0, int64_t n, float *dst) {
    const unsigned char *p = g->base + row * g->row_bytes + col_bytes(g, kind, c0);
    const int64_t nu = units(g, kind, c0, n), nb = (nu + L - 1) / L;
    if (kind_direct(kind)) {
        for (int64_t b = 0; b < nb; b++) {
            const int64_t left = nu - b * L;
            _mm256_storeu_ps(dst + b * L, left >= L ? direct_w(p, b, left, kind, 0) : direct_w(p, b, left, kind, 1));
        }
        return;
    }
    const int V = g->V, B = g->B, bits = g->bits;
    float sbuf[KSEG / 32 + 8], bbuf[KSEG / 32 + 8];
    if (kind_quant(kind)) {
        load_sb(sbuf, g->sp, g->sd, row * g->G + (c0 >> g->gshift), n >> g->gshift);
        load_sb(bbuf, g->bp, g->sd, row * g->G + (c0 >> g->gshift), n >> g->gshift);
    }
    const __m256 step = _mm256_set1_ps((float)(1u << (bits < 16 ? bits : 0)));
    for (int64_t b = 0; b < nb; b++) {
        const int64_t left = nu - b * L;
        const __m256i v = left >= L ? load_block(p, b, left, 4, 0) : load_block(p, b, left, 4, 1);
        if (kind == KIND_BF16) {
            _mm256_storeu_ps(dst + b * B, unpack_bf16(v, 0));
            _mm256_storeu_ps(dst + b * B + L, unpack_bf16(v, 1));
            continue;
        }
        const __m256 S = lane_sb(g, sbuf, b), Bias = lane_sb(g, bbuf, b);
        __m256 Be = Bias; /* b * 2^(bits e), exact: fl(q 2^k s + b 2^k) = 2^k fl(q s + b) */
#pragma GCC unroll 16
        for (int e = 0; e < V; e++) {
            const __m256 be = e == V - 1 ? Bias : Be;
            _mm256_storeu_ps(dst + b * B + e * L, _mm256_fmadd_ps(unpack_q(v, e, bits, V), S, be));
            Be = _mm256_mul_ps(Be, step);
        }
    }
}

/* acc[rho][tt] += over nv vectors of w[rho] x[tt]; with xleft < L the last x vector is partial
 * (activations read in natural order end exactly at K). */
static AI void tn_tile(const fm_kern_job *j, const geom *g, const float *const *wrow, int64_t r, int64_t t0,
                       int64_t c0, int64_t nv, int64_t xleft, const int kind, const int R, const int TT) {
    const float *xt = kind_direct(kind) ? j->x + t0 * g->K + c0 : j->xp + t0 * j->xp_stride + c0;
    const int64_t xs = kind_direct(kind) ? g->K : j->xp_stride;
    const int64_t nfull = xleft < L ? nv - 1 : nv;
    __m256 acc[RN][TTN];
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++)
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) acc[rho][tt] = _mm256_setzero_ps();
    for (int64_t k = 0; k < nfull; k++) {
        __m256 wv[RN];
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) wv[rho] = loadu_ps(wrow[rho] + L * k);
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) {
            const __m256 xv = loadu_ps(xt + tt * xs + L * k);
#pragma GCC unroll 8
            for (int rho = 0; rho < R; rho++) acc[rho][tt] = _mm256_fmadd_ps(wv[rho], xv, acc[rho][tt]);
        }
    }
    if (nfull < nv) {
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) {
            const __m256 xv = load_x(xt + tt * xs + L * nfull, xleft, 1);
#pragma GCC unroll 8
            for (int rho = 0; rho < R; rho++) acc[rho][tt] = _mm256_fmadd_ps(loadu_ps(wrow[rho] + L * nfull), xv, acc[rho][tt]);
        }
    }
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++)
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) {
            const float d = hsum(acc[rho][tt]);
            float *o = j->out + (t0 + tt) * g->N + r + rho;
            *o = c0 == 0 ? d : *o + d;
        }
}

static AI void tn_group(const fm_kern_job *j, const geom *g, int64_t r, const int kind, const int R) {
    const int64_t T = j->n_tokens;
    float wbuf[RN][KSEG] __attribute__((aligned(32)));
    for (int64_t c0 = 0; c0 < g->K; c0 += KSEG) {
        const int64_t n = g->K - c0 < KSEG ? g->K - c0 : KSEG;
        const float *wrow[RN];
        int64_t nv, xleft = L;
        if (kind_direct(kind)) {
            nv = (n + L - 1) / L;
            xleft = n - L * (nv - 1);
        } else {
            nv = (units(g, kind, c0, n) + L - 1) / L * g->V; /* whole blocks; the prepared x is padded */
        }
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) {
            dequant_seg(g, kind, r + rho, c0, n, wbuf[rho]);
            wrow[rho] = wbuf[rho];
        }
        int64_t t0 = 0;
        for (; t0 + TTN <= T; t0 += TTN) tn_tile(j, g, wrow, r, t0, c0, nv, xleft, kind, R, TTN);
        switch (T - t0) {
        case 4: tn_tile(j, g, wrow, r, t0, c0, nv, xleft, kind, R, 4); break;
        case 3: tn_tile(j, g, wrow, r, t0, c0, nv, xleft, kind, R, 3); break;
        case 2: tn_tile(j, g, wrow, r, t0, c0, nv, xleft, kind, R, 2); break;
        case 1: tn_tile(j, g, wrow, r, t0, c0, nv, xleft, kind, R, 1); break;
        default: break;
        }
    }
    if (kind == KIND_BF16 && (g->K & 1)) bf16_odd_column(j, g, r, R);
}

static AI void rows_kind(const fm_kern_job *j, int64_t r0, int64_t r1, const int kind) {
    const geom g = geom_of(j->w, kind);
    int64_t r = r0;
    if (j->n_tokens == 1) {
        const int R1 = kind_quant(kind) ? R1Q : R1F;
        for (; r + R1 <= r1; r += R1) t1_group(j, &g, r, kind, R1);
        for (; r < r1; r++) t1_group(j, &g, r, kind, 1);
    } else {
        for (; r + RN <= r1; r += RN) tn_group(j, &g, r, kind, RN);
        for (; r < r1; r++) tn_group(j, &g, r, kind, 1);
    }
}

static void rows_f32(const fm_kern_job *j, int64_t r0, int64_t r1) { rows_kind(j, r0, r1, KIND_F32); }
static void rows_f16(const fm_kern_job *j, int64_t r0, int64_t r1) { rows_kind(j, r0, r1, KIND_F16); }
static void rows_bf16(const fm_kern_job *j, int64_t r0, int64_t r1) { rows_kind(j, r0, r1, KIND_BF16); }
static void rows_q8(const fm_kern_job *j, int64_t r0, int64_t r1) { rows_kind(j, r0, r1, KIND_Q8); }
static void rows_q4(const fm_kern_job *j, int64_t r0, int64_t r1) { rows_kind(j, r0, r1, KIND_Q4); }
static void rows_q2(const fm_kern_job *j, int64_t r0, int64_t r1) { rows_kind(j, r0, r1, KIND_Q2); }

void fm_kern_avx2_rows(const fm_kern_job *j, int64_t r0, int64_t r1) {
    switch (j->w->dtype) {
    case FM_DTYPE_F32: rows_f32(j, r0, r1); break;
    case FM_DTYPE_F16: rows_f16(j, r0, r1); break;
    case FM_DTYPE_BF16: rows_bf16(j, r0, r1); break;
    case FM_DTYPE_Q8: rows_q8(j, r0, r1); break;
    case FM_DTYPE_Q4: rows_q4(j, r0, r1); break;
    case FM_DTYPE_Q2: rows_q2(j, r0, r1); break;
    default: break; /* the dispatcher sends no other type */
    }
}

/* The prepared layout (kernels.h) with gathers: output vector e of block blk holds, in lane i,
 * x[B blk + V i + e] times 2^-(bits e) (not scaled for the top element e = V - 1, nor for BF16). */
void fm_kern_avx2_prep(const fm_weight *w, const float *x, int64_t t0, int64_t t1, float *xp, int64_t xp_stride,
                       float *xsum) {
    const int bits = w->dtype == FM_DTYPE_BF16 ? 16 : fm_quant_bits(w->dtype);
    if (!bits) return;
    const int V = 32 / bits, B = L * V;
    const int64_t K = w->cols, full = (K / V) * V; /* values inside whole words */
    const __m256i step = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(V));
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = x + t * K;
        float *o = xp + t * xp_stride;
        for (int64_t c0 = 0; c0 < xp_stride; c0 += B) {
            const int64_t left = full - c0; /* values of this block inside the row */
            const __m256i lim = _mm256_set1_epi32(left < B ? (int)left : B);
            for (int e = 0; e < V; e++) {
                const __m256i idx = _mm256_add_epi32(step, _mm256_set1_epi32(e));
                const __m256 m = _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, idx)); /* V i + e < left */
                __m256 v = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xt + c0, idx, m, 4);
                if (bits < 16 && e < V - 1) v = _mm256_mul_ps(v, _mm256_set1_ps(1.0f / (float)(1u << (bits * e))));
                _mm256_storeu_ps(o + c0 + e * L, v);
            }
        }
        if (xsum && fm_dtype_is_quant(w->dtype)) {
            const int64_t gs = w->group_size, G = K / gs;
            float *xs = xsum + t * G;
            for (int64_t g = 0; g < G; g++) {
                __m256 a = loadu_ps(xt + g * gs);
                for (int64_t c = 8; c < gs; c += 8) a = _mm256_add_ps(a, loadu_ps(xt + g * gs + c));
                xs[g] = hsum(a);
            }
        }
    }
}

uint64_t fm_kern_avx2_read(const void *p, size_t n) {
    const unsigned char *c = p;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        s0 = _mm256_add_epi64(s0, loadu_si(c + i));
        s1 = _mm256_add_epi64(s1, loadu_si(c + i + 32));
        s2 = _mm256_add_epi64(s2, loadu_si(c + i + 64));
        s3 = _mm256_add_epi64(s3, loadu_si(c + i + 96));
    }
    __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)(void *)lanes, s);
    uint64_t r = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    for (; i < n; i++) r += c[i];
    return r;
}
