/* The CUDA backend (docs/CUDA.md): device buffers and the hot kernels of the MoE forward pass.
 *
 * A plain C surface with no CUDA types in it: the library's C code includes this header, and only
 * the .cu files of src/backend/cuda/ include the CUDA runtime. Compiled in with `make CUDA=1`, which
 * also defines FM_HAVE_CUDA for the C code; the default build has no CUDA code at all.
 *
 * Contract shared by every function here:
 *  - An fm_cuda context owns one device and one CUDA stream. Kernels and device-to-device copies
 *    are enqueued on that stream and run asynchronously, in order; uploads and downloads are
 *    synchronous (they return when the bytes have arrived, so host buffers may be reused at once).
 *    fm_cuda_sync waits for everything enqueued and reports a failure that happened meanwhile.
 *  - Functions return FM_OK or a failure with one line in fm_last_error() that names the CUDA call,
 *    the CUDA error and the source file and line (e.g. "CUDA: cudaMalloc(&p, bytes) failed:
 *    cudaErrorMemoryAllocation (out of memory) at src/backend/cuda/cuda_backend.cu:96").
 *    Status mapping: FM_ERR_NOMEM for a failed allocation, FM_ERR_UNSUPPORTED when there is no
 *    usable device / driver or for a weight type the kernels do not take, FM_ERR_ARG for bad
 *    arguments (checked before anything is enqueued), FM_ERR_IO for every other CUDA failure.
 *    A kernel fault (an illegal address) leaves the context unusable: every later call fails.
 *  - A context is used by one host thread at a time. Several contexts may share a device.
 *  - "Device pointer" means memory from fm_cuda_buf_alloc (or any cudaMalloc'ed memory).
 *    No function here calls exit() or abort(). */
#ifndef FM_BACKEND_CUDA_BACKEND_H
#define FM_BACKEND_CUDA_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" { /* the C headers below have no guards of their own */
#endif

#include "backend/tensor.h"
#include "flashmoe.h"

typedef struct fm_cuda fm_cuda;

/* Number of CUDA devices usable by this process, in *n. No driver, a stub driver, or no device
 * give *n = 0 and FM_OK (the reason is left in fm_last_error(), for a SKIP message). */
fm_status fm_cuda_device_count(int *n);

/* Opens device `device` (0-based) with a fresh non-blocking stream. FM_ERR_UNSUPPORTED when the
 * device does not exist or no driver is usable; the message says which. */
fm_status fm_cuda_init(int device, fm_cuda **out);

/* Waits for the stream, then releases the stream, timers and the context (NULL is fine). Buffers
 * from fm_cuda_buf_alloc are not freed: free them first. */
void fm_cuda_free(fm_cuda *ctx);

/* "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79.1 GiB" for logs. */
const char *fm_cuda_device_desc(const fm_cuda *ctx);

/* Multiprocessors and L2 bytes of the context's device (benchmarks size their data from these). */
int fm_cuda_sm_count(const fm_cuda *ctx);
int64_t fm_cuda_l2_bytes(const fm_cuda *ctx);

/* ---- device buffers ---- */

/* *dev = `bytes` of device memory, 256-byte aligned, contents undefined. bytes = 0 gives NULL. */
fm_status fm_cuda_buf_alloc(fm_cuda *ctx, size_t bytes, void **dev);
/* Frees a buffer (NULL is fine); waits for the context's stream first. */
void fm_cuda_buf_free(fm_cuda *ctx, void *dev);
/* host -> device and device -> host, synchronous: return when the copy is complete (and, for the
 * download, after all work enqueued before it). */
fm_status fm_cuda_buf_upload(fm_cuda *ctx, void *dev, const void *host, size_t bytes);
fm_status fm_cuda_buf_download(fm_cuda *ctx, void *host, const void *dev, size_t bytes);
/* device -> device, enqueued on the stream (asynchronous). */
fm_status fm_cuda_buf_copy(fm_cuda *ctx, void *dst, const void *src, size_t bytes);
/* Sets every byte to `byte`, enqueued (asynchronous). */
fm_status fm_cuda_buf_fill(fm_cuda *ctx, void *dev, int byte, size_t bytes);

/* Waits for everything enqueued on the context's stream; reports an asynchronous failure. */
fm_status fm_cuda_sync(fm_cuda *ctx);

/* Timing with device events on the stream: start records an event, stop records another, waits
 * for it and gives the milliseconds between them. */
fm_status fm_cuda_timer_start(fm_cuda *ctx);
fm_status fm_cuda_timer_stop(fm_cuda *ctx, double *ms);

