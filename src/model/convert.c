/* The converter: decides each tensor's stored type, reads it through convert_source.c, transforms
 * (norms to multipliers, Qwen3-Next projections reordered, experts sliced) and writes the packed
 * format through src/formats/packed.c. */
#include "model/convert.h"

#include <errno.h>
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend/cpu/threadpool.h"
#include "formats/packed.h"
#include "formats/safetensors.h"
#include "model/config.h"
#include "model/convert_source.h"
#include "util/error.h"
#include "util/half.h"
#include "util/progress.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) return st_;                                                              \
    } while (0)

#define MAX_PARTS 64 /* row ranges making up one output matrix */

typedef enum tensor_role {
    ROLE_F32,    /* norms, conv, A_log, dt_bias: always float32 */
    ROLE_ROUTER, /* mlp.gate, shared_expert_gate: never below Q8 */
    ROLE_DENSE,
    ROLE_EXPERT,
} tensor_role;

typedef struct conv_ctx {
    const fm_config *cfg;
    src_set ss;
    const fm_convert_options *opt;
    regex_t re[FM_CONVERT_MAX_OVERRIDES];
    int n_re;
    int group_size;
    fm_packed_writer *w;
    fm_pool *pool;
    fm_progress progress;
    float *buf; /* scratch f32 */
    size_t buf_cap;
    int n_copied, n_fallback, n_router_floor;
} conv_ctx;

fm_convert_options fm_convert_default_options(void) {
    fm_convert_options o;
    memset(&o, 0, sizeof o);
    o.dense_dtype = FM_DTYPE_Q8;
    o.expert_dtype = FM_DTYPE_Q4;
    o.keep_quantized = true;
    o.group_size = 64;
    o.method = FM_QUANT_RTN;
    o.progress = true;
    return o;
}

static fm_status ensure_buf(conv_ctx *x, size_t n) {
    if (n <= x->buf_cap) return FM_OK;
    float *b = realloc(x->buf, n * sizeof(float));
    if (!b) return fm_error_set(FM_ERR_NOMEM, "out of memory (%zu floats)", n);
    x->buf = b;
    x->buf_cap = n;
    return FM_OK;
}

/* A sub-view of rows [r0, r0 + n) of v. */
static src_view view_rows(const src_view *v, int64_t r0, int64_t n) {
    src_view s = *v;
    s.rows = n;
    s.w += (uint64_t)r0 * v->w_row_bytes;
    if (v->kind == SRC_MLX) {
        s.s += (uint64_t)r0 * v->s_row_bytes;
        s.b += (uint64_t)r0 * v->s_row_bytes;
    }
    s.row0 = v->row0 + r0;
    return s;
}

/* ------------------------------------------------------------------ type decisions */

typedef struct plan {
    fm_dtype dtype;   /* stored type */
    bool copy;        /* copy the checkpoint's own quantized bytes */
    int group_size;
    fm_dtype scale_dtype;
    bool floored;     /* a router gate raised to Q8 */
    bool fell_back;   /* BF16 because the columns do not divide into groups */
} plan;

/* Counts a stored tensor's plan in the converter's summary. */
static void count_plan(conv_ctx *x, const plan *p) {
    x->n_copied += p->copy;
    x->n_router_floor += p->floored;
    x->n_fallback += p->fell_back;
}

static plan choose(conv_ctx *x, const char *name, tensor_role role, const src_view *src) {
    plan p = {.dtype = FM_DTYPE_F32, .group_size = 0, .scale_dtype = FM_DTYPE_UNKNOWN};
    if (role == ROLE_F32) return p;
    const fm_convert_options *o = x->opt;
    fm_dtype target = role == ROLE_EXPERT ? o->expert_dtype : o->dense_dtype;
    bool keep = o->keep_quantized;
    for (int i = 0; i < x->n_re; i++)
        if (regexec(&x->re[i], name, 0, NULL, 0) == 0) {
            target = o->overrides[i].dtype;
            keep = false;
        }
    if (src->kind == SRC_MLX &&
        (keep || target == FM_DTYPE_UNKNOWN || (target == src->dtype && src->group_size == x->group_size))) {
        p.dtype = src->dtype;
        p.copy = true;
        p.group_size = src->group_size;
        p.scale_dtype = src->scale_dtype;
        return p;
    }
    if (target == FM_DTYPE_UNKNOWN) target = src->kind == SRC_FLOAT ? src->dtype : FM_DTYPE_BF16;
    if (role == ROLE_ROUTER && fm_dtype_is_quant(target) && fm_quant_bits(target) < 8) {
        target = FM_DTYPE_Q8;
        p.floored = true;
    }
    if (fm_dtype_is_quant(target) && (src->cols % x->group_size != 0)) {
        target = FM_DTYPE_BF16; /* the shape cannot be grouped: keep 16 bits rather than fail */
        p.fell_back = true;
    }
    p.dtype = target;
    if (fm_dtype_is_quant(target)) {
        p.group_size = x->group_size;
        p.scale_dtype = FM_DTYPE_BF16;
    }
    return p;
}

