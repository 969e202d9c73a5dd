/* Model hyper-parameters, parsed and validated from a Hugging Face config.json (plain or with a
 * nested text_config) or from the "config" object of a packed model.json (same field names). */
#ifndef FM_MODEL_CONFIG_H
#define FM_MODEL_CONFIG_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "flashmoe.h"

#define FM_MAX_LAYERS 1024

typedef enum fm_arch {
    FM_ARCH_QWEN35_MOE = 1, /* Qwen3.5-MoE: separate in_proj_qkv/z/b/a, fused or per-expert experts */
    FM_ARCH_QWEN3_NEXT = 2, /* Qwen3-Next: fused in_proj_qkvz / in_proj_ba, per-expert experts */
} fm_arch;

typedef enum fm_layer_kind {
    FM_LAYER_LINEAR = 0, /* Gated DeltaNet */
    FM_LAYER_FULL = 1,   /* gated full attention */
} fm_layer_kind;

typedef struct fm_config {
    fm_arch arch;
    int64_t n_vocab;
    int64_t n_embd;   /* hidden_size */
    int n_layers;
    uint8_t layer_kind[FM_MAX_LAYERS]; /* fm_layer_kind per layer */
    double norm_eps;  /* rms_norm_eps as written in the config */
    bool tie_embeddings;

    /* gated full attention */
    int n_head, n_head_kv, head_dim;
    int rot_dim;      /* rotated dims per head = head_dim * partial_rotary_factor (even) */
    double rope_theta;

    /* Gated DeltaNet */
    int lin_n_k_heads, lin_n_v_heads; /* v heads per k head = n_v / n_k */
    int lin_k_dim, lin_v_dim;         /* per-head key / value dims */
    int conv_kernel;

    /* MoE */
    int n_experts, n_experts_used;
    int64_t n_ff_expert;        /* moe_intermediate_size */
    int64_t n_ff_shared;        /* shared_expert_intermediate_size (0 = none) */
    bool norm_topk_prob;        /* renormalise the top-k weights */

    int64_t max_position;       /* max_position_embeddings (informational) */
} fm_config;

/* Derived sizes. */
static inline int64_t fm_config_key_dim(const fm_config *c) { return (int64_t)c->lin_n_k_heads * c->lin_k_dim; }
static inline int64_t fm_config_value_dim(const fm_config *c) { return (int64_t)c->lin_n_v_heads * c->lin_v_dim; }
static inline int64_t fm_config_conv_dim(const fm_config *c) {
    return 2 * fm_config_key_dim(c) + fm_config_value_dim(c);
}

/* Fills *cfg from a parsed config object. `root` may be a Hugging Face config.json (flat, or with
 * the model in "text_config") or a packed model's "config". `what` names the source in messages
 * ("config.json"). Every field the engine uses is checked; anything unsupported (another
 * architecture, rope scaling, attention bias, dense MLP layers, ...) is rejected naming the field. */
fm_status fm_config_parse(json_t *root, const char *what, fm_config *cfg);

/* Reads and parses a config.json file (see fm_config_parse). */
fm_status fm_config_load(const char *path, fm_config *cfg);

/* Builds the packed model's "config" object: explicit values for every field, HF names. */
json_t *fm_config_to_json(const fm_config *cfg);

/* "qwen3_5_moe" / "qwen3_next". */
const char *fm_arch_name(fm_arch arch);

#endif
