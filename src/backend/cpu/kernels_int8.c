/* Int8-activation matmul kernels for quantized weights (Q8/Q4/Q2): AVX-512 VNNI and AMX-INT8.
 * Compiled with -mavx512f/bw/vl/dq -mavx512vnni -mavx512vbmi -mfma -mf16c -mamx-tile -mamx-int8 and
 * only entered after the dispatcher (ops.c) has checked the CPU (and, for AMX, obtained the tile
 * data permission from the kernel and run fm_kern_amx_probe). Contracts and numerics: kernels.h.
 *
 * Weights: a block of 16 rows x 64 columns is unpacked to u8 (Q8 as is; Q4/Q2 by one qword
 * zero-extension, one vpmultishiftqb and one mask) and transposed (16 x 16 dwords, 64 shuffles)
 * into the VNNI layout: 64-byte vector k4 holds, in dword i, the 4 values of row i at columns
 * 4 k4 .. 4 k4 + 3. A segment of KSEG columns of the 16 rows is repacked once into an L1 buffer and
 * used by every token; the scales and biases of the segment are transposed the same way (vector g
 * holds the 16 rows' scale of group g).
 *
 * VNNI: per 4 columns, one load of the weight vector and, per token, one vpdpbusd with the
 * token's 4 int8 activations broadcast from memory: 16 rows x 4 columns per instruction, int32
 * sums per (row, group). At the end of a group: out += cvt(isum) * (s * dx) + b * xsum (4
 * instructions per token per 16 rows).
 *
 * AMX: A = 16 tokens x 64 columns of int8 activations (row-major, as quantized), B = the
 * repacked weights of one 64-column step (16 rows of 64 bytes: exactly the VNNI layout), C = 16
 * tokens x 16 rows int32; TDPBSUD (signed A, unsigned B) does one group of 64 (group 32: a 32-deep
 * step; group 128: two steps into the same C). C is stored to L1 and the same group epilogue as
 * VNNI runs on its 16 rows per token; two C tiles alternate between groups so the tile unit works
 * on the next group while the vector units finish the last. */
#include "backend/cpu/kernels.h"

#include <immintrin.h>

#define AI inline __attribute__((always_inline))
#define KSEG 1024        /* columns repacked at a time (a multiple of 128) */
#define GSEG (KSEG / 32) /* groups per segment, at most */
#define TTV 8            /* VNNI: tokens per register tile */

static AI __mmask16 mask16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }
static AI __mmask32 mask32(int64_t n) { return n >= 32 ? (__mmask32)0xFFFFFFFFu : n <= 0 ? 0 : (__mmask32)((1u << n) - 1); }
static AI __mmask64 mask64(int64_t n) { return n >= 64 ? ~(__mmask64)0 : n <= 0 ? 0 : (((__mmask64)1 << n) - 1); }

typedef fm_kern_qgeom geom;