/* ------------------------------------------------------------------ encoding */

typedef struct quant_job {
    const float *src;
    int64_t rows, cols;
    plan p;
    fm_quant_method method;
    uint8_t *out; /* whole-matrix layout: q words, scales, biases */
    pthread_mutex_t mu;
    fm_status st;
    char err[512];
} quant_job;

/* Quantizes rows [r0, r1) straight into the whole matrix's layout. */
static void quant_rows(void *arg, int64_t r0, int64_t r1) {
    quant_job *j = arg;
    fm_status st = fm_quantize_rows(j->src, j->rows, j->cols, j->p.dtype, j->p.group_size, j->p.scale_dtype, j->method,
                                    r0, r1, j->out);
    if (st != FM_OK) {
        pthread_mutex_lock(&j->mu);
        if (j->st == FM_OK) {
            j->st = st;
            snprintf(j->err, sizeof j->err, "%s", fm_last_error());
        }
        pthread_mutex_unlock(&j->mu);
    }
}

/* Encodes f32 [rows, cols] as plan p into a malloc'd buffer (*out, *n_bytes). */
static fm_status encode(conv_ctx *x, const char *name, const float *src, int64_t rows, int64_t cols, plan p, uint8_t **out,
                        uint64_t *n_bytes) {
    uint64_t nb = fm_dtype_is_quant(p.dtype) ? fm_quant_nbytes(p.dtype, rows, cols, p.group_size, p.scale_dtype)
                                             : (uint64_t)(rows * cols) * fm_dtype_size(p.dtype);
    uint8_t *d = malloc(nb ? nb : 1);
    if (!d) return fm_error_set(FM_ERR_NOMEM, "out of memory (%llu bytes for %s)", (unsigned long long)nb, name);
    int64_t n = rows * cols;
    switch (p.dtype) {
    case FM_DTYPE_F32: memcpy(d, src, nb); break;
    case FM_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = fm_f32_to_bf16(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        break;
    case FM_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = fm_f32_to_f16(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        break;
    default: {
        quant_job j = {.src = src, .rows = rows, .cols = cols, .p = p, .method = x->opt->method, .out = d, .st = FM_OK};
        pthread_mutex_init(&j.mu, NULL);
        fm_pool_run(x->pool, quant_rows, &j, rows, 8);
        pthread_mutex_destroy(&j.mu);
        if (j.st != FM_OK) {
            free(d);
            return fm_error_set(j.st, "%s: %s", name, j.err);
        }
    }
    }
    *out = d;
    *n_bytes = nb;
    return FM_OK;
}

typedef enum transform { XF_NONE, XF_NORM } transform; /* XF_NORM: (1+w) unless the export holds it already */

/* Builds one stored matrix from row ranges of the checkpoint (parts, concatenated in order):
 * chooses its type, copies quantized bytes or converts through f32, and returns the encoded bytes. */
static fm_status build_matrix(conv_ctx *x, const char *name, tensor_role role, const src_view *parts, int n_parts,
                              transform xf, plan *pl, uint8_t **out, uint64_t *n_bytes) {
    int64_t rows = 0, cols = parts[0].cols;
    bool same_kind = true;
    for (int i = 0; i < n_parts; i++) {
        rows += parts[i].rows;
        same_kind &= parts[i].kind == parts[0].kind && parts[i].dtype == parts[0].dtype &&
                     parts[i].group_size == parts[0].group_size && parts[i].scale_dtype == parts[0].scale_dtype;
    }
    src_view whole = parts[0];
    whole.rows = rows;
    *pl = choose(x, name, role, &whole);
    fm_progress_add(&x->progress, (uint64_t)(rows * cols) * 4);
    if (pl->copy && same_kind && xf == XF_NONE) {
        uint64_t nb = src_quant_nbytes(&whole);
        uint8_t *d = malloc(nb ? nb : 1);
        if (!d) return fm_error_set(FM_ERR_NOMEM, "out of memory");
        uint64_t wrow = parts[0].w_row_bytes, srow = parts[0].s_row_bytes;
        uint64_t W = wrow * (uint64_t)rows, S = srow * (uint64_t)rows, r = 0;
        for (int i = 0; i < n_parts; i++) { /* rows are independent: concatenate each region */
            memcpy(d + r * wrow, parts[i].w, wrow * (uint64_t)parts[i].rows);
            memcpy(d + W + r * srow, parts[i].s, srow * (uint64_t)parts[i].rows);
            memcpy(d + W + S + r * srow, parts[i].b, srow * (uint64_t)parts[i].rows);
            r += (uint64_t)parts[i].rows;
        }
        *out = d;
        *n_bytes = nb;
        return FM_OK;
    }
    pl->copy = false; /* mixed or transformed quantized parts go through f32 */
    TRY(ensure_buf(x, (size_t)(rows * cols)));
    int64_t r = 0;
    for (int i = 0; i < n_parts; i++) {
        TRY(src_to_f32(&parts[i], x->buf + r * cols));
        r += parts[i].rows;
    }
    if (xf == XF_NORM && !x->ss.mlx_layout)
        for (int64_t i = 0; i < rows * cols; i++) x->buf[i] += 1.0f;
    return encode(x, name, x->buf, rows, cols, *pl, out, n_bytes);
}

/* Writes a dense tensor made of `parts`; 1-D when `vector`. */
static fm_status put_dense(conv_ctx *x, const char *name, tensor_role role, const src_view *parts, int n_parts,
                           bool vector, transform xf) {
    plan pl;
    uint8_t *d;
    uint64_t nb;
    TRY(build_matrix(x, name, vector ? ROLE_F32 : role, parts, n_parts, xf, &pl, &d, &nb));
    count_plan(x, &pl);
    int64_t rows = 0;
    for (int i = 0; i < n_parts; i++) rows += parts[i].rows;
    fm_packed_tensor t = {.name = name, .dtype = pl.dtype, .n_dims = vector ? 1 : 2, .shape = {rows, parts[0].cols},
                          .group_size = pl.group_size, .scale_dtype = pl.scale_dtype, .n_bytes = nb, .data = d};
    fm_status st = fm_packed_writer_add_dense(x->w, &t);
    free(d);
    return st;
}

/* One checkpoint tensor -> one packed tensor. */
static fm_status copy_tensor(conv_ctx *x, const char *src_name, const char *out_name, tensor_role role, int64_t rows,
                             int64_t cols, bool vector, transform xf) {
    src_view v;
    TRY(src_find(&x->ss, src_name, rows, cols, vector, &v));
    return put_dense(x, out_name, role, &v, 1, vector, xf);
}

/* ------------------------------------------------------------------ layers */

/* Qwen3-Next: in_proj_qkvz rows grouped per key head [q_g | k_g | v_g (r heads) | z_g (r heads)]
 * and in_proj_ba rows [b_g (r) | a_g (r)] become Qwen3.5's in_proj_qkv (all q | all k | all v),
 * in_proj_z, in_proj_b and in_proj_a — as row ranges, so quantized rows move unchanged. */
static fm_status split_qwen3_next_projections(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, nk = c->lin_n_k_heads, r = c->lin_n_v_heads / c->lin_n_k_heads;
    int64_t dk = c->lin_k_dim, dv = c->lin_v_dim, group = 2 * dk + 2 * r * dv;
    if (3 * nk > MAX_PARTS) return fm_error_set(FM_ERR_UNSUPPORTED, "too many key heads (%lld)", (long long)nk);
    char src[256], dst[256];
    src_view all, parts[MAX_PARTS];
    snprintf(src, sizeof src, "layers.%d.linear_attn.in_proj_qkvz.weight", l);
    TRY(src_find(&x->ss, src, nk * group, H, false, &all));
    int n = 0;
    for (int64_t g = 0; g < nk; g++) parts[n++] = view_rows(&all, g * group, dk);                    /* q_g */
    for (int64_t g = 0; g < nk; g++) parts[n++] = view_rows(&all, g * group + dk, dk);               /* k_g */
    for (int64_t g = 0; g < nk; g++) parts[n++] = view_rows(&all, g * group + 2 * dk, r * dv);       /* v_g */
    snprintf(dst, sizeof dst, "layers.%d.linear_attn.in_proj_qkv", l);
    TRY(put_dense(x, dst, ROLE_DENSE, parts, n, false, XF_NONE));
    n = 0;
    for (int64_t g = 0; g < nk; g++) parts[n++] = view_rows(&all, g * group + 2 * dk + r * dv, r * dv); /* z_g */
    snprintf(dst, sizeof dst, "layers.%d.linear_attn.in_proj_z", l);
    TRY(put_dense(x, dst, ROLE_DENSE, parts, n, false, XF_NONE));

    snprintf(src, sizeof src, "layers.%d.linear_attn.in_proj_ba.weight", l);
    TRY(src_find(&x->ss, src, 2 * c->lin_n_v_heads, H, false, &all));
    for (int k = 0; k < 2; k++) { /* b then a */
        n = 0;
        for (int64_t g = 0; g < nk; g++) parts[n++] = view_rows(&all, g * 2 * r + k * r, r);
        snprintf(dst, sizeof dst, "layers.%d.linear_attn.%s", l, k ? "in_proj_a" : "in_proj_b");
        TRY(put_dense(x, dst, ROLE_DENSE, parts, n, false, XF_NONE));
    }
    return FM_OK;
}

static fm_status convert_linear_attn(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, nv = c->lin_n_v_heads, vd = fm_config_value_dim(c), cd = fm_config_conv_dim(c);
    char src[256], dst[256];
#define LIN(s, d) (snprintf(src, sizeof src, "layers.%d.linear_attn.%s", l, s), \
                   snprintf(dst, sizeof dst, "layers.%d.linear_attn.%s", l, d))
    if (c->arch == FM_ARCH_QWEN3_NEXT) {
        TRY(split_qwen3_next_projections(x, l));
    } else {
        LIN("in_proj_qkv.weight", "in_proj_qkv");
        TRY(copy_tensor(x, src, dst, ROLE_DENSE, cd, H, false, XF_NONE));
        LIN("in_proj_z.weight", "in_proj_z");
        TRY(copy_tensor(x, src, dst, ROLE_DENSE, vd, H, false, XF_NONE));
        LIN("in_proj_b.weight", "in_proj_b");
        TRY(copy_tensor(x, src, dst, ROLE_DENSE, nv, H, false, XF_NONE));
        LIN("in_proj_a.weight", "in_proj_a");
        TRY(copy_tensor(x, src, dst, ROLE_DENSE, nv, H, false, XF_NONE));
    }
    LIN("conv1d.weight", "conv1d"); /* [C, 1, K] (HF) or [C, K, 1] (MLX): the same bytes, stored [C, K] */
    TRY(copy_tensor(x, src, dst, ROLE_F32, cd, c->conv_kernel, false, XF_NONE));
    LIN("dt_bias", "dt_bias");
    TRY(copy_tensor(x, src, dst, ROLE_F32, nv, 1, true, XF_NONE));
    LIN("A_log", "A_log");
    TRY(copy_tensor(x, src, dst, ROLE_F32, nv, 1, true, XF_NONE));
    LIN("norm.weight", "norm"); /* the gated norm multiplies by plain w */
    TRY(copy_tensor(x, src, dst, ROLE_F32, c->lin_v_dim, 1, true, XF_NONE));
    LIN("out_proj.weight", "out_proj");
    TRY(copy_tensor(x, src, dst, ROLE_DENSE, H, vd, false, XF_NONE));
#undef LIN
    return FM_OK;
}

static fm_status convert_full_attn(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, d = c->head_dim;
    char src[256], dst[256];
#define ATT(s, dd) (snprintf(src, sizeof src, "layers.%d.self_attn.%s", l, s), \
                    snprintf(dst, sizeof dst, "layers.%d.self_attn.%s", l, dd))
    ATT("q_proj.weight", "q_proj");
    TRY(copy_tensor(x, src, dst, ROLE_DENSE, c->n_head * 2 * d, H, false, XF_NONE));
    ATT("k_proj.weight", "k_proj");
    TRY(copy_tensor(x, src, dst, ROLE_DENSE, c->n_head_kv * d, H, false, XF_NONE));
    ATT("v_proj.weight", "v_proj");
    TRY(copy_tensor(x, src, dst, ROLE_DENSE, c->n_head_kv * d, H, false, XF_NONE));
    ATT("o_proj.weight", "o_proj");
    TRY(copy_tensor(x, src, dst, ROLE_DENSE, H, c->n_head * d, false, XF_NONE));
    ATT("q_norm.weight", "q_norm");
    TRY(copy_tensor(x, src, dst, ROLE_F32, d, 1, true, XF_NORM));
    ATT("k_norm.weight", "k_norm");
    TRY(copy_tensor(x, src, dst, ROLE_F32, d, 1, true, XF_NORM));
#undef ATT
    return FM_OK;
}