/* ---- the copy stream: host -> device copies beside the compute stream ----
 * A context has a second stream for uploads (created on first use). Its copies run concurrently
 * with the kernels of the compute stream; ordering between the two is explicit: the compute stream
 * waits for the copies enqueued so far (fm_cuda_compute_wait_copies), the copy stream for the
 * kernels enqueued so far (fm_cuda_copies_wait_compute). Host memory given to fm_cuda_copy_upload
 * should be page-locked (fm_cuda_host_alloc or fm_cuda_host_register) for a truly asynchronous
 * copy; pageable memory works too (CUDA stages it before the call returns). */

/* Page-locks `bytes` of existing host memory at `host` (cudaHostRegister) so that copies from it
 * are DMA transfers that do not block the host. FM_ERR_IO (with the CUDA error) when the driver
 * refuses, e.g. for a file mapping; the memory then stays usable as pageable memory. */
fm_status fm_cuda_host_register(fm_cuda *ctx, void *host, size_t bytes);
/* Waits for the copy stream, then unregisters (NULL is fine). */
void fm_cuda_host_unregister(fm_cuda *ctx, void *host);

/* host -> device on the copy stream, enqueued: `host` must stay unchanged until the copy is done
 * (fm_cuda_copy_sync, or a later compute-stream point that waited for it). Each copy is timed with
 * a pair of events (fm_cuda_copy_stats). */
fm_status fm_cuda_copy_upload(fm_cuda *ctx, void *dev, const void *host, size_t bytes);
/* The compute stream's later work waits for every copy enqueued so far (an event, no host wait). */
fm_status fm_cuda_compute_wait_copies(fm_cuda *ctx);
/* The copy stream's later copies wait for every kernel enqueued so far on the compute stream (so a
 * copy may overwrite device memory that those kernels read). */
fm_status fm_cuda_copies_wait_compute(fm_cuda *ctx);
/* The host waits for every copy enqueued (their host buffers may be reused after). */
fm_status fm_cuda_copy_sync(fm_cuda *ctx);

/* Copies through fm_cuda_copy_upload since the context was made (or the last reset): their count,
 * bytes and summed device time (each copy's own start to end event: the copy engine's busy time). */
typedef struct fm_cuda_copy_totals {
    uint64_t copies, bytes;
    double busy_ms;
} fm_cuda_copy_totals;
/* Waits for the copy stream, then gives the totals. */
fm_status fm_cuda_copy_stats(fm_cuda *ctx, fm_cuda_copy_totals *out);
/* Waits for the copy stream and zeroes the totals. */
fm_status fm_cuda_copy_stats_reset(fm_cuda *ctx);

/* Host -> device bandwidth from page-locked memory on the copy stream, GB/s (1e9 bytes): the
 * median of `reps` (>= 1, after one warm-up) copies of `bytes`, timed with events. Allocates
 * `bytes` of page-locked host memory and of device memory for the measurement (FM_ERR_NOMEM if
 * they do not fit). Not counted in fm_cuda_copy_stats. */
fm_status fm_cuda_h2d_gbs(fm_cuda *ctx, size_t bytes, int reps, double *gbs);

/* ---- matmul: out[t, r] = sum_c x[t, c] * W[r, c] ---- */

/* One product of a batch. w: the weight's bytes on the device, in the layout of fm_weight (for
 * quantized types: packed q words, then scales, then biases; docs/QUANT.md). x: (n_tokens, cols)
 * float32 on the device; out: (n_tokens, rows) float32 on the device, not overlapping x or w.
 * n_tokens may be 0 (nothing is computed or written for that product). */
typedef struct fm_cuda_mat {
    const void *w;
    const float *x;
    float *out;
    int64_t n_tokens;
} fm_cuda_mat;

/* Products per kernel launch: larger batches are split into launches of this many. */
#define FM_CUDA_BATCH_MAX 64

/* out = x W^T for one weight whose data pointer (w->data) is a device pointer. Takes F32, BF16,
 * F16, Q8, Q4, Q2 (groups 32/64/128, scales BF16, F16 or F32). Enqueued (asynchronous).
 * Alignment: w->data must be aligned to 4 bytes for F32 and quantized types and 2 for BF16/F16;
 * x to 4 bytes (FM_ERR_ARG otherwise). The fast kernel (16-byte weight loads) runs when w->data
 * and x are 16-byte aligned and a weight row is a whole number of 16-byte chunks (cols * bits a
 * multiple of 128; always true for Q4/Q8 and for the model's shapes); any other case runs a
 * slower, general kernel with the same results.
 * Results agree with fm_cpu_matmul to float32 rounding of the sum of |products| (quantized: of
 * sum_c (|q s| + |b|) |x_c|): the summation order differs, and quantized weights use the FMA form
 * s * sum(q x) + b * sum(x) per group. Errors (nothing enqueued): FM_ERR_UNSUPPORTED for another
 * dtype, the fm_quant_check errors, FM_ERR_ARG for NULL pointers, rows < 0, cols <= 0,
 * n_tokens < 0 or misalignment. */