/* 16 scales/biases of type sd at element i of p as float32, lanes past m zero */
static AI __m512 sb16(const unsigned char *p, fm_dtype sd, int64_t i, __mmask16 m) {
    if (sd == FM_DTYPE_F32) return _mm512_maskz_loadu_ps(m, p + 4 * i);
    __m256i h = _mm256_maskz_loadu_epi16(m, p + 2 * i);
    return sd == FM_DTYPE_F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* In place: r[i] dword j  <->  r[j] dword i. */
static AI void transpose16(__m512i r[16]) {
    __m512i t[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* r[4 q + j], 128-bit lane L: rows 4q .. 4q + 3 at column 4 L + j */
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        r[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        r[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        r[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        r[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
    /* t[j] (quads 0, 1) and t[8 + j] (quads 2, 3): lanes = quad a col j, quad a col 4 + j, quad b col j,
     * quad b col 4 + j; t[4 + j], t[12 + j]: the same for columns 8 + j, 12 + j */
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);
        t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
        t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
        r[8 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xDD);
    }
}

/* The u8 values of columns [c, c + nk) of a row (nk <= 64, c a multiple of 32), zero past nk. p
 * points at the row's byte for column c. */
static AI __m512i unpack64(const unsigned char *p, int64_t nk, const int bits) {
    if (bits == 8) return _mm512_maskz_loadu_epi8(mask64(nk), p);
    if (bits == 4) { /* qword m = 4 bytes = values 8 m .. 8 m + 7, value e at bit 4 e */
        const __m512i q = _mm512_cvtepu32_epi64(_mm256_maskz_loadu_epi8(mask32(nk / 2), p));
        const __m512i ctl = _mm512_set1_epi64(0x1C1814100C080400ll);
        return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctl, q), _mm512_set1_epi8(0x0F));
    }
    /* Q2: qword m = 2 bytes = values 8 m .. 8 m + 7, value e at bit 2 e */
    const __m512i q = _mm512_cvtepu16_epi64(_mm_maskz_loadu_epi8((__mmask16)mask16(nk / 4), p));
    const __m512i ctl = _mm512_set1_epi64(0x0E0C0A0806040200ll);
    return _mm512_and_si512(_mm512_multishift_epi64_epi8(ctl, q), _mm512_set1_epi8(0x03));
}

/* Rows [r, r + nr) (nr <= 16; missing rows zero), columns [c0, c0 + n) into the VNNI layout at wb
 * (ceil(n / 64) * 16 vectors of 64 bytes), and their scales/biases into sb/bb (n / gs vectors of
 * 16 floats, group-major). */
static AI void repack(const geom *g, int64_t r, int nr, int64_t c0, int64_t n, unsigned char *wb, float *sb, float *bb,
                      const int bits) {
    const unsigned char *rp[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) rp[i] = g->q + (r + (i < nr ? i : 0)) * g->row_bytes + c0 * bits / 8;
    for (int64_t ch = 0; ch < n; ch += 64) {
        const int64_t nk = n - ch < 64 ? n - ch : 64;
        __m512i v[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) v[i] = i < nr ? unpack64(rp[i] + ch * bits / 8, nk, bits) : _mm512_setzero_si512();
        transpose16(v);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) _mm512_store_si512(wb + 64 * (ch / 4 + i), v[i]);
    }
    const int64_t ng = n / g->gs, g0 = c0 / g->gs;
    for (int64_t gc = 0; gc < ng; gc += 16) {
        const __mmask16 m = mask16(ng - gc);
        for (int k = 0; k < 2; k++) {
            const unsigned char *p = k ? g->bp : g->sp;
            __m512i v[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++)
                v[i] = i < nr ? _mm512_castps_si512(sb16(p, g->sd, (r + i) * g->G + g0 + gc, m)) : _mm512_setzero_si512();
            transpose16(v);
            float *o = k ? bb : sb;
            for (int i = 0; i < 16 && gc + i < ng; i++) _mm512_store_si512(o + 16 * (gc + i), v[i]);
        }
    }
}

/* out[t, r .. r + nr) for tokens t of a tile: c0 == 0 stores, later segments add */
static AI void put(const fm_kern_i8_job *j, int64_t t, int64_t r, __mmask16 rm, int64_t c0, __m512 v) {
    float *o = j->out + t * j->w->rows + r;
    if (c0) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(rm, o));
    _mm512_mask_storeu_ps(o, rm, v);
}

/* ---- VNNI ---- */

static AI void vnni_tile(const fm_kern_i8_job *j, const geom *g, const unsigned char *wb, const float *sb,
                         const float *bb, int64_t r, __mmask16 rm, int64_t t0, int64_t c0, int64_t n, const int TT,
                         const int LV) {
    const int64_t G = g->G, g0 = c0 / g->gs, ng = n / g->gs, k4g = g->gs / 4, xst = j->xq_stride;
    const int8_t *xq = j->xq + t0 * xst + c0, *xq2 = LV == 2 ? j->xq2 + t0 * xst + c0 : NULL;
    const float *dx = j->dx + t0 * G + g0, *xs = j->xs + t0 * G + g0;
    __m512 f[TTV];
#pragma GCC unroll 8
    for (int tt = 0; tt < TT; tt++) f[tt] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < ng; gi++) {
        __m512i a[TTV], a2[TTV];
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) a[tt] = a2[tt] = _mm512_setzero_si512();
        const unsigned char *w = wb + 64 * k4g * gi;
        for (int64_t k = 0; k < k4g; k++) {
            const __m512i wv = _mm512_load_si512(w + 64 * k);
            const int64_t o = 4 * (k4g * gi + k);
#pragma GCC unroll 8
            for (int tt = 0; tt < TT; tt++) {
                int32_t x4;
                memcpy(&x4, xq + tt * xst + o, 4);
                a[tt] = _mm512_dpbusd_epi32(a[tt], wv, _mm512_set1_epi32(x4));
                if (LV == 2) {
                    memcpy(&x4, xq2 + tt * xst + o, 4);
                    a2[tt] = _mm512_dpbusd_epi32(a2[tt], wv, _mm512_set1_epi32(x4));
                }
            }
        }
        const __m512 S = _mm512_load_ps(sb + 16 * gi), B = _mm512_load_ps(bb + 16 * gi);
