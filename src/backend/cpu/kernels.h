/* SIMD matmul kernels behind fm_cpu_matmul (internal to src/backend/cpu; see ops.h for the
 * dispatch). kernels_avx2.c is compiled with -mavx2 -mfma -mf16c, kernels_avx512.c with
 * -mavx512f/bw/vl/dq: nothing here may be called unless fm_cpu_level_supported() says the CPU has
 * that level, and this header itself holds only baseline C.
 *
 * The product computed is the oracle's (fm_cpu_matmul_ref):  out[t, r] = sum_c x[t, c] * W[r, c].
 *
 * Quantized weights, one token (decode): the FMA form. Per group g of row r with scale s, bias b:
 *     sum_j (q_j s + b) x_j = s * sum_j q_j x_j + b * xsum[g],   xsum[g] = sum over the group of x
 * so the inner loop is integer -> float conversion + multiply-add, the scale applied once per
 * block. Several tokens (prefill): each row segment is dequantized once into an L1 buffer as the
 * weights fma(q, s, b) (= the oracle's fl(fl(q s) + b) for BF16/F16 scales) and reused by every
 * token (no xsum). To avoid shuffles the q are
 * unpacked in the order they sit in the words, and the activations are permuted once per call to
 * match ("prepared" activations, fm_kern_prep):
 *
 *   A block is L consecutive u32 words of a row (L = 16 lanes for AVX-512, 8 for AVX2), i.e.
 *   B = L * V values where V = 32 / bits values per word. Unpacked vector e (0 <= e < V) holds, in
 *   lane i, element e of word i, i.e. value c = B * blk + V * i + e, isolated as
 *   (word & (mask << bits * e)) = q * 2^(bits * e) for e < V - 1 and as (word >> bits * (V - 1)) = q
 *   for the top element (no sign bit reaches a signed int32 conversion). The prepared activations
 *   hold x[c] * 2^-(bits * e) (resp. x[c]) at xp[B * blk + L * e + i], zero past the row end, so the
 *   products equal q * x exactly as in the oracle (barring underflow of |x| < 2^-96).
 *   BF16 weights use the same scheme with V = 2 and no scaling: the low half of a word shifted
 *   left by 16 and the high half masked are the two float32 values.
 *
 * Summation order differs from the oracle's, so results agree to float32 rounding of the sum of
 * |terms| (quantized: of sum_j (|q_j s| + |b|) |x_j|), not bit for bit. */
#ifndef FM_BACKEND_CPU_KERNELS_H
#define FM_BACKEND_CPU_KERNELS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "backend/tensor.h"
#include "quant/quant.h"

#define FM_KERN_AVX2_LANES 8
#define FM_KERN_AVX512_LANES 16

/* One matmul call, shared read-only by the threads that split its rows. */
typedef struct fm_kern_job {
    float *out;           /* (n_tokens, w->rows) */
    const float *x;       /* (n_tokens, w->cols), the caller's activations */
    int64_t n_tokens;
    const fm_weight *w;   /* F32, BF16, F16, Q8, Q4 or Q2 (quantized: passed fm_quant_check) */
    const float *xp;      /* prepared activations (BF16 and quantized types): n_tokens x xp_stride */
    int64_t xp_stride;    /* floats per token of xp */
    const float *xsum;    /* quantized, n_tokens = 1: (cols / group_size) group sums of x */
} fm_kern_job;

/* Floats per token of prepared activations for weight w at `lanes` lanes (0: the kernel reads x
 * as is). Quantized: whole blocks of lanes words; BF16: whole blocks of lanes word pairs. */
static inline int64_t fm_kern_xp_floats(const fm_weight *w, int lanes) {
    int bits = w->dtype == FM_DTYPE_BF16 ? 16 : fm_quant_bits(w->dtype);
    if (!bits) return 0;
    int64_t V = 32 / bits, words = w->cols / V, blocks = (words + lanes - 1) / lanes;
    return blocks * lanes * V;
}

/* Floats per token of group sums for weight w (0 unless quantized). */
static inline int64_t fm_kern_xsum_floats(const fm_weight *w) {
    return fm_dtype_is_quant(w->dtype) ? w->cols / w->group_size : 0;
}