/* The three parts of expert e of layer l, from MLX switch_mlp, fused release tensors or per-expert ones. */
static fm_status expert_views(conv_ctx *x, int l, int e, src_view v[FM_PART_COUNT]) {
    const fm_config *c = x->cfg;
    int64_t E = c->n_experts, I = c->n_ff_expert, H = c->n_embd;
    char name[256];
    static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
    snprintf(name, sizeof name, "layers.%d.mlp.switch_mlp.gate_proj.weight", l);
    if (src_has(&x->ss, name)) {
        for (int p = 0; p < 3; p++) {
            snprintf(name, sizeof name, "layers.%d.mlp.switch_mlp.%s.weight", l, pn[p]);
            TRY(src_find_stacked(&x->ss, name, E, p == 2 ? H : I, p == 2 ? I : H, e, 0, p == 2 ? H : I, &v[p]));
        }
        return FM_OK;
    }
    snprintf(name, sizeof name, "layers.%d.mlp.experts.gate_up_proj", l);
    if (src_has(&x->ss, name)) { /* [E, 2I, H]: gate rows, then up rows */
        TRY(src_find_stacked(&x->ss, name, E, 2 * I, H, e, 0, I, &v[0]));
        TRY(src_find_stacked(&x->ss, name, E, 2 * I, H, e, I, I, &v[1]));
        snprintf(name, sizeof name, "layers.%d.mlp.experts.down_proj", l);
        return src_find_stacked(&x->ss, name, E, H, I, e, 0, H, &v[2]);
    }
    for (int p = 0; p < 3; p++) {
        snprintf(name, sizeof name, "layers.%d.mlp.experts.%d.%s.weight", l, e, pn[p]);
        TRY(src_find(&x->ss, name, p == 2 ? H : I, p == 2 ? I : H, false, &v[p]));
    }
    return FM_OK;
}

