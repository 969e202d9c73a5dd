/* Layer kernels of the forward pass on the GPU (see the "layer kernels" section of cuda_backend.h):
 * residual + RMSNorm, the gated RMSNorm of Gated DeltaNet, per-head RMSNorm + partial RoPE, the
 * causal depthwise conv1d + SiLU with its state, the gated delta rule recurrence, gated attention
 * over the KV cache, the router's softmax + top-k, the row gather of the routed experts and the
 * weighted expert combine + residual. Each mirrors the order of operations of src/model/forward.c
 * (and fm_cpu_rmsnorm, fm_cpu_rope_neox), except that sums over many values are reduced across
 * threads, so results differ from the CPU by float32 rounding only. No fast-math: expf, log1pf,
 * sqrtf, cosf, sinf and divisions are IEEE-accurate CUDA library calls. */
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

extern "C" {
#include "quant/quant.h"
}

namespace {

constexpr int BLOCK = 256;

/* Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
 * `red` has room for 32 floats; the function begins and ends with a barrier, so it may be called
 * repeatedly with the same buffer. */
__device__ float block_sum(float v, float *red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float tot = 0.f;
    const int nw = (int)(blockDim.x >> 5);
    for (int i = 0; i < nw; i++) tot += red[i];
    __syncthreads();
    return tot;
}

__device__ float block_max(float v, float *red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float m = -INFINITY;
    const int nw = (int)(blockDim.x >> 5);
    for (int i = 0; i < nw; i++) m = fmaxf(m, red[i]);
    __syncthreads();
    return m;
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

/* ---- residual + RMSNorm: x += add (optional); xn = x / sqrt(mean(x^2) + eps) * w ----
 * One block per row, of BLOCK threads, or up to 1024 for fewer rows than SMs (decode: one block,
 * whose time is a chain of dependent loads per thread; 2 values a thread instead of 8 took it
 * from 7.4 to 4.3 us at n = 2048 on an H200). */
__global__ void __launch_bounds__(1024) add_rmsnorm_kernel(float *x, float *xn, const float *add, const float *w,
                                                           long long n, float eps) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    __shared__ float red[32];
    float *xr = x + (long long)blockIdx.x * n;
    float *orow = xn + (long long)blockIdx.x * n;
    const float *ar = add ? add + (long long)blockIdx.x * n : nullptr;
    float ss = 0.f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (ar) {
            v += ar[i];
            xr[i] = v;
        }
        ss = fmaf(v, v, ss);
    }
    const float tot = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(tot / (float)n + eps);
    for (long long i = threadIdx.x; i < n; i += blockDim.x) orow[i] = xr[i] * scale * (w ? w[i] : 1.0f);
}

/* ---- gated RMSNorm (DeltaNet output): out = rmsnorm(x) * w * silu(z), per row of n ---- */
__global__ void __launch_bounds__(BLOCK) rmsnorm_gated_kernel(float *out, const float *x, const float *z,
                                                              const float *w, long long n, float eps) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    __shared__ float red[32];
    const long long r = blockIdx.x;
    const float *xr = x + r * n, *zr = z + r * n;
    float *orow = out + r * n;
    float ss = 0.f;
    for (long long i = threadIdx.x; i < n; i += BLOCK) ss = fmaf(xr[i], xr[i], ss);
    const float tot = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(tot / (float)n + eps);
    for (long long i = threadIdx.x; i < n; i += BLOCK) {
        const float v = xr[i] * scale * w[i]; /* fm_cpu_rmsnorm, then o *= silu(z) */
        orow[i] = v * silu(zr[i]);
    }
}

/* ---- per-head RMSNorm + NeoX RoPE on the first rot_dim values: one block per (token, head) ---- */
__global__ void __launch_bounds__(128) head_norm_rope_kernel(float *out, long long out_stride, const float *in,
                                                             long long in_stride, const float *w, int n_heads, int d,
                                                             float eps, int rot_dim, const float *inv_freq,
                                                             long long pos0, const long long *pos_dev,
                                                             long long out_pos_stride) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    extern __shared__ float sh[]; /* d floats */
    __shared__ float red[32];
    const long long r = blockIdx.x; /* t * n_heads + h */
    const long long t = r / n_heads;
    if (pos_dev) { /* the position from device memory (a graph replays this launch at every position) */
        const long long p = *pos_dev;
        pos0 += p;
        out += p * out_pos_stride;
    }
    const float *src = in + r * in_stride;
    float *dst = out + r * out_stride;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss = fmaf(src[i], src[i], ss);
    const float tot = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(tot / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) sh[i] = src[i] * scale * w[i];
    __syncthreads();
    const int half = rot_dim / 2;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        if (i < half) { /* as fm_cpu_rope_neox: angle = (float)pos * inv_freq in float32 */
            const float f = (float)(pos0 + t) * inv_freq[i];
            const float c = cosf(f), s = sinf(f), a = sh[i], b = sh[i + half];
            dst[i] = a * c - b * s;
            dst[i + half] = b * c + a * s;
        } else if (i >= rot_dim) {
            dst[i] = sh[i];
        }
    }
}

/* ---- causal depthwise conv1d over [state (K-1 rows); in (T rows)], SiLU, state update ----
 * One thread per channel: everything it reads and writes is its own channel. */
__global__ void conv1d_silu_kernel(float *out, const float *in, float *state, const float *w, long long T,
                                   long long C, int K) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    const long long ch = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    const float *wc = w + ch * K;
    for (long long t = 0; t < T; t++) {
        float acc = 0.f;
        for (int j = 0; j < K; j++) {
            const long long idx = t + j - (K - 1);
            const float v = idx >= 0 ? in[idx * C + ch] : state[(K - 1 + idx) * C + ch];
            acc += wc[j] * v;
        }
        out[t * C + ch] = silu(acc);
    }
    for (int i = 0; i < K - 1; i++) { /* keep the last K-1 inputs; reads run ahead of writes */
        const long long src = T + i;
        state[(long long)i * C + ch] = src < K - 1 ? state[src * C + ch] : in[(src - (K - 1)) * C + ch];
    }
}

/* conv1d_silu_kernel for one token and K <= CONV1_K, bit-identical: the channel's weights and state
 * (this kernel's own, written by its launch for the previous token: long complete, as the delta
 * rule's state) loaded before the PDL wait, so only the input is read after it. */
constexpr int CONV1_K = 8;

__global__ void conv1d_silu_one_kernel(float *out, const float *in, float *state, const float *w, long long C, int K) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch */
    const long long ch = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float wv[CONV1_K], sv[CONV1_K];
    if (ch < C) {
#pragma unroll
        for (int j = 0; j < CONV1_K; j++) {
            wv[j] = j < K ? w[ch * K + j] : 0.f;
            sv[j] = j < K - 1 ? state[(long long)j * C + ch] : 0.f;
        }
    }
    fm_pdl_wait(); /* the input from the predecessor */
    if (ch >= C) return;
    const float x = in[ch];
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < CONV1_K; j++)
        if (j < K) acc += wv[j] * (j < K - 1 ? sv[j] : x);
    out[ch] = silu(acc);
#pragma unroll
    for (int i = 0; i < CONV1_K - 1; i++) /* keep the last K-1 inputs */
        if (i < K - 1) state[(long long)i * C + ch] = i + 1 < K - 1 ? sv[i + 1] : x;
}

/* ---- gated delta rule: one block per value head h, the chunk's T tokens in order ----
 * Thread j owns column j of the head's state S (dk x dv, row-major in global memory). Per token:
 *   q, k = l2norm(q), l2norm(k) (1e-6 inside the rsqrt); q *= dk^-1/2
 *   decay = exp(-exp(A_log) softplus(a + dt_bias)); beta = sigmoid(b)
 *   S = decay S; d = beta (v - S^T k); S += k d^T; o = S^T q   (o before the gated norm) */
__global__ void delta_rule_kernel(float *o, const float *qkv, const float *bb, const float *aa, float *S, const float *A_log,
                                  const float *dt_bias, long long T, int nk, int nv, int dk, int dv) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    extern __shared__ float sh[]; /* qn (dk) | kn (dk) */
    __shared__ float red[32];
    float *qn = sh, *kn = sh + dk;
    const int h = blockIdx.x, g = h / (nv / nk);
    const long long kd = (long long)nk * dk, cd = 2 * kd + (long long)nv * dv, vd = (long long)nv * dv;
    float *Sh = S + (long long)h * dk * dv;
    const float A = -expf(A_log[h]);
    const float q_scale = 1.0f / sqrtf((float)dk);
    const int j = threadIdx.x;
    for (long long t = 0; t < T; t++) {
        const float *row = qkv + t * cd;
        const float *q = row + (long long)g * dk, *k = row + kd + (long long)g * dk, *v = row + 2 * kd + (long long)h * dv;
        float sq = 0.f, sk = 0.f;
        for (int i = threadIdx.x; i < dk; i += blockDim.x) {
            sq = fmaf(q[i], q[i], sq);
            sk = fmaf(k[i], k[i], sk);
        }
        sq = block_sum(sq, red);
        sk = block_sum(sk, red);
        const float iq = 1.0f / sqrtf(sq + 1e-6f), ik = 1.0f / sqrtf(sk + 1e-6f);
        for (int i = threadIdx.x; i < dk; i += blockDim.x) {
            qn[i] = q[i] * iq * q_scale;
            kn[i] = k[i] * ik;
        }
        __syncthreads();
        const float b = bb[t * nv + h], a = aa[t * nv + h];
        const float decay = expf(A * softplus(a + dt_bias[h]));
        const float beta = fm_sigmoid(b);
        if (j < dv) {
            float kv = 0.f;
            for (int i = 0; i < dk; i++) {
                const float s = Sh[(long long)i * dv + j] * decay;
                Sh[(long long)i * dv + j] = s;
                kv += s * kn[i];
            }
            const float dd = beta * (v[j] - kv);
            float acc = 0.f;
            for (int i = 0; i < dk; i++) {
                const float s = Sh[(long long)i * dv + j] + kn[i] * dd;
                Sh[(long long)i * dv + j] = s;
                acc += s * qn[i];
            }
            o[t * vd + (long long)h * dv + j] = acc;
        }
        __syncthreads(); /* qn, kn are rewritten by the next token */
    }
}

/* The same for dk <= DELTA_REG_DK and dv <= 128: thread j keeps column j of S in registers for
 * the whole chunk (loaded once, stored once), so a token's two passes over S are register
 * arithmetic instead of dk dependent global loads and stores each. Same order of operations. */
constexpr int DELTA_REG_DK = 128;

__global__ void __launch_bounds__(128) delta_rule_reg_kernel(float *o, const float *qkv, const float *bb,
                                                             const float *aa, float *S, const float *A_log,
                                                             const float *dt_bias, long long T, int nk, int nv,
                                                             int dk, int dv) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch */
    extern __shared__ float sh[]; /* qn (dk) | kn (dk) */
    __shared__ float red[32];
    float *qn = sh, *kn = sh + dk;
    const int h = blockIdx.x, g = h / (nv / nk);
    const long long kd = (long long)nk * dk, cd = 2 * kd + (long long)nv * dv, vd = (long long)nv * dv;
    float *Sh = S + (long long)h * dk * dv;
    const float A = -expf(A_log[h]);
    const float q_scale = 1.0f / sqrtf((float)dk);
    const int j = threadIdx.x;
    const bool col = j < dv;
    float s[DELTA_REG_DK];
    /* S is this kernel's own state (the previous token's launch wrote it, long complete): loaded
     * before the PDL wait, so that it overlaps the predecessor (the conv) */