/* AVX2 + FMA + F16C (kernels_avx2.c).
 * prep: tokens [t0, t1) of x into xp (n_tokens x xp_stride floats, xp_stride =
 *   fm_kern_xp_floats(w, FM_KERN_AVX2_LANES); the layout above, zero past the row end) and, for
 *   quantized weights when xsum is not NULL, their group sums into xsum (n_tokens x cols/group_size).
 *   Called once per matmul, before the rows; nothing to do for F32/F16.
 * rows: out[t, r] for r in [r0, r1), every t (the job's xp and xsum prepared; xsum needed only
 *   for one token). Calls on disjoint row ranges may run concurrently. */
void fm_kern_avx2_prep(const fm_weight *w, const float *x, int64_t t0, int64_t t1, float *xp, int64_t xp_stride,
                       float *xsum);
void fm_kern_avx2_rows(const fm_kern_job *j, int64_t r0, int64_t r1);
/* Reads n bytes at p (any alignment) with 256-bit loads; returns a checksum (so the reads stay). */
uint64_t fm_kern_avx2_read(const void *p, size_t n);

/* AVX-512 F/BW/VL/DQ (kernels_avx512.c), the same contracts with 16 lanes. */
void fm_kern_avx512_prep(const fm_weight *w, const float *x, int64_t t0, int64_t t1, float *xp, int64_t xp_stride,
                         float *xsum);
void fm_kern_avx512_rows(const fm_kern_job *j, int64_t r0, int64_t r1);
uint64_t fm_kern_avx512_read(const void *p, size_t n);

/* ---- int8 activations (kernels_int8.c: AVX-512 VNNI + VBMI, AMX-INT8) ----
 *
 * Quantized weights at several tokens (prefill), an approximation of the product above:
 * activations are rounded per (token, group of the weight's group size) to int8, and optionally a
 * second int8 for the residual ("two levels", ~16-bit precision). In float32 arithmetic, with amax
 * = max |x_c| over the group (amax < FM_KERN_I8_AMAX_MIN, 0 included, gives d = 0 and zeros),
 *     d = amax / 127,  q1_c = round_half_even(x_c * (127 / amax))          in [-127, 127]
 *     two levels:  r_c = fma(-q1_c, d, x_c),  q2_c = clamp(round_half_even(r_c * (127 / amax * 256)), -128, 127)
 * and the activations used are  x^_c = d q1_c  (one level)  or  d (q1_c + q2_c / 256)  (two), i.e.
 * x^_c = dx * Q_c with the integer Q_c = q1_c (dx = d) or 256 q1_c + q2_c (dx = d / 256). Then
 *     out[t, r] = sum_g ( s_g * dx_g * sum_{c in g} q_c Q_c  +  b_g * xs_g ),   xs_g = dx_g * sum_{c in g} Q_c
 * where the integer sums are exact (u8 q times s8 levels: vpdpbusd / tdpbsud; 256 I1 + I2 fits int32)
 * and the rest is float32. This is the exact product with x^ in place of x (up to float32
 * rounding): the error against the exact product is sum_c (q_c s + b)(x^_c - x_c), with |x^_c - x_c|
 * <= d / 2 (one level) or d / 256 (two; d / 512 unless the residual saturates). The bias term uses
 * sum x^ rather than sum x on purpose: then the offset b cancels between the terms; with the exact
 * sum x the error would be sum_c s q_c (x^_c - x_c), whose weights s q_c are all >= 0 (measured
 * 2.7x the KL on the trained fixture).
 *
 * quant: tokens [t0, t1) of x (n_tokens x cols floats) into xq (level 1) and, if xq2 is not NULL,
 *   xq2 (level 2) (int8, xq_stride bytes per token, cols used), dx and xs (cols / group_size floats
 *   per token, as above). The weight must be quantized with cols a multiple of group_size
 *   (fm_quant_check). Needs AVX-512 F/BW/VL/DQ.
 * vnni_rows / amx_rows: out[t, r] for r in [r0, r1), every t; r0 a multiple of 16. xq (and xq2)
 *   must hold whole blocks of 16 tokens (rows n_tokens .. up to the next multiple of 16 all zero):
 *   the AMX kernel reads them. Calls on disjoint row ranges may run concurrently. vnni_rows needs
 *   AVX512-VNNI and VBMI; amx_rows also AMX-TILE/INT8 and the tile-data permission
 *   (arch_prctl(ARCH_REQ_XCOMP_PERM)) granted to the process.
 * amx_probe: runs one tile product on known data and says whether it came out right (call only
 *   where amx_rows may be called). */
