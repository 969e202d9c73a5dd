/* CPU kernels, scalar reference versions: these are the oracle every faster kernel (SIMD, CUDA)
 * is tested against. All activations are float32; weights may be F32, BF16, F16 or quantized
 * (Q8/Q4/Q2, converted through fm_dequant_row; see src/quant/quant.h). */
#ifndef FM_BACKEND_CPU_OPS_H
#define FM_BACKEND_CPU_OPS_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/cpu/threadpool.h"
#include "backend/tensor.h"

/* SIMD levels of the matmul kernels (src/backend/cpu/kernels_*.c). */
typedef enum fm_cpu_level {
    FM_CPU_SCALAR = 0, /* fm_cpu_matmul_ref, portable C */
    FM_CPU_AVX2 = 1,   /* AVX2 + FMA + F16C */
    FM_CPU_AVX512 = 2, /* AVX-512 F/BW/VL/DQ (+ FMA, F16C) */
} fm_cpu_level;

/* out[t, r] = sum_c x[t, c] * W[r, c]  for t < n_tokens, r < W.rows.
 * out: (n_tokens, W.rows); x: (n_tokens, W.cols). Rows are split among the pool's threads.
 * Runs at fm_cpu_matmul_level(). The SIMD levels read each weight row once per call whatever
 * n_tokens, and agree with fm_cpu_matmul_ref to float32 rounding of the sum of |products|
 * (quantized weights: of sum_j (|q_j s| + |b|) |x_j|; see kernels.h), not bit for bit.
 * Exception: quantized weights run an int8-activation path (below; fm_cpu_int8_pick(
 * fm_cpu_matmul_int8_mode(), ...); FLASHMOE_CPU_INT8=0 turns it off), one token (decode) included. */
void fm_cpu_matmul(fm_pool *pool, float *out, const float *x, int64_t n_tokens, const fm_weight *w);

/* The scalar reference matmul, the oracle of every faster kernel: each row converted to float32
 * (fm_cpu_get_row / fm_dequant_row) and dotted with each token in float32. Same contract. */
void fm_cpu_matmul_ref(fm_pool *pool, float *out, const float *x, int64_t n_tokens, const fm_weight *w);

/* fm_cpu_matmul at a given level. A level the CPU lacks runs at the best one it has below it.
 * Returns the level that ran (FM_CPU_SCALAR also for types or shapes the SIMD kernels do not
 * take: unknown dtypes, cols <= 0, and when the activation scratch cannot be allocated). */
fm_cpu_level fm_cpu_matmul_at(fm_cpu_level level, fm_pool *pool, float *out, const float *x, int64_t n_tokens,
                              const fm_weight *w);

/* True if this CPU and OS can run `level` (__builtin_cpu_supports: the OS saves the registers). */
bool fm_cpu_level_supported(fm_cpu_level level);

/* The best level this CPU supports. */
fm_cpu_level fm_cpu_level_best(void);

/* "scalar", "avx2", "avx512" ("?" for anything else). */
const char *fm_cpu_level_name(fm_cpu_level level);

/* The level for a FLASHMOE_CPU value: NULL, "" or "auto" give fm_cpu_level_best(); "scalar",
 * "avx2", "avx512" give that level if supported. An unknown name or a level the CPU lacks prints
 * one line on stderr ("flashmoe: FLASHMOE_CPU=avx512: ...; using avx2") and gives the best level. */
fm_cpu_level fm_cpu_level_choose(const char *request);

/* The level fm_cpu_matmul runs at: fm_cpu_level_choose(getenv("FLASHMOE_CPU")), decided once per
 * process on first use (thread-safe). */
fm_cpu_level fm_cpu_matmul_level(void);

/* ---- int8 activations ----
 * Quantized weights (Q8/Q4/Q2) can run with integer dot products: the activations
 * are rounded per (token, weight group) to one int8 level (~0.5% RMS error per product for
 * Gaussian-like activations) or two (int8 + an int8 residual, ~256x smaller), and the result is the
 * exact product with those rounded activations, to float32 rounding (kernels.h, "int8
 * activations"). Like llama.cpp's q8 activations, but two levels by default: one level costs the
 * trained test model visible quality (docs/SPEED.md). */
typedef enum fm_cpu_int8 {
    FM_CPU_INT8_OFF = 0,  /* the float kernels (fm_cpu_matmul_at) */
    FM_CPU_INT8_AVX2 = 1,    /* AVX2 only (vpmaddubsw / vpmaddwd; kernels_int8_avx2.c), one token included */
    FM_CPU_INT8_AVXVNNI = 2, /* the same with AVX-VNNI (256-bit vpdpbusd / vpdpwssd, no AVX-512) */
    FM_CPU_INT8_VNNI = 3,    /* AVX-512 VNNI (vpdpbusd) + VBMI */
    FM_CPU_INT8_AMX = 4,     /* AMX-INT8 tiles (tdpbsud), VNNI for the rest */
} fm_cpu_int8;

/* True if this CPU and OS can run the int8 path `k` (OFF: always). AMX: CPUID, the tile-data
 * permission (arch_prctl(ARCH_REQ_XCOMP_PERM), Linux >= 5.16; asked once per process) and one
 * probe product checked against its known answer. */
bool fm_cpu_int8_supported(fm_cpu_int8 k);

/* The best supported int8 path (OFF if none). */
fm_cpu_int8 fm_cpu_int8_best(void);

/* "off", "avx2", "avxvnni", "vnni", "amx" ("?" for anything else). */
const char *fm_cpu_int8_name(fm_cpu_int8 k);

