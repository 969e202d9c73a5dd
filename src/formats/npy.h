/* NumPy .npy files: little-endian float32 / int32 / int64 arrays in C order, for reference dumps
 * and test fixtures. Writes version 1.0; reads versions 1.0 and 2.0. */
#ifndef FM_FORMATS_NPY_H
#define FM_FORMATS_NPY_H

#include <stdint.h>

#include "flashmoe.h"

#define FM_NPY_MAX_DIMS 8

typedef struct fm_npy {
    char descr[8];     /* "<f4", "<i4" or "<i8" */
    int n_dims;        /* 0..FM_NPY_MAX_DIMS */
    int64_t shape[FM_NPY_MAX_DIMS];
    int64_t n_elements;
    void *data;        /* malloc'd, n_elements elements of descr; free with fm_npy_free */
} fm_npy;

/* Writes a float32 array (C order, shape[0..n_dims), 0 <= n_dims <= 8) to `path` as .npy v1.0
 * ('<f4'). data may be NULL only when the array has no elements. Returns FM_OK, FM_ERR_ARG (bad
 * shape / arguments) or FM_ERR_IO (open / write / close failed; the partial file is removed). */
fm_status fm_npy_write_f32(const char *path, const float *data, int n_dims, const int64_t *shape);

/* As fm_npy_write_f32, for int32 data ('<i4'). */
fm_status fm_npy_write_i32(const char *path, const int32_t *data, int n_dims, const int64_t *shape);

/* Reads a .npy file (v1.0 or v2.0 header, descr '<f4', '<i4' or '<i8', C order, at most 8 dims)
 * into *out. Returns FM_OK; FM_ERR_IO (cannot open / read); FM_ERR_FORMAT (bad magic, malformed
 * header, truncated data or bytes after it); FM_ERR_UNSUPPORTED (other dtypes, fortran_order True,
 * other versions, more than 8 dims); FM_ERR_NOMEM. On failure *out is zeroed (nothing to free). */
fm_status fm_npy_read(const char *path, fm_npy *out);

/* Frees the data of an array filled by fm_npy_read and zeroes it (NULL or zeroed is fine). */
void fm_npy_free(fm_npy *a);

#endif
