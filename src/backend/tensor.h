/* A read-only view of a stored weight matrix, shared by the model and every backend. */
#ifndef FM_BACKEND_TENSOR_H
#define FM_BACKEND_TENSOR_H

#include <stdint.h>

#include "formats/dtype.h"

typedef struct fm_weight {
    fm_dtype dtype;   /* F32, BF16 or F16 (quantized types come later) */
    int64_t rows;     /* output features */
    int64_t cols;     /* input features; rows are contiguous: element (r, c) at r * cols + c */
    const void *data; /* not owned */
} fm_weight;

#endif