#pragma unroll
    for (int i = 0; i < DELTA_REG_DK; i++) s[i] = col && i < dk ? Sh[(long long)i * dv + j] : 0.f;
    fm_pdl_wait(); /* qkv, b, a from the predecessors */
    for (long long t = 0; t < T; t++) {
        const float *row = qkv + t * cd;
        const float *q = row + (long long)g * dk, *k = row + kd + (long long)g * dk, *v = row + 2 * kd + (long long)h * dv;
        float sq = 0.f, sk = 0.f;
        for (int i = threadIdx.x; i < dk; i += blockDim.x) {
            sq = fmaf(q[i], q[i], sq);
            sk = fmaf(k[i], k[i], sk);
        }
        sq = block_sum(sq, red);
        sk = block_sum(sk, red);
        const float iq = 1.0f / sqrtf(sq + 1e-6f), ik = 1.0f / sqrtf(sk + 1e-6f);
        for (int i = threadIdx.x; i < dk; i += blockDim.x) {
            qn[i] = q[i] * iq * q_scale;
            kn[i] = k[i] * ik;
        }
        __syncthreads();
        const float b = bb[t * nv + h], a = aa[t * nv + h];
        const float decay = expf(A * softplus(a + dt_bias[h]));
        const float beta = fm_sigmoid(b);
        if (col) {
            float kv = 0.f;
#pragma unroll
            for (int i = 0; i < DELTA_REG_DK; i++)
                if (i < dk) {
                    s[i] *= decay;
                    kv += s[i] * kn[i];
                }
            const float dd = beta * (v[j] - kv);
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < DELTA_REG_DK; i++)
                if (i < dk) {
                    s[i] += kn[i] * dd;
                    acc += s[i] * qn[i];
                }
            o[t * vd + (long long)h * dv + j] = acc;
        }
        __syncthreads(); /* qn, kn are rewritten by the next token */
    }
    if (col) {
#pragma unroll
        for (int i = 0; i < DELTA_REG_DK; i++)
            if (i < dk) Sh[(long long)i * dv + j] = s[i];
    }
}

/* The same recurrence with a warp per 8 columns of a head (dk <= 128, dv a multiple of 8, at most
 * 128): lane l holds rows rg + 16 r (rg = l >> 1, r < 8) of the 4 columns c0 + 4 (l & 1) .. + 3 as
 * float4s (32 state values a thread instead of 128), so a warp's load of one r is 16 rows x 32 bytes,
 * whole sectors; the column dots (S^T k, S^T q) are 8 products in the lane and a shuffle tree over
 * the 16 lanes of a column (xor 2..16), and the norms of q and k the same: no shared memory and no
 * block barrier in the recurrence. A block holds `wpb` warps of one head (blockIdx.x = h * splits +
 * part). With z (gated, one block per head), the block then applies the gated RMSNorm of the head's
 * dv outputs, out = rmsnorm(o) * w * silu(z) (rmsnorm_gated_kernel's arithmetic, the sum of squares
 * over the block by warps): one barrier a token. The state is loaded before the PDL wait (as
 * delta_rule_reg_kernel). Sums are in another order than the CPU's: results differ by rounding. */
constexpr int DCOL_RPT = 8; /* rows a thread: dk <= 16 * DCOL_RPT */

template <bool GATED>
__global__ void __launch_bounds__(512) delta_cols_kernel(float *o, const float *qkv, const float *bb, const float *aa,
                                                         float *S, const float *A_log, const float *dt_bias,
                                                         const float *z, const float *nw, float eps, long long T,
                                                         int nk, int nv, int dk, int dv, int splits) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch */
    __shared__ float red[2][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = (int)(blockDim.x >> 5);
    const int h = (int)blockIdx.x / splits, part = (int)blockIdx.x - h * splits, g = h / (nv / nk);
    const int c0 = (part * wpb + warp) * 8 + 4 * (lane & 1), rg = lane >> 1;
    const long long kd = (long long)nk * dk, cd = 2 * kd + (long long)nv * dv, vd = (long long)nv * dv;
    float *Sh = S + (long long)h * dk * dv + c0;
    float4 s[DCOL_RPT];
#pragma unroll
    for (int r = 0; r < DCOL_RPT; r++) {
        const int i = rg + 16 * r;
        s[r] = i < dk ? *reinterpret_cast<const float4 *>(Sh + (long long)i * dv) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const float A = -expf(A_log[h]), dtb = dt_bias[h];
    const float q_scale = 1.0f / sqrtf((float)dk);
    float4 w4 = make_float4(0.f, 0.f, 0.f, 0.f);
    if (GATED) w4 = make_float4(nw[c0], nw[c0 + 1], nw[c0 + 2], nw[c0 + 3]);
    fm_pdl_wait(); /* qkv, b, a from the predecessors */
    for (long long t = 0; t < T; t++) {
        const float *row = qkv + t * cd;
        const float *q = row + (long long)g * dk, *k = row + kd + (long long)g * dk, *v = row + 2 * kd + (long long)h * dv + c0;
        float qn[DCOL_RPT], kn[DCOL_RPT], sq = 0.f, sk = 0.f;
#pragma unroll
        for (int r = 0; r < DCOL_RPT; r++) {
            const int i = rg + 16 * r;
            qn[r] = i < dk ? q[i] : 0.f;
            kn[r] = i < dk ? k[i] : 0.f;
        }
        const float v0 = v[0], v1 = v[1], v2 = v[2], v3 = v[3];
        const float b = bb[t * nv + h], a = aa[t * nv + h];
#pragma unroll
        for (int r = 0; r < DCOL_RPT; r++) {
            sq = fmaf(qn[r], qn[r], sq);
            sk = fmaf(kn[r], kn[r], sk);
        }
#pragma unroll
        for (int m = 2; m < 32; m <<= 1) {
            sq += __shfl_xor_sync(0xffffffffu, sq, m);
            sk += __shfl_xor_sync(0xffffffffu, sk, m);
        }
        const float iq = 1.0f / sqrtf(sq + 1e-6f), ik = 1.0f / sqrtf(sk + 1e-6f);
#pragma unroll
        for (int r = 0; r < DCOL_RPT; r++) {
            qn[r] = qn[r] * iq * q_scale;
            kn[r] = kn[r] * ik;
        }
        const float decay = expf(A * softplus(a + dtb));
        const float beta = fm_sigmoid(b);
        float4 kv = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int r = 0; r < DCOL_RPT; r++) {
            s[r].x *= decay, s[r].y *= decay, s[r].z *= decay, s[r].w *= decay;
            kv.x = fmaf(s[r].x, kn[r], kv.x), kv.y = fmaf(s[r].y, kn[r], kv.y);
            kv.z = fmaf(s[r].z, kn[r], kv.z), kv.w = fmaf(s[r].w, kn[r], kv.w);
        }
#pragma unroll
        for (int m = 2; m < 32; m <<= 1) {
            kv.x += __shfl_xor_sync(0xffffffffu, kv.x, m), kv.y += __shfl_xor_sync(0xffffffffu, kv.y, m);
            kv.z += __shfl_xor_sync(0xffffffffu, kv.z, m), kv.w += __shfl_xor_sync(0xffffffffu, kv.w, m);
        }
        const float d0 = beta * (v0 - kv.x), d1 = beta * (v1 - kv.y), d2 = beta * (v2 - kv.z), d3 = beta * (v3 - kv.w);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int r = 0; r < DCOL_RPT; r++) {
            s[r].x = fmaf(kn[r], d0, s[r].x), s[r].y = fmaf(kn[r], d1, s[r].y);
            s[r].z = fmaf(kn[r], d2, s[r].z), s[r].w = fmaf(kn[r], d3, s[r].w);
            acc.x = fmaf(s[r].x, qn[r], acc.x), acc.y = fmaf(s[r].y, qn[r], acc.y);
            acc.z = fmaf(s[r].z, qn[r], acc.z), acc.w = fmaf(s[r].w, qn[r], acc.w);
        }
#pragma unroll
        for (int m = 2; m < 32; m <<= 1) {
            acc.x += __shfl_xor_sync(0xffffffffu, acc.x, m), acc.y += __shfl_xor_sync(0xffffffffu, acc.y, m);
            acc.z += __shfl_xor_sync(0xffffffffu, acc.z, m), acc.w += __shfl_xor_sync(0xffffffffu, acc.w, m);
        }
        float *orow = o + t * vd + (long long)h * dv + c0;
        if (GATED) { /* the head's sum of squares: the warp's 8 columns, then the block's warps */
            const float *zr = z + t * vd + (long long)h * dv + c0;
            const float z0 = zr[0], z1 = zr[1], z2 = zr[2], z3 = zr[3];
            float ss = acc.x * acc.x + acc.y * acc.y + acc.z * acc.z + acc.w * acc.w;
            ss += __shfl_xor_sync(0xffffffffu, ss, 1);
            if (lane == 0) red[t & 1][warp] = ss;
            float tot = 0.f;
            __syncthreads(); /* red[t & 1] is rewritten two tokens on, after the next barrier */
            for (int w = 0; w < wpb; w++) tot += red[t & 1][w];
            const float scale = 1.0f / sqrtf(tot / (float)dv + eps);
            if (lane < 2) {
                orow[0] = acc.x * scale * w4.x * silu(z0);
                orow[1] = acc.y * scale * w4.y * silu(z1);
                orow[2] = acc.z * scale * w4.z * silu(z2);
                orow[3] = acc.w * scale * w4.w * silu(z3);
            }
        } else if (lane < 2) {
            orow[0] = acc.x, orow[1] = acc.y, orow[2] = acc.z, orow[3] = acc.w;
        }
    }
#pragma unroll
    for (int r = 0; r < DCOL_RPT; r++) {
        const int i = rg + 16 * r;
        if (i < dk) *reinterpret_cast<float4 *>(Sh + (long long)i * dv) = s[r];
    }
}

/* ---- gated attention over the KV cache: one block per (token, head), ATT_WARPS warps ----
 * Warp w takes positions w, w + ATT_WARPS, ... <= pos0 + t with its own online softmax (running
 * max m, sum, and o in registers: lane l holds o[l + 32 i]); the warps' partial results are
 * merged at the end: M = max m_w, sum = sum_w sum_w e^(m_w - M), o = sum_w o_w e^(m_w - M).
 * out = o / sum * sigmoid(gate). head_dim <= ATT_MAX_D. */
constexpr int ATT_WARPS = 4;
constexpr int ATT_MAX_D = 512;
constexpr int ATT_PER_LANE = ATT_MAX_D / 32;

__global__ void __launch_bounds__(ATT_WARPS * 32) attention_kernel(float *out, const float *q, const float *gate,
                                                                   long long gate_stride, const float *kc,
                                                                   const float *vc, long long pos0, int nh, int nkv,
                                                                   int d, float scale, const long long *pos_dev) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    __shared__ float sm_m[ATT_WARPS], sm_s[ATT_WARPS];
    __shared__ float sm_o[ATT_WARPS][ATT_MAX_D];
    const long long r = blockIdx.x; /* t * nh + h */
    const long long t = r / nh;
    const int h = (int)(r % nh), kvh = h / (nh / nkv);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const float *qr = q + r * d;
    float qreg[ATT_PER_LANE], o[ATT_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; i++) {
        const int c = lane + 32 * i;
        qreg[i] = c < d ? qr[c] : 0.f;
        o[i] = 0.f;
    }
    float m = -INFINITY, sum = 0.f;
    const long long last = pos0 + (pos_dev ? *pos_dev : 0) + t;
    for (long long p = wid; p <= last; p += ATT_WARPS) {
        const float *k = kc + (p * nkv + kvh) * d, *v = vc + (p * nkv + kvh) * d;
        float part = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; i++) {
            const int c = lane + 32 * i;
            if (c < d) part = fmaf(qreg[i], k[c], part);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        const float sc = part * scale;
        if (sc > m) {
            const float rescale = expf(m - sc);
            sum *= rescale;
#pragma unroll
            for (int i = 0; i < ATT_PER_LANE; i++) o[i] *= rescale;
            m = sc;
        }
        const float e = expf(sc - m);
        sum += e;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; i++) {
            const int c = lane + 32 * i;
            if (c < d) o[i] = fmaf(e, v[c], o[i]);
        }
    }
    if (lane == 0) {
        sm_m[wid] = m;
        sm_s[wid] = sum;
    }
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; i++) {
        const int c = lane + 32 * i;
        if (c < d) sm_o[wid][c] = o[i];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm_m[w]);
    float tot = 0.f, f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = sm_m[w] == -INFINITY ? 0.f : expf(sm_m[w] - M);
        tot += sm_s[w] * f[w];
    }
    const float *g = gate + r * gate_stride;
    for (int c = threadIdx.x; c < d; c += ATT_WARPS * 32) {
        float acc = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) acc += sm_o[w][c] * f[w];
        out[r * d + c] = acc / tot * fm_sigmoid(g[c]);
    }
}