static fm_status convert_experts(conv_ctx *x, int l) {
    static const char *pn[FM_PART_COUNT] = {"gate", "up", "down"};
    fm_status st = FM_OK;
    for (int e = 0; e < x->cfg->n_experts && st == FM_OK; e++) {
        src_view v[FM_PART_COUNT];
        uint8_t *data[FM_PART_COUNT] = {0};
        plan pl[FM_PART_COUNT];
        fm_packed_tensor parts[FM_PART_COUNT];
        st = expert_views(x, l, e, v);
        for (int p = 0; p < FM_PART_COUNT && st == FM_OK; p++) {
            char name[64];
            uint64_t nb;
            snprintf(name, sizeof name, "layers.%d.experts.%s", l, pn[p]);
            st = build_matrix(x, name, ROLE_EXPERT, &v[p], 1, XF_NONE, &pl[p], &data[p], &nb);
            if (st == FM_OK && e == 0) count_plan(x, &pl[p]); /* once per layer and part */
            parts[p] = (fm_packed_tensor){.dtype = pl[p].dtype, .n_dims = 2, .shape = {v[p].rows, v[p].cols},
                                          .group_size = pl[p].group_size, .scale_dtype = pl[p].scale_dtype, .n_bytes = nb};
        }
        if (st == FM_OK && e == 0) st = fm_packed_writer_set_expert_layout(x->w, l, parts);
        if (st == FM_OK) {
            const fm_packed_expert_layer *L = fm_packed_writer_expert_layout(x->w, l);
            for (int p = 0; p < FM_PART_COUNT && st == FM_OK; p++)
                if (L->parts[p].dtype != parts[p].dtype || L->parts[p].n_bytes != parts[p].n_bytes)
                    st = fm_error_set(FM_ERR_FORMAT, "layer %d: expert %d's %s is stored differently from expert 0's", l, e, pn[p]);
        }
        if (st == FM_OK) st = fm_packed_writer_put_expert(x->w, l, e, (const void *const *)data);
        for (int p = 0; p < FM_PART_COUNT; p++) free(data[p]);
    }
    return st;
}

