/* Int8-activation matmul kernels for quantized weights (Q8/Q4/Q2) with AVX2 + FMA + F16C only (no
 * AVX-512): for CPUs such as AMD Zen 2/3 and Intel 12th-14th gen consumer parts (Zen 4 on has
 * AVX-512). Compiled with -mavx2 -mfma -mf16c and only entered after the dispatcher (ops.c) has
 * checked the CPU. The numerics are those of kernels_int8.c (kernels.h, "int8 activations"): the
 * same rounded activations (fm_kern_avx2_i8_quant gives fm_kern_i8_quant's bytes), exact integer
 * sums per (token, row, group), the same float32 epilogue.
 *
 * AVX2 has no u8 x s8 dot product that adds into int32 without saturating. Two exact forms:
 *   "byte" form, vpmaddubsw: u8 weights times s8 activations, adjacent pairs summed into int16
 *     (saturating), then vpmaddwd by ones into int32. A pair sum is at most 2 * 15 * 128 = 3840 in
 *     magnitude for Q4 and 2 * 3 * 128 = 768 for Q2, so up to 8 (Q4) or 32 (Q2) of them are also
 *     added in int16 before the widening (8 * 3840 = 30720, 32 * 768 = 24576 < 32767): exact. Q8
 *     (2 * 255 * 128 = 65280) would saturate, so Q8 never takes this form.
 *   "word" form, vpmaddwd: weights widened to int16 (0..255) times int16 activations, pairs summed
 *     into int32. The activations are the integer Q itself (kernels.h: q1, or 256 q1 + q2 with two
 *     levels, |Q| <= 256 * 127 + 128 = 32640, an int16), so two levels cost one product, not two.
 *     A pair sum is at most 2 * 255 * 32640 < 2^24 and a group of 128 columns at most
 *     128 * 255 * 32640 < 2^30: exact in int32. fm_kern_avx2_i8_widen makes these activations.
 * Several tokens: the byte form for Q4/Q2 with one level (2 instructions per 32 products), the
 * word form otherwise (2 per 16 products for both levels together; the byte form would need two
 * products per level pair as well).
 *
 * Several tokens (prefill): a block of 16 rows x KSEG columns is unpacked and transposed once into
 * an L1 buffer (byte form: 32-byte vector k holds, in dword i, the 4 values of row i (or 8 + i) at
 * columns 4 k .. 4 k + 3; word form: the 2 int16 values at columns 2 k, 2 k + 1) and used by every
 * token: per step one load of the weights and, per token, one broadcast of its 4 activation bytes.
 * At the end of a group: out += cvt(isum) * (s * dx) + b * xs, as kernels_int8.c.
 *
 * One token (decode): the rows are read in place (no repack): see "one token" below.
 *
 * AVX-VNNI (Intel 12th gen on, AMD Zen 5): kernels_int8_avxvnni.c compiles this file a second time
 * with FM_I8_VNNI = 1 and -mavxvnni: the byte form's vpmaddubsw + vpaddw (+ vpmaddwd by ones)
 * becomes one vpdpbusd (u8 x s8 into int32, no saturation: Q8 too) and the word form's vpmaddwd +
 * vpaddd one vpdpwssd. Several tokens: the byte form for every type with one level, the word form
 * with two. One token: the same kernel (vpdpbusd for Q4/Q2, vpdpwssd for Q8). That build defines
 * fm_kern_avxvnni_i8_rows and _t1_rows (I8_NAME); the activation functions, the same for both,
 * exist only in this one (docs/SPEED.md, session 7, for what AVX-VNNI gains). */
#include "backend/cpu/kernels.h"

#include <immintrin.h>

#ifndef FM_I8_VNNI
#define FM_I8_VNNI 0
#endif
#if FM_I8_VNNI
#define I8_NAME(n) fm_kern_avxvnni_i8_##n
#else
#define I8_NAME(n) fm_kern_avx2_i8_##n
#endif

#define AI inline __attribute__((always_inline))
#define KSEG 512         /* columns repacked at a time (a multiple of 128): 16 rows of it fill 8-16 KiB */
#define GSEG (KSEG / 32) /* groups per segment, at most */
#define RB 16            /* rows per tile: two vectors of 8 */
#define TTA 4            /* tokens per tile */

