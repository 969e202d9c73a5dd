/* CPU kernels of the token mixers (src/model/forward.c): the gated delta rule step of a DeltaNet
 * value head, the vector primitives of attention, and the scan of a logits row for its largest
 * value (the sampler's and bench's argmax). Each has a scalar reference (the oracle,
 * the code the forward pass ran before these kernels existed) and AVX-512 / AVX2 versions chosen
 * at run time by fm_cpu_matmul_level() (FLASHMOE_CPU=scalar|avx2|avx512). The SIMD versions use
 * fused multiply-adds and a different summation order, so they agree with the reference to float32
 * rounding (tests/test_mixer.c states the tolerances), not bit for bit. */
#ifndef FM_BACKEND_CPU_MIXER_KERNELS_H
#define FM_BACKEND_CPU_MIXER_KERNELS_H

#include <stdint.h>

#include "backend/cpu/ops.h"

/* One token of the gated delta rule for one value head, state S (dk rows of dv floats):
 *   S = decay * S;  d = beta * (v - S^T k);  S = S + k d^T;  o = S^T q
 * k, q: (dk) already normalised and scaled; v, o: (dv). o must not alias S, k, q or v. */
void fm_cpu_delta_rule_token(float *S, int64_t dk, int64_t dv, const float *k, const float *q, const float *v,
                             float decay, float beta, float *o);

/* The same at a given level (a level the CPU lacks runs the best one below it). */
void fm_cpu_delta_rule_token_at(fm_cpu_level level, float *S, int64_t dk, int64_t dv, const float *k, const float *q,
                                const float *v, float decay, float beta, float *o);

/* sum_i a[i] b[i] */
float fm_cpu_dot(const float *a, const float *b, int64_t n);
float fm_cpu_dot_at(fm_cpu_level level, const float *a, const float *b, int64_t n);

/* y[i] = y[i] * s + a * x[i]  (s = 1: axpy; a = 0: scale) */
void fm_cpu_scale_axpy(float *y, float s, float a, const float *x, int64_t n);
void fm_cpu_scale_axpy_at(fm_cpu_level level, float *y, float s, float a, const float *x, int64_t n);

/* The index of the first largest of x[0..n) (NaN-free input: argmax as `if (x[i] > x[best]) best =
 * i`), with *max_out = that value; -1 when n < 1 or any x[i] is NaN. Bit-exact at every level. */
int64_t fm_cpu_argmax(const float *x, int64_t n, float *max_out);
int64_t fm_cpu_argmax_at(fm_cpu_level level, const float *x, int64_t n, float *max_out);

#endif
