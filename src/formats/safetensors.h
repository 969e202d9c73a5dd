/* Safetensors reader: one file, a sharded directory (model.safetensors.index.json), or a directory
 * of *.safetensors files. Every file is mapped read-only; tensors point into the mappings, which
 * live until fm_st_close.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON header, then the data section.
 * The header maps tensor name -> {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative
 * to the data section), plus an optional "__metadata__" entry that is ignored.
 *
 * Alignment: a tensor's data is aligned only as far as the file aligns it (the reference writer
 * pads the header to 8 bytes); read elements with memcpy or check alignment before casting. */
#ifndef FM_FORMATS_SAFETENSORS_H
#define FM_FORMATS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"
#include "formats/dtype.h"

#define FM_ST_MAX_DIMS 8
#define FM_ST_INDEX_NAME "model.safetensors.index.json"

typedef struct fm_st_tensor {
    const char *name; /* owned by the set */
    fm_dtype dtype;
    int n_dims; /* 0..FM_ST_MAX_DIMS */
    int64_t shape[FM_ST_MAX_DIMS];
    int64_t n_elements;
    const void *data; /* points into the read-only mmap of its file */
    uint64_t n_bytes;
    int file_index; /* which shard (index for fm_st_file_path) */
} fm_st_tensor;

typedef struct fm_st_set fm_st_set;

/* Opens `path`: a .safetensors file; or a directory holding model.safetensors.index.json (every
 * shard its weight_map names is opened, shards in name order); else a directory holding
 * model.safetensors (only that file); else every *.safetensors file in the directory (name order,
 * dot-files skipped). Every header is fully validated before success.
 * Returns FM_OK and *out owning the set; or FM_ERR_IO (open/read/mmap failure, missing shard, no
 * safetensors file), FM_ERR_FORMAT (malformed or inconsistent header / index),
 * FM_ERR_UNSUPPORTED (unknown dtype), FM_ERR_NOMEM, FM_ERR_ARG (NULL arguments), with *out = NULL
 * and fm_last_error() naming the file and tensor at fault. */
fm_status fm_st_open(const char *path, fm_st_set **out);

/* Unmaps every file and frees the set (NULL is fine). Tensor pointers die with it. */
void fm_st_close(fm_st_set *set);

/* Number of tensors in all files together. */
size_t fm_st_count(const fm_st_set *set);

/* The i-th tensor in name order (strcmp), 0 <= i < fm_st_count; NULL if i is out of range. */
const fm_st_tensor *fm_st_get(const fm_st_set *set, size_t i);

/* The tensor called `name` (hash lookup, O(1) expected); NULL if absent. */
const fm_st_tensor *fm_st_find(const fm_st_set *set, const char *name);

/* Path of file `file_index` (as opened: dir/shard for directories); NULL if out of range. */
const char *fm_st_file_path(const fm_st_set *set, int file_index);

/* Number of files the set has open. */
int fm_st_file_count(const fm_st_set *set);

#endif