/* 8 scales/biases of type sd at element i of p as float32; lanes from n (< 8) on are zero */
static AI __m256 sb8(const unsigned char *p, fm_dtype sd, int64_t i, int64_t n) {
    const int es = sd == FM_DTYPE_F32 ? 4 : 2;
    unsigned char tmp[32] = {0};
    if (n < 8) { /* AVX2 has no 16-bit masked load: a zeroed copy */
        memcpy(tmp, p + es * i, (size_t)(es * (n > 0 ? n : 0)));
        p = tmp;
        i = 0;
    }
    if (sd == FM_DTYPE_F32) return _mm256_loadu_ps((const float *)(const void *)(p + 4 * i));
    const __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(p + 2 * i));
    return sd == FM_DTYPE_F16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 floats at p; lanes from n (< 8) on are zero */
static AI __m256 f8(const float *p, int64_t n) {
    if (n >= 8) return _mm256_loadu_ps(p);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n > 0 ? n : 0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, m);
}

static AI float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* In place: r[i] dword j  <->  r[j] dword i (8 x 8). */
static AI void transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4 q + j], 128-bit lane h: rows 4 q .. 4 q + 3 at column 4 h + j */
#pragma GCC unroll 2
    for (int q = 0; q < 2; q++) {
        u[4 * q] = _mm256_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 1] = _mm256_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
        u[4 * q + 2] = _mm256_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
        u[4 * q + 3] = _mm256_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
        r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
}

/* The 16 u8 values of columns [c, c + 16) of a row (c a multiple of 16); p points at the row's
 * byte for column c. Q4: byte i holds columns 2 i (low nibble), 2 i + 1; Q2: 4 i + e at bits 2 e. */
static AI __m128i unpack16(const unsigned char *p, const int bits) {
    if (bits == 8) return _mm_loadu_si128((const __m128i *)(const void *)p);
    if (bits == 4) {
        const __m128i b = _mm_loadl_epi64((const __m128i *)(const void *)p), m = _mm_set1_epi8(0x0F);
        return _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
    }
    int32_t v;
    memcpy(&v, p, 4);
    const __m128i b = _mm_cvtsi32_si128(v), m = _mm_set1_epi8(0x03);
    const __m128i v01 = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 2), m));
    const __m128i v23 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(_mm_srli_epi16(b, 6), m));
    return _mm_unpacklo_epi16(v01, v23);
}

typedef fm_kern_qgeom geom;

/* ---- several tokens ---- */

/* whether the kernel for `bits`-bit weights and LV levels takes the word form */
static AI int word_form(const int bits, const int LV) { return LV == 2 || (bits == 8 && !FM_I8_VNNI); }

/* s + the products of w and x: word form, int32 + pairs of int16 products; byte form, int16 +
 * pairs of u8 x s8 products (int32 + quads with AVX-VNNI) */
static AI __m256i dot(__m256i s, __m256i w, __m256i x, const int W) {
#if FM_I8_VNNI
    return W ? _mm256_dpwssd_avx_epi32(s, w, x) : _mm256_dpbusd_avx_epi32(s, w, x);
#else
    return W ? _mm256_add_epi32(s, _mm256_madd_epi16(w, x)) : _mm256_add_epi16(s, _mm256_maddubs_epi16(w, x));
#endif
}

/* the int32 sums of a dot() accumulator */
static AI __m256i widen(__m256i s, const int W) {
    return W || FM_I8_VNNI ? s : _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

/* One row's columns [c, c + CW) as the repack's input vector, CW = 16 (word form: int16) or 32
 * (byte form: u8); p points at the row's byte for column c. */
static AI __m256i row_chunk(const unsigned char *p, const int bits, const int W) {
    if (W) return _mm256_cvtepu8_epi16(unpack16(p, bits));
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)(const void *)p);
    return _mm256_set_m128i(unpack16(p + 16 * bits / 8, bits), unpack16(p, bits));
}

