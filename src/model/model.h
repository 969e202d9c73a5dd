/* The model as the forward pass sees it: config, weight views bound to the packed model's tensors
 * (shapes checked against the config at open), the expert store and the thread pool. */
#ifndef FM_MODEL_MODEL_H
#define FM_MODEL_MODEL_H

#include "backend/cpu/threadpool.h"
#include "backend/tensor.h"
#include "formats/packed.h"
#include "model/config.h"
#include "store/expert_store.h"

typedef struct fm_layer_weights {
    const float *input_norm;     /* (H) multiplier, (1+w) already applied */
    const float *post_attn_norm; /* (H) */

    /* Gated DeltaNet (linear layers) */
    fm_weight in_qkv;       /* (conv_dim, H): rows q (nk*dk) | k (nk*dk) | v (nv*dv) */
    fm_weight in_z;         /* (nv*dv, H) */
    fm_weight in_b, in_a;   /* (nv, H) */
    const float *conv;      /* (conv_dim, K) */
    const float *dt_bias;   /* (nv) */
    const float *A_log;     /* (nv) */
    const float *ssm_norm;  /* (dv) plain multiplier */
    fm_weight out_proj;     /* (H, nv*dv) */

    /* gated full attention */
    fm_weight q_proj;       /* (n_head * 2 * head_dim, H): per head [query | gate] */
    fm_weight k_proj, v_proj; /* (n_head_kv * head_dim, H) */
    fm_weight o_proj;       /* (H, n_head * head_dim) */
    const float *q_norm, *k_norm; /* (head_dim) multipliers */

    /* MoE */
    fm_weight router;       /* (n_experts, H) */
    fm_weight sh_gate, sh_up; /* (n_ff_shared, H) */
    fm_weight sh_down;      /* (H, n_ff_shared) */
    fm_weight sh_router;    /* (1, H) */
} fm_layer_weights;

struct fm_model {
    fm_packed_model *packed;
    fm_config cfg;
    int n_experts_used; /* routed experts per token actually used */
    fm_weight embed;    /* (V, H) */
    fm_weight lm_head;  /* (V, H) */
    const float *out_norm; /* (H) */
    fm_layer_weights *layers;
    fm_expert_store *store;
    fm_pool *pool;
    uint64_t dense_bytes; /* resident weights */
    int prefetch;         /* fm_model_params.prefetch: next-layer experts read speculatively (0: off) */
    struct fm_cuda_model *gpu; /* --backend cuda: VRAM weights and expert cache (forward_cuda.c); NULL on the CPU */
};

/* Where one layer's time went, summed over evals (seconds). */
typedef struct fm_layer_timing {
    double mixer;          /* input norm + DeltaNet or attention */
    double route;          /* post-attention norm, router, softmax, top-k */
    double shared;         /* shared expert (runs while the first reads are in flight) */
    double expert_wait;    /* waiting for expert bytes */
    double expert_compute; /* routed experts' matmuls and the weighted sum */
    uint64_t experts_used; /* distinct experts fetched */
    uint64_t guessed, guessed_right; /* prefetch: experts guessed for this layer, and how many it used */
} fm_layer_timing;

/* A session's per-layer timing counters (for flashmoe bench). */
const fm_layer_timing *fm_session_layer_timing(const fm_session *s, int layer);

/* Time in the final norm and lm_head. */
double fm_session_head_seconds(const fm_session *s);

/* Zeroes the timing counters. */
void fm_session_reset_timing(fm_session *s);

#endif
