/* The CUDA backend's context, buffers, errors and timers (see cuda_backend.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

fm_status fm_cuda_fail(cudaError_t e, const char *call, const char *file, int line) {
    fm_status st = FM_ERR_IO;
    if (e == cudaErrorMemoryAllocation) st = FM_ERR_NOMEM;
    else if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorStubLibrary ||
             e == cudaErrorInvalidDevice || e == cudaErrorNoKernelImageForDevice || e == cudaErrorUnsupportedPtxVersion ||
             e == cudaErrorSystemDriverMismatch || e == cudaErrorCompatNotSupportedOnDevice)
        st = FM_ERR_UNSUPPORTED;
    else if (e == cudaErrorInvalidValue) st = FM_ERR_ARG;
    return fm_error_set(st, "CUDA: %s failed: %s (%s) at %s:%d", call, cudaGetErrorName(e), cudaGetErrorString(e),
                        file, line);
}

extern "C" fm_status fm_cuda_device_count(int *n) {
    if (!n) return fm_error_set(FM_ERR_ARG, "fm_cuda_device_count: NULL argument");
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky; clear it */
        *n = 0;
        fm_cuda_fail(e, "cudaGetDeviceCount(&count)", __FILE__, __LINE__);
        return FM_OK;
    }
    *n = count;
    if (count == 0) fm_error_set(FM_ERR_UNSUPPORTED, "CUDA: cudaGetDeviceCount found no device");
    return FM_OK;
}

extern "C" fm_status fm_cuda_init(int device, fm_cuda **out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_cuda_init: NULL argument");
    *out = NULL;
    int count = 0;
    cudaError_t ce = cudaGetDeviceCount(&count);
    if (ce != cudaSuccess) { /* no driver, a stub, no device: whatever the code, nothing to run on */
        (void)cudaGetLastError();
        return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA: cudaGetDeviceCount(&count) failed: %s (%s) at %s:%d",
                            cudaGetErrorName(ce), cudaGetErrorString(ce), __FILE__, __LINE__);
    }
    if (device < 0 || device >= count)
        return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA: device %d does not exist (%d device%s)", device, count,
                            count == 1 ? "" : "s");
    FM_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop;
    FM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    fm_cuda *c = (fm_cuda *)calloc(1, sizeof *c);
    if (!c) return fm_error_set(FM_ERR_NOMEM, "fm_cuda_init: out of memory");
    c->device = device;
    c->sm_count = prop.multiProcessorCount;
    c->l2_bytes = prop.l2CacheSize;
    snprintf(c->desc, sizeof c->desc, "%s, sm_%d%d, %d SMs, %.1f GiB", prop.name, prop.major, prop.minor,
             prop.multiProcessorCount, (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreate(&c->t0);
    if (e == cudaSuccess) e = cudaEventCreate(&c->t1);
    if (e != cudaSuccess) {
        fm_cuda_fail(e, "cudaStreamCreateWithFlags / cudaEventCreate", __FILE__, __LINE__);
        fm_status st = e == cudaErrorMemoryAllocation ? FM_ERR_NOMEM : FM_ERR_IO;
        fm_cuda_free(c);
        return st;
    }
    *out = c;
    return FM_OK;
}

extern "C" void fm_cuda_free(fm_cuda *ctx) {
    if (!ctx) return;
    cudaSetDevice(ctx->device);
    if (ctx->stream) {
        cudaStreamSynchronize(ctx->stream);
        cudaStreamDestroy(ctx->stream);
    }
    if (ctx->t0) cudaEventDestroy(ctx->t0);
    if (ctx->t1) cudaEventDestroy(ctx->t1);
    free(ctx);
}

extern "C" const char *fm_cuda_device_desc(const fm_cuda *ctx) { return ctx ? ctx->desc : "?"; }
extern "C" int fm_cuda_sm_count(const fm_cuda *ctx) { return ctx ? ctx->sm_count : 0; }
extern "C" int64_t fm_cuda_l2_bytes(const fm_cuda *ctx) { return ctx ? ctx->l2_bytes : 0; }

extern "C" fm_status fm_cuda_buf_alloc(fm_cuda *ctx, size_t bytes, void **dev) {
    if (!dev) return fm_error_set(FM_ERR_ARG, "fm_cuda_buf_alloc: NULL argument");
    *dev = NULL;
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* an allocation failure is not sticky */
        fm_cuda_fail(e, "cudaMalloc(&p, bytes)", __FILE__, __LINE__);
        return fm_error_wrap(e == cudaErrorMemoryAllocation ? FM_ERR_NOMEM : FM_ERR_IO,
                             "fm_cuda_buf_alloc of %zu bytes", bytes);
    }
    *dev = p;
    return FM_OK;
}

extern "C" void fm_cuda_buf_free(fm_cuda *ctx, void *dev) {
    if (!ctx || !dev) return;
    cudaSetDevice(ctx->device);
    cudaStreamSynchronize(ctx->stream);
    cudaFree(dev);
}

extern "C" fm_status fm_cuda_buf_upload(fm_cuda *ctx, void *dev, const void *host, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    if (!dev || !host) return fm_error_set(FM_ERR_ARG, "fm_cuda_buf_upload: NULL pointer");
    FM_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, ctx->stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_buf_download(fm_cuda *ctx, void *host, const void *dev, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return fm_cuda_sync(ctx);
    if (!dev || !host) return fm_error_set(FM_ERR_ARG, "fm_cuda_buf_download: NULL pointer");
    FM_CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, ctx->stream));
    FM_CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_buf_copy(fm_cuda *ctx, void *dst, const void *src, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    if (!dst || !src) return fm_error_set(FM_ERR_ARG, "fm_cuda_buf_copy: NULL pointer");
    FM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_buf_fill(fm_cuda *ctx, void *dev, int byte, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    if (!dev) return fm_error_set(FM_ERR_ARG, "fm_cuda_buf_fill: NULL pointer");
    FM_CUDA_CHECK(cudaMemsetAsync(dev, byte, bytes, ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_sync(fm_cuda *ctx) {
    FM_CUDA_CTX(ctx);
    FM_CUDA_CHECK(cudaStreamSynchronize(ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_timer_start(fm_cuda *ctx) {
    FM_CUDA_CTX(ctx);
    FM_CUDA_CHECK(cudaEventRecord(ctx->t0, ctx->stream));
    return FM_OK;
}

extern "C" fm_status fm_cuda_timer_stop(fm_cuda *ctx, double *ms) {
    FM_CUDA_CTX(ctx);
    if (!ms) return fm_error_set(FM_ERR_ARG, "fm_cuda_timer_stop: NULL argument");
    FM_CUDA_CHECK(cudaEventRecord(ctx->t1, ctx->stream));
    FM_CUDA_CHECK(cudaEventSynchronize(ctx->t1));
    float f = 0;
    FM_CUDA_CHECK(cudaEventElapsedTime(&f, ctx->t0, ctx->t1));
    *ms = f;
    return FM_OK;
}