fm_status fm_cuda_matmul(fm_cuda *ctx, float *out, const float *x, int64_t n_tokens, const fm_weight *w);

/* n_mats products with one shape: shape->dtype, rows, cols, group_size and scale_dtype apply to
 * every mats[i] (shape->data is ignored); each has its own weight, activations, output and token
 * count. Runs as ceil(n_mats / FM_CUDA_BATCH_MAX) launches, so several experts cost one launch
 * (the MoE case: the 10 experts of a token, gate and up together). Same checks and results as
 * fm_cuda_matmul for each product; a launch takes the fast kernel only if all of its products
 * qualify. */
fm_status fm_cuda_matmul_batch(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_mat *mats, int n_mats);

/* The fewest tokens with which a Q4/Q8 product of fm_cuda_matmul(_batch) runs on the tensor-core
 * GEMM (gemm.cu) instead of the FP32 kernels; 0: never. Default FM_CUDA_GEMM_MIN_TOKENS, or
 * FLASHMOE_CUDA_GEMM=N from the environment (read once). The setter returns the previous value
 * (tests use it to reach both kernels whatever the environment). 16: prefill of the 8-layer 35B
 * slice on an H100, 2048 tokens 3.07x, 256 tokens 1.9x faster than the FP32 kernels (docs/SPEED.md);
 * FLASHMOE_CUDA_GEMM=0 turns it off. */
#define FM_CUDA_GEMM_MIN_TOKENS 16
int fm_cuda_gemm_min_tokens(void);
int fm_cuda_set_gemm_min_tokens(int n);

/* ---- one-token matvecs (decode) ---- */

/* One product of fm_cuda_matvec: out (w->rows floats) = W x (x: w->cols floats), w->data on the
 * device. With w_up (NULL for none; the same type and shape as w, on the device): out = silu(W x) *
 * (W_up x), the SwiGLU of a gate/up pair in one product (needs fm_cuda_matvec_takes(w, x) and
 * w_up->data 16-byte aligned, else FM_ERR_UNSUPPORTED). */
typedef struct fm_cuda_mv {
    const fm_weight *w;
    const float *x;
    float *out;
    const fm_weight *w_up;
    /* Optional, zero for none; they need the one-token kernel (fm_cuda_matvec_takes(w, x) and
     * norm_w 16-byte aligned, else FM_ERR_UNSUPPORTED). norm_w (cols floats): the product's input
     * is x / sqrt(mean(x^2) + norm_eps) * norm_w, the RMSNorm of fm_cuda_rmsnorm folded into the
     * product (x is then the raw residual stream); norm_out (needs norm_w, must not overlap x): that
     * normalised input also stored there; residual (not with w_up; may equal out): out = residual
     * + W x. The results agree with fm_cuda_rmsnorm then the product within float rounding (the sum
     * of squares is added in another order). conv_w (rows x conv_k), conv_state ((conv_k - 1) x
     * rows), conv_out (rows), 2 <= conv_k <= 8, not with w_up: the outputs are also the input of
     * fm_cuda_conv1d_silu(conv_out, out, conv_state, conv_w, 1 token, rows channels, conv_k), done
     * in the product's epilogue (the same values and state bit for bit); conv_out must not overlap
     * out or conv_state. */
    const float *norm_w;
    float norm_eps;
    float *norm_out;
    const float *residual;
    const float *conv_w;
    float *conv_state, *conv_out;
    int conv_k;
} fm_cuda_mv;

/* Products per launch of fm_cuda_matvec's kernel. */
#define FM_CUDA_MV_MAX 16

/* n one-token products, each with its own weight (any shape and type fm_cuda_matmul takes), x and
 * output: as n calls of fm_cuda_matmul with n_tokens = 1, but the products of one weight type whose
 * weight and x are 16-byte aligned and whose rows are whole 16-byte chunks (every type but Q2) run
 * in one launch per FM_CUDA_MV_MAX of a kernel made for one token (docs/CUDA.md "One-token
 * matvecs"); the others go through fm_cuda_matmul. Products sharing x (a layer's projections of one
 * input) are the intended use. Enqueued. Same checks (nothing is enqueued on an error) and the same
 * accuracy contract as fm_cuda_matmul; results are deterministic. FLASHMOE_CUDA_MV_RPT=2|4|8 fixes
 * the rows a thread takes (for measurements; by default chosen per launch). */
fm_status fm_cuda_matvec(fm_cuda *ctx, const fm_cuda_mv *mv, int n);

