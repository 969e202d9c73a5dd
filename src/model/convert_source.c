#include "model/convert_source.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant/quant.h"
#include "util/error.h"
#include "util/half.h"

static const fm_st_tensor *get(src_set *ss, const char *full) {
    const fm_st_tensor *t = fm_st_find(ss->st, full);
    if (!t) return NULL;
    /* the set keeps its tensors in one sorted array: the index is a pointer difference */
    size_t n = fm_st_count(ss->st), i = (size_t)(t - fm_st_get(ss->st, 0));
    if (i < n && fm_st_get(ss->st, i) == t) ss->used[i] = 1;
    return t;
}

static bool exists(src_set *ss, const char *full) { return fm_st_find(ss->st, full) != NULL; }

static void shape_str(const fm_st_tensor *t, char *buf, size_t cap) {
    buf[0] = 0;
    for (int i = 0; i < t->n_dims; i++)
        snprintf(buf + strlen(buf), cap - strlen(buf), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
}

/* Shapes equal once size-1 dimensions are dropped (conv1d [C,1,K] = [C,K,1] = [C,K]; [1,H] = [H]). */
static bool squeezed_equal(const fm_st_tensor *t, const int64_t *want, int n_want) {
    int64_t a[8], b[8];
    int na = 0, nb = 0;
    for (int i = 0; i < t->n_dims; i++)
        if (t->shape[i] != 1) a[na++] = t->shape[i];
    for (int i = 0; i < n_want; i++)
        if (want[i] != 1) b[nb++] = want[i];
    if (na != nb) return false;
    for (int i = 0; i < na; i++)
        if (a[i] != b[i]) return false;
    return true;
}

/* bits and group size of MLX tensor base `base` (full name without .weight) from config.json. */
static fm_status mlx_params(src_set *ss, const char *base, int *bits, int *gs) {
    if (!ss->quant)
        return fm_error_set(FM_ERR_FORMAT, "%s.scales exists but config.json has no \"quantization\" block", base);
    json_t *q = ss->quant, *per = json_object_get(q, base);
    const char *mode = json_string_value(json_object_get(q, "mode"));
    if (mode && strcmp(mode, "affine") != 0)
        return fm_error_set(FM_ERR_UNSUPPORTED, "config.json: quantization mode \"%s\" is not supported (affine only)", mode);
    json_t *src = json_is_object(per) ? per : q;
    if (json_is_object(per)) {
        const char *pm = json_string_value(json_object_get(per, "mode"));
        if (pm && strcmp(pm, "affine") != 0)
            return fm_error_set(FM_ERR_UNSUPPORTED, "config.json: quantization of %s: mode \"%s\" is not supported (affine only)",
                                base, pm);
    }
    json_t *jb = json_object_get(src, "bits"), *jg = json_object_get(src, "group_size");
    if (!json_is_integer(jb) || !json_is_integer(jg))
        return fm_error_set(FM_ERR_FORMAT, "config.json: quantization declares no bits/group_size for %s", base);
    *bits = (int)json_integer_value(jb);
    *gs = (int)json_integer_value(jg);
    if (fm_quant_type_for_bits(*bits) == FM_DTYPE_UNKNOWN)
        return fm_error_set(FM_ERR_UNSUPPORTED, "config.json: %d-bit quantization of %s is not supported (8, 4, 2)", *bits, base);
    return FM_OK;
}

/* Fills an MLX view. t: the .weight tensor (2-D, or 3-D stacked with expert e); rows_total: rows
 * per expert (or of the matrix); the view covers rows [row0, row0 + rows). */
static fm_status mlx_view(src_set *ss, const fm_st_tensor *t, const char *base, bool stacked, int64_t n_experts,
                          int64_t rows_total, int64_t cols, int e, int64_t row0, int64_t rows, src_view *v) {
    char sname[400], bname[400], got[96];
    int bits = 0, gs = 0;
    fm_status st = mlx_params(ss, base, &bits, &gs);
    if (st != FM_OK) return st;
    snprintf(sname, sizeof sname, "%s.scales", base);
    snprintf(bname, sizeof bname, "%s.biases", base);
    const fm_st_tensor *s = get(ss, sname), *b = get(ss, bname);
    if (!s || !b) return fm_error_set(FM_ERR_FORMAT, "missing tensor %s", s ? bname : sname);
    int nd = stacked ? 3 : 2;
    int64_t lead = stacked ? n_experts : 0;
    bool ok = t->dtype == FM_DTYPE_U32 && t->n_dims == nd && (!stacked || t->shape[0] == lead) &&
              t->shape[nd - 2] == rows_total && t->shape[nd - 1] * 32 == cols * bits;
    shape_str(t, got, sizeof got);
    if (!ok)
        return fm_error_set(FM_ERR_FORMAT,
                            "tensor %s: %s [%s] does not hold %lld x %lld values at %d bits (as config.json's quantization declares)",
                            t->name, fm_dtype_name(t->dtype), got, (long long)rows_total, (long long)cols, bits);
    if (cols % gs)
        return fm_error_set(FM_ERR_FORMAT, "tensor %s: %lld columns are not a multiple of the declared group size %d", t->name,
                            (long long)cols, gs);
    for (int k = 0; k < 2; k++) {
        const fm_st_tensor *x = k ? b : s;
        shape_str(x, got, sizeof got);
        if (x->n_dims != nd || (stacked && x->shape[0] != lead) || x->shape[nd - 2] != rows_total ||
            x->shape[nd - 1] != cols / gs)
            return fm_error_set(FM_ERR_FORMAT, "tensor %s has shape [%s] but %lld rows of %lld columns in groups of %d need [%s%lld, %lld]",
                                x->name, got, (long long)rows_total, (long long)cols, gs, stacked ? "E, " : "",
                                (long long)rows_total, (long long)(cols / gs));
    }
    if (s->dtype != b->dtype || (s->dtype != FM_DTYPE_BF16 && s->dtype != FM_DTYPE_F16 && s->dtype != FM_DTYPE_F32))
        return fm_error_set(FM_ERR_UNSUPPORTED, "tensor %s: scales %s / biases %s are not a supported pair (BF16, F16, F32)",
                            base, fm_dtype_name(s->dtype), fm_dtype_name(b->dtype));
    memset(v, 0, sizeof *v);
    v->kind = SRC_MLX;
    snprintf(v->name, sizeof v->name, "%s", t->name);
    v->rows = rows;
    v->cols = cols;
    v->dtype = fm_quant_type_for_bits(bits);
    v->group_size = gs;
    v->scale_dtype = s->dtype;
    v->w_row_bytes = (uint64_t)cols * (uint64_t)bits / 8;
    v->s_row_bytes = (uint64_t)(cols / gs) * fm_dtype_size(s->dtype);
    uint64_t first = (uint64_t)((stacked ? (int64_t)e * rows_total : 0) + row0);
    v->w = (const uint8_t *)t->data + first * v->w_row_bytes;
    v->s = (const uint8_t *)s->data + first * v->s_row_bytes;
    v->b = (const uint8_t *)b->data + first * v->s_row_bytes;
    return FM_OK;
}

static fm_status float_view(const fm_st_tensor *t, uint64_t first_elem, int64_t rows, int64_t cols, src_view *v) {
    if (t->dtype != FM_DTYPE_F32 && t->dtype != FM_DTYPE_BF16 && t->dtype != FM_DTYPE_F16)
        return fm_error_set(FM_ERR_UNSUPPORTED, "tensor %s: dtype %s is not supported (F32, BF16, F16, F8_E4M3 with block scales, MLX u32)",
                            t->name, fm_dtype_name(t->dtype));
    memset(v, 0, sizeof *v);
    v->kind = SRC_FLOAT;
    snprintf(v->name, sizeof v->name, "%s", t->name);
    v->rows = rows;
    v->cols = cols;
    v->dtype = t->dtype;
    v->w_row_bytes = (uint64_t)cols * fm_dtype_size(t->dtype);
    v->w = (const uint8_t *)t->data + first_elem * fm_dtype_size(t->dtype);
    return FM_OK;
}

fm_status src_find(src_set *ss, const char *name, int64_t rows, int64_t cols, bool vector, src_view *v) {
    char full[400], base[400], aux[420], got[96];
    snprintf(full, sizeof full, "%s%s", ss->prefix, name);
    const fm_st_tensor *t = get(ss, full);
    if (!t) return fm_error_set(FM_ERR_FORMAT, "missing tensor %s", full);
    size_t n = strlen(full);
    bool has_weight_suffix = n > 7 && !strcmp(full + n - 7, ".weight");
    snprintf(base, sizeof base, "%.*s", (int)(has_weight_suffix ? n - 7 : n), full);
    snprintf(aux, sizeof aux, "%s.scales", base);
    if (has_weight_suffix && exists(ss, aux)) return mlx_view(ss, t, base, false, 0, rows, cols, 0, 0, rows, v);
    if (t->dtype == FM_DTYPE_F8_E4M3) {
        snprintf(aux, sizeof aux, "%s_scale_inv", full);
        const fm_st_tensor *si = get(ss, aux);
        if (!si) return fm_error_set(FM_ERR_FORMAT, "tensor %s is F8_E4M3 but %s is missing", full, aux);
        int64_t br = ss->fp8_block[0] ? ss->fp8_block[0] : 128, bc = ss->fp8_block[1] ? ss->fp8_block[1] : 128;
        shape_str(t, got, sizeof got);
        if (t->n_dims != 2 || t->shape[0] != rows || t->shape[1] != cols)
            return fm_error_set(FM_ERR_FORMAT, "tensor %s has shape [%s] but the config implies [%lld, %lld]", full, got,
                                (long long)rows, (long long)cols);
        if (si->n_dims != 2 || si->shape[0] != (rows + br - 1) / br || si->shape[1] != (cols + bc - 1) / bc ||
            (si->dtype != FM_DTYPE_F32 && si->dtype != FM_DTYPE_BF16))
            return fm_error_set(FM_ERR_FORMAT, "tensor %s must be F32/BF16 [%lld, %lld] for %lldx%lld blocks", aux,
                                (long long)((rows + br - 1) / br), (long long)((cols + bc - 1) / bc), (long long)br,
                                (long long)bc);
        memset(v, 0, sizeof *v);
        v->kind = SRC_FP8;
        snprintf(v->name, sizeof v->name, "%s", full);
        v->rows = rows;
        v->cols = cols;
        v->dtype = FM_DTYPE_F8_E4M3;
        v->w = t->data;
        v->w_row_bytes = (uint64_t)cols;
        v->scale_inv = si;
        v->fp8_block[0] = br;
        v->fp8_block[1] = bc;
        return FM_OK;
    }
    int64_t want[2] = {rows, cols};
    if (!squeezed_equal(t, want, vector ? 1 : 2)) {
        shape_str(t, got, sizeof got);
        if (vector)
            return fm_error_set(FM_ERR_FORMAT, "tensor %s has shape [%s] but the config implies [%lld]", full, got, (long long)rows);
        return fm_error_set(FM_ERR_FORMAT, "tensor %s has shape [%s] but the config implies [%lld, %lld]", full, got,
                            (long long)rows, (long long)cols);
    }
    return float_view(t, 0, rows, cols, v);
}

bool src_has(src_set *ss, const char *name) {
    char full[400];
    snprintf(full, sizeof full, "%s%s", ss->prefix, name);
    return exists(ss, full);
}

fm_status src_find_stacked(src_set *ss, const char *name, int64_t n_experts, int64_t rows_total, int64_t cols, int e,
                           int64_t row0, int64_t rows, src_view *v) {
    char full[400], base[400], aux[420], got[96];
    snprintf(full, sizeof full, "%s%s", ss->prefix, name);
    const fm_st_tensor *t = get(ss, full);
    if (!t) return fm_error_set(FM_ERR_FORMAT, "missing tensor %s", full);
    size_t n = strlen(full);
    bool has_weight_suffix = n > 7 && !strcmp(full + n - 7, ".weight");
    snprintf(base, sizeof base, "%.*s", (int)(has_weight_suffix ? n - 7 : n), full);
    snprintf(aux, sizeof aux, "%s.scales", base);
    if (has_weight_suffix && exists(ss, aux))
        return mlx_view(ss, t, base, true, n_experts, rows_total, cols, e, row0, rows, v);
    shape_str(t, got, sizeof got);
    if (t->n_dims != 3 || t->shape[0] != n_experts || t->shape[1] != rows_total || t->shape[2] != cols)
        return fm_error_set(FM_ERR_FORMAT, "tensor %s has shape [%s] but the config implies [%lld, %lld, %lld]", full, got,
                            (long long)n_experts, (long long)rows_total, (long long)cols);
    return float_view(t, ((uint64_t)e * (uint64_t)rows_total + (uint64_t)row0) * (uint64_t)cols, rows, cols, v);
}

uint64_t src_quant_nbytes(const src_view *v) {
    return fm_quant_nbytes(v->dtype, v->rows, v->cols, v->group_size, v->scale_dtype);
}

void src_copy_quant(const src_view *v, void *out) {
    uint8_t *o = out;
    memcpy(o, v->w, v->w_row_bytes * (uint64_t)v->rows);
    o += v->w_row_bytes * (uint64_t)v->rows;
    memcpy(o, v->s, v->s_row_bytes * (uint64_t)v->rows);
    o += v->s_row_bytes * (uint64_t)v->rows;
    memcpy(o, v->b, v->s_row_bytes * (uint64_t)v->rows);
}

/* float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN. */
static float fp8_e4m3_to_f32(uint8_t x) {
    int sign = x >> 7, e = (x >> 3) & 15, m = x & 7;
    float v;
    if (e == 15 && m == 7) return NAN;
    if (e == 0) v = ldexpf((float)m / 8.0f, -6);
    else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
    return sign ? -v : v;
}

static float load_scale(const fm_st_tensor *t, int64_t i) {
    if (t->dtype == FM_DTYPE_F32) {
        float f;
        memcpy(&f, (const uint8_t *)t->data + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, (const uint8_t *)t->data + 2 * i, 2);
    return fm_bf16_to_f32(h);
}

fm_status src_to_f32(const src_view *v, float *out) {
    int64_t R = v->rows, C = v->cols;
    switch (v->kind) {
    case SRC_FLOAT:
        for (int64_t r = 0; r < R; r++) {
            const uint8_t *p = v->w + (uint64_t)r * v->w_row_bytes;
            float *o = out + r * C;
            if (v->dtype == FM_DTYPE_F32) {
                memcpy(o, p, sizeof(float) * (size_t)C);
            } else {
                for (int64_t c = 0; c < C; c++) {
                    uint16_t h;
                    memcpy(&h, p + 2 * c, 2);
                    o[c] = v->dtype == FM_DTYPE_BF16 ? fm_bf16_to_f32(h) : fm_f16_to_f32(h);
                }
            }
        }
        return FM_OK;
    case SRC_FP8: {
        const fm_st_tensor *si = v->scale_inv;
        int64_t br = v->fp8_block[0], bc = v->fp8_block[1];
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < C; c++) {
                float s = load_scale(si, ((r + v->row0) / br) * si->shape[1] + c / bc);
                out[r * C + c] = fp8_e4m3_to_f32(v->w[(uint64_t)r * v->w_row_bytes + (uint64_t)c]) * s;
            }
        return FM_OK;
    }
    case SRC_MLX: {
        uint64_t nb = src_quant_nbytes(v);
        void *blob = malloc(nb ? nb : 1);
        if (!blob) return fm_error_set(FM_ERR_NOMEM, "out of memory");
        src_copy_quant(v, blob);
        fm_weight w = {.dtype = v->dtype, .rows = R, .cols = C, .data = blob, .group_size = v->group_size,
                       .scale_dtype = v->scale_dtype};
        for (int64_t r = 0; r < R; r++) fm_dequant_row(out + r * C, &w, r, 0, C);
        free(blob);
        return FM_OK;
    }
    }
    return fm_error_set(FM_ERR_ARG, "bad source view");
}
