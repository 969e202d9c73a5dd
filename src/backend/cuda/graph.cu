/* CUDA graphs of the context's stream (cuda_backend.h): capture, replay, and a profile of where a
 * replay's time goes (fm_cuda_graph_profile). */
#include <cxxabi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"

struct fm_cuda_graph {
    cudaGraphExec_t exec;
    cudaGraph_t graph; /* kept for fm_cuda_graph_profile (its nodes name the kernels) */
};

extern "C" fm_status fm_cuda_capture_begin(fm_cuda *ctx) {
    FM_CUDA_CTX(ctx);
    FM_CUDA_CHECK(cudaStreamBeginCapture(ctx->stream, cudaStreamCaptureModeThreadLocal));
    return FM_OK;
}

extern "C" void fm_cuda_capture_abort(fm_cuda *ctx) {
    if (!ctx) return;
    cudaSetDevice(ctx->device);
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(ctx->stream, &cs) == cudaSuccess && cs != cudaStreamCaptureStatusNone) {
        cudaGraph_t g = nullptr;
        if (cudaStreamEndCapture(ctx->stream, &g) == cudaSuccess && g) cudaGraphDestroy(g);
    }
    (void)cudaGetLastError(); /* capture errors are not sticky */
}

extern "C" fm_status fm_cuda_capture_end(fm_cuda *ctx, fm_cuda_graph **out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_cuda_capture_end: NULL argument");
    *out = nullptr;
    FM_CUDA_CTX(ctx);
    cudaGraph_t g = nullptr;
    cudaError_t e = cudaStreamEndCapture(ctx->stream, &g);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return fm_cuda_fail(e, "cudaStreamEndCapture(ctx->stream, &g)", __FILE__, __LINE__);
    }
    fm_cuda_graph *gr = (fm_cuda_graph *)calloc(1, sizeof *gr);
    if (!gr) {
        cudaGraphDestroy(g);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    e = cudaGraphInstantiate(&gr->exec, g, 0);
    if (e != cudaSuccess) {
        cudaGraphDestroy(g);
        free(gr);
        (void)cudaGetLastError();
        return fm_cuda_fail(e, "cudaGraphInstantiate(&gr->exec, g, 0)", __FILE__, __LINE__);
    }
    gr->graph = g;
    e = cudaGraphUpload(gr->exec, ctx->stream);
    if (e != cudaSuccess) {
        cudaGraphExecDestroy(gr->exec);
        cudaGraphDestroy(g);
        free(gr);
        return fm_cuda_fail(e, "cudaGraphUpload(gr->exec, ctx->stream)", __FILE__, __LINE__);
    }
    *out = gr;
    return FM_OK;
}

extern "C" fm_status fm_cuda_graph_launch(fm_cuda *ctx, fm_cuda_graph *g) {
    FM_CUDA_CTX(ctx);
    if (!g) return fm_error_set(FM_ERR_ARG, "fm_cuda_graph_launch: NULL graph");
    FM_CUDA_CHECK(cudaGraphLaunch(g->exec, ctx->stream));
    return FM_OK;
}

extern "C" void fm_cuda_graph_free(fm_cuda *ctx, fm_cuda_graph *g) {
    if (!g) return;
    if (ctx) {
        cudaSetDevice(ctx->device);
        cudaStreamSynchronize(ctx->stream);
    }
    cudaGraphExecDestroy(g->exec);
    cudaGraphDestroy(g->graph);
    free(g);
}

/* ---- the profile: each kernel of the graph alone and left out ---- */

namespace {

constexpr int PROF_BATCH = 10; /* replays per timed batch */

int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median over `reps` batches of PROF_BATCH replays of us per replay, after two untimed replays. */
cudaError_t prof_time(fm_cuda *ctx, cudaGraphExec_t ex, int reps, double *us) {
    cudaEvent_t a = nullptr, b = nullptr;
    double *t = (double *)calloc((size_t)reps, sizeof *t);
    cudaError_t e = t ? cudaEventCreate(&a) : cudaErrorMemoryAllocation;
    if (e == cudaSuccess) e = cudaEventCreate(&b);
    for (int i = 0; e == cudaSuccess && i < 2; i++) e = cudaGraphLaunch(ex, ctx->stream);
    for (int r = 0; e == cudaSuccess && r < reps; r++) {
        e = cudaEventRecord(a, ctx->stream);
        for (int i = 0; e == cudaSuccess && i < PROF_BATCH; i++) e = cudaGraphLaunch(ex, ctx->stream);
        if (e == cudaSuccess) e = cudaEventRecord(b, ctx->stream);
        if (e == cudaSuccess) e = cudaEventSynchronize(b);
        float ms = 0.f;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, a, b);
        t[r] = 1000.0 * ms / PROF_BATCH;
    }
    if (e == cudaSuccess) {
        qsort(t, (size_t)reps, sizeof *t, cmp_double);
        *us = t[reps / 2];
    }
    if (a) cudaEventDestroy(a);
    if (b) cudaEventDestroy(b);
    free(t);
    return e;
}

