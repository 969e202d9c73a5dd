/* A read-only view of a stored weight matrix, shared by the model and every backend. */
#ifndef FM_BACKEND_TENSOR_H
#define FM_BACKEND_TENSOR_H

#include <stdint.h>

#include "formats/dtype.h"

typedef struct fm_weight {
    fm_dtype dtype;   /* F32, BF16, F16, or a quantized type (Q8, Q4, Q2) */
    int64_t rows;     /* output features */
    int64_t cols;     /* input features; rows are contiguous: element (r, c) at r * cols + c */
    const void *data; /* not owned. Quantized: packed q words (rows, cols*bits/32) u32, then scales
                       * (rows, cols/group_size), then biases (same), scales/biases of scale_dtype */
    int group_size;   /* quantized types only: values per scale/bias pair along a row */
    fm_dtype scale_dtype; /* quantized types only: BF16, F16 or F32 */
} fm_weight;

#endif