#pragma GCC unroll 8
        for (int tt = 0; tt < TT; tt++) {
            const __m512i ai = LV == 2 ? _mm512_add_epi32(_mm512_slli_epi32(a[tt], 8), a2[tt]) : a[tt];
            const __m512 sdx = _mm512_mul_ps(S, _mm512_set1_ps(dx[tt * G + gi]));
            f[tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), sdx, f[tt]);
            f[tt] = _mm512_fmadd_ps(B, _mm512_set1_ps(xs[tt * G + gi]), f[tt]);
        }
    }
#pragma GCC unroll 8
    for (int tt = 0; tt < TT; tt++) put(j, t0 + tt, r, rm, c0, f[tt]);
}

static AI void vnni_rows_bits(const fm_kern_i8_job *j, int64_t r0, int64_t r1, const int bits, const int LV) {
    const geom g = fm_kern_qgeom_of(j->w);
    const int64_t T = j->n_tokens;
    unsigned char wb[KSEG * 16] __attribute__((aligned(64)));
    float sb[GSEG * 16] __attribute__((aligned(64))), bb[GSEG * 16] __attribute__((aligned(64)));
    for (int64_t r = r0; r < r1; r += 16) {
        const int nr = r1 - r < 16 ? (int)(r1 - r) : 16;
        const __mmask16 rm = mask16(nr);
        for (int64_t c0 = 0; c0 < g.K; c0 += KSEG) {
            const int64_t n = g.K - c0 < KSEG ? g.K - c0 : KSEG;
            repack(&g, r, nr, c0, n, wb, sb, bb, bits);
            int64_t t0 = 0;
            for (; t0 + TTV <= T; t0 += TTV) vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, TTV, LV);
            switch (T - t0) {
            case 7: vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, 7, LV); break;
            case 6: vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, 6, LV); break;
            case 5: vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, 5, LV); break;
            case 4: vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, 4, LV); break;
            case 3: vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, 3, LV); break;
            case 2: vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, 2, LV); break;
            case 1: vnni_tile(j, &g, wb, sb, bb, r, rm, t0, c0, n, 1, LV); break;
            default: break;
            }
        }
    }
}

FM_KERN_I8_TABLE(vnni, vnni_rows_bits)

void fm_kern_vnni_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1) {
    fm_kern_i8_dispatch(vnni_fns, j, r0, r1);
}

/* ---- VNNI, one token: the weights read where they are ----
 *
 * At one token the repack (a transpose per 16 x 64 block, used once) costs more than the product,
 * so this form reads each row in place. A 64-byte chunk of a row holds CH = 64 VB columns (VB =
 * 8 / bits values a byte, value e of byte i = column VB i + e of the chunk). Vector e (e < VB) of
 * the chunk, (bytes >> bits e) & mask, holds in byte i the value of column VB i + e; the
 * activations were permuted once to match (fm_kern_i8_t1_order: xq[CH k + 64 e + i] = column
 * CH k + VB i + e). Dword lane d of every such vector spans columns 4 VB d .. 4 VB d + 4 VB - 1 of
 * the chunk, inside one group (gs is a multiple of 4 VB), so one vpdpbusd per vector and level
 * gives per-lane integer sums within one group; the lane's s dx is picked by vpermps out of a
 * vector of 16 groups' s dx (index = group mod 16: a chunk never straddles a window of 16 groups,
 * as 16 gs >= 512 >= CH and both are powers of two). The bias term, sum_g b_g xs_g, is 16 groups
 * per FMA. */

/* How far ahead of the chunk being read the weights are prefetched into L2 (the rows follow each
 * other in memory: past a row's end this is the next row's start). The hardware prefetcher stops
 * at 4 KB pages; with this, one token's Q4 expert product went from ~13 to ~21.5 GB/s on 2 cores
 * (2048: ~20, 8192: ~21.5; kernelbench, docs/SPEED.md). */
