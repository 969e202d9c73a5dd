/* Internal to src/backend/cuda/ (the .cu files) (CUDA C++): the context and the error-check macro. */
#ifndef FM_BACKEND_CUDA_INTERNAL_H
#define FM_BACKEND_CUDA_INTERNAL_H

#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"

extern "C" {
#include "util/error.h"
}

struct fm_cuda {
    int device;
    cudaStream_t stream;
    cudaEvent_t t0, t1;
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

#endif
