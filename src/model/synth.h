/* Synthetic models: a packed model with random weights at a real model's exact geometry (all of it,
 * or its first N layers), so the per-layer work of a model far larger than this machine can be
 * measured. Weights are drawn directly in the stored type (no quantizer in the loop), scaled so that
 * activations keep unit size through the layers. */
#ifndef FM_MODEL_SYNTH_H
#define FM_MODEL_SYNTH_H

#include <stdbool.h>
#include <stdint.h>

#include "flashmoe.h"
#include "formats/dtype.h"
#include "model/config.h"

typedef struct fm_synth_options {
    const char *preset;    /* "qwen3.5-397b-a17b", "qwen3.5-35b-a3b", "qwen3-next-80b-a3b", "tiny" */
    int n_layers;          /* 0 = the preset's all */
    int64_t n_vocab;       /* 0 = the preset's vocabulary size */
    fm_dtype expert_dtype; /* F32/BF16/F16/Q8/Q4/Q2 */
    fm_dtype dense_dtype;
    uint64_t seed;
    bool force, progress;
} fm_synth_options;

/* Fills *cfg with a preset's configuration; FM_ERR_ARG naming the presets if unknown. */
fm_status fm_synth_preset(const char *name, fm_config *cfg);

/* Comma-separated list of the preset names. */
const char *fm_synth_preset_names(void);

/* Writes the synthetic model to out_dir (via out_dir.partial, renamed when complete). */
fm_status fm_synth_write(const char *out_dir, const fm_synth_options *opt);

#endif