static fm_status convert_layer(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd;
    char src[256], dst[256];
    snprintf(src, sizeof src, "layers.%d.input_layernorm.weight", l);
    snprintf(dst, sizeof dst, "layers.%d.input_layernorm", l);
    TRY(copy_tensor(x, src, dst, ROLE_F32, H, 1, true, XF_NORM));
    snprintf(src, sizeof src, "layers.%d.post_attention_layernorm.weight", l);
    snprintf(dst, sizeof dst, "layers.%d.post_attention_layernorm", l);
    TRY(copy_tensor(x, src, dst, ROLE_F32, H, 1, true, XF_NORM));
    if (c->layer_kind[l] == FM_LAYER_LINEAR) TRY(convert_linear_attn(x, l));
    else TRY(convert_full_attn(x, l));
    snprintf(src, sizeof src, "layers.%d.mlp.gate.weight", l);
    snprintf(dst, sizeof dst, "layers.%d.mlp.gate", l);
    TRY(copy_tensor(x, src, dst, ROLE_ROUTER, c->n_experts, H, false, XF_NONE));
    if (c->n_ff_shared > 0) {
        static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int p = 0; p < 3; p++) {
            snprintf(src, sizeof src, "layers.%d.mlp.shared_expert.%s.weight", l, pn[p]);
            snprintf(dst, sizeof dst, "layers.%d.mlp.shared_expert.%s", l, pn[p]);
            TRY(copy_tensor(x, src, dst, ROLE_DENSE, p == 2 ? H : c->n_ff_shared, p == 2 ? c->n_ff_shared : H, false,
                            XF_NONE));
        }
        snprintf(src, sizeof src, "layers.%d.mlp.shared_expert_gate.weight", l);
        snprintf(dst, sizeof dst, "layers.%d.mlp.shared_expert_gate", l);
        TRY(copy_tensor(x, src, dst, ROLE_ROUTER, 1, H, false, XF_NONE));
    }
    return convert_experts(x, l);
}