/* ---- one token's gated attention with its q / k norms, RoPE and KV-cache store in one kernel (the
 * decode step's head_norm_rope_at for q and for k, store_at for v and attention_at).
 * Grid (n_head, n_split), ATD_THREADS threads. Block (h, s) norms and rotates q of head h and k of its
 * KV head into shared memory, takes v there too (every load of that at once, the weights before the
 * PDL wait, one reduction for both norms); block (h, 0) of the first head of each KV group
 * writes that k and v into the caches at pos = *pos_dev. Positions < pos are read from the caches,
 * position pos from shared memory (so no block waits for another's store).
 * The positions 0..pos are cut in chunks of ATD_CHUNK; split s takes chunks s, s + n_split, ...
 * (only the first min(n_split, chunks) splits have work; the others end at once). Per chunk, two
 * passes with no serial chain through the softmax: (1) each warp scores ATD_PPW positions at once
 * (their k loads all in flight) into shared memory; (2) the chunk's max and exponentials, then each
 * thread accumulates its columns of sum_j e_j v_j over the chunk, ATD_VB v rows in flight. Chunks
 * merge online (running max M, sum L, o). With one active split the block writes
 * out = o / L * sigmoid(gate); with more, each writes (M, L, o) into the scratch and the last to
 * finish (a per-head counter, reset by that block) merges them in split order (deterministic).
 * qg: per head [q (d) | gate (d)]; kv: [k (nkv d) | v (nkv d)]. Grids are small (heads x splits):
 * one block an SM, so the registers are not capped for occupancy (80 spilled, 167 do not). ---- */
constexpr int ATD_WARPS = 8;
constexpr int ATD_THREADS = ATD_WARPS * 32;
constexpr int ATD_CHUNK = 64;
constexpr int ATD_PPW = 4;
constexpr int ATD_VB = 8;
constexpr int ATD_COLS = ATT_MAX_D / ATD_THREADS;
constexpr int ATD_MAX_SPLIT = 32;

/* The scratch's layout: a counter per head (rounded to 4), then (M, L) per (head, split), then o. */
__host__ __device__ inline long long atd_ml_offset(int nh) { return (nh + 3) / 4 * 4; }
__host__ __device__ inline long long atd_o_offset(int nh, int n_split) {
    return atd_ml_offset(nh) + 2LL * nh * n_split;
}

__global__ void __launch_bounds__(ATD_THREADS, 1) attention_decode_kernel(
    float *out, const float *qg, const float *kv, const float *qw, const float *kw, float eps, int rot_dim,
    const float *inv_freq, float *kc, float *vc, const long long *pos_dev, int nh, int nkv, int d, float scale,
    float *scratch) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch */
    extern __shared__ float ad_sh[]; /* sq | sk | sv | tq | tk, d floats each */
    __shared__ float red[2][ATD_WARPS];
    __shared__ float sc[ATD_CHUNK], se[ATD_CHUNK], fsplit[ATD_MAX_SPLIT];
    __shared__ int last_sh;
    float *sq = ad_sh, *sk = ad_sh + d, *sv = ad_sh + 2 * d, *tq = ad_sh + 3 * d, *tk = ad_sh + 4 * d;
    const int h = blockIdx.x, s = blockIdx.y, S = gridDim.y, group = nh / nkv, kvh = h / group;
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, half = rot_dim / 2;
    /* the prologue: every load at once. Weights first (constants: before the PDL wait), then q, k, v;
     * one reduction gives both norms; RoPE pairs element i with i +- half through shared memory. */
    float wq[ATD_COLS], wk[ATD_COLS], fr[ATD_COLS], qval[ATD_COLS], kval[ATD_COLS], vval[ATD_COLS];
#pragma unroll
    for (int e = 0; e < ATD_COLS; e++) {
        const int i = threadIdx.x + ATD_THREADS * e, j = i < half ? i : i - half;
        wq[e] = i < d ? qw[i] : 0.f;
        wk[e] = i < d ? kw[i] : 0.f;
        fr[e] = i < rot_dim ? inv_freq[j] : 0.f;
    }
    fm_pdl_wait(); /* the predecessor's writes are visible from here */
    const long long pos = *pos_dev, nchunk = pos / ATD_CHUNK + 1;
    const int active = (int)(nchunk < S ? nchunk : S);
    if (s >= active) return; /* the whole block: before any barrier */
    float ssq = 0.f, ssk = 0.f;
#pragma unroll
    for (int e = 0; e < ATD_COLS; e++) {
        const int i = threadIdx.x + ATD_THREADS * e;
        qval[e] = i < d ? qg[(long long)h * 2 * d + i] : 0.f;
        kval[e] = i < d ? kv[(long long)kvh * d + i] : 0.f;
        vval[e] = i < d ? kv[(long long)(nkv + kvh) * d + i] : 0.f;
    }
#pragma unroll
    for (int e = 0; e < ATD_COLS; e++) ssq = fmaf(qval[e], qval[e], ssq), ssk = fmaf(kval[e], kval[e], ssk);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        ssq += __shfl_xor_sync(0xffffffffu, ssq, off);
        ssk += __shfl_xor_sync(0xffffffffu, ssk, off);
    }
    if (lane == 0) red[0][wid] = ssq, red[1][wid] = ssk;
    __syncthreads();
    ssq = ssk = 0.f;
#pragma unroll
    for (int w = 0; w < ATD_WARPS; w++) ssq += red[0][w], ssk += red[1][w];
    const float scq = 1.0f / sqrtf(ssq / (float)d + eps), sck = 1.0f / sqrtf(ssk / (float)d + eps);
#pragma unroll
    for (int e = 0; e < ATD_COLS; e++) {
        const int i = threadIdx.x + ATD_THREADS * e;
        if (i < d) {
            qval[e] = qval[e] * scq * wq[e];
            kval[e] = kval[e] * sck * wk[e];
            tq[i] = qval[e];
            tk[i] = kval[e];
            sv[i] = vval[e];
        }
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < ATD_COLS; e++) {
        const int i = threadIdx.x + ATD_THREADS * e;
        if (i < d && i < rot_dim) { /* neox: (i, i + half) rotate by pos * inv_freq[i mod half] */
            const float f = (float)pos * fr[e], c = cosf(f), sn = sinf(f);
            if (i < half) {
                sq[i] = qval[e] * c - tq[i + half] * sn;
                sk[i] = kval[e] * c - tk[i + half] * sn;
            } else {
                sq[i] = qval[e] * c + tq[i - half] * sn;
                sk[i] = kval[e] * c + tk[i - half] * sn;
            }
        } else if (i < d) {
            sq[i] = qval[e];
            sk[i] = kval[e];
        }
    }
    __syncthreads();
    if (s == 0 && h % group == 0)
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            kc[(pos * nkv + kvh) * d + i] = sk[i];
            vc[(pos * nkv + kvh) * d + i] = sv[i];
        }
    float qreg[ATT_PER_LANE], o[ATD_COLS];
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; i++) {
        const int c = lane + 32 * i;
        qreg[i] = c < d ? sq[c] : 0.f;
    }
#pragma unroll
    for (int cc = 0; cc < ATD_COLS; cc++) o[cc] = 0.f;
    float M = -INFINITY, L = 0.f;
    for (long long chunk = s; chunk < nchunk; chunk += S) {
        const long long p0 = chunk * ATD_CHUNK;
        const int n = (int)(pos + 1 - p0 < ATD_CHUNK ? pos + 1 - p0 : ATD_CHUNK);
        /* (1) scores */
        for (int j0 = wid * ATD_PPW; j0 < n; j0 += ATD_WARPS * ATD_PPW) {
            const float *kr[ATD_PPW];
            float part[ATD_PPW];
#pragma unroll
            for (int u = 0; u < ATD_PPW; u++) {
                const long long p = p0 + j0 + u;
                kr[u] = j0 + u >= n || p == pos ? sk : kc + (p * nkv + kvh) * d;
                part[u] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < ATT_PER_LANE; i++) {
                const int c = lane + 32 * i;
                if (c < d) {
#pragma unroll
                    for (int u = 0; u < ATD_PPW; u++) part[u] = fmaf(qreg[i], kr[u][c], part[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < ATD_PPW; u++)
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) part[u] += __shfl_xor_sync(0xffffffffu, part[u], off);
            if (lane == 0)
#pragma unroll
                for (int u = 0; u < ATD_PPW; u++)
                    if (j0 + u < n) sc[j0 + u] = part[u] * scale;
        }
        __syncthreads();
        /* (2) the chunk's weights, then o = o f + sum_j e_j v_j */
        float cm = -INFINITY;
        for (int j = 0; j < n; j++) cm = fmaxf(cm, sc[j]);
        const float mnew = fmaxf(M, cm), f = expf(M - mnew);
        for (int j = threadIdx.x; j < n; j += ATD_THREADS) se[j] = expf(sc[j] - mnew);
        __syncthreads();
        float csum = 0.f;
        for (int j = 0; j < n; j++) csum += se[j];
        L = L * f + csum;
        M = mnew;
#pragma unroll
        for (int cc = 0; cc < ATD_COLS; cc++) {
            const int c = threadIdx.x + ATD_THREADS * cc;
            if (c < d) {
                float acc = o[cc] * f;
                for (int j = 0; j < n; j += ATD_VB) {
                    float vv[ATD_VB];
#pragma unroll
                    for (int u = 0; u < ATD_VB; u++) {
                        const long long p = p0 + j + u;
                        vv[u] = j + u >= n ? 0.f : p == pos ? sv[c] : vc[(p * nkv + kvh) * d + c];
                    }
#pragma unroll
                    for (int u = 0; u < ATD_VB; u++)
                        if (j + u < n) acc = fmaf(se[j + u], vv[u], acc);
                }
                o[cc] = acc;
            }
        }
        __syncthreads(); /* sc / se are rewritten by the next chunk */
    }
    const float *g = qg + (long long)h * 2 * d + d;
    if (active == 1) {
#pragma unroll
        for (int cc = 0; cc < ATD_COLS; cc++) {
            const int c = threadIdx.x + ATD_THREADS * cc;
            if (c < d) out[(long long)h * d + c] = o[cc] / L * fm_sigmoid(g[c]);
        }
        return;
    }
    unsigned *count = reinterpret_cast<unsigned *>(scratch);
    float *ml = scratch + atd_ml_offset(nh), *po = scratch + atd_o_offset(nh, S);
#pragma unroll
    for (int cc = 0; cc < ATD_COLS; cc++) {
        const int c = threadIdx.x + ATD_THREADS * cc;
        if (c < d) po[((long long)h * S + s) * d + c] = o[cc];
    }
    if (threadIdx.x == 0) {
        ml[2 * ((long long)h * S + s)] = M;
        ml[2 * ((long long)h * S + s) + 1] = L;
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned done = atomicAdd(count + h, 1u);
        last_sh = done + 1 == (unsigned)active;
        if (last_sh) atomicExch(count + h, 0u);
    }
    __syncthreads();
    if (!last_sh) return;
    __threadfence();
    float Mx = -INFINITY;
    for (int t = 0; t < active; t++) Mx = fmaxf(Mx, __ldcg(ml + 2 * ((long long)h * S + t)));
    for (int t = threadIdx.x; t < active; t += ATD_THREADS) fsplit[t] = expf(__ldcg(ml + 2 * ((long long)h * S + t)) - Mx);
    __syncthreads();
    float tot = 0.f;
    for (int t = 0; t < active; t++) tot += __ldcg(ml + 2 * ((long long)h * S + t) + 1) * fsplit[t];
#pragma unroll
    for (int cc = 0; cc < ATD_COLS; cc++) {
        const int c = threadIdx.x + ATD_THREADS * cc;
        if (c < d) {
            float acc = 0.f;
            for (int t = 0; t < active; t++) acc = fmaf(__ldcg(po + ((long long)h * S + t) * d + c), fsplit[t], acc);
            out[(long long)h * d + c] = acc / tot * fm_sigmoid(g[c]);
        }
    }
}

/* ---- router: softmax over E logits, top-k by k passes of max selection (ties to the lower id),
 * optional renormalisation. One block per token; p in shared memory. ---- */
__global__ void __launch_bounds__(BLOCK) router_topk_kernel(int32_t *ids, float *weights, const float *logits, int E,
                                                            int k, int norm) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    extern __shared__ float p[]; /* E floats, then E taken flags (as floats) */
    __shared__ float red[32];
    __shared__ int red_id[32];
    float *taken = p + E;
    const long long t = blockIdx.x;
    const float *lg = logits + t * E;
    float mx = -INFINITY;
    for (int e = threadIdx.x; e < E; e += BLOCK) {
        p[e] = lg[e];
        taken[e] = 0.f;
        mx = fmaxf(mx, p[e]);
    }
    mx = block_max(mx, red);
    float s = 0.f;
    for (int e = threadIdx.x; e < E; e += BLOCK) {
        const float v = expf(p[e] - mx);
        p[e] = v;
        s += v;
    }
    s = block_sum(s, red);
    for (int e = threadIdx.x; e < E; e += BLOCK) p[e] /= s;
    __syncthreads();
    float tsum = 0.f; /* thread 0 */
    for (int i = 0; i < k; i++) {
        float bv = -INFINITY;
        int bi = -1;
        for (int e = threadIdx.x; e < E; e += BLOCK) /* ascending e: strict > keeps the lower id */
            if (taken[e] == 0.f && (bi < 0 || p[e] > bv)) {
                bv = p[e];
                bi = e;
            }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        if ((threadIdx.x & 31) == 0) {
            red[threadIdx.x >> 5] = bv;
            red_id[threadIdx.x >> 5] = bi;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float v = -INFINITY;
            int best = -1;
            for (int w = 0; w < BLOCK / 32; w++)
                if (red_id[w] >= 0 && (best < 0 || red[w] > v || (red[w] == v && red_id[w] < best))) {
                    v = red[w];
                    best = red_id[w];
                }
            taken[best] = 1.f;
            ids[t * k + i] = best;
            weights[t * k + i] = p[best];
            tsum += p[best];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && norm)
        for (int i = 0; i < k; i++) weights[t * k + i] /= tsum;
}

/* The same for E <= 32 PL and k <= 32 with one warp per token and no shared memory: fm_topk_warp
 * (cuda_internal.h), whose code fm_cuda_matvec_topk's fused launch runs too. */
template <int PL>
__global__ void __launch_bounds__(32) router_topk_warp_kernel(int32_t *ids, float *weights, const float *logits, int E,
                                                              int k, int norm) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    const long long t = blockIdx.x;
    fm_topk_warp<PL>(ids + t * k, weights + t * k, logits + t * E, E, k, norm, (int)threadIdx.x);
}