/* The path for a FLASHMOE_CPU_INT8 value: "auto" or "1" give fm_cpu_int8_best(); "0" or "off" give
 * OFF; "avx2", "avxvnni", "vnni", "amx" give that path if supported; NULL or "" give the default: the best path
 * (ops.c, INT8_DEFAULT_ON). An unknown value or a path the CPU
 * lacks prints one line on stderr and gives the best path. */
fm_cpu_int8 fm_cpu_int8_choose(const char *request);

/* The int8 path to use at float level `level` when path k was chosen: k at AVX512; at AVX2, k if it
 * is AVX2 or AVXVNNI, else (VNNI, AMX) the best of those two (so that FLASHMOE_CPU=avx2 runs no
 * AVX-512 instruction, int8 path included; OFF stays OFF); OFF at SCALAR. */
fm_cpu_int8 fm_cpu_int8_for_level(fm_cpu_level level, fm_cpu_int8 k);

/* The int8 path fm_cpu_matmul uses: fm_cpu_int8_for_level(fm_cpu_matmul_level(),
 * fm_cpu_int8_choose(getenv("FLASHMOE_CPU_INT8"))), decided once per process on first use
 * (thread-safe). So by default AMX or VNNI on AVX-512 CPUs, AVXVNNI or AVX2 on AVX2 CPUs (and
 * with FLASHMOE_CPU=avx2), OFF with FLASHMOE_CPU=scalar or FLASHMOE_CPU_INT8=0. */
fm_cpu_int8 fm_cpu_matmul_int8_mode(void);

/* Overrides the int8 path fm_cpu_matmul uses from now on (an unsupported path gives the best one;
 * OFF: the float kernels) and returns the previous one. For tests that check exactness; call it
 * while no matmul runs. */
fm_cpu_int8 fm_cpu_set_int8_mode(fm_cpu_int8 k);

/* The path fm_cpu_matmul takes in int8 mode `mode` with `levels` activation levels for n_tokens
 * tokens of weight w: OFF (the float kernels) for unquantized weights; with mode AMX, AMX from 6
 * tokens on (12 with one level), VNNI below; mode VNNI: VNNI (one token: the in-place VNNI kernel);
 * mode AVX2 or AVXVNNI: that path (one token: its in-place kernel), except one token of Q8: OFF. */
fm_cpu_int8 fm_cpu_int8_pick(fm_cpu_int8 mode, int levels, const fm_weight *w, int64_t n_tokens);

/* Activation levels fm_cpu_matmul's int8 path uses: FLASHMOE_CPU_INT8_LEVELS = 1 or 2 (default 2;
 * anything else prints one line on stderr and gives 2), decided once per process. */
int fm_cpu_int8_levels(void);

/* fm_cpu_matmul through int8 path k (that kernel, whatever n_tokens, except that one token with
 * VNNI or AMX always takes the in-place VNNI kernel, and with AVX2/AVXVNNI its in-place one; an
 * unsupported path falls back to the best one below it) with
 * `levels` (1 or 2) activation levels. Returns the path that
 * ran; OFF when none could (weight not quantized, levels not 1 or 2, no support, the activation
 * buffer cannot be allocated): then it ran fm_cpu_matmul_at(fm_cpu_level_best()). */
fm_cpu_int8 fm_cpu_matmul_int8(fm_cpu_int8 k, int levels, fm_pool *pool, float *out, const float *x, int64_t n_tokens,
                               const fm_weight *w);

/* One product of a batch for fm_cpu_matvec_many: out (w->rows floats) = w x, one token. */
typedef struct fm_cpu_mv {
    float *out;
    const float *x;
    const fm_weight *w;
} fm_cpu_mv;

#define FM_CPU_MV_MANY 32 /* most products fm_cpu_matvec_many runs in one dispatch */

/* fm_cpu_matmul of one token for each of n products, bit-identical to n such calls: where every
 * product takes the same one-token int8 kernel (and n <= FM_CPU_MV_MANY, their scratch <= 192 KB),
 * the rows of all of them are shared among the pool's threads in one dispatch (a small product
 * alone leaves most of a call to the dispatch and the ramp: 512 x 2048 Q4 ran at 44% of the RAM
 * rate, 1024 x 4096 at 79%); otherwise one call each. Outputs must not overlap the inputs. */
void fm_cpu_matvec_many(fm_pool *pool, const fm_cpu_mv *mv, int n);

/* Reads n bytes at p (any alignment) with the widest loads of `level` (falling back as
 * fm_cpu_matmul_at does) and returns a checksum that depends on every byte, so that the reads
 * cannot be optimised away. For measuring memory read bandwidth (flashmoe kernelbench). */
uint64_t fm_cpu_read_sum(fm_cpu_level level, const void *p, size_t n);

/* Row `row` of a weight matrix converted to float32. out: (w.cols). */
void fm_cpu_get_row(float *out, const fm_weight *w, int64_t row);

/* out = x / sqrt(mean(x^2) + eps) * w   (w may be NULL: no scale). out may alias x. */
void fm_cpu_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);

/* NeoX ("rotate half") RoPE on the first rot_dim values of one head:
 * for i < rot_dim/2, with f = pos * theta^(-2i/rot_dim):
 *   x'[i] = x[i] cos f - x[i + rot_dim/2] sin f;  x'[i + rot_dim/2] = x[i + rot_dim/2] cos f + x[i] sin f. */
void fm_cpu_rope_neox(float *x, int rot_dim, int64_t pos, double theta);

static inline float fm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float fm_silu(float x) { return x / (1.0f + expf(-x)); }
/* torch.nn.functional.softplus with beta 1, threshold 20 */
static inline float fm_softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

#endif