/* Rows [r, r + nr) (nr <= 16; missing rows zero), columns [c0, c0 + n) into the layout above at wb
 * (vector 2 k + h: step k of rows 8 h .. 8 h + 7), and their scales/biases into sb/bb (n / gs
 * groups of 16 floats, group-major). */
static AI void repack(const geom *g, int64_t r, int nr, int64_t c0, int64_t n, __m256i *wb, float *sb, float *bb,
                      const int bits, const int W) {
    const int CW = W ? 16 : 32;
    const unsigned char *rp[RB];
#pragma GCC unroll 16
    for (int i = 0; i < RB; i++) rp[i] = g->q + (r + (i < nr ? i : 0)) * g->row_bytes + c0 * bits / 8;
    for (int64_t ch = 0; ch < n; ch += CW) {
        __m256i v[RB];
#pragma GCC unroll 16
        for (int i = 0; i < RB; i++) v[i] = i < nr ? row_chunk(rp[i] + ch * bits / 8, bits, W) : _mm256_setzero_si256();
        transpose8(v);
        transpose8(v + 8);
        __m256i *o = wb + 2 * 8 * (ch / CW);
#pragma GCC unroll 8
        for (int s = 0; s < 8; s++) {
            _mm256_store_si256(o + 2 * s, v[s]);
            _mm256_store_si256(o + 2 * s + 1, v[8 + s]);
        }
    }
    const int64_t ng = n / g->gs, g0 = c0 / g->gs;
    for (int64_t gc = 0; gc < ng; gc += 8)
        for (int k = 0; k < 2; k++)
            for (int h = 0; h < 2; h++) {
                const unsigned char *p = k ? g->bp : g->sp;
                __m256i v[8];
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    v[i] = 8 * h + i < nr ? _mm256_castps_si256(sb8(p, g->sd, (r + 8 * h + i) * g->G + g0 + gc, ng - gc))
                                          : _mm256_setzero_si256();
                transpose8(v);
                float *o = (k ? bb : sb) + 8 * h;
                for (int i = 0; i < 8 && gc + i < ng; i++) _mm256_store_ps(o + 16 * (gc + i), _mm256_castsi256_ps(v[i]));
            }
}

/* out[t, r .. r + n) (n <= 8 lanes, n <= 0: nothing): c0 == 0 stores, later segments add */
static AI void put8(float *o, int n, int64_t c0, __m256 v) {
    if (n >= 8) {
        if (c0) v = _mm256_add_ps(v, _mm256_loadu_ps(o));
        _mm256_storeu_ps(o, v);
    } else if (n > 0) {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        if (c0) v = _mm256_add_ps(v, _mm256_maskload_ps(o, m));
        _mm256_maskstore_ps(o, m, v);
    }
}

