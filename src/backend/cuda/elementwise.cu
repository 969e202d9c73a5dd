/* Elementwise kernels of the CUDA backend: RMSNorm and SwiGLU (see cuda_backend.h). Both follow
 * the CPU oracle's arithmetic (fm_cpu_rmsnorm, fm_silu) except the order of the sum of squares. */
#include <stdint.h>

#include "backend/cuda/cuda_internal.h"

namespace {

constexpr int NORM_THREADS = 256;

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

} // namespace

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
