/* Internal to src/backend/cuda/ (the .cu files) (CUDA C++): the context and the error-check macro. */
#ifndef FM_BACKEND_CUDA_INTERNAL_H
#define FM_BACKEND_CUDA_INTERNAL_H

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <utility>

#include "backend/cuda/cuda_backend.h"

extern "C" {
#include "util/error.h"
}

/* Timed copies on the copy stream whose events may be pending at once (a ring). */
#define FM_CUDA_COPY_TIMED 64

#define FM_CUDA_FFN_COUNTERS 64 /* fm_cuda::ffn_ctr */

struct fm_cuda {
    int device;
    cudaStream_t stream;
    cudaEvent_t t0, t1;
    /* the copy stream (fm_cuda_copy_*), created on first use, and its events */
    cudaStream_t copy;
    cudaEvent_t copied;   /* recorded on the copy stream: the compute stream waits on it */
    cudaEvent_t computed; /* recorded on the compute stream: the copy stream waits on it */
    cudaEvent_t (*cev)[2];/* [FM_CUDA_COPY_TIMED] start/end of timed copies (a ring) */
    int cev_next, cev_pending;
    double copy_ms;       /* summed over finished timed copies */
    uint64_t copy_bytes, copy_count;
    int sm_count, cc_major;
    int ffn_clusters[4];  /* matmul.cu: the most resident clusters of the expert FFN kernel (2, 4, 8, 16 blocks); -1 unknown */
    int64_t l2_bytes;
    unsigned *tk_count;   /* device: fm_cuda_matvec_topk's count of finished blocks (0 between launches) */
    unsigned *ffn_ctr;    /* device: [FM_CUDA_FFN_COUNTERS] fm_cuda_expert_ffn's counts of finished blocks a slice (0 between launches) */
    char desc[256];
};

/* Maps a CUDA error to a status and leaves "CUDA: <call> failed: <name> (<text>) at <file>:<line>". */
fm_status fm_cuda_fail(cudaError_t e, const char *call, const char *file, int line);

/* Runs a CUDA runtime call; on failure returns the mapped status from the enclosing function. */
#define FM_CUDA_CHECK(call)                                                                        \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return fm_cuda_fail(e_, #call, __FILE__, __LINE__);                 \
    } while (0)

/* After a kernel launch: a launch-configuration error, reported with the kernel's name. */
#define FM_CUDA_CHECK_LAUNCH(name)                                                                 \
    do {                                                                                           \
        cudaError_t e_ = cudaGetLastError();                                                       \
        if (e_ != cudaSuccess) return fm_cuda_fail(e_, "launch of " name, __FILE__, __LINE__);     \
    } while (0)

/* Makes the context's device current for the calling thread. */
#define FM_CUDA_CTX(ctx)                                                                           \
    do {                                                                                           \
        if (!(ctx)) return fm_error_set(FM_ERR_ARG, "CUDA: NULL context");                         \
        FM_CUDA_CHECK(cudaSetDevice((ctx)->device));                                               \
    } while (0)

/* A quantized weight's scale or bias as float from its stored bits (kind 0 BF16 and 1 F16: the low
 * 16 bits of raw; 2 F32), and element i of an array of them at p. */
__device__ __forceinline__ float fm_scale_bits(uint32_t raw, int kind) {
    return kind == 0 ? __uint_as_float(raw << 16)
                     : kind == 1 ? __half2float(__ushort_as_half((unsigned short)raw)) : __uint_as_float(raw);
}
__device__ __forceinline__ float fm_scale_load(const unsigned char *p, long long i, int kind) {
    if (kind == 2) return __ldg((const float *)p + i);
    return fm_scale_bits(__ldg((const unsigned short *)p + i), kind);
}

/* Programmatic dependent launch (docs/CUDA.md "One-token matvecs"): fm_pdl_trigger() at the start
 * of a kernel lets a successor launched with the programmatic-serialization attribute start its
 * blocks early; such a successor calls fm_pdl_wait() before it reads anything its predecessors
 * wrote (it returns once they have completed and their writes are visible). Both are no-ops
 * before sm_90 and for kernels launched without the attribute. */
__device__ __forceinline__ void fm_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void fm_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

/* A barrier over every block of the grid (all of them resident: a cooperative launch, or no more
 * blocks than fit at once). count: device memory, 0 at the launch, only this barrier's; target: the
 * number of arrivals to wait for, (phase + 1) * gridDim.x for the barrier ending phase `phase`.
 * Every block's global writes before it are visible to every block after it (fence, then release
 * by the atomic and acquire by the loads); read data written by other blocks through L2 (__ldcg or
 * volatile), not through a possibly stale L1. */
__device__ __forceinline__ void fm_grid_barrier(unsigned *count, unsigned target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(count, 1u);
        unsigned v;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
        } while (v < target);
    }
    __syncthreads();
}

/* Top-k of one token's router logits lg[0..E) by one warp (lane = 0..31; E <= 32 PL, k <= 32):
 * router_topk_warp_kernel's body (layers.cu), also run by the last block of fm_cuda_matvec_topk's
 * router product (matmul.cu): the same code, so the same ids and weights. Lane l holds p[l + 32 i],
 * i < PL, in registers; max and sum by shuffles; each of the k rounds takes the lane's best untaken
 * key (the bits of p plus one, 0 once taken: p >= 0, so the bits order as the values), the warp's
 * largest key by one redux, and among the lanes that hold it the lowest id by another (ties to the
 * lower id, as the block kernel); the weight is the key's own value. Lane i keeps round i's id and
 * weight and writes them at the end (divided by the rounds' sum, in round order, with norm). The
 * logits are read through L2 (__ldcg: other blocks may have just written them). */
