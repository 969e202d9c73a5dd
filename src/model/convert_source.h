/* The converter's view of a checkpoint's weights: one matrix (or vector) however the checkpoint
 * stores it — a float tensor (F32/BF16/F16), an MLX affine-quantized triple (X.weight u32 +
 * X.scales + X.biases, bits and group size from config.json "quantization"), or an FP8 tensor with
 * block scales (X.weight F8_E4M3 + X.weight_scale_inv) — possibly one expert's slice of a stacked
 * [E, rows, cols] tensor and a row range of it. Internal to src/model/convert*.c. */
#ifndef FM_MODEL_CONVERT_SOURCE_H
#define FM_MODEL_CONVERT_SOURCE_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "flashmoe.h"
#include "formats/dtype.h"
#include "formats/safetensors.h"

typedef enum src_kind { SRC_FLOAT, SRC_MLX, SRC_FP8 } src_kind;

typedef struct src_set {
    const fm_st_set *st;
    const char *prefix;     /* "model.language_model.", "language_model.model.", "model." or "" */
    bool mlx_layout;        /* MLX export (switch_mlp experts): norms already hold 1+w, conv1d is [C, K, 1] */
    json_t *quant;          /* config.json "quantization" object (MLX), or NULL */
    int fp8_block[2];       /* FP8 weight_block_size (rows, cols); 0 = no FP8 */
    unsigned char *used;    /* [fm_st_count]: tensor consumed */
} src_set;

typedef struct src_view {
    src_kind kind;
    char name[320];          /* the .weight tensor's name, for messages */
    int64_t rows, cols;      /* logical shape of this view */
    fm_dtype dtype;          /* FLOAT: F32/BF16/F16; MLX: Q8/Q4/Q2; FP8: F8_E4M3 */
    const uint8_t *w;        /* first row of this view */
    uint64_t w_row_bytes;
    /* MLX */
    const uint8_t *s, *b;    /* first row of scales / biases */
    uint64_t s_row_bytes;
    fm_dtype scale_dtype;
    int group_size;
    /* FP8 */
    const fm_st_tensor *scale_inv; /* [ceil(R/br), ceil(C/bc)] of the whole (unsliced) matrix */
    int64_t row0;                  /* this view's first row within that matrix */
    int64_t fp8_block[2];          /* block rows, block cols of the scale grid */
} src_view;

/* Finds tensor `name` (prefix added) as a matrix of rows x cols (vector: rows = n, cols = 1 with
 * `vector` true). Recognises MLX triples and FP8 block scales. Marks what it uses. A missing tensor
 * or a wrong shape / dtype fails naming the tensor. */
fm_status src_find(src_set *ss, const char *name, int64_t rows, int64_t cols, bool vector, src_view *v);

/* Like src_find but for a stacked [E, rows_total, cols] tensor (fused release experts, MLX
 * switch_mlp): the view is expert e's rows [row0, row0 + rows). */
fm_status src_find_stacked(src_set *ss, const char *name, int64_t n_experts, int64_t rows_total, int64_t cols, int e,
                           int64_t row0, int64_t rows, src_view *v);

/* True if the stacked tensor `name` (prefix added) exists (as a float tensor or an MLX triple). */
bool src_has(src_set *ss, const char *name);

/* The view as float32, rows x cols into out. */
fm_status src_to_f32(const src_view *v, float *out);

/* Bytes of a quantized view in the packed layout (q words, scales, biases). */
uint64_t src_quant_nbytes(const src_view *v);

/* Copies an MLX view into the packed quantized layout (q words, then scales, then biases) — the
 * bytes are the checkpoint's own, unchanged. */
void src_copy_quant(const src_view *v, void *out);

#endif