/* fm_cuda_matvec(mv, n) and then fm_cuda_router_topk(ids, weights, mv[0].out, 1 token, mv[0].w->rows
 * experts, k, norm): mv[0] is the router (no w_up). When the one-token kernel takes mv[0], E <= 1024
 * and k <= 32, the top-k runs inside the matvec launch (the last block of the router's product to
 * finish, with router_topk_warp_kernel's code: the same ids and weights) and saves a launch;
 * otherwise, or with FLASHMOE_CUDA_TOPK_FUSE=0, the two calls. Errors: fm_cuda_matvec's, and
 * FM_ERR_ARG for n < 1, NULL ids / weights or a bad (E, k) as fm_cuda_router_topk (nothing enqueued). */
fm_status fm_cuda_matvec_topk(fm_cuda *ctx, const fm_cuda_mv *mv, int n, int32_t *ids, float *weights, int k,
                              bool norm);

/* True when fm_cuda_matvec runs W x in its one-token kernel (not the fm_cuda_matmul fallback). */
bool fm_cuda_matvec_takes(const fm_weight *w, const float *x);

/* ---- elementwise ---- */

/* For each of n_tokens rows of n values: out = x / sqrt(mean(x^2) + eps) * w  (w: n floats on the
 * device, or NULL for no scale), as fm_cpu_rmsnorm. out may equal x. Enqueued. */
fm_status fm_cuda_rmsnorm(fm_cuda *ctx, float *out, const float *x, const float *w, int64_t n_tokens, int64_t n,
                          float eps);

/* out[i] = silu(gate[i]) * up[i] for i < n, silu(g) = g / (1 + exp(-g)) (as fm_silu). out may equal
 * gate or up. Enqueued. */
fm_status fm_cuda_swiglu(fm_cuda *ctx, float *out, const float *gate, const float *up, int64_t n);

/* *out (device) = the index of the first largest of x[0..n) (device), or -1 when any x[i] is NaN:
 * fm_cpu_argmax's index (greedy decoding without the logits leaving the device). scratch: device
 * memory of fm_cuda_argmax_scratch_bytes(), not used by anything else until the argmax has run.
 * Enqueued (two launches); FM_ERR_ARG for n < 1 or n > INT32_MAX or a NULL pointer. */
fm_status fm_cuda_argmax(fm_cuda *ctx, int32_t *out, const float *x, int64_t n, void *scratch);
size_t fm_cuda_argmax_scratch_bytes(void);

#ifdef __cplusplus
}
#endif

#endif

/* ==== Layer kernels of the forward pass (src/backend/cuda/layers.cu; docs/CUDA.md) ====
 * The same contract as above: enqueued on the context's stream unless said otherwise, FM_ERR_ARG
 * for bad shapes or NULL pointers (checked before anything is enqueued), every pointer a device
 * pointer unless it says host. Each kernel mirrors the CPU code it replaces (src/model/forward.c,
 * fm_cpu_rmsnorm, fm_cpu_rope_neox) in its order of operations; sums over many values are reduced
 * across threads, so results agree with the CPU to float32 rounding, not bit for bit. */
#ifndef FM_BACKEND_CUDA_LAYERS_SECTION
#define FM_BACKEND_CUDA_LAYERS_SECTION

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Page-locked host memory (cudaMallocHost), for uploads that do not block the host. */
fm_status fm_cuda_host_alloc(fm_cuda *ctx, size_t bytes, void **host);
/* Waits for the context's stream, then frees (NULL is fine). */
void fm_cuda_host_free(fm_cuda *ctx, void *host);
/* host -> device, enqueued: `host` must stay unchanged until the stream has passed this point
 * (page-locked memory: truly asynchronous; pageable memory: the copy is staged at once). */
fm_status fm_cuda_upload_async(fm_cuda *ctx, void *dev, const void *host, size_t bytes);
/* Free and total device memory (cudaMemGetInfo). */
fm_status fm_cuda_mem_info(fm_cuda *ctx, uint64_t *free_bytes, uint64_t *total_bytes);

/* Per row t < n_tokens of n values: x += add (add may be NULL: no add), then
 * xn = x / sqrt(mean(x^2) + eps) * w (w NULL: no scale). The residual step of forward.c followed by
 * fm_cpu_rmsnorm. xn must not overlap x or add. */
fm_status fm_cuda_add_rmsnorm(fm_cuda *ctx, float *x, float *xn, const float *add, const float *w, int64_t n_tokens,
                              int64_t n, float eps);

/* Gated RMSNorm of Gated DeltaNet, per row of n: out = rmsnorm(x) * w * silu(z) (w: n floats).
 * out may equal x. */
fm_status fm_cuda_rmsnorm_gated(fm_cuda *ctx, float *out, const float *x, const float *z, const float *w,
                                int64_t n_rows, int64_t n, float eps);