/* The kernel's name without return type, namespace and parameter list, into buf. */
void prof_name(const void *func, char *buf, size_t n) {
    const char *raw = nullptr;
    snprintf(buf, n, "%p", func);
    if (cudaFuncGetName(&raw, func) != cudaSuccess || !raw) {
        (void)cudaGetLastError();
        return;
    }
    int st = 0;
    char *dem = abi::__cxa_demangle(raw, nullptr, nullptr, &st);
    const char *s = st == 0 && dem ? dem : raw;
    static const char anon[] = "(anonymous namespace)::";
    size_t o = 0;
    if (!strncmp(s, "void ", 5)) s += 5;
    while (*s && o + 1 < n) {
        if (!strncmp(s, anon, sizeof anon - 1)) {
            s += sizeof anon - 1;
            continue;
        }
        if (*s == '(') break; /* the parameter list */
        buf[o++] = *s++;
    }
    buf[o] = 0;
    free(dem);
}

struct ProfGroup {
    const void *func;
    int nodes;
    double alone, without;
};

/* Enables (on = true) or disables the kernel nodes of function func (every kernel node: func NULL). */
cudaError_t prof_set(cudaGraphExec_t ex, cudaGraphNode_t *nodes, const void *const *funcs, size_t n, const void *func,
                     bool on) {
    for (size_t i = 0; i < n; i++) {
        if (!funcs[i] || (func && funcs[i] != func)) continue;
        const cudaError_t e = cudaGraphNodeSetEnabled(ex, nodes[i], on ? 1u : 0u);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

int cmp_saved(const void *a, const void *b) {
    const ProfGroup *x = (const ProfGroup *)a, *y = (const ProfGroup *)b;
    return cmp_double(&y->without, &x->without); /* the largest saving (least time without) first */
}

} // namespace

extern "C" fm_status fm_cuda_graph_profile(fm_cuda *ctx, fm_cuda_graph *g, int reps, FILE *out) {
    FM_CUDA_CTX(ctx);
    if (!g || !out || reps < 1) return fm_error_set(FM_ERR_ARG, "fm_cuda_graph_profile: bad argument");
    size_t n = 0;
    FM_CUDA_CHECK(cudaGraphGetNodes(g->graph, nullptr, &n));
    cudaGraphNode_t *nodes = (cudaGraphNode_t *)calloc(n + 1, sizeof *nodes);
    const void **funcs = (const void **)calloc(n + 1, sizeof *funcs);
    ProfGroup *gr = (ProfGroup *)calloc(n + 1, sizeof *gr);
    fm_status st = FM_OK;
    cudaError_t e = nodes && funcs && gr ? cudaGraphGetNodes(g->graph, nodes, &n) : cudaErrorMemoryAllocation;
    int ng = 0, nk = 0;
    for (size_t i = 0; e == cudaSuccess && i < n; i++) {
        cudaGraphNodeType type;
        e = cudaGraphNodeGetType(nodes[i], &type);
        if (e != cudaSuccess || type != cudaGraphNodeTypeKernel) continue;
        cudaKernelNodeParams kp;
        e = cudaGraphKernelNodeGetParams(nodes[i], &kp);
        if (e != cudaSuccess) break;
        funcs[i] = kp.func;
        nk++;
        int j = 0;
        while (j < ng && gr[j].func != kp.func) j++;
        if (j == ng) gr[ng++].func = kp.func;
        gr[j].nodes++;
    }
    double all = 0, none = 0;
    if (e == cudaSuccess) e = prof_time(ctx, g->exec, reps, &all);
    if (e == cudaSuccess) e = prof_set(g->exec, nodes, funcs, n, nullptr, false);
    if (e == cudaSuccess) e = prof_time(ctx, g->exec, reps, &none);
    for (int j = 0; e == cudaSuccess && j < ng; j++) { /* alone: from every kernel node disabled */
        e = prof_set(g->exec, nodes, funcs, n, gr[j].func, true);
        if (e == cudaSuccess) e = prof_time(ctx, g->exec, reps, &gr[j].alone);
        if (e == cudaSuccess) e = prof_set(g->exec, nodes, funcs, n, gr[j].func, false);
    }
    if (e == cudaSuccess) e = prof_set(g->exec, nodes, funcs, n, nullptr, true);
    for (int j = 0; e == cudaSuccess && j < ng; j++) { /* without: from every kernel node enabled */
        e = prof_set(g->exec, nodes, funcs, n, gr[j].func, false);
        if (e == cudaSuccess) e = prof_time(ctx, g->exec, reps, &gr[j].without);
        if (e == cudaSuccess) e = prof_set(g->exec, nodes, funcs, n, gr[j].func, true);
    }
    if (e != cudaSuccess) {
        st = fm_cuda_fail(e, "profiling the graph's kernel nodes", __FILE__, __LINE__);
        (void)prof_set(g->exec, nodes, funcs, n, nullptr, true);
    } else {
        qsort(gr, (size_t)ng, sizeof *gr, cmp_saved);
        fprintf(out,
                "graph profile: %zu nodes, %d kernel nodes of %d kernels; us per replay, medians of %d batches of %d\n"
                "  whole graph %.1f us; every kernel node disabled %.1f us\n"
                "  %-44s %5s %9s %10s %9s %9s\n",
                n, nk, ng, reps, PROF_BATCH, all, none, "kernel", "nodes", "alone", "without", "saved", "per node");
        for (int j = 0; j < ng; j++) {
            char name[160];
            prof_name(gr[j].func, name, sizeof name);
            fprintf(out, "  %-44.44s %5d %9.1f %10.1f %9.1f %9.2f\n", name, gr[j].nodes, gr[j].alone, gr[j].without,
                    all - gr[j].without, (all - gr[j].without) / gr[j].nodes);
        }
    }
    free(nodes);
    free(funcs);
    free(gr);
    return st;
}
