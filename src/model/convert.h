/* Hugging Face checkpoint -> packed model (docs/FORMAT.md). */
#ifndef FM_MODEL_CONVERT_H
#define FM_MODEL_CONVERT_H

#include <stdbool.h>

#include "flashmoe.h"
#include "formats/dtype.h"

typedef struct fm_convert_options {
    fm_dtype dense_dtype;  /* F32 / BF16 / F16, or FM_DTYPE_UNKNOWN = keep each tensor's source dtype */
    fm_dtype expert_dtype; /* likewise for routed experts */
    bool force;            /* replace an existing output directory */
    bool progress;         /* progress line on stderr */
} fm_convert_options;

/* Converts the checkpoint in hf_dir (config.json + safetensors: single, sharded or a directory of
 * files; Qwen3.5-MoE or Qwen3-Next; prefix model. or model.language_model.; fused or per-expert
 * experts; F32/BF16/F16) into a packed model at out_dir. The model is written into
 * "<out_dir>.partial" and renamed to out_dir only when complete, so an interrupted conversion never
 * leaves a directory that looks like a model. Norm weights stored as (1+w) are converted to plain
 * multipliers; Qwen3-Next's fused projections are split into Qwen3.5's order. Tensors the engine
 * does not use (model.visual.*, mtp.*) are skipped and counted on stderr. */
fm_status fm_convert_hf(const char *hf_dir, const char *out_dir, const fm_convert_options *opt);

#endif