#define T1_PREFETCH_BYTES 4096

/* the number of columns one 64-byte chunk of a row holds */
static AI int64_t t1_chunk_cols(const int bits) { return 64 * 8 / bits; }

static AI __m512i t1_unpack(__m512i v, const int e, const int bits) {
    if (bits == 8) return v;
    const __m512i m = _mm512_set1_epi8((char)((1 << bits) - 1));
    return _mm512_and_si512(e ? _mm512_srli_epi16(v, bits * e) : v, m);
}

static AI float t1_row(const fm_kern_i8_job *j, const geom *g, int64_t r, const int bits, const int LV) {
    const int VB = 8 / bits;
    const int64_t CH = t1_chunk_cols(bits), nch = (g->K + CH - 1) / CH, per_window = 16 * g->gs / CH;
    const unsigned char *wq = g->q + r * g->row_bytes;
    const int sh = __builtin_ctz((unsigned)g->gs);
    const __m512i lane_col = _mm512_mullo_epi32(_mm512_set1_epi32(4 * VB),
                                                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    __m512 f = _mm512_setzero_ps(), fb = _mm512_setzero_ps(), sdx = _mm512_setzero_ps();
    for (int64_t k = 0, next_window = 0; k < nch; k++) {
        if (k == next_window) { /* the next 16 groups' s dx, and their bias term */
            next_window += per_window;
            const int64_t g0 = k * CH / g->gs;
            const __mmask16 m = mask16(g->G - g0);
            sdx = _mm512_mul_ps(sb16(g->sp, g->sd, r * g->G + g0, m), _mm512_maskz_loadu_ps(m, j->dx + g0));
            fb = _mm512_fmadd_ps(sb16(g->bp, g->sd, r * g->G + g0, m), _mm512_maskz_loadu_ps(m, j->xs + g0), fb);
        }
        _mm_prefetch((const char *)wq + 64 * k + T1_PREFETCH_BYTES, _MM_HINT_T1);
        const int64_t left = g->row_bytes - 64 * k;
        const __m512i v = left >= 64 ? _mm512_loadu_si512(wq + 64 * k) : _mm512_maskz_loadu_epi8(mask64(left), wq + 64 * k);
        const int8_t *x1 = j->xq + CH * k;
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t1_unpack(v, 0, bits), _mm512_load_si512(x1));
#pragma GCC unroll 4
        for (int e = 1; e < VB; e++) a = _mm512_dpbusd_epi32(a, t1_unpack(v, e, bits), _mm512_load_si512(x1 + 64 * e));
        if (LV == 2) {
            const int8_t *x2 = j->xq2 + CH * k;
            __m512i a2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t1_unpack(v, 0, bits), _mm512_load_si512(x2));
#pragma GCC unroll 4
            for (int e = 1; e < VB; e++)
                a2 = _mm512_dpbusd_epi32(a2, t1_unpack(v, e, bits), _mm512_load_si512(x2 + 64 * e));
            a = _mm512_add_epi32(_mm512_slli_epi32(a, 8), a2);
        }
        const __m512i grp = _mm512_srli_epi32(_mm512_add_epi32(lane_col, _mm512_set1_epi32((int)(CH * k))), sh);
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(grp, sdx), f);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(f, fb));
}

static AI void t1_rows_bits(const fm_kern_i8_job *j, int64_t r0, int64_t r1, const int bits, const int LV) {
    const geom g = fm_kern_qgeom_of(j->w);
    for (int64_t r = r0; r < r1; r++) j->out[r] = t1_row(j, &g, r, bits, LV);
}

FM_KERN_I8_TABLE(t1, t1_rows_bits)

void fm_kern_vnni_t1_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1) {
    fm_kern_i8_dispatch(t1_fns, j, r0, r1);
}

int64_t fm_kern_i8_t1_cols(const fm_weight *w) {
    const int64_t CH = t1_chunk_cols(fm_quant_bits(w->dtype));
    return (w->cols + CH - 1) / CH * CH;
}

