/* What a phase boundary of the decode step costs (docs/CUDA.md "The 60% roofline"): the step's
 * kernels are separated by launch boundaries (a CUDA graph with PDL); a persistent kernel would
 * separate the same phases by grid barriers (fm_grid_barrier, cuda_internal.h). Both are timed
 * here with the least work a phase can have, and both check that every phase sees the previous
 * phase's writes of every block. */
#include "backend/cuda/cuda_internal.h"

namespace {

constexpr int PHASE_THREADS = 256;

/* Phase p, as its own launch: block b reads what block b + 1 wrote in phase p - 1 (it must be
 * p - 1) and writes p. slots: 2 x gridDim.x ints (phases alternate between the halves). */
__global__ void __launch_bounds__(PHASE_THREADS) phase_step_kernel(int *slots, int p, unsigned *errors) {
    fm_pdl_trigger();
    fm_pdl_wait();
    const int nb = (int)gridDim.x, b = (int)blockIdx.x;
    if (threadIdx.x == 0) {
        if (p > 0 && __ldcg(&slots[((p - 1) & 1) * nb + (b + 1) % nb]) != p - 1) atomicAdd(errors, 1u);
        slots[(p & 1) * nb + b] = p;
    }
}

/* The same phases in one launch, separated by fm_grid_barrier. */
__global__ void __launch_bounds__(PHASE_THREADS) phase_persistent_kernel(int *slots, int phases, unsigned *count,
                                                                         unsigned *errors) {
    const int nb = (int)gridDim.x, b = (int)blockIdx.x;
    for (int p = 0; p < phases; p++) {
        if (threadIdx.x == 0) {
            if (p > 0 && __ldcg(&slots[((p - 1) & 1) * nb + (b + 1) % nb]) != p - 1) atomicAdd(errors, 1u);
            slots[(p & 1) * nb + b] = p;
        }
        fm_grid_barrier(count, (unsigned)(p + 1) * (unsigned)nb);
    }
}

int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

} // namespace

extern "C" fm_status fm_cuda_phase_bench(fm_cuda *ctx, int blocks, int phases, int reps, fm_cuda_phase_times *out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_cuda_phase_bench: NULL argument");
    memset(out, 0, sizeof *out);
    FM_CUDA_CTX(ctx);
    int per_sm = 0;
    FM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, phase_persistent_kernel, PHASE_THREADS, 0));
    const int most = per_sm * ctx->sm_count;
    if (blocks < 1 || blocks > most || phases < 2 || phases > 100000 || reps < 1 || reps > 1000)
        return fm_error_set(FM_ERR_ARG,
                            "fm_cuda_phase_bench: bad arguments (%d blocks of at most %d resident, %d phases of 2..100000, "
                            "%d reps of 1..1000)",
                            blocks, most, phases, reps);
    int *slots = nullptr;
    unsigned *count = nullptr, *errors = nullptr;
    double *t = (double *)calloc((size_t)reps, sizeof(double));
    fm_cuda_graph *g = nullptr;
    fm_status st = FM_OK;
    unsigned err_host[2] = {0, 0};
    cudaError_t e = cudaMalloc(&slots, sizeof(int) * 2 * (size_t)blocks);
    if (e == cudaSuccess) e = cudaMalloc(&count, sizeof(unsigned));
    if (e == cudaSuccess) e = cudaMalloc(&errors, 2 * sizeof(unsigned));
    if (e == cudaSuccess) e = cudaMemsetAsync(errors, 0, 2 * sizeof(unsigned), ctx->stream);
    if (e != cudaSuccess || !t) {
        st = t ? fm_cuda_fail(e, "cudaMalloc (phase bench)", __FILE__, __LINE__) : fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto done;
    }
    /* the launch boundaries: `phases` PDL launches captured into one graph */
    st = fm_cuda_capture_begin(ctx);
    for (int p = 0; st == FM_OK && p < phases; p++) {
        e = fm_launch_pdl(ctx, phase_step_kernel, dim3((unsigned)blocks), dim3(PHASE_THREADS), 0, slots, p, errors);
        if (e != cudaSuccess) st = fm_cuda_fail(e, "fm_launch_pdl(phase_step_kernel)", __FILE__, __LINE__);
    }
    if (st != FM_OK) {
        fm_cuda_capture_abort(ctx);
        goto done;
    }
    if ((st = fm_cuda_capture_end(ctx, &g)) != FM_OK) goto done;
    for (int r = -1; r < reps && st == FM_OK; r++) { /* r = -1: untimed */
        double ms = 0;
        st = fm_cuda_timer_start(ctx);
        if (st == FM_OK) st = fm_cuda_graph_launch(ctx, g);
        if (st == FM_OK) st = fm_cuda_timer_stop(ctx, &ms);
        if (r >= 0) t[r] = ms;
    }
    if (st != FM_OK) goto done;
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    out->launch_us = t[reps / 2] * 1e3 / phases;
    /* the grid barriers: one cooperative launch (every block resident) */
    for (int r = -1; r < reps && st == FM_OK; r++) {
        unsigned *barrier_errors = errors + 1;
        void *args[] = {&slots, &phases, &count, &barrier_errors};
        double ms = 0;
        e = cudaMemsetAsync(count, 0, sizeof(unsigned), ctx->stream);
        if (e != cudaSuccess) {
            st = fm_cuda_fail(e, "cudaMemsetAsync(count)", __FILE__, __LINE__);
            break;
        }
        st = fm_cuda_timer_start(ctx);
        if (st != FM_OK) break;
        e = cudaLaunchCooperativeKernel((const void *)phase_persistent_kernel, dim3((unsigned)blocks),
                                        dim3(PHASE_THREADS), args, 0, ctx->stream);
        if (e != cudaSuccess) {
            st = fm_cuda_fail(e, "cudaLaunchCooperativeKernel(phase_persistent_kernel)", __FILE__, __LINE__);
            break;
        }
        st = fm_cuda_timer_stop(ctx, &ms);
        if (r >= 0) t[r] = ms;
    }
    if (st != FM_OK) goto done;
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    out->barrier_us = t[reps / 2] * 1e3 / phases;
    e = cudaMemcpy(err_host, errors, sizeof err_host, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        st = fm_cuda_fail(e, "cudaMemcpy(errors)", __FILE__, __LINE__);
        goto done;
    }
    out->launch_errors = err_host[0];
    out->barrier_errors = err_host[1];
    out->blocks = blocks;
    out->most_blocks = most;
done:
    if (g) fm_cuda_graph_free(ctx, g);
    cudaFree(slots);
    cudaFree(count);
    cudaFree(errors);
    free(t);
    return st;
}
