/* Hugging Face / MLX checkpoint -> packed model (docs/FORMAT.md). */
#ifndef FM_MODEL_CONVERT_H
#define FM_MODEL_CONVERT_H

#include <stdbool.h>

#include "flashmoe.h"
#include "formats/dtype.h"
#include "quant/quant.h"

#define FM_CONVERT_MAX_OVERRIDES 32

typedef struct fm_quant_override {
    const char *pattern; /* POSIX extended regex, matched against packed tensor names (docs/FORMAT.md),
                          * expert parts as "layers.L.experts.gate|up|down" */
    fm_dtype dtype;      /* F32, BF16, F16, Q8, Q4, Q2 */
} fm_quant_override;

typedef struct fm_convert_options {
    fm_dtype dense_dtype;   /* F32/BF16/F16/Q8/Q4/Q2, or FM_DTYPE_UNKNOWN = keep each tensor's source dtype */
    fm_dtype expert_dtype;  /* likewise for routed experts */
    bool keep_quantized;    /* tensors already quantized in the checkpoint (MLX) are copied as they are
                             * unless an override names them (set when the user chose no type) */
    int group_size;         /* quantization group size: 32, 64 or 128 (0 = 64) */
    fm_quant_method method; /* FM_QUANT_RTN or FM_QUANT_MSE */
    fm_quant_override overrides[FM_CONVERT_MAX_OVERRIDES]; /* the last match wins */
    int n_overrides;
    int n_threads;          /* 0 = all CPUs */
    bool force;             /* replace an existing output directory */
    bool progress;          /* progress line, plan and summary on stderr */
} fm_convert_options;

/* Options as `flashmoe convert` defaults them: experts Q4, dense Q8, group 64, RTN, keep MLX. */
fm_convert_options fm_convert_default_options(void);

/* Converts the checkpoint in hf_dir (config.json + safetensors: single, sharded or a directory of
 * files) of a Qwen3.5-MoE or Qwen3-Next model into a packed model at out_dir. Accepts prefixes
 * model., model.language_model. and language_model.model.; fused, per-expert or MLX switch_mlp
 * experts; F32/BF16/F16 tensors, MLX affine-quantized triples (bits and group size from config.json
 * "quantization") and FP8 tensors with 128x128 block scales. Norms are stored as multipliers (1+w
 * is applied unless the checkpoint is an MLX export, which already holds it); Qwen3-Next's fused
 * projections are reordered into Qwen3.5's. Norms, conv, A_log and dt_bias stay F32; the router and
 * shared-expert gate are never stored below Q8. The model is written into "<out_dir>.partial" and
 * renamed to out_dir only when complete. */
fm_status fm_convert_hf(const char *hf_dir, const char *out_dir, const fm_convert_options *opt);

#endif