void fm_kern_i8_t1_order(const fm_weight *w, int8_t *xq) {
    const int bits = fm_quant_bits(w->dtype), VB = 8 / bits;
    const int64_t CH = t1_chunk_cols(bits), n = fm_kern_i8_t1_cols(w);
    if (VB == 1) return;
    /* vpermt2b: byte i of the result = byte idx[i] mod 128 of the pair (a, b) */
    const __m512i step = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44,
                                         43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24,
                                         23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t c0 = 0; c0 < n; c0 += CH) {
        __m512i in[4], out[4];
        for (int v = 0; v < VB; v++) in[v] = _mm512_load_si512(xq + c0 + 64 * v);
        for (int e = 0; e < VB; e++) { /* byte i of vector e = column VB i + e */
            const __m512i idx = _mm512_add_epi8(_mm512_mullo_epi16(step, _mm512_set1_epi16((short)VB)), _mm512_set1_epi8((char)e));
            if (VB == 2) out[e] = _mm512_permutex2var_epi8(in[0], idx, in[1]);
            else /* VB = 4: bytes 0..31 from in[0..1], 32..63 from in[2..3] (idx mod 128 is right for both) */
                out[e] = _mm512_mask_blend_epi8(0xFFFFFFFF00000000ull, _mm512_permutex2var_epi8(in[0], idx, in[1]),
                                                _mm512_permutex2var_epi8(in[2], idx, in[3]));
        }
        for (int e = 0; e < VB; e++) _mm512_store_si512(xq + c0 + 64 * e, out[e]);
    }
}

/* ---- AMX ---- */

typedef struct tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

/* tiles 0..3: C (16 tokens x 16 rows int32) of up to 4 groups in flight; 4, 6: A (16 tokens x kb
 * bytes); 5, 7: B (kb / 4 x 64 bytes). Consecutive groups alternate between the A/B pairs, so a
 * tile load need not wait for the product that reads the other pair. */
static void amx_config(int kb) {
    tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 4; i++) {
        c.rows[i] = 16;
        c.colsb[i] = 64;
    }
    c.rows[4] = c.rows[6] = 16;
    c.colsb[4] = c.colsb[6] = (uint16_t)kb;
    c.rows[5] = c.rows[7] = (uint8_t)(kb / 4);
    c.colsb[5] = c.colsb[7] = 64;
    /* GCC's _tile_loadconfig tells the compiler it reads 8 bytes: make the whole struct be stored */
    __asm__ volatile("" : : "r"(&c) : "memory");
    _tile_loadconfig(&c);
}

/* group gi of the segment, level-1 activations into C tile c (A tile a, B tile b) and, with two
 * levels, level 2 into C tile c2 (A tile a2, same B); stored to cb, cb2 (16 x 16 int32 each) */
#define AMX_GROUP(LV, c, c2, a, a2, b, gi, cb, cb2)                                                              \
    do {                                                                                                          \
        _tile_zero(c);                                                                                            \
        if (LV == 2) _tile_zero(c2);                                                                              \
        for (int h_ = 0; h_ < steps; h_++) {                                                                      \
            _tile_loadd(b, wb + 64 * ((gi) * (gs / 4) + h_ * (kb / 4)), 64);                                      \
            _tile_loadd(a, xq + (gi) * gs + h_ * kb, xstride);                                                    \
            _tile_dpbsud(c, a, b);                                                                                \
            if (LV == 2) {                                                                                        \
                _tile_loadd(a2, xq2 + (gi) * gs + h_ * kb, xstride);                                              \
                _tile_dpbsud(c2, a2, b);                                                                          \
            }                                                                                                     \
        }                                                                                                         \
        _tile_stored(c, cb, 64);                                                                                  \
        if (LV == 2) _tile_stored(c2, cb2, 64);                                                                   \
    } while (0)

#define AMX_BATCH 4 /* C tiles: groups in flight x levels */

/* the int32 products of groups [gi, gi + m) (m <= AMX_BATCH / LV) into cb: group k's level l at
 * cb[LV k + l] */