/* Per token t and head h (row r = t * n_heads + h): out[r * out_stride + i] = rope(rmsnorm(in[r *
 * in_stride + i]) * w)[i] for i < d, where rope is fm_cpu_rope_neox on the first rot_dim values at
 * position pos0 + t with inv_freq[i] (rot_dim / 2 floats on the device: float(1 / theta^(2i/rot_dim)),
 * as the CPU computes them). rot_dim = 0: no rotation (inv_freq may be NULL). d <= 8192. */
fm_status fm_cuda_head_norm_rope(fm_cuda *ctx, float *out, int64_t out_stride, const float *in, int64_t in_stride,
                                 const float *w, int64_t n_tokens, int n_heads, int d, float eps, int rot_dim,
                                 const float *inv_freq, int64_t pos0);

/* Causal depthwise conv1d (kernel K, no bias) + SiLU over [state (K-1 rows); in (n_tokens rows)]:
 * out[t, ch] = silu(sum_{j<K} w[ch, j] * seq[t + j, ch]); then state = the last K-1 rows of that
 * sequence. in, out: (n_tokens, channels); state: (K-1, channels), oldest first; w: (channels, K).
 * out must not overlap in or state. K <= 64. */
fm_status fm_cuda_conv1d_silu(fm_cuda *ctx, float *out, const float *in, float *state, const float *w,
                              int64_t n_tokens, int64_t channels, int K);

/* The gated delta rule over n_tokens tokens in order (docs/MODEL.md), per value head h with key
 * head h / (nv / nk): qkv (n_tokens, 2*nk*dk + nv*dv) = [q | k | v] after the conv; b, a
 * (n_tokens, nv) the beta and decay projections; S (nv, dk, dv) the recurrent state, updated;
 * A_log, dt_bias (nv).
 * o (n_tokens, nv*dv) = S^T q per head, before the gated norm. dk, dv <= 1024. */
fm_status fm_cuda_delta_rule(fm_cuda *ctx, float *o, const float *qkv, const float *b, const float *a, float *S,
                             const float *A_log, const float *dt_bias, int64_t n_tokens, int nk, int nv, int dk, int dv);

/* fm_cuda_delta_rule, then the gated RMSNorm of each head's dv outputs (fm_cuda_rmsnorm_gated with
 * z (n_tokens, nv*dv) and norm_w (dv)): out = rmsnorm(o) * norm_w * silu(z). One kernel for dk <=
 * 128 and dv a multiple of 8 up to 128 (a block per head), else the two. out must not overlap the
 * inputs. */
fm_status fm_cuda_delta_rule_gated(fm_cuda *ctx, float *out, const float *qkv, const float *b, const float *a, float *S,
                                   const float *A_log, const float *dt_bias, const float *z, const float *norm_w,
                                   float eps, int64_t n_tokens, int nk, int nv, int dk, int dv);

/* Gated causal attention for n_tokens tokens at positions pos0.. whose K and V rows are already in
 * the caches (n_ctx, n_head_kv, d): for row r = t * n_head + h,
 *   out[r] = softmax_p(q[r] . K[p, h/(n_head/n_head_kv)] / sqrt(d), p <= pos0 + t) V * sigmoid(gate)
 * q, out: (n_tokens, n_head, d); gate row r at gate + r * gate_stride. d <= 512. */
fm_status fm_cuda_attention(fm_cuda *ctx, float *out, const float *q, const float *gate, int64_t gate_stride,
                            const float *k_cache, const float *v_cache, int64_t n_tokens, int64_t pos0, int n_head,
                            int n_head_kv, int d);

/* Router: per token, p = softmax(logits[t]) over n_experts (<= 4096), then k passes of max
 * selection (ties to the lower id): ids[t, i], weights[t, i] = p; with norm, weights /= their sum. */
fm_status fm_cuda_router_topk(fm_cuda *ctx, int32_t *ids, float *weights, const float *logits, int64_t n_tokens,
                              int n_experts, int k, bool norm);

/* out[r] = src[idx[r]] for r < n (rows of cols floats; n <= 65535). */
fm_status fm_cuda_gather_rows(fm_cuda *ctx, float *out, const float *src, const int32_t *idx, int64_t n,
                              int64_t cols);

/* MoE combine + residual, per token t < n_tokens (<= 65535), rows of H:
 *   x[t] += sigmoid(shared_logit[t]) * shared[t] + sum_{j<k} w[t, j] * Y[rows[t, j]]
 * in that order (rows[t, j] < 0 is skipped; shared NULL: no shared expert). */
fm_status fm_cuda_moe_combine(fm_cuda *ctx, float *x, const float *shared, const float *shared_logit, const float *Y,
                              const int32_t *rows, const float *w, int64_t n_tokens, int k, int64_t H);

/* ---- decode without host synchronisation (forward_cuda.c's resident mode and CUDA graphs) ---- */

/* device -> host, enqueued (asynchronous): `host` (page-locked for a truly asynchronous copy) is
 * valid after the next fm_cuda_sync. */