/* ------------------------------------------------------------------ the whole model */

static fm_status detect_layout(conv_ctx *x) {
    static const char *prefixes[] = {"model.language_model.", "language_model.model.", "model.", ""};
    x->ss.prefix = NULL;
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes && !x->ss.prefix; i++) {
        char name[256];
        snprintf(name, sizeof name, "%sembed_tokens.weight", prefixes[i]);
        if (fm_st_find(x->ss.st, name)) x->ss.prefix = prefixes[i];
    }
    if (!x->ss.prefix)
        return fm_error_set(FM_ERR_FORMAT, "missing tensor embed_tokens.weight (looked under model.language_model., "
                                           "language_model.model., model. and no prefix)");
    char name[256];
    snprintf(name, sizeof name, "%slayers.0.mlp.switch_mlp.gate_proj.weight", x->ss.prefix);
    x->ss.mlx_layout = fm_st_find(x->ss.st, name) != NULL;
    return FM_OK;
}

static fm_status convert_all(conv_ctx *x) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, V = c->n_vocab;
    uint64_t total = 0;
    for (size_t i = 0, n = fm_st_count(x->ss.st); i < n; i++) {
        const fm_st_tensor *t = fm_st_get(x->ss.st, i);
        if (strncmp(t->name, "mtp.", 4) && !strstr(t->name, "visual.") && t->dtype != FM_DTYPE_U32)
            total += (uint64_t)t->n_elements * 4;
        if (t->dtype == FM_DTYPE_U32) total += (uint64_t)t->n_elements * 4 * 8; /* packed values, roughly */
    }
    fm_progress_init(&x->progress, "convert", total, x->opt->progress);
    TRY(copy_tensor(x, "embed_tokens.weight", "embed_tokens", ROLE_DENSE, V, H, false, XF_NONE));
    for (int l = 0; l < c->n_layers; l++) {
        fm_status st = convert_layer(x, l);
        if (st != FM_OK) return fm_error_wrap(st, "layer %d", l);
    }
    TRY(copy_tensor(x, "norm.weight", "norm", ROLE_F32, H, 1, true, XF_NORM));
    static const char *heads[] = {"lm_head.weight", "language_model.lm_head.weight"};
    bool done = false;
    for (size_t i = 0; i < 2 && !done; i++)
        if (fm_st_find(x->ss.st, heads[i])) {
            const char *saved = x->ss.prefix;
            x->ss.prefix = "";
            fm_status st = copy_tensor(x, heads[i], "lm_head", ROLE_DENSE, V, H, false, XF_NONE);
            x->ss.prefix = saved;
            TRY(st);
            done = true;
        }
    if (!done) {
        if (!c->tie_embeddings)
            return fm_error_set(FM_ERR_FORMAT, "missing tensor lm_head.weight (and tie_word_embeddings is false)");
        TRY(copy_tensor(x, "embed_tokens.weight", "lm_head", ROLE_DENSE, V, H, false, XF_NONE));
    }
    fm_progress_finish(&x->progress);
    return FM_OK;
}