static AI __m256i bcast4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Tokens [t0, t0 + TT) of rows [r, r + nr), columns [c0, c0 + n) of the segment in wb. */
static AI void tile(const fm_kern_i8_job *j, const geom *g, const __m256i *wb, const float *sb, const float *bb,
                    int64_t r, int nr, int64_t t0, int64_t c0, int64_t n, const int TT, const int bits, const int LV) {
    const int W = word_form(bits, LV), CS = W ? 2 : 4; /* columns per step */
    const int64_t G = g->G, g0 = c0 / g->gs, ng = n / g->gs, spg = g->gs / CS;
    /* steps summed before the widening to int32: the byte form's int16 sums (see the top) */
    const int64_t F = !W && !FM_I8_VNNI && bits == 4 && spg > 8 ? 8 : spg;
    /* the activations as bytes: a step's 4 bytes are the 4 (byte form) or 2 (word form) of its columns */
    const int64_t xst = W ? 2 * j->xw_stride : j->xq_stride;
    const unsigned char *xa = W ? (const unsigned char *)(j->xw + t0 * j->xw_stride + c0)
                                : (const unsigned char *)(j->xq + t0 * j->xq_stride + c0);
    const float *dx = j->dx + t0 * G + g0, *xs = j->xs + t0 * G + g0;
    __m256 f[2][TTA];
#pragma GCC unroll 4
    for (int tt = 0; tt < TT; tt++) f[0][tt] = f[1][tt] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < ng; gi++) {
        __m256i a[2][TTA];
#pragma GCC unroll 4
        for (int tt = 0; tt < TT; tt++) a[0][tt] = a[1][tt] = _mm256_setzero_si256();
        const __m256i *w = wb + 2 * spg * gi;
        for (int64_t k0 = 0; k0 < spg; k0 += F) {
            __m256i s[2][TTA]; /* dot() accumulators */
#pragma GCC unroll 4
            for (int tt = 0; tt < TT; tt++) s[0][tt] = s[1][tt] = _mm256_setzero_si256();
            for (int64_t k = k0; k < k0 + F; k++) {
                const __m256i w0 = _mm256_load_si256(w + 2 * k), w1 = _mm256_load_si256(w + 2 * k + 1);
                const int64_t o = 4 * (spg * gi + k);
#pragma GCC unroll 4
                for (int tt = 0; tt < TT; tt++) {
                    const __m256i xb = bcast4(xa + tt * xst + o);
                    s[0][tt] = dot(s[0][tt], w0, xb, W);
                    s[1][tt] = dot(s[1][tt], w1, xb, W);
                }
            }
#pragma GCC unroll 4
            for (int tt = 0; tt < TT; tt++) {
                a[0][tt] = _mm256_add_epi32(a[0][tt], widen(s[0][tt], W));
                a[1][tt] = _mm256_add_epi32(a[1][tt], widen(s[1][tt], W));
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256 S = _mm256_load_ps(sb + 16 * gi + 8 * h), B = _mm256_load_ps(bb + 16 * gi + 8 * h);
#pragma GCC unroll 4
            for (int tt = 0; tt < TT; tt++) {
                const __m256 sdx = _mm256_mul_ps(S, _mm256_set1_ps(dx[tt * G + gi]));
                f[h][tt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[h][tt]), sdx, f[h][tt]);
                f[h][tt] = _mm256_fmadd_ps(B, _mm256_set1_ps(xs[tt * G + gi]), f[h][tt]);
            }
        }
    }
#pragma GCC unroll 4
    for (int tt = 0; tt < TT; tt++) {
        float *o = j->out + (t0 + tt) * j->w->rows + r;
        put8(o, nr, c0, f[0][tt]);
        put8(o + 8, nr - 8, c0, f[1][tt]);
    }
}

static AI void rows_bits(const fm_kern_i8_job *j, int64_t r0, int64_t r1, const int bits, const int LV) {
    const geom g = fm_kern_qgeom_of(j->w);
    const int64_t T = j->n_tokens;
    __m256i wb[KSEG] __attribute__((aligned(32))); /* word form: KSEG / 16 chunks x 16 vectors */
    float sb[GSEG * RB] __attribute__((aligned(32))), bb[GSEG * RB] __attribute__((aligned(32)));
    for (int64_t r = r0; r < r1; r += RB) {
        const int nr = r1 - r < RB ? (int)(r1 - r) : RB;
        for (int64_t c0 = 0; c0 < g.K; c0 += KSEG) {
            const int64_t n = g.K - c0 < KSEG ? g.K - c0 : KSEG;
            repack(&g, r, nr, c0, n, wb, sb, bb, bits, word_form(bits, LV));
            int64_t t0 = 0;
            for (; t0 + TTA <= T; t0 += TTA) tile(j, &g, wb, sb, bb, r, nr, t0, c0, n, TTA, bits, LV);
            switch (T - t0) {
            case 3: tile(j, &g, wb, sb, bb, r, nr, t0, c0, n, 3, bits, LV); break;
            case 2: tile(j, &g, wb, sb, bb, r, nr, t0, c0, n, 2, bits, LV); break;
            case 1: tile(j, &g, wb, sb, bb, r, nr, t0, c0, n, 1, bits, LV); break;
            default: break;
            }
        }
    }
}

FM_KERN_I8_TABLE(tn, rows_bits)