static AI void amx_batch(const int8_t *xq, const int8_t *xq2, int64_t xstride, const unsigned char *wb, int gs, int kb,
                         int steps, int64_t gi, int m, int32_t (*cb)[256], const int LV) {
    if (LV == 1) {
        AMX_GROUP(1, 0, 0, 4, 4, 5, gi, cb[0], cb[0]);
        if (m > 1) AMX_GROUP(1, 1, 1, 6, 6, 7, gi + 1, cb[1], cb[1]);
        if (m > 2) AMX_GROUP(1, 2, 2, 4, 4, 5, gi + 2, cb[2], cb[2]);
        if (m > 3) AMX_GROUP(1, 3, 3, 6, 6, 7, gi + 3, cb[3], cb[3]);
    } else {
        AMX_GROUP(2, 0, 1, 4, 6, 5, gi, cb[0], cb[1]);
        if (m > 1) AMX_GROUP(2, 2, 3, 4, 6, 7, gi + 1, cb[2], cb[3]);
    }
}

/* the group epilogue for groups [gi, gi + m) from cb: with C = C1 (one level) or 256 C1 + C2 (two),
 * f[t] += cvt(C[t]) * (S * dx[t]) + B * xs[t] */
static AI void amx_epilogue(const int32_t (*cb)[256], const float *sb, const float *bb, const float *dx,
                            const float *xs, int64_t G, int64_t gi, int m, int nt, __m512 f[16], const int LV) {
    for (int k = 0; k < m; k++) {
        const __m512 S = _mm512_load_ps(sb + 16 * (gi + k)), B = _mm512_load_ps(bb + 16 * (gi + k));
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++)
            if (t < nt) {
                __m512i c = _mm512_load_si512(cb[LV * k] + 16 * t);
                if (LV == 2) c = _mm512_add_epi32(_mm512_slli_epi32(c, 8), _mm512_load_si512(cb[2 * k + 1] + 16 * t));
                const __m512 sdx = _mm512_mul_ps(S, _mm512_set1_ps(dx[t * G + gi + k]));
                f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), sdx, f[t]);
                f[t] = _mm512_fmadd_ps(B, _mm512_set1_ps(xs[t * G + gi + k]), f[t]);
            }
    }
}

static AI void amx_rows_bits(const fm_kern_i8_job *j, int64_t r0, int64_t r1, const int bits, const int LV) {
    const geom g = fm_kern_qgeom_of(j->w);
    const int64_t T = j->n_tokens, G = g.G, xstride = j->xq_stride;
    const int gs = g.gs, kb = gs < 64 ? gs : 64, steps = gs / kb, batch = AMX_BATCH / LV;
    unsigned char wb[KSEG * 16] __attribute__((aligned(64)));
    float sb[GSEG * 16] __attribute__((aligned(64))), bb[GSEG * 16] __attribute__((aligned(64)));
    int32_t cb[2][AMX_BATCH][256] __attribute__((aligned(64)));
    amx_config(kb);
    /* segments outside the row blocks: one segment's activations (up to 2 x 1 KiB per token) stay
     * in L2 for all the thread's rows (at K = 4096, T = 512 the activations are 4 MiB, more than L2) */
    for (int64_t c0 = 0; c0 < g.K; c0 += KSEG) {
        const int64_t n = g.K - c0 < KSEG ? g.K - c0 : KSEG, ng = n / gs, g0 = c0 / gs;
        for (int64_t r = r0; r < r1; r += 16) {
            const int nr = r1 - r < 16 ? (int)(r1 - r) : 16;
            const __mmask16 rm = mask16(nr);
            repack(&g, r, nr, c0, n, wb, sb, bb, bits);
            __asm__ volatile("" ::: "memory"); /* tileloadd has no memory operand: keep the stores before it */
            for (int64_t t0 = 0; t0 < T; t0 += 16) {
                const int nt = T - t0 < 16 ? (int)(T - t0) : 16;
                /* rows past T: the zero padding */
                const int8_t *xq = j->xq + t0 * xstride + c0, *xq2 = LV == 2 ? j->xq2 + t0 * xstride + c0 : NULL;
                const float *dx = j->dx + t0 * G + g0, *xs = j->xs + t0 * G + g0;
                __m512 f[16];
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++) f[t] = _mm512_setzero_ps();
                /* software pipeline: the tile unit computes batch b + 1 while the vector units
                 * run the epilogue of batch b */
                int m = ng < batch ? (int)ng : batch, p = 0;
                amx_batch(xq, xq2, xstride, wb, gs, kb, steps, 0, m, cb[0], LV);
                for (int64_t gi = 0; gi < ng; gi += batch) {
                    const int64_t gn = gi + batch;
                    const int mn = gn >= ng ? 0 : ng - gn < batch ? (int)(ng - gn) : batch;
                    if (mn) amx_batch(xq, xq2, xstride, wb, gs, kb, steps, gn, mn, cb[p ^ 1], LV);
                    amx_epilogue((const int32_t(*)[256])cb[p], sb, bb, dx, xs, G, gi, m, nt, f, LV);
                    m = mn;
                    p ^= 1;
                }
#pragma GCC unroll 16
                for (int t = 0; t < 16; t++)
                    if (t < nt) put(j, t0 + t, r, rm, c0, f[t]);
            }
        }
    }
    _tile_release();
}

