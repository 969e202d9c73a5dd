/* AVX-512 (F/BW/VL/DQ) matmul kernels; compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq
 * -mfma -mf16c and only entered after the dispatcher (ops.c) has checked the CPU. Layouts, the
 * prepared activations and the FMA form: kernels.h.
 *
 * One token (decode, memory-bound): rows R = 4 at a time, each 64-byte block of the 4 rows loaded
 * once; quantized rows in the FMA form, per block  acc += S * (sum_e q_e * xp_e)  with S the
 * per-lane scales (one chain per row), then  + sum_g b_g xsum_g  per row: and + convert + FMA per
 * 16 weights. While a row group is read, the next group's bytes are prefetched, as many lines per
 * block as are consumed (the hardware prefetchers alone left ~15% of the bandwidth unused).
 *
 * Several tokens (prefill, compute-bound): rows R = 4 at a time, columns in segments of KSEG; each
 * segment of the 4 rows is dequantized once into an L1 buffer as float32 weights q s + b (one
 * FMA: the oracle's fl(fl(q s) + b) exactly for BF16/F16 scales, whose q s is exact; one rounding
 * less for F32 scales) in the prepared order (F32 rows are used in place), then tiles of TT = 6 tokens
 * run over it with 4 x 6 accumulators: per 16 columns 4 weight loads, 6 activation loads, 24 FMAs.
 * The weights come from memory once per call whatever the number of tokens. */
#include "backend/cpu/kernels.h"

#include <immintrin.h>

#include "util/half.h"

#define L FM_KERN_AVX512_LANES
#define SEG 8192         /* one token: columns per scale segment (a multiple of every block and group) */
#define SEG_G (SEG / 32) /* groups per segment, at most */
#define KSEG 1024        /* several tokens: columns per dequantized segment (likewise a multiple) */
#define R1 4             /* rows per tile, one token */
#define RN 4             /* rows per tile, several tokens */
#define TTN 6            /* tokens per tile */
#define AI inline __attribute__((always_inline))

enum { KIND_F32, KIND_F16, KIND_BF16, KIND_Q8, KIND_Q4, KIND_Q2 };

/* bits per unpacked unit: 32 (F32/F16 are read value by value), 16 (BF16 pairs), 8, 4, 2 */
static AI int kind_bits(const int kind) {
    return kind == KIND_Q8 ? 8 : kind == KIND_Q4 ? 4 : kind == KIND_Q2 ? 2 : kind == KIND_BF16 ? 16 : 32;
}
static AI int kind_quant(const int kind) { return kind >= KIND_Q8; }
static AI int kind_direct(const int kind) { return kind == KIND_F32 || kind == KIND_F16; } /* natural order */

static AI __mmask16 lane_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* 16 scales/biases of type sd at element i of p as float32, lanes past n zero */
static AI __m512 sb16(const unsigned char *p, fm_dtype sd, int64_t i, __mmask16 m) {
    if (sd == FM_DTYPE_F32) return _mm512_maskz_loadu_ps(m, p + 4 * i);
    __m256i h = _mm256_maskz_loadu_epi16(m, p + 2 * i);
    return sd == FM_DTYPE_F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Converts n scales (or biases) of type sd starting at element i of p into out[0, n), and zeroes
 * out[n, n + 16) (so that 16-wide windows past the end read finite zeros). */
static AI void load_sb(float *out, const unsigned char *p, fm_dtype sd, int64_t i, int64_t n) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) _mm512_storeu_ps(out + k, sb16(p, sd, i + k, 0xFFFF));
    _mm512_storeu_ps(out + k, sb16(p, sd, i + k, lane_mask(n - k)));
    if (k < n) _mm512_storeu_ps(out + k + 16, _mm512_setzero_ps());
}

