/* Element types of stored tensors, shared by the safetensors reader and the packed format. */
#ifndef FM_FORMATS_DTYPE_H
#define FM_FORMATS_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum fm_dtype {
    FM_DTYPE_UNKNOWN = 0,
    FM_DTYPE_F32,
    FM_DTYPE_F16,
    FM_DTYPE_BF16,
    FM_DTYPE_F8_E4M3,
    FM_DTYPE_I64,
    FM_DTYPE_I32,
    FM_DTYPE_U32,
    FM_DTYPE_I16,
    FM_DTYPE_U16,
    FM_DTYPE_I8,
    FM_DTYPE_U8,
    FM_DTYPE_BOOL,
    /* affine group quantization (docs/FORMAT.md): w = q * scale + bias per group of group_size
     * values along a row; q packed little-end first into uint32 words, then scales, then biases */
    FM_DTYPE_Q8,
    FM_DTYPE_Q4,
    FM_DTYPE_Q2,
    FM_DTYPE_COUNT
} fm_dtype;

/* Bytes per element (0 for FM_DTYPE_UNKNOWN and for quantized types, whose size depends on the
 * group size: see fm_quant_nbytes). */
size_t fm_dtype_size(fm_dtype t);

/* The safetensors spelling ("F32", "BF16", ...; "Q8", "Q4", "Q2"); "?" for unknown. */
const char *fm_dtype_name(fm_dtype t);

/* Parses a dtype name; FM_DTYPE_UNKNOWN if not recognised. */
fm_dtype fm_dtype_from_name(const char *name);

#endif
