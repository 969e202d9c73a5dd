/* The CUDA backend's context, buffers, errors and timers (see cuda_backend.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

#include <algorithm>

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
    c->cc_major = prop.major;
    for (int i = 0; i < 4; i++) c->ffn_clusters[i] = -1;
    c->l2_bytes = prop.l2CacheSize;
    snprintf(c->desc, sizeof c->desc, "%s, sm_%d%d, %d SMs, %.1f GiB", prop.name, prop.major, prop.minor,
             prop.multiProcessorCount, (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreate(&c->t0);
    if (e == cudaSuccess) e = cudaEventCreate(&c->t1);
    if (e == cudaSuccess) e = cudaMalloc((void **)&c->tk_count, sizeof(unsigned));
    if (e == cudaSuccess) e = cudaMemsetAsync(c->tk_count, 0, sizeof(unsigned), c->stream);
    if (e == cudaSuccess) e = cudaMalloc((void **)&c->ffn_ctr, FM_CUDA_FFN_COUNTERS * sizeof(unsigned));
    if (e == cudaSuccess) e = cudaMemsetAsync(c->ffn_ctr, 0, FM_CUDA_FFN_COUNTERS * sizeof(unsigned), c->stream);
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
    if (ctx->tk_count) cudaFree(ctx->tk_count);
    if (ctx->ffn_ctr) cudaFree(ctx->ffn_ctr);
    if (ctx->copy) {
        cudaStreamSynchronize(ctx->copy);
        cudaStreamDestroy(ctx->copy);
    }
    if (ctx->copied) cudaEventDestroy(ctx->copied);
    if (ctx->computed) cudaEventDestroy(ctx->computed);
    if (ctx->cev) {
        for (int i = 0; i < FM_CUDA_COPY_TIMED; i++)
            for (int j = 0; j < 2; j++)
                if (ctx->cev[i][j]) cudaEventDestroy(ctx->cev[i][j]);
        free(ctx->cev);
    }
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

/* ---- the copy stream ---- */

/* Creates the copy stream and its events on first use. */
static fm_status copy_ready(fm_cuda *ctx) {
    if (ctx->copy) return FM_OK;
    FM_CUDA_CHECK(cudaEventCreateWithFlags(&ctx->copied, cudaEventDisableTiming));
    FM_CUDA_CHECK(cudaEventCreateWithFlags(&ctx->computed, cudaEventDisableTiming));
    ctx->cev = (cudaEvent_t(*)[2])calloc(FM_CUDA_COPY_TIMED, sizeof *ctx->cev);
    if (!ctx->cev) return fm_error_set(FM_ERR_NOMEM, "fm_cuda copy stream: out of memory");
    for (int i = 0; i < FM_CUDA_COPY_TIMED; i++)
        for (int j = 0; j < 2; j++) FM_CUDA_CHECK(cudaEventCreate(&ctx->cev[i][j]));
    FM_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->copy, cudaStreamNonBlocking));
    return FM_OK;
}

/* Adds the oldest pending timed copy's device time to the totals (waits for its end event). */
static fm_status copy_harvest_one(fm_cuda *ctx) {
    int i = (ctx->cev_next - ctx->cev_pending + FM_CUDA_COPY_TIMED) % FM_CUDA_COPY_TIMED;
    float ms = 0;
    FM_CUDA_CHECK(cudaEventSynchronize(ctx->cev[i][1]));
    FM_CUDA_CHECK(cudaEventElapsedTime(&ms, ctx->cev[i][0], ctx->cev[i][1]));
    ctx->copy_ms += ms;
    ctx->cev_pending--;
    return FM_OK;
}

extern "C" fm_status fm_cuda_host_register(fm_cuda *ctx, void *host, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (!host || !bytes) return fm_error_set(FM_ERR_ARG, "fm_cuda_host_register: NULL pointer or 0 bytes");
    cudaError_t e = cudaHostRegister(host, bytes, cudaHostRegisterDefault);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky: the memory stays usable as pageable memory */
        fm_cuda_fail(e, "cudaHostRegister(host, bytes, cudaHostRegisterDefault)", __FILE__, __LINE__);
        return fm_error_wrap(FM_ERR_IO, "fm_cuda_host_register of %zu bytes", bytes);
    }
    return FM_OK;
}

extern "C" void fm_cuda_host_unregister(fm_cuda *ctx, void *host) {
    if (!ctx || !host) return;
    cudaSetDevice(ctx->device);
    if (ctx->copy) cudaStreamSynchronize(ctx->copy);
    cudaStreamSynchronize(ctx->stream);
    cudaHostUnregister(host);
}