void I8_NAME(rows)(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { fm_kern_i8_dispatch(tn_fns, j, r0, r1); }

/* ---- one token: the weights read where they are ----
 *
 * A 32-byte chunk of a row holds CH = 32 VB columns (VB = 8 / bits values a byte).
 * Q4/Q2 (byte form): vector e (e < VB) of the chunk, (bytes >> bits e) & mask, holds in byte i the
 *   value of column VB i + e; the activations were permuted once to match
 *   (fm_kern_avx2_i8_t1_order: xq[CH k + 32 e + i] = column CH k + VB i + e). vpmaddubsw per
 *   vector and level, the VB results added in int16 (at most 4 * 3840), vpmaddwd by ones: dword
 *   lane d then holds the sum over columns 4 VB d .. 4 VB d + 4 VB - 1 of the chunk, inside one
 *   group (gs is a multiple of 4 VB). Two levels: 256 lane(q1) + lane(q2).
 * Q8 (word form): the chunk's two halves widened to int16 times the activations Q (natural order,
 *   fm_kern_avx2_i8_widen): lane d holds columns 2 d, 2 d + 1, 16 + 2 d, 17 + 2 d, inside one group.
 * Each chunk's lane sums are converted and scaled on their own (s dx of the lane's group by vpermps
 * from a window of 8 groups' s dx, as kernels_int8.c with 16) into two float accumulators taken
 * in turn (each a chain of one FMA per 64 bytes of the row, as kernels_int8.c); the bias terms are
 * 8 groups per FMA. */

#define T1_PREFETCH_BYTES 4096 /* as kernels_int8.c: past the hardware prefetcher's 4 KiB page */

static AI int64_t t1_chunk_cols(const int bits) { return 32 * 8 / bits; }

static AI __m256i t1_unpack(__m256i v, const int e, const int bits) {
    const __m256i m = _mm256_set1_epi8((char)((1 << bits) - 1));
    return _mm256_and_si256(e ? _mm256_srli_epi16(v, bits * e) : v, m);
}

/* the activations of the one-token kernel (the job's xq, xq2 and xw) */
typedef struct t1_act {
    const int8_t *x1, *x2;
    const int16_t *xw;
} t1_act;

/* the int32 lane sums of chunk k (32 bytes at p) */
static AI __m256i t1_chunk(const t1_act *x, const unsigned char *p, int64_t k, const int bits, const int LV) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)p);
    if (bits == 8) {
        const int16_t *xw = x->xw + 32 * k;
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)), w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1));
        return dot(dot(_mm256_setzero_si256(), w0, _mm256_loadu_si256((const __m256i *)(const void *)xw), 1), w1,
                   _mm256_loadu_si256((const __m256i *)(const void *)(xw + 16)), 1);
    }
    const int VB = 8 / bits;
    const int64_t CH = t1_chunk_cols(bits);
    __m256i a[2];
#pragma GCC unroll 2
    for (int l = 0; l < LV; l++) {
        const int8_t *xl = (l ? x->x2 : x->x1) + CH * k;
        __m256i s = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int e = 0; e < VB; e++)
            s = dot(s, t1_unpack(v, e, bits), _mm256_loadu_si256((const __m256i *)(const void *)(xl + 32 * e)), 0);
        a[l] = widen(s, 0);
    }
    return LV == 2 ? _mm256_add_epi32(_mm256_slli_epi32(a[0], 8), a[1]) : a[0];
}

/* fma(cvt(the lane sums of chunk k of the row at wq), the lanes' s dx, f); chunk k is chunk i of
 * its window of 8 groups, whose s dx are sdx */
static AI __m256 t1_step(const t1_act *x, const unsigned char *wq, int64_t row_bytes, int64_t k, int64_t i, __m256 sdx,
                         __m256i lane_col, __m128i sh, __m256 f, const int bits, const int LV) {
    const int64_t CH = t1_chunk_cols(bits);
    __m256i a;
    if (32 * k + 32 <= row_bytes) a = t1_chunk(x, wq + 32 * k, k, bits, LV);
    else { /* the row's last, partial chunk (Q4/Q2 only: a Q8 row is whole chunks) */
        unsigned char tmp[32] = {0};
        memcpy(tmp, wq + 32 * k, (size_t)(row_bytes - 32 * k));
        a = t1_chunk(x, tmp, k, bits, LV);
    }
    const __m256i grp = _mm256_srl_epi32(_mm256_add_epi32(lane_col, _mm256_set1_epi32((int)(CH * i))), sh);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_permutevar8x32_ps(sdx, grp), f);
}