template <int PL>
__device__ __forceinline__ void fm_topk_warp(int32_t *ids, float *weights, const float *lg, int E, int k, int norm,
                                             int lane) {
    float p[PL];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PL; i++) {
        const int e = lane + 32 * i;
        p[i] = e < E ? __ldcg(lg + e) : -INFINITY;
        mx = fmaxf(mx, p[i]);
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, m));
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < PL; i++) {
        p[i] = lane + 32 * i < E ? expf(p[i] - mx) : 0.f;
        s += p[i];
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    uint32_t key[PL];
#pragma unroll
    for (int i = 0; i < PL; i++) key[i] = lane + 32 * i < E ? __float_as_uint(p[i] / s) + 1u : 0u;
    int32_t my_id = 0;
    float my_w = 0.f, tsum = 0.f;
    for (int r = 0; r < k; r++) {
        uint32_t bk = 0u;
        int bi = 0;
#pragma unroll
        for (int i = 0; i < PL; i++) /* ascending id: strict > keeps the lower one */
            if (key[i] > bk) bk = key[i], bi = i;
        const uint32_t top = __reduce_max_sync(0xffffffffu, bk);
        const uint32_t win = __reduce_min_sync(0xffffffffu, bk == top ? (uint32_t)(lane + 32 * bi) : 0xffffffffu);
#pragma unroll
        for (int i = 0; i < PL; i++)
            if ((uint32_t)(lane + 32 * i) == win) key[i] = 0u;
        const float pw = __uint_as_float(top - 1u);
        if (lane == r) my_id = (int32_t)win, my_w = pw;
        tsum += pw;
    }
    if (lane < k) {
        ids[lane] = my_id;
        weights[lane] = norm ? my_w / tsum : my_w;
    }
}

__device__ __forceinline__ float fm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Token t's k (<= KM) expert ids and routing weights, each thread its own copy in registers:
 * rank[j] = how many of the ids are below ids[j] (a token's ids are distinct), so that adding slot
 * j's value at step rank[j] adds the experts in ascending id without a sort or a barrier. */
template <int KM>
__device__ __forceinline__ void fm_combine_ranks(const int32_t *ids, const float *w, int k, int rank[KM], float wv[KM]) {
    int32_t id[KM];
#pragma unroll
    for (int j = 0; j < KM; j++) {
        id[j] = j < k ? ids[j] : INT32_MAX;
        wv[j] = j < k ? w[j] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < KM; j++) {
        rank[j] = 0;
#pragma unroll
        for (int i = 0; i < KM; i++) rank[j] += i < k && id[i] < id[j];
    }
}

/* acc + the sum over slots of wv[j] * yv[j], added in ascending id (fm_combine_ranks), as
 * moe_combine_topk_kernel adds them. */
template <int KM>
__device__ __forceinline__ float fm_combine_experts(float acc, const float yv[KM], const int rank[KM], const float wv[KM],
                                                 int k) {
#pragma unroll
    for (int r = 0; r < KM; r++)
        if (r < k) {
            float yy = 0.f, ww = 0.f;
#pragma unroll
            for (int j = 0; j < KM; j++)
                if (rank[j] == r) yy = yv[j], ww = wv[j];
            acc += ww * yy;
        }
    return acc;
}

/* Launches k on the context's stream with programmatic stream serialization (it may start while the
 * previous kernel runs, and must call fm_pdl_wait() before reading what that kernel wrote), or as
 * an ordinary launch with FLASHMOE_CUDA_PDL=0 (for measurements); the _cluster form with
 * thread-block clusters of `cluster` blocks along x (0: none). */
template <typename... KArgs, typename... Args>
cudaError_t fm_launch_pdl_cluster(fm_cuda *ctx, void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem, unsigned cluster,
                                  Args &&...args) {
    const char *e = getenv("FLASHMOE_CUDA_PDL");
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = ctx->stream;
    cudaLaunchAttribute attr[2];
    int n = 0;
    if (!(e && e[0] == '0' && !e[1])) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster) { /* thread-block clusters of `cluster` blocks along x (sm_90) */
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n].val.clusterDim.x = cluster, attr[n].val.clusterDim.y = 1, attr[n++].val.clusterDim.z = 1;
    }
    cfg.attrs = attr;
    cfg.numAttrs = (unsigned)n;
    return cudaLaunchKernelEx(&cfg, k, std::forward<Args>(args)...);
}
template <typename... KArgs, typename... Args>
cudaError_t fm_launch_pdl(fm_cuda *ctx, void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem, Args &&...args) {
    return fm_launch_pdl_cluster(ctx, k, grid, block, smem, 0u, std::forward<Args>(args)...);
}

/* matmul.cu's one-token kernel for fm_cuda_expert_matvec (arguments already checked): enqueues the
 * products and sets *done, or leaves *done false and enqueues nothing when it does not take them
 * (a shape mv_shape refuses, x or x_up not 16-byte aligned, x_stride not a multiple of 4). */
fm_status fm_cuda_mv_experts(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv, bool *done);

/* gemm.cu's tensor-core GEMM for quantized weights at many tokens (prefill). fm_cuda_gemm_wants: whether
 * it takes product m of weights shaped like `shape` (Q4/Q8, groups 32/64/128, cols a multiple of 64,
 * at least fm_cuda_gemm_min_tokens() tokens, w and x 16-byte aligned).
 * fm_cuda_gemm_batch enqueues exactly those products of mats (arguments already checked) and leaves
 * the others to the caller. */
bool fm_cuda_gemm_wants(const fm_weight *shape, const fm_cuda_mat *m);
fm_status fm_cuda_gemm_batch(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_mat *mats, int n_mats);

#endif