__global__ void gather_rows_kernel(float *out, const float *src, const int32_t *idx, long long cols) {
    const long long r = blockIdx.y;
    const float *s = src + (long long)idx[r] * cols;
    float *o = out + r * cols;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += (long long)gridDim.x * blockDim.x)
        o[c] = s[c];
}

/* ---- MoE combine + residual: x[t] += (sigmoid(sl[t]) * shared[t]) + sum_j w[t,j] Y[rows[t,j]] ----
 * In forward.c's order: out = sg * y_shared (or 0), out += w * Y per expert in ascending id, x += out. */
__global__ void moe_combine_kernel(float *x, const float *shared, const float *sl, const float *Y,
                                   const int32_t *rows, const float *w, int k, long long H) {
    const long long t = blockIdx.y;
    const float sg = shared ? fm_sigmoid(sl[t]) : 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < H; i += (long long)gridDim.x * blockDim.x) {
        float acc = shared ? sg * shared[t * H + i] : 0.f;
        for (int j = 0; j < k; j++) {
            const int32_t r = rows[t * k + j];
            if (r >= 0) acc += w[t * k + j] * Y[(long long)r * H + i];
        }
        x[t * H + i] += acc;
    }
}

/* ord[0..k) = 0..k-1 sorted by ids[ord[j]] ascending (insertion sort; a token's ids are distinct):
 * the order in which the combine kernels add the experts, as forward.c does. */
__device__ static void topk_order_by_id(int *ord, const int32_t *ids, int k) {
    for (int j = 0; j < k; j++) {
        const int32_t e = ids[j];
        int at = j;
        while (at > 0 && ids[ord[at - 1]] > e) {
            ord[at] = ord[at - 1];
            at--;
        }
        ord[at] = j;
    }
}

/* ---- MoE combine + residual with the top-k ids on the device: as moe_combine_kernel, the k
 * experts of token t taken in ascending id (the CPU's order); expert j's output is row t * k + j
 * of Y. The order is sorted once per block in shared memory (k <= 64). ---- */
__global__ void moe_combine_topk_kernel(float *x, const float *shared, const float *sl, const float *Y,
                                        const int32_t *ids, const float *w, int k, long long H) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    __shared__ int ord[64];
    const long long t = blockIdx.y;
    if (threadIdx.x == 0) topk_order_by_id(ord, ids + t * k, k);
    __syncthreads();
    const float sg = shared ? fm_sigmoid(sl[t]) : 0.f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < H; i += (long long)gridDim.x * blockDim.x) {
        float acc = shared ? sg * shared[t * H + i] : 0.f;
        for (int j = 0; j < k; j++) {
            const int r = ord[j];
            acc += w[t * k + r] * Y[(t * k + r) * H + i];
        }
        x[t * H + i] += acc;
    }
}

/* ---- moe_combine_topk_kernel and then add_rmsnorm_kernel (add NULL) in one kernel: one block per
 * token with add_rmsnorm's block size, so that x and xn are bit-identical to the two launches
 * (every element of x has the same arithmetic; the sum of squares the same order). Saves a launch
 * per layer of the one-token step (the MoE's combine and the next layer's input norm). ---- */
__global__ void __launch_bounds__(1024) moe_combine_norm_kernel(float *__restrict__ x, float *__restrict__ xn,
                                                                const float *__restrict__ nw, float eps,
                                                                const float *__restrict__ shared,
                                                                const float *__restrict__ sl,
                                                                const float *__restrict__ Y, const int32_t *ids,
                                                                const float *__restrict__ w, int k, long long H) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    __shared__ int ord[64];
    __shared__ float red[32];
    const long long t = blockIdx.x;
    if (threadIdx.x == 0) topk_order_by_id(ord, ids + t * k, k);
    __syncthreads();
    const float sg = shared ? fm_sigmoid(sl[t]) : 0.f;
    float *xr = x + t * H, *orow = xn + t * H;
    float ss = 0.f;
    for (long long i = threadIdx.x; i < H; i += blockDim.x) {
        float acc = shared ? sg * shared[t * H + i] : 0.f;
        /* the experts' values 8 at a time, loaded before they are added (a single block does all of
         * H: one load at a time was a chain of k memory latencies, 15 us in ncu on the H100); the
         * same additions in the same order */
        for (int j0 = 0; j0 < k; j0 += 8) {
            float yv[8], wv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int r = j0 + u < k ? ord[j0 + u] : 0;
                yv[u] = j0 + u < k ? Y[(t * k + r) * H + i] : 0.f;
                wv[u] = j0 + u < k ? w[t * k + r] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (j0 + u < k) acc += wv[u] * yv[u];
        }
        const float v = xr[i] + acc;
        xr[i] = v;
        ss = fmaf(v, v, ss);
    }
    const float tot = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(tot / (float)H + eps);
    for (long long i = threadIdx.x; i < H; i += blockDim.x) orow[i] = xr[i] * scale * (nw ? nw[i] : 1.0f);
}

/* moe_combine_topk_kernel for k <= KM in one round of loads after the PDL wait (every thread ranks
 * the ids itself, fm_combine_ranks, and loads its expert values by slot before the first addition):
 * the same arithmetic, so the same x bit for bit. One value a thread. */
template <int KM>
__global__ void __launch_bounds__(BLOCK)
    moe_combine_regs_kernel(float *__restrict__ x, const float *__restrict__ shared, const float *__restrict__ sl,
                            const float *__restrict__ Y, const int32_t *ids, const float *__restrict__ w, int k,
                            int parts, long long H) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    const long long t = blockIdx.y, i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= H) return;
    int rank[KM];
    float wv[KM], yv[KM];
    fm_combine_ranks<KM>(ids + t * k, w + t * k, k, rank, wv);
#pragma unroll
    for (int j = 0; j < KM; j++) yv[j] = j < k ? Y[(t * k + j) * parts * H + i] : 0.f;
#pragma unroll
    for (int p = 1; p < 8; p++) /* expert j's output in parts (fm_cuda_expert_ffn; unrolled: all loads in flight) */
        if (p < parts)
#pragma unroll
            for (int j = 0; j < KM; j++)
                if (j < k) yv[j] += Y[((t * k + j) * parts + p) * H + i];
    const float xv = x[t * H + i], sg = shared ? fm_sigmoid(sl[t]) : 0.f;
    const float acc = shared ? sg * shared[t * H + i] : 0.f;
    x[t * H + i] = xv + fm_combine_experts<KM>(acc, yv, rank, wv, k);
}

/* moe_combine_norm_kernel for k <= CN_K and H <= NPT * blockDim.x (NPT <= CN_NPT), with fewer dependent memory
 * round trips and the same arithmetic (bit-identical: each element's additions and each thread's
 * sum of squares in the same order): the norm weights loaded before the PDL wait; every thread
 * ranks the ids itself (fm_combine_ranks: no sort by one thread and no barrier before the combine);
 * all of a thread's expert values loaded before the first addition; x kept in registers for the
 * norm's second pass. */
constexpr int CN_K = 8, CN_NPT = 4;

template <int NPT>
__global__ void __launch_bounds__(1024) moe_combine_norm_regs_kernel(float *__restrict__ x, float *__restrict__ xn,
                                                                     const float *__restrict__ nw, float eps,
                                                                     const float *__restrict__ shared,
                                                                     const float *__restrict__ sl,
                                                                     const float *__restrict__ Y, const int32_t *ids,
                                                                     const float *__restrict__ w, int k, long long H) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch */
    __shared__ float red[32];
    const long long t = blockIdx.x;
    const int bd = (int)blockDim.x;
    float nwv[NPT];
#pragma unroll
    for (int u = 0; u < NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        nwv[u] = i < H && nw ? nw[i] : 1.0f; /* a weight: never written by the step */
    }
    fm_pdl_wait(); /* the predecessors' writes are visible from here */
    int rank[CN_K];
    float wv[CN_K];
    fm_combine_ranks<CN_K>(ids + t * k, w + t * k, k, rank, wv);
    const float sg = shared ? fm_sigmoid(sl[t]) : 0.f;
    float *xr = x + t * H, *orow = xn + t * H;
    float xv[NPT], yv[NPT][CN_K], shv[NPT];
