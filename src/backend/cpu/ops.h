/* CPU kernels, scalar reference versions: these are the oracle every faster kernel (SIMD, CUDA)
 * is tested against. All activations are float32; weights may be F32, BF16, F16 or quantized
 * (Q8/Q4/Q2, converted through fm_dequant_row; see src/quant/quant.h). */
#ifndef FM_BACKEND_CPU_OPS_H
#define FM_BACKEND_CPU_OPS_H

#include <math.h>
#include <stdint.h>

#include "backend/cpu/threadpool.h"
#include "backend/tensor.h"

/* out[t, r] = sum_c x[t, c] * W[r, c]  for t < n_tokens, r < W.rows.
 * out: (n_tokens, W.rows); x: (n_tokens, W.cols). Rows are split among the pool's threads. */
void fm_cpu_matmul(fm_pool *pool, float *out, const float *x, int64_t n_tokens, const fm_weight *w);

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