/* Groups whose largest |x| is below this round to zeros with d = 0: 127 / amax and 256 * 127 / amax
 * must be finite in float32 (they overflow below ~9.6e-35), and such values are far below what any
 * activation resolves. */
#define FM_KERN_I8_AMAX_MIN 0x1p-110f

typedef struct fm_kern_i8_job {
    float *out;         /* (n_tokens, w->rows) */
    int64_t n_tokens;
    const fm_weight *w; /* Q8, Q4 or Q2, passed fm_quant_check */
    const int8_t *xq;   /* level 1: (round_up(n_tokens, 16), xq_stride) */
    const int8_t *xq2;  /* level 2, the same shape, or NULL: one level */
    int64_t xq_stride;  /* bytes per token, >= cols */
    const float *dx;    /* (n_tokens, cols / group_size) */
    const float *xs;    /* (n_tokens, cols / group_size) */
    const int16_t *xw;  /* AVX2 kernels only: (n_tokens, xw_stride) the integers Q (fm_kern_avx2_i8_widen) */
    int64_t xw_stride;  /* int16 per token of xw, >= cols */
} fm_kern_i8_job;

void fm_kern_i8_quant(const fm_weight *w, const float *x, int64_t t0, int64_t t1, int8_t *xq, int8_t *xq2,
                      int64_t xq_stride, float *dx, float *xs);

/* The geometry of one quantized weight, for the int8 kernels. */
typedef struct fm_kern_qgeom {
    const unsigned char *q, *sp, *bp; /* packed values, scales, biases */
    int64_t K, N, row_bytes, G;       /* G: groups per row */
    int gs, bits;
    fm_dtype sd;
} fm_kern_qgeom;

static inline fm_kern_qgeom fm_kern_qgeom_of(const fm_weight *w) {
    fm_kern_qgeom g = {.q = w->data, .K = w->cols, .N = w->rows, .gs = w->group_size, .bits = fm_quant_bits(w->dtype),
                       .sd = w->scale_dtype};
    g.row_bytes = g.K * g.bits / 8;
    g.G = g.K / g.gs;
    g.sp = g.q + g.N * g.row_bytes;
    g.bp = g.sp + g.N * g.G * (g.sd == FM_DTYPE_F32 ? 4 : 2);
    return g;
}

/* An int8 row kernel per weight type and level count: FM_KERN_I8_TABLE(name, body) defines
 * name_fns[6], body(j, r0, r1, bits, levels) (an always-inline function) for Q8, Q4, Q2 with one
 * level, then the same with two; fm_kern_i8_dispatch runs the one for the job's weight and levels
 * (nothing for another type: ops.c sends none). */
typedef void (*fm_kern_i8_rows_fn)(const fm_kern_i8_job *j, int64_t r0, int64_t r1);
static inline void fm_kern_i8_dispatch(const fm_kern_i8_rows_fn fns[6], const fm_kern_i8_job *j, int64_t r0, int64_t r1) {
    const int bits = fm_quant_bits(j->w->dtype), i = bits == 8 ? 0 : bits == 4 ? 1 : bits == 2 ? 2 : -1;
    if (i >= 0) fns[i + (j->xq2 ? 3 : 0)](j, r0, r1);
}
#define FM_KERN_I8_TABLE(name, body)                                                                             \
    static void name##_q8(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { body(j, r0, r1, 8, 1); }           \
    static void name##_q4(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { body(j, r0, r1, 4, 1); }           \
    static void name##_q2(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { body(j, r0, r1, 2, 1); }           \
    static void name##_q8_2(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { body(j, r0, r1, 8, 2); }         \
    static void name##_q4_2(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { body(j, r0, r1, 4, 2); }         \
    static void name##_q2_2(const fm_kern_i8_job *j, int64_t r0, int64_t r1) { body(j, r0, r1, 2, 2); }         \
    static const fm_kern_i8_rows_fn name##_fns[6] = {name##_q8, name##_q4, name##_q2, name##_q8_2, name##_q4_2,     \
                                                     name##_q2_2};