#pragma unroll
    for (int u = 0; u < NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        const bool in = i < H;
        xv[u] = in ? xr[i] : 0.f;
        shv[u] = in && shared ? shared[t * H + i] : 0.f;
#pragma unroll
        for (int j = 0; j < CN_K; j++) yv[u][j] = in && j < k ? Y[(t * k + j) * H + i] : 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        if (i < H) {
            const float acc = fm_combine_experts<CN_K>(shared ? sg * shv[u] : 0.f, yv[u], rank, wv, k);
            const float v = xv[u] + acc;
            xr[i] = v;
            xv[u] = v;
            ss = fmaf(v, v, ss);
        }
    }
    const float tot = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(tot / (float)H + eps);
#pragma unroll
    for (int u = 0; u < NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        if (i < H) orow[i] = xv[u] * scale * nwv[u];
    }
}

/* add_rmsnorm_kernel for n <= CN_NPT * blockDim.x, bit-identical: w loaded before the PDL wait and x
 * kept in registers for the second pass. */
__global__ void __launch_bounds__(1024) add_rmsnorm_regs_kernel(float *x, float *xn, const float *add, const float *w,
                                                                long long n, float eps) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch */
    __shared__ float red[32];
    const int bd = (int)blockDim.x;
    float wv[CN_NPT], xv[CN_NPT], av[CN_NPT];
#pragma unroll
    for (int u = 0; u < CN_NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        wv[u] = i < n && w ? w[i] : 1.0f; /* a weight: never written by the step */
    }
    fm_pdl_wait(); /* the predecessors' writes are visible from here */
    float *xr = x + (long long)blockIdx.x * n;
    float *orow = xn + (long long)blockIdx.x * n;
    const float *ar = add ? add + (long long)blockIdx.x * n : nullptr;
#pragma unroll
    for (int u = 0; u < CN_NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        xv[u] = i < n ? xr[i] : 0.f;
        av[u] = i < n && ar ? ar[i] : 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < CN_NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        if (i < n) {
            float v = xv[u];
            if (ar) {
                v += av[u];
                xr[i] = v;
            }
            xv[u] = v;
            ss = fmaf(v, v, ss);
        }
    }
    const float tot = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(tot / (float)n + eps);
#pragma unroll
    for (int u = 0; u < CN_NPT; u++) {
        const long long i = threadIdx.x + (long long)u * bd;
        if (i < n) orow[i] = xv[u] * scale * wv[u];
    }
}

/* ---- dst[pos * stride + i] = src[i], i < n, pos from device memory ---- */
__global__ void store_at_kernel(float *dst, const float *src, long long n, long long stride, const long long *pos) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    float *d = dst + *pos * stride;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        d[i] = src[i];
}

/* ---- routed experts of one token with their ids on the device (fm_cuda_expert_matvec) ----
 * Product j = blockIdx.y is part j / k (gate or up, or down) of expert ids[j % k]: the weight at
 * table[id] + part_off[part]. The block stages its x (or silu(x) * x_up: the SwiGLU of the down
 * projection, fused) in shared memory, transposed so that the float4 q of chunk c sits at
 * xs4[q * C + c]: lanes reading consecutive chunks read consecutive 16-byte words (no bank
 * conflicts). A row is cut into C 16-byte chunks; `lpr` lanes (a power of two <= 32, <= C) share a
 * row and take chunks li, li + lpr, ...; each lane does two rows (ra, rb = ra + 32 / lpr) at once
 * and two chunks of each per step, so 4 weight loads are in flight, and the x of a chunk is read
 * once for both rows. Quantized chunks use the FMA form per group: s * sum(q x) + b * sum(x), the
 * sums of x per chunk staged with x. q as float without a conversion: (bits | 0x4B000000) read as
 * a float is 2^23 + bits exactly, and one subtraction leaves bits; Q4 nibbles are masked in place
 * (bits = q 2^(4e), e < 5, or of the word shifted by 20), so the staged x carries the factor
 * 2^(-4e) (exact). */
enum { EK_F32 = 0, EK_F16, EK_BF16, EK_Q8, EK_Q4, EK_NONE };
constexpr int EMV_WARPS = 8, EMV_PASSES = 2;

struct ExpMv {
    const unsigned char *const *table;
    const int32_t *ids;
    long long part_off[2];
    const float *x, *x_up;
    long long x_stride;
    float *out[2];
    long long out_stride;
    long long rows, cols, scale_off, bias_off;
    int k, n_experts, gs_log2, scale_kind, lpr, chunks;
};

template <int KIND> struct EKT {
    static constexpr int VPC = KIND == EK_F32 ? 4 : KIND == EK_Q4 ? 32 : KIND == EK_Q8 ? 16 : 8; /* values a chunk */
    static constexpr int NQ = VPC / 4;                                                        /* float4 of x */
    static constexpr bool Q = KIND >= EK_Q8;
};

__device__ __forceinline__ float q_float(uint32_t bits) { return __uint_as_float(bits | 0x4B000000u) - 8388608.0f; }

/* byte (sel & 3) of w as a float: PRMT puts it under the exponent bits 0x4B (2^23 + q exactly) */
__device__ __forceinline__ float q8_float(uint32_t w, uint32_t sel) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, sel)) - 8388608.0f;
}

__device__ __forceinline__ float2 half2_f(uint32_t w, int kind) {
    if (kind == EK_BF16) return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
    return __half22float2(*reinterpret_cast<const __half2 *>(&w));
}

/* da += chunk wa . x, db += chunk wb . x (x: the chunk's staged float4s, stride C) */
template <int KIND>
__device__ __forceinline__ void chunk_dot2(const uint4 &wa, const uint4 &wb, const float4 *xc, int C, float &da,
                                           float &db) {
    const uint32_t A[4] = {wa.x, wa.y, wa.z, wa.w}, B[4] = {wb.x, wb.y, wb.z, wb.w};
    if constexpr (KIND == EK_F32) {
        const float4 x = xc[0];
        da = fmaf(__uint_as_float(A[0]), x.x, da), db = fmaf(__uint_as_float(B[0]), x.x, db);
        da = fmaf(__uint_as_float(A[1]), x.y, da), db = fmaf(__uint_as_float(B[1]), x.y, db);
        da = fmaf(__uint_as_float(A[2]), x.z, da), db = fmaf(__uint_as_float(B[2]), x.z, db);
        da = fmaf(__uint_as_float(A[3]), x.w, da), db = fmaf(__uint_as_float(B[3]), x.w, db);
    } else if constexpr (KIND == EK_F16 || KIND == EK_BF16) {
#pragma unroll
        for (int q = 0; q < 2; q++) {
            const float4 x = xc[q * C];
            const float2 a0 = half2_f(A[2 * q], KIND), a1 = half2_f(A[2 * q + 1], KIND);
            const float2 b0 = half2_f(B[2 * q], KIND), b1 = half2_f(B[2 * q + 1], KIND);
            da = fmaf(a0.x, x.x, da), db = fmaf(b0.x, x.x, db);
            da = fmaf(a0.y, x.y, da), db = fmaf(b0.y, x.y, db);
            da = fmaf(a1.x, x.z, da), db = fmaf(b1.x, x.z, db);
            da = fmaf(a1.y, x.w, da), db = fmaf(b1.y, x.w, db);
        }
    } else if constexpr (KIND == EK_Q8) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const float4 x = xc[q * C];
            const uint32_t a = A[q], b = B[q];
            da = fmaf(q8_float(a, 0x7440), x.x, da), db = fmaf(q8_float(b, 0x7440), x.x, db);
            da = fmaf(q8_float(a, 0x7441), x.y, da), db = fmaf(q8_float(b, 0x7441), x.y, db);
            da = fmaf(q8_float(a, 0x7442), x.z, da), db = fmaf(q8_float(b, 0x7442), x.z, db);
            da = fmaf(q8_float(a, 0x7443), x.w, da), db = fmaf(q8_float(b, 0x7443), x.w, db);
        }
    } else { /* Q4: word i holds values 8i..8i+7, nibble e at bit 4e */
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float4 x0 = xc[(2 * i) * C], x1 = xc[(2 * i + 1) * C];
            const uint32_t a = A[i], b = B[i], ah = a >> 20, bh = b >> 20;
            da = fmaf(q_float(a & 0xFu), x0.x, da), db = fmaf(q_float(b & 0xFu), x0.x, db);
            da = fmaf(q_float(a & 0xF0u), x0.y, da), db = fmaf(q_float(b & 0xF0u), x0.y, db);
            da = fmaf(q_float(a & 0xF00u), x0.z, da), db = fmaf(q_float(b & 0xF00u), x0.z, db);
            da = fmaf(q_float(a & 0xF000u), x0.w, da), db = fmaf(q_float(b & 0xF000u), x0.w, db);
            da = fmaf(q_float(a & 0xF0000u), x1.x, da), db = fmaf(q_float(b & 0xF0000u), x1.x, db);
            da = fmaf(q_float(ah & 0xFu), x1.y, da), db = fmaf(q_float(bh & 0xFu), x1.y, db);
            da = fmaf(q_float(ah & 0xF0u), x1.z, da), db = fmaf(q_float(bh & 0xF0u), x1.z, db);
            da = fmaf(q_float(ah & 0xF00u), x1.w, da), db = fmaf(q_float(bh & 0xF00u), x1.w, db);
        }
    }
}