extern "C" fm_status fm_cuda_copy_upload(fm_cuda *ctx, void *dev, const void *host, size_t bytes) {
    FM_CUDA_CTX(ctx);
    if (bytes == 0) return FM_OK;
    if (!dev || !host) return fm_error_set(FM_ERR_ARG, "fm_cuda_copy_upload: NULL pointer");
    fm_status st = copy_ready(ctx);
    if (st != FM_OK) return st;
    if (ctx->cev_pending == FM_CUDA_COPY_TIMED && (st = copy_harvest_one(ctx)) != FM_OK) return st;
    int i = ctx->cev_next;
    FM_CUDA_CHECK(cudaEventRecord(ctx->cev[i][0], ctx->copy));
    FM_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, ctx->copy));
    FM_CUDA_CHECK(cudaEventRecord(ctx->cev[i][1], ctx->copy));
    ctx->cev_next = (i + 1) % FM_CUDA_COPY_TIMED;
    ctx->cev_pending++;
    ctx->copy_bytes += bytes;
    ctx->copy_count++;
    return FM_OK;
}

extern "C" fm_status fm_cuda_compute_wait_copies(fm_cuda *ctx) {
    FM_CUDA_CTX(ctx);
    if (!ctx->copy) return FM_OK; /* nothing was ever copied there */
    FM_CUDA_CHECK(cudaEventRecord(ctx->copied, ctx->copy));
    FM_CUDA_CHECK(cudaStreamWaitEvent(ctx->stream, ctx->copied, 0));
    return FM_OK;
}

extern "C" fm_status fm_cuda_copies_wait_compute(fm_cuda *ctx) {
    FM_CUDA_CTX(ctx);
    fm_status st = copy_ready(ctx);
    if (st != FM_OK) return st;
    FM_CUDA_CHECK(cudaEventRecord(ctx->computed, ctx->stream));
    FM_CUDA_CHECK(cudaStreamWaitEvent(ctx->copy, ctx->computed, 0));
    return FM_OK;
}

extern "C" fm_status fm_cuda_copy_sync(fm_cuda *ctx) {
    FM_CUDA_CTX(ctx);
    if (ctx->copy) FM_CUDA_CHECK(cudaStreamSynchronize(ctx->copy));
    return FM_OK;
}

extern "C" fm_status fm_cuda_copy_stats(fm_cuda *ctx, fm_cuda_copy_totals *out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_cuda_copy_stats: NULL argument");
    memset(out, 0, sizeof *out);
    fm_status st = fm_cuda_copy_sync(ctx);
    while (st == FM_OK && ctx->cev_pending > 0) st = copy_harvest_one(ctx);
    if (st != FM_OK) return st;
    out->copies = ctx->copy_count;
    out->bytes = ctx->copy_bytes;
    out->busy_ms = ctx->copy_ms;
    return FM_OK;
}

extern "C" fm_status fm_cuda_copy_stats_reset(fm_cuda *ctx) {
    fm_cuda_copy_totals t;
    fm_status st = fm_cuda_copy_stats(ctx, &t); /* harvests what is pending */
    if (st != FM_OK) return st;
    ctx->copy_ms = 0;
    ctx->copy_bytes = ctx->copy_count = 0;
    return FM_OK;
}

extern "C" fm_status fm_cuda_h2d_gbs(fm_cuda *ctx, size_t bytes, int reps, double *gbs) {
    if (!gbs || reps < 1 || reps > 64 || bytes == 0) return fm_error_set(FM_ERR_ARG, "fm_cuda_h2d_gbs: bad arguments");
    *gbs = 0;
    FM_CUDA_CTX(ctx);
    fm_status st = copy_ready(ctx);
    if (st != FM_OK) return st;
    void *host = NULL, *dev = NULL;
    if ((st = fm_cuda_host_alloc(ctx, bytes, &host)) != FM_OK) return st;
    if ((st = fm_cuda_buf_alloc(ctx, bytes, &dev)) != FM_OK) {
        fm_cuda_host_free(ctx, host);
        return st;
    }
    memset(host, 0x5a, bytes);
    double ms[64];
    for (int i = -1; i < reps && st == FM_OK; i++) { /* one warm-up */
        cudaError_t e = cudaEventRecord(ctx->t0, ctx->copy);
        if (e == cudaSuccess) e = cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, ctx->copy);
        if (e == cudaSuccess) e = cudaEventRecord(ctx->t1, ctx->copy);
        if (e == cudaSuccess) e = cudaEventSynchronize(ctx->t1);
        float f = 0;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&f, ctx->t0, ctx->t1);
        if (e != cudaSuccess) st = fm_cuda_fail(e, "the timed host-to-device copy", __FILE__, __LINE__);
        else if (i >= 0) ms[i] = f;
    }
    fm_cuda_buf_free(ctx, dev);
    fm_cuda_host_free(ctx, host);
    if (st != FM_OK) return st;
    std::sort(ms, ms + reps);
    double med = reps % 2 ? ms[reps / 2] : 0.5 * (ms[reps / 2 - 1] + ms[reps / 2]);
    *gbs = med > 0 ? (double)bytes / (med * 1e-3) / 1e9 : 0;
    return FM_OK;
}
