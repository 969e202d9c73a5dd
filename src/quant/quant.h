/* Affine group quantization in the MLX layout (docs/QUANT.md).
 *
 * A matrix [rows, cols] is cut into groups of group_size (32, 64 or 128) consecutive values along
 * a row; group g of row r has a scale s and a bias b (stored as BF16, F16 or F32) and each value is
 * an unsigned integer q of `bits` = 8, 4 or 2 bits:
 *
 *     w = q * s + b      evaluated in float32 as fl(fl(q * s) + b), s and b converted to float32.
 *
 * With BF16 / F16 scales the product q * s is exact in float32 (at most 8 + 11 significant bits),
 * so w is the correctly rounded value of q * s + b: one rounding. With F32 scales the product may
 * round too (two roundings); no fused multiply-add is used in either case.
 *
 * Storage of a whole matrix, contiguous, no padding:
 *     packed q   [rows, cols * bits / 32]  uint32, little-endian; element j of a row is in word
 *                (j * bits) / 32 of the row at bit offset (j * bits) % 32 (little end first)
 *     scales     [rows, cols / group_size] scale_dtype
 *     biases     [rows, cols / group_size] scale_dtype
 * cols must be a multiple of group_size (hence of 32: every uint32 word lies inside one group).
 *
 * All functions are re-entrant (no global state); failures leave one line in fm_last_error(). */
#ifndef FM_QUANT_QUANT_H
#define FM_QUANT_QUANT_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/tensor.h"
#include "flashmoe.h"
#include "formats/dtype.h"

typedef enum fm_quant_method {
    FM_QUANT_RTN = 0, /* round to nearest over each group's [min, max] (the MLX formula) */
    FM_QUANT_MSE = 1, /* per group, the clipping range with the least squared error (never worse than RTN) */
} fm_quant_method;

/* True for the quantized types Q8, Q4, Q2. */
bool fm_dtype_is_quant(fm_dtype t);

/* Bits per value of a quantized type: 8, 4 or 2; 0 for every other type. */
int fm_quant_bits(fm_dtype t);

/* The quantized type with `bits` bits per value (8, 4, 2); FM_DTYPE_UNKNOWN for any other count. */
fm_dtype fm_quant_type_for_bits(int bits);

/* Bytes of a quantized [rows, cols] matrix: packed words + scales + biases. 0 if the type is not
 * quantized, rows < 0, cols <= 0, cols % group_size != 0, group_size not in {32, 64, 128}, the
 * scale type is not BF16/F16/F32, or the size does not fit in 63 bits. Sets no error message. */
uint64_t fm_quant_nbytes(fm_dtype t, int64_t rows, int64_t cols, int group_size, fm_dtype scale_dtype);

/* Byte offsets, from the start of a quantized matrix w (parameters as fm_quant_check accepts), of its
 * scales and of its biases: the packed words come first, then the scales, then the biases. */
void fm_quant_part_offsets(const fm_weight *w, int64_t *scale_off, int64_t *bias_off);

/* Validates a quantized tensor's parameters. Returns FM_OK, or (with a message naming `what`, a
 * tensor name; NULL reads "matrix"):
 *   FM_ERR_UNSUPPORTED  t is not Q8/Q4/Q2, group_size is not 32/64/128, scale_dtype is not BF16/F16/F32;
 *   FM_ERR_FORMAT       cols <= 0 or cols is not a multiple of group_size. */
fm_status fm_quant_check(const char *what, fm_dtype t, int64_t cols, int group_size, fm_dtype scale_dtype);

/* Quantizes the float32 matrix w [rows, cols] (row-major) into out, which must hold
 * fm_quant_nbytes(t, rows, cols, group_size, scale_dtype) bytes (any alignment).
 * Every stored q is the value in [0, 2^bits - 1] whose dequantized value (with the stored, rounded
 * s and b) is nearest to the weight. Errors: those of fm_quant_check; FM_ERR_ARG for rows < 0 or
 * an unknown method; FM_ERR_FORMAT "non-finite weight at row R col C" for a NaN/Inf weight;
 * FM_ERR_UNSUPPORTED when a group's scale or bias overflows the scale type (F16: |w| > 65504).
 * On failure the contents of out are unspecified. Equivalent to fm_quantize_rows over [0, rows). */
fm_status fm_quantize(const float *w, int64_t rows, int64_t cols, fm_dtype t, int group_size, fm_dtype scale_dtype,
                      fm_quant_method method, void *out);

/* As fm_quantize, but reads and writes only rows [row0, row1) of the same whole-matrix w and out
 * (out still holds the whole matrix's layout). Calls on disjoint row ranges of one out may run
 * concurrently on different threads; the error, if any, names whole-matrix row numbers. */
fm_status fm_quantize_rows(const float *w, int64_t rows, int64_t cols, fm_dtype t, int group_size,
                           fm_dtype scale_dtype, fm_quant_method method, int64_t row0, int64_t row1, void *out);

/* Dequantizes columns [col0, col0 + n) of row `row` of the quantized weight w into out (float32,
 * n values), exactly as defined above. The weight must have passed fm_quant_check; col0 must be a
 * multiple of w->group_size; 0 <= n <= w->cols - col0. w->data may have any alignment. No checks:
 * this is the kernels' hot path. */
void fm_dequant_row(float *out, const fm_weight *w, int64_t row, int64_t col0, int64_t n);

/* Sum over the matrix of (dequantized q - w)^2, accumulated in double, row by row and within a row
 * in column order. w is float32 [q->rows, q->cols]. For tests and the quality harness. */
double fm_quant_sq_error(const float *w, const fm_weight *q);

#endif