static AI float t1_row(const fm_kern_i8_job *j, const geom *g, int64_t r, const int bits, const int LV) {
    const int VB = 8 / bits;
    const int64_t CH = t1_chunk_cols(bits), nch = (g->row_bytes + 31) / 32, cpw = 8 * g->gs / CH; /* cpw: even */
    const unsigned char *wq = g->q + r * g->row_bytes;
    const t1_act x = {j->xq, j->xq2, j->xw};
    const __m128i sh = _mm_cvtsi32_si128(__builtin_ctz((unsigned)g->gs));
    const __m256i lane_col = _mm256_mullo_epi32(_mm256_set1_epi32(bits == 8 ? 2 : 4 * VB), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, fb = f0;
    for (int64_t k0 = 0, g0 = 0; k0 < nch; k0 += cpw, g0 += 8) { /* a window: the next 8 groups' s dx, their bias term */
        const int64_t m = g->G - g0, k1 = k0 + cpw < nch ? k0 + cpw : nch;
        const __m256 sdx = _mm256_mul_ps(sb8(g->sp, g->sd, r * g->G + g0, m), f8(j->dx + g0, m));
        fb = _mm256_fmadd_ps(sb8(g->bp, g->sd, r * g->G + g0, m), f8(j->xs + g0, m), fb);
        for (int64_t k = k0; k < k1; k += 2) { /* two FMA chains */
            _mm_prefetch((const char *)wq + 32 * k + T1_PREFETCH_BYTES, _MM_HINT_T1);
            f0 = t1_step(&x, wq, g->row_bytes, k, k - k0, sdx, lane_col, sh, f0, bits, LV);
            if (k + 1 < k1) f1 = t1_step(&x, wq, g->row_bytes, k + 1, k + 1 - k0, sdx, lane_col, sh, f1, bits, LV);
        }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(f0, f1), fb));
}

static AI void t1_rows_bits(const fm_kern_i8_job *j, int64_t r0, int64_t r1, const int bits, const int LV) {
    const geom g = fm_kern_qgeom_of(j->w);
    for (int64_t r = r0; r < r1; r++) j->out[r] = t1_row(j, &g, r, bits, LV);
}

FM_KERN_I8_TABLE(t1, t1_rows_bits)

void I8_NAME(t1_rows)(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { fm_kern_i8_dispatch(t1_fns, j, r0, r1); }

#if !FM_I8_VNNI /* the activations: this build only */

int64_t fm_kern_avx2_i8_t1_cols(const fm_weight *w) {
    const int64_t CH = t1_chunk_cols(fm_quant_bits(w->dtype));
    return (w->cols + CH - 1) / CH * CH;
}

void fm_kern_avx2_i8_t1_order(const fm_weight *w, int8_t *xq) {
    const int bits = fm_quant_bits(w->dtype), VB = 8 / bits;
    const int64_t CH = t1_chunk_cols(bits), n = fm_kern_avx2_i8_t1_cols(w);
    if (VB == 1) return;
    /* per 128-bit lane, the bytes grouped by e (byte VB i' + e to e (16 / VB) + i'), then per
     * vector the lanes' groups of one e side by side (dwords), then the vectors' groups of one e
     * side by side */
    const __m256i by_e = VB == 2 ? _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8,
                                                    10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)
                                 : _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1,
                                                    5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i lanes = VB == 2 ? _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7) : _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t c0 = 0; c0 < n; c0 += CH) {
        __m256i v[4];
        for (int i = 0; i < VB; i++)
            v[i] = _mm256_permutevar8x32_epi32(
                _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(const void *)(xq + c0 + 32 * i)), by_e), lanes);
        __m256i o[4];
        if (VB == 2) { /* v[i]: 16 bytes of e = 0, then 16 of e = 1 */
            o[0] = _mm256_permute2x128_si256(v[0], v[1], 0x20);
            o[1] = _mm256_permute2x128_si256(v[0], v[1], 0x31);
        } else { /* v[i]: qword e = the 8 bytes of e */
            const __m256i t0 = _mm256_unpacklo_epi64(v[0], v[1]), t1 = _mm256_unpackhi_epi64(v[0], v[1]);
            const __m256i t2 = _mm256_unpacklo_epi64(v[2], v[3]), t3 = _mm256_unpackhi_epi64(v[2], v[3]);
            o[0] = _mm256_permute2x128_si256(t0, t2, 0x20);
            o[1] = _mm256_permute2x128_si256(t1, t3, 0x20);
            o[2] = _mm256_permute2x128_si256(t0, t2, 0x31);
            o[3] = _mm256_permute2x128_si256(t1, t3, 0x31);
        }
        for (int e = 0; e < VB; e++) _mm256_storeu_si256((__m256i *)(void *)(xq + c0 + 32 * e), o[e]);
    }
}

