/* The packed model format (docs/FORMAT.md): a directory with
 *   model.json          manifest: format version, config, every tensor's dtype/shape/offset/size
 *   dense.bin           all non-expert tensors, each 64-byte aligned; mapped read-only
 *   experts/L###.bin    one file per layer; expert e at e * stride (stride a multiple of 4096),
 *                       its parts (gate, up, down) contiguous so one read fetches one expert.
 * Each layer has its own expert layout (dtype, stride), so layers may be quantized differently.
 * This module writes and reads the format; it knows nothing of the math. */
#ifndef FM_FORMATS_PACKED_H
#define FM_FORMATS_PACKED_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "backend/tensor.h"
#include "flashmoe.h"
#include "formats/dtype.h"
#include "model/config.h"

#define FM_PACKED_FORMAT_NAME "flashmoe-packed"
#define FM_PACKED_VERSION 1
#define FM_PACKED_MAX_DIMS 4
#define FM_PACKED_DENSE_ALIGN 64
#define FM_PACKED_EXPERT_ALIGN 4096

typedef enum fm_expert_part_id { FM_PART_GATE = 0, FM_PART_UP = 1, FM_PART_DOWN = 2, FM_PART_COUNT = 3 } fm_expert_part_id;

/* One stored tensor: a dense one in dense.bin, or an expert part inside an expert block. */
typedef struct fm_packed_tensor {
    const char *name;
    fm_dtype dtype;       /* F32, BF16, F16, Q8, Q4, Q2 */
    int n_dims;
    int64_t shape[FM_PACKED_MAX_DIMS];
    int group_size;       /* quantized types: values per scale/bias pair (else 0) */
    fm_dtype scale_dtype; /* quantized types: BF16, F16 or F32 (else FM_DTYPE_UNKNOWN) */
    uint64_t offset;      /* in dense.bin, or within the expert block */
    uint64_t n_bytes;
    const void *data;     /* dense: pointer into the mapping of dense.bin; writer input for add_dense */
} fm_packed_tensor;

/* Bytes a tensor of this dtype/shape occupies (quantized: packed values + scales + biases);
 * 0 if the combination is invalid. */
uint64_t fm_packed_tensor_nbytes(const fm_packed_tensor *t);

/* A 2-D tensor as a typed weight view; data = base + t->offset (base: the dense mapping or a block). */
fm_weight fm_packed_weight(const fm_packed_tensor *t, const void *base);

/* The routed experts of one layer. */
typedef struct fm_packed_expert_layer {
    char *file;                                 /* full path of experts/L###.bin */
    uint64_t stride;                            /* bytes from one expert to the next (multiple of 4096) */
    fm_packed_tensor parts[FM_PART_COUNT];      /* gate [I,H], up [I,H], down [H,I] inside the block */
} fm_packed_expert_layer;

typedef struct fm_packed_model {
    char *dir;
    fm_config config;
    json_t *manifest;

    void *dense_map; /* read-only mapping of dense.bin */
    uint64_t dense_size;
    fm_packed_tensor *tensors; /* n_tensors, sorted by name */
    size_t n_tensors;

    fm_packed_expert_layer *experts; /* [n_layers] */
    uint64_t max_expert_stride;      /* the largest layer stride */
} fm_packed_model;

/* Opens and validates a packed model directory: manifest fields, every tensor range against
 * dense.bin, expert part ranges against the stride, each expert file's size. */
fm_status fm_packed_open(const char *dir, fm_packed_model **out);

/* Unmaps and frees (NULL is fine). */
void fm_packed_close(fm_packed_model *m);

/* The dense tensor called `name`, or NULL. */
const fm_packed_tensor *fm_packed_find(const fm_packed_model *m, const char *name);

/* ---- writing ---- */

typedef struct fm_packed_writer fm_packed_writer;

/* Starts writing a packed model that will appear at `dir`: everything is written into
 * "<dir>.partial" (a stale one from an interrupted run is removed; parent directories are created)
 * and renamed to `dir` by fm_packed_writer_finish, so a directory named `dir` is always a whole
 * model. An existing `dir` is an error unless `force` (then it is replaced at the end). */
fm_status fm_packed_writer_init(const char *dir, const fm_config *cfg, bool force, fm_packed_writer **out);

/* Appends a dense tensor: name, dtype, shape, group_size/scale_dtype (quantized), data and n_bytes
 * (= fm_packed_tensor_nbytes) are read from *t; offset is assigned. */
fm_status fm_packed_writer_add_dense(fm_packed_writer *w, const fm_packed_tensor *t);

/* Declares layer `layer`'s expert block: each part's dtype, shape, group_size and scale_dtype
 * (n_bytes and offsets are computed). Must precede fm_packed_writer_put_expert for that layer. */
fm_status fm_packed_writer_set_expert_layout(fm_packed_writer *w, int layer, const fm_packed_tensor parts[FM_PART_COUNT]);

/* The layout declared for a layer (parts with n_bytes filled), or NULL if none yet. */
const fm_packed_expert_layer *fm_packed_writer_expert_layout(const fm_packed_writer *w, int layer);

/* Writes expert `expert` of `layer`: parts[p] holds the declared parts[p].n_bytes bytes. */
fm_status fm_packed_writer_put_expert(fm_packed_writer *w, int layer, int expert, const void *const parts[FM_PART_COUNT]);

/* Copies the file at src_path into the model directory as `name` (a plain file name), e.g. the
 * checkpoint's tokenizer.json and chat template. */
fm_status fm_packed_writer_copy_file(fm_packed_writer *w, const char *src_path, const char *name);

/* Writes model.json (with `source`, an object describing where the weights came from, stolen),
 * flushes every file to disk, closes them and renames "<dir>.partial" to `dir`. */
fm_status fm_packed_writer_finish(fm_packed_writer *w, json_t *source);

/* Frees the writer, closing files; an unfinished "<dir>.partial" is removed. */
void fm_packed_writer_free(fm_packed_writer *w);

#endif