fm_status fm_cuda_download_async(fm_cuda *ctx, void *host, const void *dev, size_t bytes);

/* fm_cuda_head_norm_rope with the position read from device memory: pos = *pos_dev (int64) is the
 * position of token 0, and the output starts at out + pos * out_pos_stride (0: not moved), so one
 * launch (captured in a graph) serves every position, e.g. writing k into the KV cache row of the
 * current token. */
fm_status fm_cuda_head_norm_rope_at(fm_cuda *ctx, float *out, int64_t out_pos_stride, int64_t out_stride,
                                    const float *in, int64_t in_stride, const float *w, int64_t n_tokens, int n_heads,
                                    int d, float eps, int rot_dim, const float *inv_freq, const int64_t *pos_dev);

/* fm_cuda_attention with pos0 = *pos_dev (device memory). */
fm_status fm_cuda_attention_at(fm_cuda *ctx, float *out, const float *q, const float *gate, int64_t gate_stride,
                               const float *k_cache, const float *v_cache, int64_t n_tokens, const int64_t *pos_dev,
                               int n_head, int n_head_kv, int d);

/* One token's full attention at position *pos_dev in one kernel, as fm_cuda_head_norm_rope_at of q
 * (q_norm) and of k (k_norm) with rot_dim and inv_freq, fm_cuda_store_at of v, and fm_cuda_attention_at
 * (equal within float rounding: the softmax is summed in another order): qg (n_head, 2 d) = per head
 * [q | gate], kv = [k (n_head_kv d) | v (n_head_kv d)]; k and v go into the caches (n_ctx, n_head_kv,
 * d) at the position; out (n_head, d). d <= 512. The context is split over up to n_split blocks a
 * head (1..32; see fm_cuda_attention_decode_splits); n_split > 1 needs `scratch`, a device buffer of
 * fm_cuda_attention_decode_scratch_bytes, zero-filled before its first use (the kernel leaves it so);
 * calls that share a scratch must not run concurrently. */
fm_status fm_cuda_attention_decode(fm_cuda *ctx, float *out, const float *qg, const float *kv, const float *q_norm,
                                   const float *k_norm, float eps, int rot_dim, const float *inv_freq, float *k_cache,
                                   float *v_cache, const int64_t *pos_dev, int n_head, int n_head_kv, int d,
                                   int n_split, void *scratch);

/* The split count fm_cuda_attention_decode should use for caches of n_ctx positions: enough blocks
 * to fill the SMs at long contexts (1 when n_ctx is short). */
int fm_cuda_attention_decode_splits(const fm_cuda *ctx, int n_head, int64_t n_ctx);

/* Bytes of fm_cuda_attention_decode's scratch for n_split (0 when n_split <= 1). */
size_t fm_cuda_attention_decode_scratch_bytes(int n_head, int d, int n_split);

/* dst[*pos_dev * pos_stride + i] = src[i] for i < n (e.g. v into its KV cache row). */
fm_status fm_cuda_store_at(fm_cuda *ctx, float *dst, int64_t pos_stride, const float *src, int64_t n,
                           const int64_t *pos_dev);

/* fm_cuda_moe_combine with the router's output as it is: ids, w (n_tokens, k) on the device (ids of
 * a token distinct), expert j of token t's output at row t * k + j of Y; the experts are added in
 * ascending id (the CPU's order). k <= 64. */
fm_status fm_cuda_moe_combine_topk(fm_cuda *ctx, float *x, const float *shared, const float *shared_logit,
                                   const float *Y, const int32_t *ids, const float *w, int64_t n_tokens, int k,
                                   int64_t H);

/* fm_cuda_moe_combine_topk followed by fm_cuda_add_rmsnorm(x, xn, NULL, norm_w, n_tokens, H, eps)
 * in one launch (one block per token): x and xn are bit-identical to the two calls. xn must not
 * overlap x, shared or Y. The one-token step uses it for the combine and the next layer's input
 * norm (or the final norm). */
fm_status fm_cuda_moe_combine_topk_norm(fm_cuda *ctx, float *x, float *xn, const float *norm_w, float eps,
                                        const float *shared, const float *shared_logit, const float *Y,
                                        const int32_t *ids, const float *w, int64_t n_tokens, int k, int64_t H);

/* One token's routed experts with the expert ids in device memory (no host round trip). Product j
 * (j < n_parts * k) is part p = j / k of expert e = ids[j % k]: its weight (the launch's `shape`,
 * in the stored layout) starts at table[e] + part_off[p] (device addresses, 16-byte aligned); its
 * input is x + (j % k) * x_stride (cols floats), or, with x_up, silu(x) * x_up at the same offsets
 * (the SwiGLU fused into the down projection); its output out[p] + (j % k) * out_stride (rows
 * floats). Ids are clamped to [0, n_experts) (the router writes valid ones). */
