/* Elementwise kernels of the CUDA backend: RMSNorm, SwiGLU and the argmax of a vector (see
 * cuda_backend.h). They follow the CPU oracle (fm_cpu_rmsnorm, fm_silu, fm_cpu_argmax), the first
 * two except the order of the sum of squares, the argmax exactly. */
#include <stdint.h>

#include "backend/cuda/cuda_internal.h"

namespace {

constexpr int NORM_THREADS = 256;
constexpr int ARGMAX_THREADS = 256, ARGMAX_PARTS = 264; /* the argmax's first stage: at most this many blocks */

/* One block per token: the sum of squares (per thread, then warps, then the block), then
 * out = x * scale * w with scale = 1 / sqrt(ss / n + eps) as in fm_cpu_rmsnorm. */
__global__ void __launch_bounds__(NORM_THREADS) rmsnorm_kernel(float *out, const float *x, const float *w, long long n,
                                                               float eps) {
    __shared__ float warp_ss[NORM_THREADS / 32];
    __shared__ float scale_s;
    const float *xr = x + (long long)blockIdx.x * n;
    float *orow = out + (long long)blockIdx.x * n;
    float ss = 0.f;
    for (long long i = threadIdx.x; i < n; i += NORM_THREADS) {
        const float v = xr[i];
        ss = fmaf(v, v, ss);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) warp_ss[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float tot = 0.f;
        for (int i = 0; i < NORM_THREADS / 32; i++) tot += warp_ss[i];
        scale_s = 1.0f / sqrtf(tot / (float)n + eps);
    }
    __syncthreads();
    const float scale = scale_s;
    for (long long i = threadIdx.x; i < n; i += NORM_THREADS) orow[i] = xr[i] * scale * (w ? w[i] : 1.0f);
}

__global__ void swiglu_kernel(float *out, const float *gate, const float *up, long long n) {
    fm_pdl_trigger(); /* PDL (cuda_internal.h): the successor may launch; */
    fm_pdl_wait();    /* the predecessor's writes are visible from here */
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* The argmax's running best: value v at index i (i < 0: none yet). */
struct ArgBest {
    float v;
    int i;
};

/* The better of two candidates: the larger value, the lower index among equal values (so the first
 * largest, as fm_cpu_argmax's `if (x[i] > x[best])` scan); none loses to any. */
__device__ __forceinline__ ArgBest arg_better(ArgBest a, ArgBest b) {
    if (a.i < 0) return b;
    if (b.i < 0) return a;
    return b.v > a.v || (b.v == a.v && b.i < a.i) ? b : a;
}

/* Reduces each thread's (best, nan) over the block; thread 0 gets the result. */
__device__ __forceinline__ ArgBest arg_block(ArgBest b, int *nan) {
    __shared__ ArgBest warp_best[ARGMAX_THREADS / 32];
    __shared__ int warp_nan[ARGMAX_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const ArgBest other = {__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.i, o)};
        b = arg_better(b, other);
    }
    const int any_nan = __any_sync(0xffffffffu, *nan);
    if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = b, warp_nan[threadIdx.x >> 5] = any_nan;
    __syncthreads();
    if (threadIdx.x == 0) {
        b = warp_best[0];
        *nan = warp_nan[0];
        for (int w = 1; w < ARGMAX_THREADS / 32; w++) b = arg_better(b, warp_best[w]), *nan |= warp_nan[w];
    }
    return b;
}

/* Stage 1: block b's best of its grid-strided share of x, and whether that share has a NaN. */
__global__ void __launch_bounds__(ARGMAX_THREADS) argmax_part_kernel(const float *x, long long n, ArgBest *part,
                                                                     int *part_nan) {
    ArgBest b = {0.f, -1};
    int nan = 0;
    for (long long i = (long long)blockIdx.x * ARGMAX_THREADS + threadIdx.x; i < n; i += (long long)gridDim.x * ARGMAX_THREADS) {
        const float v = x[i];
        if (v != v) nan = 1;
        else if (b.i < 0 || v > b.v) b = ArgBest{v, (int)i}; /* a thread's indices ascend */
    }
    b = arg_block(b, &nan);
    if (threadIdx.x == 0) part[blockIdx.x] = b, part_nan[blockIdx.x] = nan;
}

/* Stage 2: one block over the parts; *out = the index, or -1 with a NaN or nothing. */
__global__ void __launch_bounds__(ARGMAX_THREADS) argmax_final_kernel(const ArgBest *part, const int *part_nan, int n_parts,
                                                                      int32_t *out) {
    ArgBest b = {0.f, -1};
    int nan = 0;
    for (int j = (int)threadIdx.x; j < n_parts; j += ARGMAX_THREADS) b = arg_better(b, part[j]), nan |= part_nan[j];
    b = arg_block(b, &nan);
    if (threadIdx.x == 0) *out = nan ? -1 : b.i;
}

} // namespace