/* Reads what the converter needs from config.json beyond fm_config: MLX "quantization" and the
 * FP8 block size. */
static fm_status read_quant_config(conv_ctx *x, const char *path, json_t **root) {
    json_error_t jerr;
    *root = json_load_file(path, 0, &jerr);
    if (!*root) return fm_error_set(FM_ERR_FORMAT, "%s: invalid JSON: %s", path, jerr.text);
    json_t *q = json_object_get(*root, "quantization");
    if (q && !json_is_object(q)) return fm_error_set(FM_ERR_FORMAT, "%s: \"quantization\" must be an object", path);
    x->ss.quant = q;
    json_t *qc = json_object_get(*root, "quantization_config");
    if (!qc) qc = json_object_get(json_object_get(*root, "text_config"), "quantization_config");
    const char *method = json_string_value(json_object_get(qc, "quant_method"));
    if (method && !strcmp(method, "fp8")) {
        json_t *bs = json_object_get(qc, "weight_block_size");
        if (!json_is_array(bs) || json_array_size(bs) != 2 || !json_is_integer(json_array_get(bs, 0)) ||
            !json_is_integer(json_array_get(bs, 1)) || json_integer_value(json_array_get(bs, 0)) < 1 ||
            json_integer_value(json_array_get(bs, 1)) < 1)
            return fm_error_set(FM_ERR_FORMAT, "%s: quantization_config.weight_block_size must be two positive integers", path);
        x->ss.fp8_block[0] = (int)json_integer_value(json_array_get(bs, 0));
        x->ss.fp8_block[1] = (int)json_integer_value(json_array_get(bs, 1));
    } else if (method && strcmp(method, "mlx") != 0 && !q) {
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s: quantization_config.quant_method \"%s\" is not supported (fp8, mlx)",
                            path, method);
    }
    return FM_OK;
}

static void describe_plan(const fm_convert_options *o, int gs) {
    char a[64], b[64];
    snprintf(a, sizeof a, "%s", o->expert_dtype ? fm_dtype_name(o->expert_dtype) : "source");
    snprintf(b, sizeof b, "%s", o->dense_dtype ? fm_dtype_name(o->dense_dtype) : "source");
    bool lossy = fm_dtype_is_quant(o->expert_dtype) || fm_dtype_is_quant(o->dense_dtype);
    fprintf(stderr, "convert: experts %s, dense %s%s (group %d, %s), norms F32, router gates at least Q8%s\n", a, b,
            o->keep_quantized ? ", already-quantized tensors kept" : "", gs, o->method == FM_QUANT_MSE ? "mse" : "rtn",
            lossy ? "; quantized weights lower quality: --quant source keeps full precision" : "");
}