/* The geometry of one weight, per call. */
typedef struct geom {
    const unsigned char *base, *sp, *bp; /* data; quantized: scales, biases */
    int64_t K, N, row_bytes, G;          /* G: groups per row (quantized) */
    int gs, bits, V, B;                  /* B = L * V values per block */
    int gshift, wide;                    /* log2(gs); a block spans several groups (B > gs) */
    fm_dtype sd;
    __m512i sidx; /* quantized: lane -> group within a block's window of scales */
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
        int idx[16];
        for (int i = 0; i < 16; i++) idx[i] = i * g.V / g.gs;
        g.sidx = _mm512_loadu_si512(idx);
    } else {
        g.row_bytes = g.K * (kind == KIND_F32 ? 4 : 2);
    }
    return g;
}

/* bytes from a row's start to column c0 (c0 a multiple of the block) */
static AI int64_t col_bytes(const geom *g, const int kind, int64_t c0) {
    return kind == KIND_F32 ? 4 * c0 : kind_quant(kind) ? c0 * g->bits / 8 : 2 * c0;
}

/* units (values for F32/F16, u32 words otherwise) in columns [c0, c0 + n) */
static AI int64_t units(const geom *g, const int kind, int64_t c0, int64_t n) {
    return kind == KIND_BF16 ? (c0 + n) / 2 - c0 / 2 : n / g->V;
}

/* the per-lane scales (or biases) of block b from a row's converted segment buffer */
static AI __m512 lane_sb(const geom *g, const float *buf, int64_t b) {
    const float *p = buf + ((b * g->B) >> g->gshift);
    return g->wide ? _mm512_permutexvar_ps(g->sidx, _mm512_loadu_ps(p)) : _mm512_set1_ps(*p);
}

/* the quantized values of unpacked vector e of word vector v, times 2^(bits e) (e < V - 1) */
static AI __m512 unpack_q(__m512i v, int e, const int bits, const int V) {
    __m512i qi = e == V - 1 ? _mm512_srli_epi32(v, bits * (V - 1))
                            : _mm512_and_si512(v, _mm512_set1_epi32((int)(((1u << bits) - 1) << (bits * e))));
    return _mm512_cvtepi32_ps(qi);
}

/* BF16 pair vector e (0: low halves, 1: high halves) as float32 */
static AI __m512 unpack_bf16(__m512i v, int e) {
    return _mm512_castsi512_ps(e == 0 ? _mm512_slli_epi32(v, 16) : _mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* The odd last column of BF16 rows with odd K, outside the word pairs: out[t, r] += w x. */
static void bf16_odd_column(const fm_kern_job *j, const geom *g, int64_t r, int R) {
    for (int rho = 0; rho < R; rho++) {
        uint16_t h;
        memcpy(&h, g->base + (r + rho) * g->row_bytes + 2 * (g->K - 1), 2);
        const float wl = fm_bf16_to_f32(h);
        for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * g->N + r + rho] += wl * j->x[t * g->K + g->K - 1];
    }
}

/* ---- one token ---- */

/* acc + (b_g * xsum_g for the ng groups from g), lane-wise: the bias half of the FMA form */
static AI __m512 bias_dot(__m512 acc, const geom *g, int64_t gi, const float *xs, int64_t ng) {
    int64_t k = 0;
    for (; k + 16 <= ng; k += 16) acc = _mm512_fmadd_ps(sb16(g->bp, g->sd, gi + k, 0xFFFF), _mm512_loadu_ps(xs + k), acc);
    if (k < ng) {
        const __mmask16 m = lane_mask(ng - k);
        acc = _mm512_fmadd_ps(sb16(g->bp, g->sd, gi + k, m), _mm512_maskz_loadu_ps(m, xs + k), acc);
    }
    return acc;
}

/* Block b (16 units) of R rows into acc; m masks the units of a block that runs past the end. */
static AI void t1_block(const geom *g, const unsigned char *const *wq, const float (*sbuf)[SEG_G + 16], const float *xt,
                        int64_t b, __mmask16 m, const unsigned char *pf, __m512 *acc, const int kind, const int R) {
    const int V = g->V, B = g->B, bits = g->bits;
    /* the next row group's bytes, as many lines per block as this group reads */
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++) _mm_prefetch((const char *)(pf + 64 * (R * b + rho)), _MM_HINT_T0);
    if (kind_direct(kind)) {
        const __m512 xv = _mm512_maskz_loadu_ps(m, xt + b * L);
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) {
            __m512 wv = kind == KIND_F32 ? _mm512_maskz_loadu_ps(m, wq[rho] + 64 * b)
                                         : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, wq[rho] + 32 * b));
            acc[rho] = _mm512_fmadd_ps(wv, xv, acc[rho]);
        }
        return;
    }
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++) {
        const __m512i v = _mm512_maskz_loadu_epi32(m, wq[rho] + 64 * b);
        if (kind == KIND_BF16) {
            acc[rho] = _mm512_fmadd_ps(unpack_bf16(v, 0), _mm512_loadu_ps(xt + b * B), acc[rho]);
            acc[rho] = _mm512_fmadd_ps(unpack_bf16(v, 1), _mm512_loadu_ps(xt + b * B + L), acc[rho]);
            continue;
        }
        /* sum_e q_e xp_e (one chain per row: the R rows interleave; a lone row, rare, runs the
         * same chain so that results do not depend on how rows are split), then one FMA with
         * the lanes' scales */
        __m512 p = _mm512_mul_ps(unpack_q(v, 0, bits, V), _mm512_loadu_ps(xt + b * B));
#pragma GCC unroll 16
        for (int e = 1; e < V; e++) p = _mm512_fmadd_ps(unpack_q(v, e, bits, V), _mm512_loadu_ps(xt + b * B + e * L), p);
        acc[rho] = _mm512_fmadd_ps(lane_sb(g, sbuf[rho], b), p, acc[rho]);
    }
}