typedef struct fm_cuda_expert_mv {
    const void *const *table; /* device: [n_experts] base address of each expert's block */
    const int32_t *ids;       /* device: k expert ids */
    int k, n_parts, n_experts;
    int64_t part_off[2];      /* bytes from an expert's base to part 0 / 1 */
    const float *x, *x_up;
    int64_t x_stride;
    float *out[2];
    int64_t out_stride;
    /* swiglu_out (with n_parts = 2): out[0] + (j % k) * out_stride = silu(part 0) * part 1, rows
     * floats (the SwiGLU fused into the gate+up launch; out[1] is not used). Needs x 16-byte aligned
     * and x_stride a multiple of 4 (FM_ERR_ARG otherwise). */
    int swiglu_out;
} fm_cuda_expert_mv;

/* True when fm_cuda_expert_matvec takes weights of this shape: F32, F16, BF16, Q8, Q4 (any group
 * size and scale type fm_quant_check accepts), cols a multiple of a 16-byte chunk's values and x
 * (cols floats) within 48 KB of shared memory (cols <= 12288 for float types, about 11900 for Q4).
 * Otherwise false with the reason in fm_last_error(). */
bool fm_cuda_expert_matvec_supported(const fm_weight *shape);

/* Enqueues the products of `mv` (one launch). Results as fm_cuda_matmul (float32 sums in another
 * order; quantized weights in the FMA form s * sum(q x) + b * sum(x) per group). Errors (nothing
 * enqueued): FM_ERR_UNSUPPORTED for a shape fm_cuda_expert_matvec_supported refuses, FM_ERR_ARG
 * for NULL pointers, part offsets not a multiple of 16, k < 1, n_parts not 1 or 2. */
fm_status fm_cuda_expert_matvec(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv);

/* fm_cuda_expert_matvec's products and one dense one-token product `extra` (fm_cuda_matvec's form,
 * no w_up; NULL for none) in one launch: the shared expert's down next to the routed experts' down
 * (matmul.cu, docs/CUDA.md). Results bit-identical to the two calls. Fused when the one-token
 * kernels take both (experts Q4 or Q8 with x 16-byte aligned; extra Q8, Q4 or BF16 with
 * fm_cuda_matvec_takes) and FLASHMOE_CUDA_MV_FUSE is not 0 and FLASHMOE_CUDA_EMV_OLD is unset; else
 * the two calls (experts first). Errors as the two calls'; nothing is enqueued on an argument error. */
fm_status fm_cuda_expert_matvec_with(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv,
                                     const fm_cuda_mv *extra);

/* One token's routed experts' whole SwiGLU FFN, and optionally one dense one-token product
 * (`extra`, fm_cuda_mv's form without w_up, norm, residual or conv: the shared expert's down), in
 * one launch of thread-block clusters (sm_90 and later; matmul.cu, docs/CUDA.md "The experts' FFN
 * in one launch"). For slot j < k, e = ids[j] (clamped to [0, n_experts)), whose gate, up ([I, H],
 * the shape gate_up) and down ([H, I], the shape down) start at table[e] + *_off:
 *   h = silu(gate x) * (up x), and out + (j * parts + p) * H = down[:, p-th 1/parts of I] h[that part],
 * so expert j's output is the sum of its `parts` rows (fm_cuda_moe_combine_parts adds them).
 * Float32 sums in another order than the two launches (fm_cuda_expert_matvec with swiglu_out, then
 * fm_cuda_expert_matvec_with): equal within rounding, not bit for bit. */
typedef struct fm_cuda_expert_ffn_args {
    const void *const *table; /* device: [n_experts] base address of each expert's block */
    const int32_t *ids;       /* device: k expert ids */
    int k, n_experts;
    int64_t gate_off, up_off, down_off; /* bytes from an expert's base to its parts (multiples of 16) */
    const float *x;           /* device: [H], 16-byte aligned */
    float *out;               /* device: [k * parts][H] */
    /* Optional: the MoE combine in the same launch (combine_x NULL: none, the caller runs
     * fm_cuda_moe_combine_parts). combine_x[i] += sigmoid(*shared_logit) * extra->out[i] (with
     * extra) + the sum over slots of weights[j] * expert j's output, in ascending id: the same x bit
     * for bit as fm_cuda_moe_combine_parts. Needs k <= 16 and extra->w->rows == H (else the launch
     * is refused as unsupported). */
    float *combine_x;
    const float *shared_logit, *weights;
} fm_cuda_expert_ffn_args;