/* One token (decode), VNNI, weights read in place (kernels_int8.c, "one token"): the same
 * rounded activations and formula, with the per-group integer sum split over 16 lanes (each lane's
 * partial sum converted and scaled on its own) and the activations in another column order.
 * t1_cols: bytes per level of one token's activations in that order (cols rounded up to whole
 *   64-byte chunks of weights).
 * t1_order: puts one level xq (t1_cols bytes: fm_kern_i8_quant's output for one token, zero from
 *   cols on) into that order, in place.
 * vnni_t1_rows: out[r] for r in [r0, r1), any r0; the job's n_tokens = 1, xq (and xq2) in that
 *   order and 64-byte aligned. Needs AVX512-VNNI. Calls on disjoint row ranges may run concurrently. */
int64_t fm_kern_i8_t1_cols(const fm_weight *w);
void fm_kern_i8_t1_order(const fm_weight *w, int8_t *xq);
void fm_kern_vnni_t1_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1);
void fm_kern_vnni_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1);
void fm_kern_amx_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1);
bool fm_kern_amx_probe(void);

/* ---- int8 activations, AVX2 (kernels_int8_avx2.c: AVX2 + FMA + F16C, no AVX-512) ----
 * The same numerics as above (the same rounded activations, exact integer sums per group, the same
 * float32 epilogue); the kernels need only AVX2/FMA/F16C.
 * avx2_i8_quant: fm_kern_i8_quant's contract with AVX2 only; its output is bit-identical to
 *   fm_kern_i8_quant's for finite x.
 * avx2_i8_widen: one token's integers Q (kernels.h above: q1, or 256 q1 + q2 when xq2 is not NULL)
 *   as int16: xw[c] for c < n, n a multiple of 16, from xq[c] (and xq2[c]).
 * avx2_i8_rows: out[t, r] for r in [r0, r1), every t; any r0. Needs the job's xq (and xq2) and xw
 *   (the widened xq/xq2 of every token), dx, xs. Calls on disjoint row ranges may run concurrently.
 * One token, weights read in place (the one-token kernel of kernels_int8_avx2.c):
 * avx2_i8_t1_cols: columns per level of one token's activations (cols rounded up to whole 32-byte
 *   chunks of weights).
 * avx2_i8_t1_order: puts one level xq (t1_cols bytes, zero from cols on) into the kernel's column
 *   order, in place (Q8: the order stays).
 * avx2_i8_t1_rows: out[r] for r in [r0, r1), n_tokens = 1; Q4/Q2 read xq (and xq2) in that order,
 *   Q8 reads xw (t1_cols values, natural order, zero from cols on). Calls on disjoint row ranges may
 *   run concurrently. */
void fm_kern_avx2_i8_quant(const fm_weight *w, const float *x, int64_t t0, int64_t t1, int8_t *xq, int8_t *xq2,
                           int64_t xq_stride, float *dx, float *xs);
void fm_kern_avx2_i8_widen(const int8_t *xq, const int8_t *xq2, int64_t n, int16_t *xw);
void fm_kern_avx2_i8_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1);
int64_t fm_kern_avx2_i8_t1_cols(const fm_weight *w);
void fm_kern_avx2_i8_t1_order(const fm_weight *w, int8_t *xq);
void fm_kern_avx2_i8_t1_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1);
/* avx2_i8_rows and avx2_i8_t1_rows with AVX-VNNI (kernels_int8_avxvnni.c: vpdpbusd / vpdpwssd on
 * 256-bit vectors): the same inputs, the same results. Need AVX-VNNI. */
void fm_kern_avxvnni_i8_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1);
void fm_kern_avxvnni_i8_t1_rows(const fm_kern_i8_job *j, int64_t r0, int64_t r1);

#endif