/* out[0, r + rho] for rho < R */
static AI void t1_group(const fm_kern_job *j, const geom *g, int64_t r, const int kind, const int R) {
    float sbuf[R1][SEG_G + 16];
    float total[R1] = {0};
    for (int64_t c0 = 0; c0 < g->K; c0 += SEG) {
        const int64_t n = g->K - c0 < SEG ? g->K - c0 : SEG, nu = units(g, kind, c0, n), nb = (nu + L - 1) / L;
        const unsigned char *wq[R1];
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) wq[rho] = g->base + (r + rho) * g->row_bytes + col_bytes(g, kind, c0);
        const unsigned char *pf = wq[0] + R * g->row_bytes; /* same columns, rows r + R .. */
        const float *xt = kind_direct(kind) ? j->x + c0 : j->xp + c0;
        const int64_t ng = n >> g->gshift, g0 = c0 >> g->gshift;
        if (kind_quant(kind))
#pragma GCC unroll 8
            for (int rho = 0; rho < R; rho++) load_sb(sbuf[rho], g->sp, g->sd, (r + rho) * g->G + g0, ng);
        __m512 acc[R1];
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) acc[rho] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb - 1; b++)
            t1_block(g, wq, (const float(*)[SEG_G + 16])sbuf, xt, b, 0xFFFF, pf, acc, kind, R);
        if (nb > 0) /* BF16 with K = 1 has no word */
            t1_block(g, wq, (const float(*)[SEG_G + 16])sbuf, xt, nb - 1, lane_mask(nu - (nb - 1) * L), pf, acc, kind, R);
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) {
            if (kind_quant(kind)) acc[rho] = bias_dot(acc[rho], g, (r + rho) * g->G + g0, j->xsum + g0, ng);
            total[rho] += _mm512_reduce_add_ps(acc[rho]);
        }
    }
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++) j->out[r + rho] = total[rho];
    if (kind == KIND_BF16 && (g->K & 1)) bf16_odd_column(j, g, r, R);
}

/* ---- several tokens ---- */

/* Row `row`'s columns [c0, c0 + n) as float32 into dst (the prepared order for BF16 and quantized
 * types, natural for F16), whole vectors, zero past the end; quantized values are the oracle's
 * fl(fl(q s) + b) scaled by the power of two that the prepared activations undo. */