template <int KIND> __global__ void __launch_bounds__(EMV_WARPS * 32) expert_mv_kernel(const __grid_constant__ ExpMv p) {
    using T = EKT<KIND>;
    extern __shared__ float4 emv_sm[];
    const int C = p.chunks;
    float4 *xs4 = emv_sm;
    float *xs = reinterpret_cast<float *>(emv_sm);
    float *xsum = reinterpret_cast<float *>(emv_sm + (size_t)T::NQ * C);
    const int part = (int)blockIdx.y / p.k, slot = (int)blockIdx.y - part * p.k;
    const int e = min(max(p.ids[slot], 0), p.n_experts - 1); /* the router writes valid ids; never read outside */
    const unsigned char *base = p.table[e] + p.part_off[part];
    const float *x = p.x + slot * p.x_stride;
    const float *xu = p.x_up ? p.x_up + slot * p.x_stride : nullptr;
    float *out = p.out[part] + slot * p.out_stride;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long cols = p.cols, rows = p.rows;

    for (long long c0 = (long long)warp * 32; c0 < cols; c0 += EMV_WARPS * 32) { /* stage x */
        const long long c = c0 + lane;
        float v = 0.f;
        if (c < cols) {
            v = x[c];
            if (xu) v = silu(v) * xu[c];
            const int ch = (int)(c / T::VPC), vi = (int)(c % T::VPC);
            float f = 1.f;
            if (KIND == EK_Q4) {
                const int e8 = vi & 7;
                f = __uint_as_float((uint32_t)(127 - 4 * (e8 < 5 ? e8 : e8 - 5)) << 23); /* 2^(-4e), exact */
            }
            xs[((long long)(vi >> 2) * C + ch) * 4 + (vi & 3)] = v * f;
        }
        if (T::Q) { /* chunk sums of x: VPC consecutive lanes hold one chunk (chunks start at multiples of VPC) */
#pragma unroll
            for (int o = T::VPC / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if ((lane & (T::VPC - 1)) == 0 && c < cols) xsum[c / T::VPC] = v;
        }
    }
    __syncthreads();

    const int lpr = p.lpr, rs = 32 / lpr, li = lane & (lpr - 1);
    const long long ra = ((long long)blockIdx.x * EMV_WARPS + warp) * (EMV_PASSES * rs) + lane / lpr, rb = ra + rs;
    const long long rca = min(ra, rows - 1), rcb = min(rb, rows - 1); /* clamped: read, never written */
    const uint4 *wa = reinterpret_cast<const uint4 *>(base) + rca * C, *wb = reinterpret_cast<const uint4 *>(base) + rcb * C;
    const long long groups = T::Q ? cols >> p.gs_log2 : 0;
    const unsigned char *sbase = base + p.scale_off, *bbase = base + p.bias_off;
    const int kind = p.scale_kind;
    float acc_a = 0.f, acc_b = 0.f;
    for (int c = li; c < C; c += 2 * lpr) {
        const int c2 = c + lpr;
        const bool has2 = c2 < C;
        const uint4 a0 = __ldg(wa + c), b0 = __ldg(wb + c);
        uint4 a1 = make_uint4(0, 0, 0, 0), b1 = a1;
        if (has2) a1 = __ldg(wa + c2), b1 = __ldg(wb + c2);
        if constexpr (T::Q) {
            const long long g0 = ((long long)c * T::VPC) >> p.gs_log2, g2 = ((long long)c2 * T::VPC) >> p.gs_log2;
            const float sa0 = fm_scale_load(sbase, rca * groups + g0, kind), ba0 = fm_scale_load(bbase, rca * groups + g0, kind);
            const float sb0 = fm_scale_load(sbase, rcb * groups + g0, kind), bb0 = fm_scale_load(bbase, rcb * groups + g0, kind);
            float sa2 = 0.f, ba2 = 0.f, sb2 = 0.f, bb2 = 0.f;
            if (has2) {
                sa2 = fm_scale_load(sbase, rca * groups + g2, kind), ba2 = fm_scale_load(bbase, rca * groups + g2, kind);
                sb2 = fm_scale_load(sbase, rcb * groups + g2, kind), bb2 = fm_scale_load(bbase, rcb * groups + g2, kind);
            }
            float da = 0.f, db = 0.f;
            chunk_dot2<KIND>(a0, b0, xs4 + c, C, da, db);
            const float xs0 = xsum[c];
            acc_a = fmaf(ba0, xs0, fmaf(sa0, da, acc_a));
            acc_b = fmaf(bb0, xs0, fmaf(sb0, db, acc_b));
            if (has2) {
                da = 0.f, db = 0.f;
                chunk_dot2<KIND>(a1, b1, xs4 + c2, C, da, db);
                const float xs2 = xsum[c2];
                acc_a = fmaf(ba2, xs2, fmaf(sa2, da, acc_a));
                acc_b = fmaf(bb2, xs2, fmaf(sb2, db, acc_b));
            }
        } else {
            chunk_dot2<KIND>(a0, b0, xs4 + c, C, acc_a, acc_b);
            if (has2) chunk_dot2<KIND>(a1, b1, xs4 + c2, C, acc_a, acc_b);
        }
    }
    for (int o = lpr >> 1; o > 0; o >>= 1) {
        acc_a += __shfl_xor_sync(0xffffffffu, acc_a, o);
        acc_b += __shfl_xor_sync(0xffffffffu, acc_b, o);
    }
    if (li == 0) {
        if (ra < rows) out[ra] = acc_a;
        if (rb < rows) out[rb] = acc_b;
    }
}

typedef void (*emv_fn)(const ExpMv);

unsigned blocks_for(long long n, int threads, long long cap) {
    long long b = (n + threads - 1) / threads;
    if (b < 1) b = 1;
    return (unsigned)(b > cap ? cap : b);
}

} // namespace

/* ------------------------------------------------------------------------ host side */

extern "C" fm_status fm_cuda_host_alloc(fm_cuda *ctx, size_t bytes, void **host) {
    if (!host) return fm_error_set(FM_ERR_ARG, "fm_cuda_host_alloc: NULL argument");
    *host = NULL;
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    void *p = NULL;
    cudaError_t e = cudaMallocHost(&p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        fm_cuda_fail(e, "cudaMallocHost(&p, bytes)", __FILE__, __LINE__);
        return fm_error_wrap(e == cudaErrorMemoryAllocation ? FM_ERR_NOMEM : FM_ERR_IO,
                             "fm_cuda_host_alloc of %zu bytes", bytes);
    }
    *host = p;
    return FM_OK;
}

extern "C" void fm_cuda_host_free(fm_cuda *ctx, void *host) {
    if (!ctx || !host) return;
    cudaSetDevice(ctx->device);
    cudaStreamSynchronize(ctx->stream);
    cudaFreeHost(host);
}

extern "C" fm_status fm_cuda_upload_async(fm_cuda *ctx, void *dev, const void *host, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    if (!dev || !host) return fm_error_set(FM_ERR_ARG, "fm_cuda_upload_async: NULL pointer");
    FM_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_mem_info(fm_cuda *ctx, uint64_t *free_bytes, uint64_t *total_bytes) {
    FM_CUDA_CTX(ctx);
    size_t f = 0, t = 0;
    FM_CUDA_CHECK(cudaMemGetInfo(&f, &t));
    if (free_bytes) *free_bytes = f;
    if (total_bytes) *total_bytes = t;
    return FM_OK;
}

#define LAYER_ARG_CHECK(cond, ...)                                                                 \
    do {                                                                                           \
        if (!(cond)) return fm_error_set(FM_ERR_ARG, __VA_ARGS__);                                 \
    } while (0)

/* add_rmsnorm's block size for n_tokens rows of n: BLOCK, or for fewer rows than SMs wider blocks
 * of about 2 values a thread (moe_combine_norm_kernel uses the same, for the same sums). */
static int norm_threads(const fm_cuda *ctx, int64_t n_tokens, int64_t n) {
    if (n_tokens >= ctx->sm_count) return BLOCK;
    const long long want = (n / 2 + 31) / 32 * 32;
    return (int)(want > 1024 ? 1024 : want < BLOCK ? BLOCK : want);
}

extern "C" fm_status fm_cuda_add_rmsnorm(fm_cuda *ctx, float *x, float *xn, const float *add, const float *w,
                                         int64_t n_tokens, int64_t n, float eps) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_tokens <= INT32_MAX && n > 0, "CUDA add_rmsnorm: bad shape (%lld x %lld)",
                    (long long)n_tokens, (long long)n);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(x && xn, "CUDA add_rmsnorm: NULL pointer");
    const int threads = norm_threads(ctx, n_tokens, n);
    FM_CUDA_CHECK(fm_launch_pdl(ctx, n <= (int64_t)CN_NPT * threads ? add_rmsnorm_regs_kernel : add_rmsnorm_kernel,
                                dim3((unsigned)n_tokens), dim3(threads), 0, x, xn, add, w, (long long)n, eps));
    FM_CUDA_CHECK_LAUNCH("add_rmsnorm_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_rmsnorm_gated(fm_cuda *ctx, float *out, const float *x, const float *z, const float *w,
                                           int64_t n_rows, int64_t n, float eps) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_rows >= 0 && n_rows <= INT32_MAX && n > 0, "CUDA rmsnorm_gated: bad shape (%lld x %lld)",
                    (long long)n_rows, (long long)n);
    if (n_rows == 0) return FM_OK;
    LAYER_ARG_CHECK(out && x && z && w, "CUDA rmsnorm_gated: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, rmsnorm_gated_kernel, dim3((unsigned)n_rows), dim3(BLOCK), 0, out, x, z, w,
                                (long long)n, eps));
    FM_CUDA_CHECK_LAUNCH("rmsnorm_gated_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_head_norm_rope(fm_cuda *ctx, float *out, int64_t out_stride, const float *in,
                                            int64_t in_stride, const float *w, int64_t n_tokens, int n_heads, int d,
                                            float eps, int rot_dim, const float *inv_freq, int64_t pos0) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_heads > 0 && d > 0 && d <= 8192 && n_tokens * n_heads <= INT32_MAX &&
                        rot_dim >= 0 && rot_dim <= d && rot_dim % 2 == 0 && pos0 >= 0 && out_stride >= d && in_stride >= d,
                    "CUDA head_norm_rope: bad shape (%lld tokens, %d heads of %d, rot %d, strides %lld/%lld)",
                    (long long)n_tokens, n_heads, d, rot_dim, (long long)in_stride, (long long)out_stride);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(out && in && w && (rot_dim == 0 || inv_freq), "CUDA head_norm_rope: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, head_norm_rope_kernel, dim3((unsigned)(n_tokens * n_heads)), dim3(128),
                                sizeof(float) * (size_t)d, out, (long long)out_stride, in, (long long)in_stride, w,
                                n_heads, d, eps, rot_dim, inv_freq, (long long)pos0, nullptr, 0));
    FM_CUDA_CHECK_LAUNCH("head_norm_rope_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_conv1d_silu(fm_cuda *ctx, float *out, const float *in, float *state, const float *w,
                                         int64_t n_tokens, int64_t channels, int K) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && channels > 0 && K >= 1 && K <= 64, "CUDA conv1d_silu: bad shape (%lld x %lld, K %d)",
                    (long long)n_tokens, (long long)channels, K);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(out && in && w && (state || K == 1), "CUDA conv1d_silu: NULL pointer");
    if (n_tokens == 1 && K <= CONV1_K) {
        FM_CUDA_CHECK(fm_launch_pdl(ctx, conv1d_silu_one_kernel, dim3(blocks_for(channels, 128, INT32_MAX)), dim3(128), 0,
                                    out, in, state, w, (long long)channels, K));
        FM_CUDA_CHECK_LAUNCH("conv1d_silu_one_kernel");
        return FM_OK;
    }
    FM_CUDA_CHECK(fm_launch_pdl(ctx, conv1d_silu_kernel, dim3(blocks_for(channels, 128, INT32_MAX)), dim3(128), 0, out,
                                in, state, w, (long long)n_tokens, (long long)channels, K));
    FM_CUDA_CHECK_LAUNCH("conv1d_silu_kernel");
    return FM_OK;
}

/* delta_cols_kernel takes dk <= 16 * DCOL_RPT, dv a multiple of 8 up to 128 and S 16-byte aligned
 * (FLASHMOE_CUDA_DELTA_COLS=0 keeps the block-per-head kernels, for measurements). */
static bool delta_cols_ok(const float *S, int dk, int dv) {
    static int off = -1;
    if (off < 0) {
        const char *e = getenv("FLASHMOE_CUDA_DELTA_COLS");
        off = e && e[0] == '0' && !e[1];
    }
    return !off && dk <= 16 * DCOL_RPT && dv % 8 == 0 && dv <= 128 && (uintptr_t)S % 16 == 0;
}

