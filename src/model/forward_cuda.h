/* The forward pass on the GPU (fm_model_params.backend = FM_BACKEND_CUDA; docs/CUDA.md).
 *
 * fm_model_open calls fm_forward_cuda_open, which uploads the dense weights (all but the embedding
 * table, which stays in host memory: one row per token is looked up there and uploaded) and binds
 * device views of them; fm_session_* in forward.c dispatch to the session functions here when the
 * model has them (m->gpu). A session's state (KV cache, conv and recurrent states, scratch) lives on
 * the GPU; routed experts come through a VRAM cache of expert slots shared by the model's sessions,
 * filled through the expert store (fm_store_request / fm_store_wait, then a copy into the slot).
 * Per layer, the router's top-k ids are the one device-to-host synchronisation, except in resident
 * mode (every routed expert fits the VRAM budget: all uploaded at the first session): there a
 * one-token step keeps the ids on the device, has no synchronisation before its logits, and from
 * the second such step of a session on runs as one replayed CUDA graph (FLASHMOE_CUDA_RESIDENT=0
 * and FLASHMOE_CUDA_GRAPH=0 turn these off). Per-layer timing then counts enqueueing only; the
 * step's GPU time is in head_seconds (the wait for the logits).
 *
 * A build without CUDA (no FM_HAVE_CUDA) has the same functions; fm_forward_cuda_open fails there
 * with FM_ERR_UNSUPPORTED and a line saying so. */
#ifndef FM_MODEL_FORWARD_CUDA_H
#define FM_MODEL_FORWARD_CUDA_H

#include <stdbool.h>
#include <stdint.h>

#include "model/model.h"

typedef struct fm_cuda_model fm_cuda_model;
typedef struct fm_cuda_session fm_cuda_session;

/* Counters of the VRAM expert cache since open (or the last reset). */
typedef struct fm_cuda_stats {
    uint64_t requested;  /* experts a layer step needed (each once per chunk) */
    uint64_t hits;       /* found in a VRAM slot */
    uint64_t misses;     /* fetched through the expert store and copied into a slot */
    uint64_t evictions;  /* slots that held another expert when it was taken */
    uint64_t h2d_bytes;  /* host-to-device bytes of expert copies */
    double upload_seconds; /* host time in those copies (the store's wait is not included) */
    int slots;           /* expert slots in VRAM (0 until the first session) */
    uint64_t slot_bytes; /* bytes per slot */
    uint64_t dense_bytes;/* dense weights in VRAM */
    uint64_t state_bytes;/* the live sessions' state and scratch in VRAM */
    uint64_t budget;     /* the VRAM budget in force */
    uint64_t token_bytes;/* device bytes one decode token reads: every dense tensor but the embedding
                            table (lm_head included) + top-k experts of each layer */
    bool resident;       /* every routed expert in VRAM (uploaded at the first session) */
    bool graphs;         /* resident one-token steps without host syncs, replayed as a CUDA graph */
    uint64_t dev_steps;  /* one-token steps run with the expert ids on the device (no host sync) */
    uint64_t graph_steps;/* of those, replays of the session's CUDA graph */
    bool overlap;        /* misses copied on a copy stream, each expert's kernels waiting for its copy
                            only (FLASHMOE_CUDA_OVERLAP=0: synchronous copies, as before) */
    uint64_t pinned_bytes;/* the store's buffers page-locked for DMA (0: pageable, or the mmap engine) */
    uint64_t copies;     /* copies on the copy stream */
    double copy_seconds; /* their summed device time (each copy's own events: the copy engine busy) */
} fm_cuda_stats;

/* Opens the GPU side of model `m` (device 0): checks that the dense weights fit the budget
 * (p->vram_budget, or the free device memory less 1 GiB) before uploading them, then uploads them
 * and sets m->gpu. FM_ERR_UNSUPPORTED without CUDA in the build or without a device; FM_ERR_NOMEM
 * with the sizes when the dense weights do not fit. */
fm_status fm_forward_cuda_open(fm_model *m, const fm_model_params *p);

/* Frees the GPU side (m->gpu NULL is fine); every session must be freed first. */
void fm_forward_cuda_close(fm_model *m);

/* A GPU session for up to n_ctx tokens. Its state is allocated on the device (FM_ERR_NOMEM with the
 * sizes if it does not fit the budget); the first session also sizes the expert cache with what the
 * budget leaves. timing / head_seconds: the fm_session's counters this session adds to. */
fm_status fm_forward_cuda_session_init(fm_model *m, int64_t n_ctx, fm_layer_timing *timing, double *head_seconds,
                                       fm_cuda_session **out);

/* Frees a GPU session (NULL is fine) and returns its VRAM to the budget. */
void fm_forward_cuda_session_free(fm_cuda_session *g);

/* Zeroes the conv and recurrent states (the next eval starts at position 0). */
fm_status fm_forward_cuda_session_reset(fm_cuda_session *g);

/* One chunk of T <= 512 tokens at positions pos0.. (ids already checked by fm_session_eval):
 * logits, if not NULL, receives [T, V] (all_logits) or [V] for the last token. */
fm_status fm_forward_cuda_eval_chunk(fm_cuda_session *g, int64_t pos0, const int32_t *ids, int64_t T, float *logits,
                                     bool all_logits);

/* fm_forward_cuda_eval_chunk for greedy decoding: *next = the index of the last token's first
 * largest logit, or -1 when a logit is NaN (fm_cpu_argmax's). In a resident one-token step the
 * argmax runs on the device and only the index comes back; otherwise on the host's logits. */
fm_status fm_forward_cuda_eval_greedy(fm_cuda_session *g, int64_t pos0, const int32_t *ids, int64_t T, int32_t *next);

/* The expert cache's counters (all zero for a CPU model), and their reset. */
fm_cuda_stats fm_forward_cuda_stats(const fm_model *m);
void fm_forward_cuda_reset_stats(fm_model *m);

/* The device's copy bandwidth in GB/s (bytes read + written), for a roofline: the median of 5
 * device-to-device copies of 256 MiB (FM_ERR_NOMEM when the two buffers do not fit on the device). */
fm_status fm_forward_cuda_copy_gbs(fm_model *m, double *gbs);

/* Host-to-device bandwidth from page-locked memory in GB/s, for the streaming floor: the median of
 * 5 copies of 256 MiB on the copy stream (FM_ERR_NOMEM when the buffers do not fit). */
fm_status fm_forward_cuda_h2d_gbs(fm_model *m, double *gbs);

/* "NVIDIA H100 80GB HBM3, sm_90, ..." for a CUDA model, "" otherwise. */
const char *fm_forward_cuda_device(const fm_model *m);

#endif
