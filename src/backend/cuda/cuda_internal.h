/* Internal to src/backend/cuda/ (the .cu files) (CUDA C++): the context and the error-check macro. */
#ifndef FM_BACKEND_CUDA_INTERNAL_H
#define FM_BACKEND_CUDA_INTERNAL_H

#include <cuda_runtime.h>
#include <stdlib.h>

#include <utility>

#include "backend/cuda/cuda_backend.h"

extern "C" {
#include "util/error.h"
}

/* Timed copies on the copy stream whose events may be pending at once (a ring). */
#define FM_CUDA_COPY_TIMED 64

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
    int sm_count;
    int64_t l2_bytes;
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

/* Launches k on the context's stream with programmatic stream serialization (it may start while the
 * previous kernel runs, and must call fm_pdl_wait() before reading what that kernel wrote), or as
 * an ordinary launch with FLASHMOE_CUDA_PDL=0 (for measurements). */
template <typename... KArgs, typename... Args>
cudaError_t fm_launch_pdl(fm_cuda *ctx, void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem, Args &&...args) {
    const char *e = getenv("FLASHMOE_CUDA_PDL");
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = ctx->stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = e && e[0] == '0' && !e[1] ? 0 : 1;
    return cudaLaunchKernelEx(&cfg, k, std::forward<Args>(args)...);
}

/* matmul.cu's one-token kernel for fm_cuda_expert_matvec (arguments already checked): enqueues the
 * products and sets *done, or leaves *done false and enqueues nothing when it does not take them
 * (a shape mv_shape refuses, x or x_up not 16-byte aligned, x_stride not a multiple of 4). */
fm_status fm_cuda_mv_experts(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv, bool *done);

#endif