/* ---- activations ---- */

void fm_kern_avx2_i8_widen(const int8_t *xq, const int8_t *xq2, int64_t n, int16_t *xw) {
    for (int64_t c = 0; c < n; c += 16) {
        __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(xq + c)));
        if (xq2)
            v = _mm256_add_epi16(_mm256_slli_epi16(v, 8),
                                 _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(const void *)(xq2 + c))));
        _mm256_storeu_si256((__m256i *)(void *)(xw + c), v);
    }
}

/* int32 lanes to int8 with signed saturation (as vpmovsdb), 8 bytes at p */
static AI void store8_sat(int8_t *p, __m256i q) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64((__m128i *)(void *)p, _mm_packs_epi16(w, w));
}

static AI int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

void fm_kern_avx2_i8_quant(const fm_weight *w, const float *x, int64_t t0, int64_t t1, int8_t *xq, int8_t *xq2,
                           int64_t xq_stride, float *dx, float *xs) {
    const int64_t K = w->cols, gs = w->group_size, G = K / gs;
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t t = t0; t < t1; t++) {
        const float *xt = x + t * K;
        for (int64_t g = 0; g < G; g++) {
            const float *p = xt + g * gs;
            __m256 m = _mm256_and_ps(_mm256_loadu_ps(p), absm);
            for (int64_t c = 8; c < gs; c += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(p + c), absm));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h); /* the maximum of finite values: any order gives it */
            const float inv = amax >= FM_KERN_I8_AMAX_MIN ? 127.0f / amax : 0.0f,
                        d = amax < FM_KERN_I8_AMAX_MIN ? 0.0f : amax / 127.0f; /* NaN: inv 0, d NaN */
            const __m256 iv = _mm256_set1_ps(inv), iv2 = _mm256_set1_ps(inv * 256.0f), dv = _mm256_set1_ps(d);
            __m256i qs = _mm256_setzero_si256(), qs2 = qs;
            for (int64_t c = 0; c < gs; c += 8) { /* round to nearest even (MXCSR default), as fm_kern_i8_quant */
                const __m256 v = _mm256_loadu_ps(p + c);
                const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v, iv));
                qs = _mm256_add_epi32(qs, q);
                store8_sat(xq + t * xq_stride + g * gs + c, q);
                if (xq2) { /* the residual x - q d in units of d / 256, clamped to [-128, 127] */
                    const __m256 rv = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q), dv, v);
                    const __m256i q2 = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(rv, iv2)),
                                                                         _mm256_set1_epi32(127)),
                                                        _mm256_set1_epi32(-128));
                    qs2 = _mm256_add_epi32(qs2, q2);
                    store8_sat(xq2 + t * xq_stride + g * gs + c, q2);
                }
            }
            if (xq2) {
                dx[t * G + g] = d / 256.0f;
                xs[t * G + g] = dx[t * G + g] * (float)(int32_t)(256u * (uint32_t)hsum_i32(qs) + (uint32_t)hsum_i32(qs2));
            } else {
                dx[t * G + g] = d;
                xs[t * G + g] = d * (float)hsum_i32(qs);
            }
        }
    }
}

#endif