fm_status fm_convert_hf(const char *hf_dir, const char *out_dir, const fm_convert_options *opt) {
    char path[4096];
    fm_config cfg;
    fm_status st;
    conv_ctx x;
    memset(&x, 0, sizeof x);
    x.opt = opt;
    x.group_size = opt->group_size ? opt->group_size : 64;
    fm_st_set *st_set = NULL;
    json_t *root = NULL;
    struct stat sb;

    if (x.group_size != 32 && x.group_size != 64 && x.group_size != 128)
        return fm_error_set(FM_ERR_ARG, "group size %d is not supported (32, 64, 128)", x.group_size);
    snprintf(path, sizeof path, "%s/config.json", hf_dir);
    if (stat(hf_dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return fm_error_set(FM_ERR_IO, "%s: not a directory (expected a Hugging Face checkpoint)", hf_dir);
    TRY(fm_config_load(path, &cfg));
    if (stat(out_dir, &sb) == 0 && !opt->force) /* checked early: before reading gigabytes */
        return fm_error_set(FM_ERR_ARG, "%s already exists (remove it or pass --force)", out_dir);
    for (int i = 0; i < opt->n_overrides; i++) {
        int rc = regcomp(&x.re[i], opt->overrides[i].pattern, REG_EXTENDED | REG_NOSUB);
        if (rc != 0) {
            char msg[256];
            regerror(rc, &x.re[i], msg, sizeof msg);
            for (int k = 0; k < x.n_re; k++) regfree(&x.re[k]);
            return fm_error_set(FM_ERR_ARG, "--quant-override pattern \"%s\": %s", opt->overrides[i].pattern, msg);
        }
        x.n_re++;
    }
    x.cfg = &cfg;
    st = read_quant_config(&x, path, &root);
    if (st == FM_OK) st = fm_st_open(hf_dir, &st_set);
    if (st != FM_OK) goto done;
    x.ss.st = st_set;
    x.ss.used = calloc(fm_st_count(st_set) + 1, 1);
    x.pool = fm_pool_init(opt->n_threads);
    if (!x.ss.used || !x.pool) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto done;
    }
    st = detect_layout(&x);
    if (st != FM_OK) goto done;
    if (opt->progress) describe_plan(opt, x.group_size);
    st = fm_packed_writer_init(out_dir, &cfg, opt->force, &x.w);
    if (st != FM_OK) goto done;
    st = convert_all(&x);
    if (st != FM_OK) {
        fm_error_wrap(st, "%s", hf_dir);
        goto done;
    }
    size_t skipped = 0, unknown = 0;
    const char *first_unknown = NULL;
    for (size_t i = 0, n = fm_st_count(st_set); i < n; i++) {
        if (x.ss.used[i]) continue;
        const char *nm = fm_st_get(st_set, i)->name;
        if (!strncmp(nm, "mtp.", 4) || strstr(nm, "visual.") || strstr(nm, "vision_tower")) skipped++;
        else if (unknown++ == 0) first_unknown = nm;
    }
    if (unknown) {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "%s: %zu tensors are not understood by this converter, e.g. %s", hf_dir,
                          unknown, first_unknown);
        goto done;
    }
    if (opt->progress) {
        if (skipped) fprintf(stderr, "convert: skipped %zu tensors the engine does not use (mtp.*, visual)\n", skipped);
        if (x.n_copied) fprintf(stderr, "convert: %d tensors copied with the checkpoint's own quantization\n", x.n_copied);
        if (x.n_router_floor) fprintf(stderr, "convert: %d router gates kept at Q8 (never below)\n", x.n_router_floor);
        if (x.n_fallback)
            fprintf(stderr, "convert: %d tensors stored as BF16: their columns are not a multiple of group size %d\n",
                    x.n_fallback, x.group_size);
    }
    /* the text side travels with the weights */
    static const char *text_files[] = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                                       "generation_config.json", "special_tokens_map.json"};
    for (size_t i = 0; i < sizeof text_files / sizeof *text_files && st == FM_OK; i++) {
        snprintf(path, sizeof path, "%s/%s", hf_dir, text_files[i]);
        if (stat(path, &sb) == 0) st = fm_packed_writer_copy_file(x.w, path, text_files[i]);
    }
    if (st != FM_OK) goto done;
    json_t *source = json_pack("{s:s, s:s}", "path", hf_dir, "converter", "flashmoe convert");
    st = fm_packed_writer_finish(x.w, source);
done:
    fm_packed_writer_free(x.w); /* removes <out_dir>.partial unless finished */
    for (int k = 0; k < x.n_re; k++) regfree(&x.re[k]);
    fm_pool_free(x.pool);
    free(x.ss.used);
    free(x.buf);
    json_decref(root);
    fm_st_close(st_set);
    return st;
}