FM_KERN_I8_TABLE(amx, amx_rows_bits)

void fm_kern_amx_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1) {
    fm_kern_i8_dispatch(amx_fns, j, r0, r1);
}

bool fm_kern_amx_probe(void) {
    /* A: 16 x 64 s8, B: 16 x 64 u8; C[t][r] = sum_k A[t][k] * B[k / 4][4 r + k % 4] */
    int8_t a[16 * 64];
    uint8_t b[16 * 64];
    int32_t c[256] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 64; i++) {
        a[i] = (int8_t)((i * 7) % 255 - 127);
        b[i] = (uint8_t)((i * 13) % 256);
    }
    __asm__ volatile("" ::: "memory");
    amx_config(64);
    _tile_loadd(4, a, 64);
    _tile_loadd(5, b, 64);
    _tile_zero(0);
    _tile_dpbsud(0, 4, 5);
    _tile_stored(0, c, 64);
    _tile_release();
    for (int t = 0; t < 16; t++)
        for (int r = 0; r < 16; r++) {
            int32_t s = 0;
            for (int k = 0; k < 64; k++) s += a[64 * t + k] * b[64 * (k / 4) + 4 * r + k % 4];
            if (c[16 * t + r] != s) return false;
        }
    return true;
}

/* ---- activations ---- */

void fm_kern_i8_quant(const fm_weight *w, const float *x, int64_t t0, int64_t t1, int8_t *xq, int8_t *xq2,
                      int64_t xq_stride, float *dx, float *xs) {
    const int64_t K = w->cols, gs = w->group_size, G = K / gs;
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = x + t * K;
        for (int64_t g = 0; g < G; g++) {
            const float *p = xt + g * gs;
            __m512 m = _mm512_abs_ps(_mm512_loadu_ps(p));
            for (int64_t c = 16; c < gs; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(p + c)));
            const float amax = _mm512_reduce_max_ps(m);
            const float inv = amax >= FM_KERN_I8_AMAX_MIN ? 127.0f / amax : 0.0f,
                        d = amax < FM_KERN_I8_AMAX_MIN ? 0.0f : amax / 127.0f; /* NaN: inv 0, d NaN */
            const __m512 iv = _mm512_set1_ps(inv), iv2 = _mm512_set1_ps(inv * 256.0f), dv = _mm512_set1_ps(d);
            __m512i qs = _mm512_setzero_si512(), qs2 = qs;
            for (int64_t c = 0; c < gs; c += 16) { /* round to nearest even (MXCSR default) */
                const __m512 v = _mm512_loadu_ps(p + c);
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, iv));
                qs = _mm512_add_epi32(qs, q);
                _mm_storeu_si128((__m128i *)(void *)(xq + t * xq_stride + g * gs + c), _mm512_cvtsepi32_epi8(q));
                if (xq2) { /* the residual x - q d in units of d / 256, saturated to [-128, 127] */
                    const __m512 rv = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(q), dv, v);
                    const __m512i q2 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(rv, iv2)),
                                                                         _mm512_set1_epi32(127)),
                                                        _mm512_set1_epi32(-128));
                    qs2 = _mm512_add_epi32(qs2, q2);
                    _mm_storeu_si128((__m128i *)(void *)(xq2 + t * xq_stride + g * gs + c), _mm512_cvtepi32_epi8(q2));
                }
            }
            if (xq2) {
                dx[t * G + g] = d / 256.0f;
                xs[t * G + g] = dx[t * G + g] * (float)(256 * _mm512_reduce_add_epi32(qs) + _mm512_reduce_add_epi32(qs2));
            } else {
                dx[t * G + g] = d;
                xs[t * G + g] = d * (float)_mm512_reduce_add_epi32(qs);
            }
        }
    }
}