extern "C" size_t fm_cuda_argmax_scratch_bytes(void) { return (size_t)ARGMAX_PARTS * (sizeof(ArgBest) + sizeof(int)); }

extern "C" fm_status fm_cuda_argmax(fm_cuda *ctx, int32_t *out, const float *x, int64_t n, void *scratch) {
    FM_CUDA_CTX(ctx);
    if (n < 1 || n > INT32_MAX) return fm_error_set(FM_ERR_ARG, "CUDA argmax: bad length %lld", (long long)n);
    if (!out || !x || !scratch) return fm_error_set(FM_ERR_ARG, "CUDA argmax: NULL pointer");
    long long parts = (n + ARGMAX_THREADS * 8 - 1) / (ARGMAX_THREADS * 8); /* ~8 values a thread */
    if (parts > ARGMAX_PARTS) parts = ARGMAX_PARTS;
    ArgBest *part = (ArgBest *)scratch;
    int *part_nan = (int *)(part + ARGMAX_PARTS);
    argmax_part_kernel<<<(unsigned)parts, ARGMAX_THREADS, 0, ctx->stream>>>(x, (long long)n, part, part_nan);
    FM_CUDA_CHECK_LAUNCH("argmax_part_kernel");
    argmax_final_kernel<<<1, ARGMAX_THREADS, 0, ctx->stream>>>(part, part_nan, (int)parts, out);
    FM_CUDA_CHECK_LAUNCH("argmax_final_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_rmsnorm(fm_cuda *ctx, float *out, const float *x, const float *w, int64_t n_tokens, int64_t n,
                                     float eps) {
    FM_CUDA_CTX(ctx);
    if (n_tokens < 0 || n <= 0 || n_tokens > INT32_MAX)
        return fm_error_set(FM_ERR_ARG, "CUDA rmsnorm: bad shape (%lld tokens of %lld)", (long long)n_tokens, (long long)n);
    if (n_tokens == 0) return FM_OK;
    if (!out || !x) return fm_error_set(FM_ERR_ARG, "CUDA rmsnorm: NULL pointer");
    rmsnorm_kernel<<<(unsigned)n_tokens, NORM_THREADS, 0, ctx->stream>>>(out, x, w, (long long)n, eps);
    FM_CUDA_CHECK_LAUNCH("rmsnorm_kernel");
    return FM_OK;
}

extern "C" fm_status fm_cuda_swiglu(fm_cuda *ctx, float *out, const float *gate, const float *up, int64_t n) {
    FM_CUDA_CTX(ctx);
    if (n < 0) return fm_error_set(FM_ERR_ARG, "CUDA swiglu: n = %lld < 0", (long long)n);
    if (n == 0) return FM_OK;
    if (!out || !gate || !up) return fm_error_set(FM_ERR_ARG, "CUDA swiglu: NULL pointer");
    long long blocks = (n + 255) / 256;
    if (blocks > 65536) blocks = 65536;
    FM_CUDA_CHECK(fm_launch_pdl(ctx, swiglu_kernel, dim3((unsigned)blocks), dim3(256), 0, out, gate, up, (long long)n));
    FM_CUDA_CHECK_LAUNCH("swiglu_kernel");
    return FM_OK;
}
