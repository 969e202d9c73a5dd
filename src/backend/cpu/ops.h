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
 * (quantized weights: of sum_j (|q_j s| + |b|) |x_j|; see kernels.h), not bit for bit. */
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