extern "C" fm_status fm_cuda_delta_rule(fm_cuda *ctx, float *o, const float *qkv, const float *b, const float *a, float *S,
                                        const float *A_log, const float *dt_bias, int64_t n_tokens, int nk, int nv,
                                        int dk, int dv) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && nk > 0 && nv > 0 && nv % nk == 0 && dk > 0 && dk <= 1024 && dv > 0 && dv <= 1024,
                    "CUDA delta_rule: bad shape (%lld tokens, %d key / %d value heads, dk %d, dv %d)",
                    (long long)n_tokens, nk, nv, dk, dv);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(o && qkv && b && a && S && A_log && dt_bias, "CUDA delta_rule: NULL pointer");
    if (delta_cols_ok(S, dk, dv)) { /* a warp per 8 columns, 4 warps a block (or fewer for small dv) */
        const int wph = dv / 8, wpb = wph % 4 == 0 ? 4 : wph % 2 == 0 ? 2 : 1, splits = wph / wpb;
        FM_CUDA_CHECK(fm_launch_pdl(ctx, delta_cols_kernel<false>, dim3((unsigned)(nv * splits)), dim3(32 * wpb), 0, o,
                                    qkv, b, a, S, A_log, dt_bias, (const float *)nullptr, (const float *)nullptr, 0.f,
                                    (long long)n_tokens, nk, nv, dk, dv, splits));
        FM_CUDA_CHECK_LAUNCH("delta_cols_kernel");
        return FM_OK;
    }
    const int threads = (dv + 31) / 32 * 32;
    if (dk <= DELTA_REG_DK && dv <= 128) {
        FM_CUDA_CHECK(fm_launch_pdl(ctx, delta_rule_reg_kernel, dim3((unsigned)nv), dim3(threads),
                                    sizeof(float) * 2 * (size_t)dk, o, qkv, b, a, S, A_log, dt_bias,
                                    (long long)n_tokens, nk, nv, dk, dv));
        FM_CUDA_CHECK_LAUNCH("delta_rule_reg_kernel");
        return FM_OK;
    }
    FM_CUDA_CHECK(fm_launch_pdl(ctx, delta_rule_kernel, dim3((unsigned)nv), dim3(threads),
                                sizeof(float) * 2 * (size_t)dk, o, qkv, b, a, S, A_log, dt_bias, (long long)n_tokens,
                                nk, nv, dk, dv));
    FM_CUDA_CHECK_LAUNCH("delta_rule_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_delta_rule_gated(fm_cuda *ctx, float *out, const float *qkv, const float *b,
                                              const float *a, float *S, const float *A_log, const float *dt_bias,
                                              const float *z, const float *norm_w, float eps, int64_t n_tokens, int nk,
                                              int nv, int dk, int dv) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && nk > 0 && nv > 0 && nv % nk == 0 && dk > 0 && dk <= 1024 && dv > 0 && dv <= 1024,
                    "CUDA delta_rule_gated: bad shape (%lld tokens, %d key / %d value heads, dk %d, dv %d)",
                    (long long)n_tokens, nk, nv, dk, dv);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(out && qkv && b && a && S && A_log && dt_bias && z && norm_w, "CUDA delta_rule_gated: NULL pointer");
    if (!delta_cols_ok(S, dk, dv)) { /* the two kernels */
        fm_status st = fm_cuda_delta_rule(ctx, out, qkv, b, a, S, A_log, dt_bias, n_tokens, nk, nv, dk, dv);
        return st != FM_OK ? st : fm_cuda_rmsnorm_gated(ctx, out, out, z, norm_w, n_tokens * nv, dv, eps);
    }
    FM_CUDA_CHECK(fm_launch_pdl(ctx, delta_cols_kernel<true>, dim3((unsigned)nv), dim3(4 * dv), 0, out, qkv, b, a, S,
                                A_log, dt_bias, z, norm_w, eps, (long long)n_tokens, nk, nv, dk, dv, 1));
    FM_CUDA_CHECK_LAUNCH("delta_cols_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_attention(fm_cuda *ctx, float *out, const float *q, const float *gate,
                                       int64_t gate_stride, const float *k_cache, const float *v_cache,
                                       int64_t n_tokens, int64_t pos0, int n_head, int n_head_kv, int d) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_head > 0 && n_head_kv > 0 && n_head % n_head_kv == 0 && d > 0 &&
                        d <= ATT_MAX_D && pos0 >= 0 && gate_stride >= d && n_tokens * n_head <= INT32_MAX,
                    "CUDA attention: bad shape (%lld tokens at %lld, %d/%d heads of %d; at most %d)", (long long)n_tokens,
                    (long long)pos0, n_head, n_head_kv, d, ATT_MAX_D);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(out && q && gate && k_cache && v_cache, "CUDA attention: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, attention_kernel, dim3((unsigned)(n_tokens * n_head)), dim3(ATT_WARPS * 32), 0,
                                out, q, gate, (long long)gate_stride, k_cache, v_cache, (long long)pos0, n_head,
                                n_head_kv, d, 1.0f / sqrtf((float)d), nullptr));
    FM_CUDA_CHECK_LAUNCH("attention_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_router_topk(fm_cuda *ctx, int32_t *ids, float *weights, const float *logits,
                                         int64_t n_tokens, int n_experts, int k, bool norm) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_tokens <= INT32_MAX && n_experts > 0 && n_experts <= 4096 && k > 0 &&
                        k <= n_experts,
                    "CUDA router_topk: bad shape (%lld tokens, %d experts, top-%d)", (long long)n_tokens, n_experts, k);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(ids && weights && logits, "CUDA router_topk: NULL pointer");
    if (k <= 32 && n_experts <= 1024) { /* one warp a token, the logits in registers */
        void (*fn)(int32_t *, float *, const float *, int, int, int) =
            n_experts <= 128 ? router_topk_warp_kernel<4>
            : n_experts <= 256 ? router_topk_warp_kernel<8>
            : n_experts <= 512 ? router_topk_warp_kernel<16>
                               : router_topk_warp_kernel<32>;
        FM_CUDA_CHECK(fm_launch_pdl(ctx, fn, dim3((unsigned)n_tokens), dim3(32), 0, ids, weights, logits, n_experts, k,
                                    norm ? 1 : 0));
        FM_CUDA_CHECK_LAUNCH("router_topk_warp_kernel");
        return FM_OK;
    }
    FM_CUDA_CHECK(fm_launch_pdl(ctx, router_topk_kernel, dim3((unsigned)n_tokens), dim3(BLOCK),
                                sizeof(float) * 2 * (size_t)n_experts, ids, weights, logits, n_experts, k,
                                norm ? 1 : 0));
    FM_CUDA_CHECK_LAUNCH("router_topk_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_gather_rows(fm_cuda *ctx, float *out, const float *src, const int32_t *idx, int64_t n,
                                         int64_t cols) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n >= 0 && n <= 65535 && cols > 0, "CUDA gather_rows: bad shape (%lld rows of %lld; at most 65535 rows)",
                    (long long)n, (long long)cols);
    if (n == 0) return FM_OK;
    LAYER_ARG_CHECK(out && src && idx, "CUDA gather_rows: NULL pointer");
    dim3 grid(blocks_for(cols, BLOCK, 64), (unsigned)n);
    gather_rows_kernel<<<grid, BLOCK, 0, ctx->stream>>>(out, src, idx, (long long)cols);
    FM_CUDA_CHECK_LAUNCH("gather_rows_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_moe_combine(fm_cuda *ctx, float *x, const float *shared, const float *shared_logit,
                                         const float *Y, const int32_t *rows, const float *w, int64_t n_tokens, int k,
                                         int64_t H) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_tokens <= 65535 && k >= 0 && H > 0,
                    "CUDA moe_combine: bad shape (%lld tokens, top-%d, %lld; at most 65535 tokens)", (long long)n_tokens,
                    k, (long long)H);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(x && (!shared || shared_logit) && (k == 0 || (Y && rows && w)), "CUDA moe_combine: NULL pointer");
    dim3 grid(blocks_for(H, BLOCK, 64), (unsigned)n_tokens);
    moe_combine_kernel<<<grid, BLOCK, 0, ctx->stream>>>(x, shared, shared_logit, Y, rows, w, k, (long long)H);
    FM_CUDA_CHECK_LAUNCH("moe_combine_kernel");
    return FM_OK;
}


/* ------------------------------------------------------------------------ decode without host syncs */

extern "C" fm_status fm_cuda_download_async(fm_cuda *ctx, void *host, const void *dev, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    if (!dev || !host) return fm_error_set(FM_ERR_ARG, "fm_cuda_download_async: NULL pointer");
    FM_CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_head_norm_rope_at(fm_cuda *ctx, float *out, int64_t out_pos_stride, int64_t out_stride,
                                               const float *in, int64_t in_stride, const float *w, int64_t n_tokens,
                                               int n_heads, int d, float eps, int rot_dim, const float *inv_freq,
                                               const int64_t *pos_dev) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_heads > 0 && d > 0 && d <= 8192 && n_tokens * n_heads <= INT32_MAX &&
                        rot_dim >= 0 && rot_dim <= d && rot_dim % 2 == 0 && out_pos_stride >= 0 && out_stride >= d &&
                        in_stride >= d,
                    "CUDA head_norm_rope_at: bad shape (%lld tokens, %d heads of %d, rot %d, strides %lld/%lld/%lld)",
                    (long long)n_tokens, n_heads, d, rot_dim, (long long)in_stride, (long long)out_stride,
                    (long long)out_pos_stride);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(out && in && w && pos_dev && (rot_dim == 0 || inv_freq), "CUDA head_norm_rope_at: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, head_norm_rope_kernel, dim3((unsigned)(n_tokens * n_heads)), dim3(128),
                                sizeof(float) * (size_t)d, out, (long long)out_stride, in, (long long)in_stride, w,
                                n_heads, d, eps, rot_dim, inv_freq, 0LL, (const long long *)pos_dev,
                                (long long)out_pos_stride));
    FM_CUDA_CHECK_LAUNCH("head_norm_rope_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_attention_at(fm_cuda *ctx, float *out, const float *q, const float *gate,
                                          int64_t gate_stride, const float *k_cache, const float *v_cache,
                                          int64_t n_tokens, const int64_t *pos_dev, int n_head, int n_head_kv, int d) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_head > 0 && n_head_kv > 0 && n_head % n_head_kv == 0 && d > 0 &&
                        d <= ATT_MAX_D && gate_stride >= d && n_tokens * n_head <= INT32_MAX,
                    "CUDA attention_at: bad shape (%lld tokens, %d/%d heads of %d; at most %d)", (long long)n_tokens,
                    n_head, n_head_kv, d, ATT_MAX_D);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(out && q && gate && k_cache && v_cache && pos_dev, "CUDA attention_at: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, attention_kernel, dim3((unsigned)(n_tokens * n_head)), dim3(ATT_WARPS * 32), 0,
                                out, q, gate, (long long)gate_stride, k_cache, v_cache, 0LL, n_head, n_head_kv, d,
                                1.0f / sqrtf((float)d), (const long long *)pos_dev));
    FM_CUDA_CHECK_LAUNCH("attention_kernel");
    return FM_OK;
}

extern "C" int fm_cuda_attention_decode_splits(const fm_cuda *ctx, int n_head, int64_t n_ctx) {
    if (!ctx || n_head <= 0 || n_ctx <= ATD_CHUNK) return 1;
    int64_t by_sms = ctx->sm_count / n_head, by_ctx = (n_ctx + ATD_CHUNK - 1) / ATD_CHUNK;
    int64_t n = by_sms < by_ctx ? by_sms : by_ctx;
    return n < 1 ? 1 : n > ATD_MAX_SPLIT ? ATD_MAX_SPLIT : (int)n;
}

extern "C" size_t fm_cuda_attention_decode_scratch_bytes(int n_head, int d, int n_split) {
    if (n_head <= 0 || d <= 0 || n_split <= 1) return 0;
    return sizeof(float) * (size_t)(atd_o_offset(n_head, n_split) + (long long)n_head * n_split * d);
}