static AI void dequant_seg(const geom *g, const int kind, int64_t row, int64_t c0, int64_t n, float *dst) {
    const unsigned char *p = g->base + row * g->row_bytes + col_bytes(g, kind, c0);
    const int64_t nu = units(g, kind, c0, n), nb = (nu + L - 1) / L;
    if (kind == KIND_F16) {
        for (int64_t b = 0; b < nb; b++)
            _mm512_storeu_ps(dst + b * L, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lane_mask(nu - b * L), p + 32 * b)));
        return;
    }
    const int V = g->V, B = g->B, bits = g->bits;
    float sbuf[KSEG / 32 + 16], bbuf[KSEG / 32 + 16];
    if (kind_quant(kind)) {
        load_sb(sbuf, g->sp, g->sd, row * g->G + (c0 >> g->gshift), n >> g->gshift);
        load_sb(bbuf, g->bp, g->sd, row * g->G + (c0 >> g->gshift), n >> g->gshift);
    }
    const __m512 step = _mm512_set1_ps((float)(1u << (bits < 16 ? bits : 0)));
    for (int64_t b = 0; b < nb; b++) {
        const __m512i v = _mm512_maskz_loadu_epi32(lane_mask(nu - b * L), p + 64 * b);
        if (kind == KIND_BF16) {
            _mm512_storeu_ps(dst + b * B, unpack_bf16(v, 0));
            _mm512_storeu_ps(dst + b * B + L, unpack_bf16(v, 1));
            continue;
        }
        const __m512 S = lane_sb(g, sbuf, b), Bias = lane_sb(g, bbuf, b);
        __m512 Be = Bias; /* b * 2^(bits e), exact: fl(q 2^k s + b 2^k) = 2^k fl(q s + b) */
#pragma GCC unroll 16
        for (int e = 0; e < V; e++) {
            const __m512 be = e == V - 1 ? Bias : Be;
            _mm512_storeu_ps(dst + b * B + e * L, _mm512_fmadd_ps(unpack_q(v, e, bits, V), S, be));
            Be = _mm512_mul_ps(Be, step);
        }
    }
}

/* acc[rho][tt] += sum over nv vectors of w[rho] x[tt]; x vectors masked by `last` on the final one
 * (activations read in natural order end exactly at K). */
static AI void micro(const float *const *wrow, const float *xt, int64_t xs, int64_t nv, __mmask16 last,
                     __m512 acc[RN][TTN], const int R, const int TT) {
    for (int64_t k = 0; k < nv; k++) {
        const __mmask16 m = k == nv - 1 ? last : (__mmask16)0xFFFF;
        __m512 wv[RN];
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) wv[rho] = _mm512_maskz_loadu_ps(m, wrow[rho] + 16 * k);
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, xt + tt * xs + 16 * k);
#pragma GCC unroll 8
            for (int rho = 0; rho < R; rho++) acc[rho][tt] = _mm512_fmadd_ps(wv[rho], xv, acc[rho][tt]);
        }
    }
}

static AI void tn_tile(const fm_kern_job *j, const geom *g, const float *const *wrow, int64_t r, int64_t t0,
                       int64_t c0, int64_t nv, __mmask16 last, const int kind, const int R, const int TT) {
    const float *xt = kind_direct(kind) ? j->x + t0 * g->K + c0 : j->xp + t0 * j->xp_stride + c0;
    const int64_t xs = kind_direct(kind) ? g->K : j->xp_stride;
    __m512 acc[RN][TTN];
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++)
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) acc[rho][tt] = _mm512_setzero_ps();
    micro(wrow, xt, xs, nv, last, acc, R, TT);
#pragma GCC unroll 8
    for (int rho = 0; rho < R; rho++)
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) {
            const float d = _mm512_reduce_add_ps(acc[rho][tt]);
            float *o = j->out + (t0 + tt) * g->N + r + rho;
            *o = c0 == 0 ? d : *o + d;
        }
}

