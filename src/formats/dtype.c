#include "formats/dtype.h"

#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtype_info[FM_DTYPE_COUNT] = {
    [FM_DTYPE_UNKNOWN] = {"?", 0},    [FM_DTYPE_F32] = {"F32", 4},   [FM_DTYPE_F16] = {"F16", 2},
    [FM_DTYPE_BF16] = {"BF16", 2},    [FM_DTYPE_F8_E4M3] = {"F8_E4M3", 1},
    [FM_DTYPE_I64] = {"I64", 8},      [FM_DTYPE_I32] = {"I32", 4},   [FM_DTYPE_U32] = {"U32", 4},
    [FM_DTYPE_I16] = {"I16", 2},      [FM_DTYPE_U16] = {"U16", 2},   [FM_DTYPE_I8] = {"I8", 1},
    [FM_DTYPE_U8] = {"U8", 1},        [FM_DTYPE_BOOL] = {"BOOL", 1},
    [FM_DTYPE_Q8] = {"Q8", 0},        [FM_DTYPE_Q4] = {"Q4", 0},     [FM_DTYPE_Q2] = {"Q2", 0},
};

size_t fm_dtype_size(fm_dtype t) { return (t > 0 && t < FM_DTYPE_COUNT) ? dtype_info[t].size : 0; }

const char *fm_dtype_name(fm_dtype t) {
    return (t > 0 && t < FM_DTYPE_COUNT) ? dtype_info[t].name : "?";
}

fm_dtype fm_dtype_from_name(const char *name) {
    for (int t = 1; t < FM_DTYPE_COUNT; t++)
        if (strcmp(dtype_info[t].name, name) == 0) return (fm_dtype)t;
    return FM_DTYPE_UNKNOWN;
}