extern "C" fm_status fm_cuda_attention_decode(fm_cuda *ctx, float *out, const float *qg, const float *kv,
                                              const float *q_norm, const float *k_norm, float eps, int rot_dim,
                                              const float *inv_freq, float *k_cache, float *v_cache,
                                              const int64_t *pos_dev, int n_head, int n_head_kv, int d, int n_split,
                                              void *scratch) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_head > 0 && n_head_kv > 0 && n_head % n_head_kv == 0 && d > 0 && d <= ATT_MAX_D &&
                        rot_dim >= 0 && rot_dim <= d && rot_dim % 2 == 0 && n_split >= 1 && n_split <= ATD_MAX_SPLIT,
                    "CUDA attention_decode: bad shape (%d/%d heads of %d, rot %d, %d splits; at most %d dims, %d splits)",
                    n_head, n_head_kv, d, rot_dim, n_split, ATT_MAX_D, ATD_MAX_SPLIT);
    LAYER_ARG_CHECK(out && qg && kv && q_norm && k_norm && k_cache && v_cache && pos_dev && (rot_dim == 0 || inv_freq) &&
                        (n_split == 1 || scratch),
                    "CUDA attention_decode: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, attention_decode_kernel, dim3((unsigned)n_head, (unsigned)n_split),
                                dim3(ATD_THREADS), sizeof(float) * 5 * (size_t)d, out, qg, kv, q_norm, k_norm, eps,
                                rot_dim, inv_freq, k_cache, v_cache, (const long long *)pos_dev, n_head, n_head_kv, d,
                                1.0f / sqrtf((float)d), (float *)scratch));
    FM_CUDA_CHECK_LAUNCH("attention_decode_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_store_at(fm_cuda *ctx, float *dst, int64_t pos_stride, const float *src, int64_t n,
                                      const int64_t *pos_dev) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n >= 0 && pos_stride >= 0, "CUDA store_at: bad shape (%lld values, stride %lld)", (long long)n,
                    (long long)pos_stride);
    if (n == 0) return FM_OK;
    LAYER_ARG_CHECK(dst && src && pos_dev, "CUDA store_at: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, store_at_kernel, dim3(blocks_for(n, BLOCK, 64)), dim3(BLOCK), 0, dst, src,
                                (long long)n, (long long)pos_stride, (const long long *)pos_dev));
    FM_CUDA_CHECK_LAUNCH("store_at_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_moe_combine_topk(fm_cuda *ctx, float *x, const float *shared, const float *shared_logit,
                                              const float *Y, const int32_t *ids, const float *w, int64_t n_tokens, int k,
                                              int64_t H) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_tokens <= 65535 && k >= 1 && k <= 64 && H > 0,
                    "CUDA moe_combine_topk: bad shape (%lld tokens, top-%d, %lld; at most 65535 tokens, top-64)",
                    (long long)n_tokens, k, (long long)H);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(x && (!shared || shared_logit) && Y && ids && w, "CUDA moe_combine_topk: NULL pointer");
    /* k <= 16: every value its own thread, one round of loads (moe_combine_regs_kernel) */
    if (k <= 16 && H <= (int64_t)BLOCK * 65535) {
        FM_CUDA_CHECK(fm_launch_pdl(ctx, k <= 8 ? moe_combine_regs_kernel<8> : moe_combine_regs_kernel<16>,
                                    dim3(blocks_for(H, BLOCK, 65535), (unsigned)n_tokens), dim3(BLOCK), 0, x, shared,
                                    shared_logit, Y, ids, w, k, 1, (long long)H));
    } else {
        FM_CUDA_CHECK(fm_launch_pdl(ctx, moe_combine_topk_kernel, dim3(blocks_for(H, BLOCK, 64), (unsigned)n_tokens),
                                    dim3(BLOCK), 0, x, shared, shared_logit, Y, ids, w, k, (long long)H));
    }
    FM_CUDA_CHECK_LAUNCH("moe_combine_topk_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_moe_combine_parts(fm_cuda *ctx, float *x, const float *shared, const float *shared_logit,
                                               const float *Y, const int32_t *ids, const float *w, int k, int parts,
                                               int64_t H) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(k >= 1 && k <= 16 && parts >= 1 && parts <= 8 && H > 0 && H <= (int64_t)BLOCK * 65535,
                    "CUDA moe_combine_parts: bad shape (top-%d, %d parts, %lld; at most top-16 and 8 parts)", k, parts,
                    (long long)H);
    LAYER_ARG_CHECK(x && (!shared || shared_logit) && Y && ids && w, "CUDA moe_combine_parts: NULL pointer");
    FM_CUDA_CHECK(fm_launch_pdl(ctx, k <= 8 ? moe_combine_regs_kernel<8> : moe_combine_regs_kernel<16>,
                                dim3(blocks_for(H, BLOCK, 65535), 1u), dim3(BLOCK), 0, x, shared, shared_logit, Y, ids,
                                w, k, parts, (long long)H));
    FM_CUDA_CHECK_LAUNCH("moe_combine_regs_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_moe_combine_topk_norm(fm_cuda *ctx, float *x, float *xn, const float *norm_w, float eps,
                                                   const float *shared, const float *shared_logit, const float *Y,
                                                   const int32_t *ids, const float *w, int64_t n_tokens, int k,
                                                   int64_t H) {
    FM_CUDA_CTX(ctx);
    LAYER_ARG_CHECK(n_tokens >= 0 && n_tokens <= INT32_MAX && k >= 1 && k <= 64 && H > 0,
                    "CUDA moe_combine_topk_norm: bad shape (%lld tokens, top-%d, %lld; at most top-64)",
                    (long long)n_tokens, k, (long long)H);
    if (n_tokens == 0) return FM_OK;
    LAYER_ARG_CHECK(x && xn && (!shared || shared_logit) && Y && ids && w, "CUDA moe_combine_topk_norm: NULL pointer");
    const int threads = norm_threads(ctx, n_tokens, H);
    FM_CUDA_CHECK(fm_launch_pdl(ctx,
                                k > CN_K || H > (int64_t)CN_NPT * threads ? moe_combine_norm_kernel
                                : H <= (int64_t)2 * threads                  ? moe_combine_norm_regs_kernel<2>
                                                                             : moe_combine_norm_regs_kernel<CN_NPT>,
                                dim3((unsigned)n_tokens), dim3(threads), 0, x, xn, norm_w, eps, shared, shared_logit, Y,
                                ids, w, k, (long long)H));
    FM_CUDA_CHECK_LAUNCH("moe_combine_norm_kernel");
    return FM_OK;
}

namespace {

int emv_kind(fm_dtype t) {
    switch (t) {
    case FM_DTYPE_F32: return EK_F32;
    case FM_DTYPE_F16: return EK_F16;
    case FM_DTYPE_BF16: return EK_BF16;
    case FM_DTYPE_Q8: return EK_Q8;
    case FM_DTYPE_Q4: return EK_Q4;
    default: return EK_NONE;
    }
}

const int emv_vpc[] = {4, 8, 8, 16, 32}; /* values per 16-byte chunk, by kind */

/* Checks the shape for the expert matvec; fills the shape part of p and the shared memory size. */
fm_status emv_shape(const fm_weight *w, ExpMv *p, int *kind, size_t *smem) {
    if (!w) return fm_error_set(FM_ERR_ARG, "CUDA expert_matvec: NULL shape");
    *kind = emv_kind(w->dtype);
    if (*kind == EK_NONE)
        return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA expert_matvec: weight type %s is not supported (F32, F16, BF16, Q8, Q4)",
                            fm_dtype_name(w->dtype));
    const int vpc = emv_vpc[*kind];
    if (w->rows <= 0 || w->cols <= 0 || w->cols % vpc || w->rows > (INT64_C(1) << 31))
        return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA expert_matvec: shape [%lld, %lld] (cols a multiple of %d)",
                            (long long)w->rows, (long long)w->cols, vpc);
    const long long C = w->cols / vpc;
    const bool q = *kind >= EK_Q8;
    const size_t need = (size_t)C * (size_t)vpc * 4 + (q ? (size_t)C * 4 : 0);
    if (need > 48 * 1024)
        return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA expert_matvec: %lld columns: x does not fit in shared memory",
                            (long long)w->cols);
    memset(p, 0, sizeof *p);
    p->rows = w->rows;
    p->cols = w->cols;
    p->chunks = (int)C;
    int lpr = 32;
    while (lpr > C) lpr >>= 1;
    p->lpr = lpr;
    if (q) {
        fm_status st = fm_quant_check("CUDA expert_matvec weight", w->dtype, w->cols, w->group_size, w->scale_dtype);
        if (st != FM_OK) return st;
        int64_t so, bo;
        fm_quant_part_offsets(w, &so, &bo);
        p->gs_log2 = w->group_size == 32 ? 5 : w->group_size == 64 ? 6 : 7;
        p->scale_kind = w->scale_dtype == FM_DTYPE_BF16 ? 0 : w->scale_dtype == FM_DTYPE_F16 ? 1 : 2;
        p->scale_off = so;
        p->bias_off = bo;
    }
    *smem = need;
    return FM_OK;
}

} // namespace

extern "C" bool fm_cuda_expert_matvec_supported(const fm_weight *shape) {
    ExpMv p;
    int kind;
    size_t smem;
    return emv_shape(shape, &p, &kind, &smem) == FM_OK; /* a failure leaves its reason in fm_last_error() */
}

extern "C" fm_status fm_cuda_expert_matvec(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv) {
    FM_CUDA_CTX(ctx);
    ExpMv p;
    int kind;
    size_t smem;
    fm_status st = emv_shape(shape, &p, &kind, &smem);
    if (st != FM_OK) return st;
    LAYER_ARG_CHECK(mv && mv->table && mv->ids && mv->x && mv->out[0] && (mv->n_parts == 1 || mv->out[1]),
                    "CUDA expert_matvec: NULL pointer");
    LAYER_ARG_CHECK(mv->k >= 1 && mv->n_parts >= 1 && mv->n_parts <= 2 && mv->k * mv->n_parts <= 65535 &&
                        mv->n_experts >= 1 && mv->x_stride >= 0 && mv->out_stride >= 0,
                    "CUDA expert_matvec: bad batch (top-%d, %d parts, %d experts)", mv->k, mv->n_parts, mv->n_experts);
    for (int i = 0; i < mv->n_parts; i++)
        LAYER_ARG_CHECK(mv->part_off[i] >= 0 && mv->part_off[i] % 16 == 0,
                        "CUDA expert_matvec: part offset %lld is not a multiple of 16", (long long)mv->part_off[i]);
    LAYER_ARG_CHECK((uintptr_t)mv->x % 4 == 0 && (!mv->x_up || (uintptr_t)mv->x_up % 4 == 0),
                    "CUDA expert_matvec: x must be 4-byte aligned");
    LAYER_ARG_CHECK(!mv->swiglu_out || (mv->n_parts == 2 && (uintptr_t)mv->x % 16 == 0 && mv->x_stride % 4 == 0),
                    "CUDA expert_matvec: swiglu_out needs 2 parts, x 16-byte aligned and x_stride a multiple of 4");
    if (!getenv("FLASHMOE_CUDA_EMV_OLD") || mv->swiglu_out) { /* matmul.cu's one-token kernel */
        bool done = false;
        if ((st = fm_cuda_mv_experts(ctx, shape, mv, &done)) != FM_OK) return st;
        if (done) return FM_OK;
        if (mv->swiglu_out) return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA expert_matvec: swiglu_out: shape not taken");
    }
    p.table = (const unsigned char *const *)mv->table;
    p.ids = mv->ids;
    p.part_off[0] = mv->part_off[0];
    p.part_off[1] = mv->n_parts > 1 ? mv->part_off[1] : 0;
    p.x = mv->x;
    p.x_up = mv->x_up;
    p.x_stride = mv->x_stride;
    p.out[0] = mv->out[0];
    p.out[1] = mv->n_parts > 1 ? mv->out[1] : mv->out[0];
    p.out_stride = mv->out_stride;
    p.k = mv->k;
    p.n_experts = mv->n_experts;
    static const emv_fn fns[] = {expert_mv_kernel<EK_F32>, expert_mv_kernel<EK_F16>, expert_mv_kernel<EK_BF16>,
                                 expert_mv_kernel<EK_Q8>, expert_mv_kernel<EK_Q4>};
    const long long rpb = (long long)EMV_WARPS * EMV_PASSES * (32 / p.lpr);
    const dim3 grid((unsigned)((p.rows + rpb - 1) / rpb), (unsigned)(mv->k * mv->n_parts));
    fns[kind]<<<grid, EMV_WARPS * 32, smem, ctx->stream>>>(p);
    FM_CUDA_CHECK_LAUNCH("expert_mv_kernel");
    return FM_OK;
}