/* out[t, r + rho] for every t, rho < R */
static AI void tn_group(const fm_kern_job *j, const geom *g, int64_t r, const int kind, const int R) {
    const int64_t T = j->n_tokens;
    float wbuf[RN][KSEG] __attribute__((aligned(64)));
    for (int64_t c0 = 0; c0 < g->K; c0 += KSEG) {
        const int64_t n = g->K - c0 < KSEG ? g->K - c0 : KSEG;
        const float *wrow[RN];
        int64_t nv; /* 16-float vectors in the segment */
        __mmask16 last = 0xFFFF;
        if (kind_direct(kind)) {
            nv = (n + 15) / 16;
            last = lane_mask(n - 16 * (nv - 1));
        } else {
            nv = (units(g, kind, c0, n) + L - 1) / L * g->V; /* whole blocks; the prepared x is padded */
        }
#pragma GCC unroll 8
        for (int rho = 0; rho < R; rho++) {
            if (kind == KIND_F32) wrow[rho] = (const float *)(const void *)(g->base + (r + rho) * g->row_bytes) + c0;
            else {
                dequant_seg(g, kind, r + rho, c0, n, wbuf[rho]);
                wrow[rho] = wbuf[rho];
            }
        }
        int64_t t0 = 0;
        for (; t0 + TTN <= T; t0 += TTN) tn_tile(j, g, wrow, r, t0, c0, nv, last, kind, R, TTN);
        switch (T - t0) {
        case 5: tn_tile(j, g, wrow, r, t0, c0, nv, last, kind, R, 5); break;
        case 4: tn_tile(j, g, wrow, r, t0, c0, nv, last, kind, R, 4); break;
        case 3: tn_tile(j, g, wrow, r, t0, c0, nv, last, kind, R, 3); break;
        case 2: tn_tile(j, g, wrow, r, t0, c0, nv, last, kind, R, 2); break;
        case 1: tn_tile(j, g, wrow, r, t0, c0, nv, last, kind, R, 1); break;
        default: break;
        }
    }
    if (kind == KIND_BF16 && (g->K & 1)) bf16_odd_column(j, g, r, R);
}

static AI void rows_kind(const fm_kern_job *j, int64_t r0, int64_t r1, const int kind) {
    const geom g = geom_of(j->w, kind);
    int64_t r = r0;
    if (j->n_tokens == 1) {
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

void fm_kern_avx512_rows(const fm_kern_job *j, int64_t r0, int64_t r1) {
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
void fm_kern_avx512_prep(const fm_weight *w, const float *x, int64_t t0, int64_t t1, float *xp, int64_t xp_stride,
                         float *xsum) {
    const int bits = w->dtype == FM_DTYPE_BF16 ? 16 : fm_quant_bits(w->dtype);
    if (!bits) return;
    const int V = 32 / bits, B = L * V;
    const int64_t K = w->cols, full = (K / V) * V; /* values inside whole words */
    const __m512i step = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(V));
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = x + t * K;
        float *o = xp + t * xp_stride;
        for (int64_t c0 = 0; c0 < xp_stride; c0 += B) {
            const int64_t left = full - c0; /* values of this block inside the row */
            for (int e = 0; e < V; e++) {
                const __m512i idx = _mm512_add_epi32(step, _mm512_set1_epi32(e));
                /* lanes whose value index V i + e < left */
                const __mmask16 m = _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(left < B ? (int)left : B));
                __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, xt + c0, 4);
                if (bits < 16 && e < V - 1) v = _mm512_mul_ps(v, _mm512_set1_ps(1.0f / (float)(1u << (bits * e))));
                _mm512_storeu_ps(o + c0 + e * L, v);
            }
        }
        if (xsum && fm_dtype_is_quant(w->dtype)) {
            const int64_t gs = w->group_size, G = K / gs;
            float *xs = xsum + t * G;
            for (int64_t g = 0; g < G; g++) {
                __m512 a = _mm512_loadu_ps(xt + g * gs);
                for (int64_t c = 16; c < gs; c += 16) a = _mm512_add_ps(a, _mm512_loadu_ps(xt + g * gs + c));
                xs[g] = _mm512_reduce_add_ps(a);
            }
        }
    }
}

uint64_t fm_kern_avx512_read(const void *p, size_t n) {
    const unsigned char *c = p;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(c + i));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(c + i + 64));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(c + i + 128));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(c + i + 192));
    }
    /* the lanes added as unsigned (_mm512_reduce_add_epi64 adds signed lanes in C: overflow is UB) */
    uint64_t lane[8], r = 0;
    _mm512_storeu_si512(lane, _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    for (int k = 0; k < 8; k++) r += lane[k];
    for (; i < n; i++) r += c[i];
    return r;
}