/* The `parts` fm_cuda_expert_ffn splits each expert into on this device (1, 2, 4 or 8), or 0 when
 * the fused launch does not take these shapes (then fm_cuda_expert_matvec and _with): Q4 experts
 * with H <= 2048 and I / parts a multiple of 32 and <= 512, a GPU of compute capability 9 or later
 * on which k * parts clusters of 16 / parts blocks (or fewer) are resident at once, extra (if any)
 * Q8, Q4 or BF16 with rows of at most 64 16-byte chunks; with `combine` (the combine in the
 * launch, combine_x below) also k <= 16 and extra's rows H. Off (0) unless FLASHMOE_CUDA_FFN is 1
 * (any cluster size) or 2, 4, 8 or 16 (that size only): where measured it was slower than the two
 * launches (docs/CUDA.md). */
int fm_cuda_expert_ffn_parts(fm_cuda *ctx, const fm_weight *gate_up, const fm_weight *down, int k,
                             const fm_cuda_mv *extra, bool combine);

/* Enqueues the fused FFN. FM_ERR_ARG for NULL pointers, k < 1, misaligned offsets or x, a combine
 * without weights (or, with extra, without shared_logit); FM_ERR_UNSUPPORTED where
 * fm_cuda_expert_ffn_parts is 0 or the combine's conditions fail. Nothing is enqueued on an error. */
fm_status fm_cuda_expert_ffn(fm_cuda *ctx, const fm_weight *gate_up, const fm_weight *down,
                             const fm_cuda_expert_ffn_args *f, const fm_cuda_mv *extra);

/* fm_cuda_moe_combine_topk for one token whose expert j's output is the sum of rows j * parts + p
 * (p = 0, 1, ... added in that order) of Y: fm_cuda_expert_ffn's output. k <= 16, 1 <= parts <= 8;
 * with parts = 1 the same x bit for bit as fm_cuda_moe_combine_topk. */
fm_status fm_cuda_moe_combine_parts(fm_cuda *ctx, float *x, const float *shared, const float *shared_logit,
                                    const float *Y, const int32_t *ids, const float *w, int k, int parts, int64_t H);

/* CUDA graphs of the context's stream: between capture_begin and capture_end, the functions of
 * this header record their work instead of running it (nothing that synchronises may be called:
 * no fm_cuda_buf_upload / download / free / sync; host memory in uploads must be page-locked and is
 * read when the graph runs). capture_end instantiates the graph; graph_launch enqueues one replay
 * on the stream. After a failure inside a capture, fm_cuda_capture_abort ends it and leaves the
 * stream usable. */
typedef struct fm_cuda_graph fm_cuda_graph;
fm_status fm_cuda_capture_begin(fm_cuda *ctx);
fm_status fm_cuda_capture_end(fm_cuda *ctx, fm_cuda_graph **out);
void fm_cuda_capture_abort(fm_cuda *ctx);
fm_status fm_cuda_graph_launch(fm_cuda *ctx, fm_cuda_graph *g);
/* Waits for the stream, then frees the graph (NULL is fine). */
void fm_cuda_graph_free(fm_cuda *ctx, fm_cuda_graph *g);
/* Where a replay of g spends its time, printed to out (a diagnostic; docs/CUDA.md "graph
 * profile"): the kernel nodes grouped by kernel function; the whole graph, the graph with every
 * kernel node disabled, and per kernel the graph with only its nodes enabled ("alone") and with
 * only its nodes disabled ("without": whole - without is what the kernel costs in the replay);
 * each a median over reps batches of 10 replays. The replays overwrite what the graph writes
 * (KV cache, states, logits): call it only when those are no longer needed. Leaves every node
 * enabled. */
fm_status fm_cuda_graph_profile(fm_cuda *ctx, fm_cuda_graph *g, int reps, FILE *out);

/* What a phase boundary costs, with the least work a phase can have (phases.cu): `phases` phases
 * of `blocks` blocks of 256 threads, (a) each its own PDL launch, the launches replayed as one CUDA
 * graph (as the decode step runs today), (b) one cooperative launch whose phases are separated by
 * fm_grid_barrier (as a persistent kernel would). Each phase checks that it sees what every block
 * wrote in the previous one. */
typedef struct fm_cuda_phase_times {
    double launch_us, barrier_us;            /* median over reps of a run's time / phases */
    unsigned launch_errors, barrier_errors;  /* phases that saw a stale value (must be 0) */
    int blocks, most_blocks;                 /* blocks used; most that can be resident at once */
} fm_cuda_phase_times;

/* Runs both, reps timed runs each after one untimed. FM_ERR_ARG unless 1 <= blocks <= the resident
 * maximum, 2 <= phases <= 100000, 1 <= reps <= 1000; CUDA errors as the other calls. */
fm_status fm_cuda_phase_bench(fm_cuda *ctx, int blocks, int phases, int reps, fm_cuda_phase_times *out);

#ifdef __cplusplus
}
#endif

#endif /* FM_BACKEND_CUDA_LAYERS_SECTION */
