/* The packed model format (docs/FORMAT.md): a directory with
 *   model.json          manifest: format version, config, every tensor's dtype/shape/offset/size
 *   dense.bin           all non-expert tensors, each 64-byte aligned; mapped read-only
 *   experts/L###.bin    one file per layer; expert e at e * stride (stride a multiple of 4096),
 *                       its parts (gate, up, down) contiguous so one read fetches one expert.
 * This module writes and reads it; it knows nothing of the math. */
#ifndef FM_FORMATS_PACKED_H
#define FM_FORMATS_PACKED_H

#include <jansson.h>
#include <stdint.h>

#include "flashmoe.h"
#include "formats/dtype.h"
#include "model/config.h"

#define FM_PACKED_FORMAT_NAME "flashmoe-packed"
#define FM_PACKED_VERSION 1
#define FM_PACKED_MAX_DIMS 4
#define FM_PACKED_DENSE_ALIGN 64
#define FM_PACKED_EXPERT_ALIGN 4096

typedef enum fm_expert_part_id { FM_PART_GATE = 0, FM_PART_UP = 1, FM_PART_DOWN = 2, FM_PART_COUNT = 3 } fm_expert_part_id;

/* One stored tensor: dense ones live in dense.bin, expert parts inside an expert block. */
typedef struct fm_packed_tensor {
    const char *name;
    fm_dtype dtype;
    int n_dims;
    int64_t shape[FM_PACKED_MAX_DIMS];
    uint64_t offset;  /* in dense.bin, or within the expert block */
    uint64_t n_bytes;
    const void *data; /* dense only: pointer into the mapping of dense.bin (NULL for expert parts) */
} fm_packed_tensor;

typedef struct fm_packed_model {
    char *dir;
    fm_config config;
    json_t *manifest;

    void *dense_map; /* read-only mapping of dense.bin */
    uint64_t dense_size;
    fm_packed_tensor *tensors; /* n_tensors, sorted by name */
    size_t n_tensors;

    uint64_t expert_stride;                     /* bytes from one expert to the next in a layer file */
    fm_packed_tensor expert_parts[FM_PART_COUNT]; /* gate [I,H], up [I,H], down [H,I] in the block */
    char **expert_files;                        /* [n_layers] full paths */
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

/* Starts writing a packed model into directory `dir` (created; must not exist). */
fm_status fm_packed_writer_init(const char *dir, const fm_config *cfg, fm_packed_writer **out);

/* Appends a dense tensor (data of n_bytes = elements x dtype size) to dense.bin. */
fm_status fm_packed_writer_add_dense(fm_packed_writer *w, const char *name, fm_dtype dtype, int n_dims,
                                     const int64_t *shape, const void *data, uint64_t n_bytes);

/* Declares the expert block: each part's dtype (shapes come from the config). Must precede
 * fm_packed_writer_put_expert. */
fm_status fm_packed_writer_set_expert_dtype(fm_packed_writer *w, fm_dtype dtype);

/* Bytes of one expert part at the declared dtype. */
uint64_t fm_packed_writer_part_bytes(const fm_packed_writer *w, fm_expert_part_id part);

/* Writes expert `expert` of `layer`: parts[p] holds fm_packed_writer_part_bytes(w, p) bytes. */
fm_status fm_packed_writer_put_expert(fm_packed_writer *w, int layer, int expert, const void *const parts[FM_PART_COUNT]);

/* Writes model.json (with `source`, an object describing where the weights came from, stolen),
 * flushes every file to disk and closes them. The directory is complete only after this. */
fm_status fm_packed_writer_finish(fm_packed_writer *w, json_t *source);

/* Frees the writer (closing files); does not delete what was written. */
void fm_packed_writer_free(fm_packed_writer *w);

#endif
