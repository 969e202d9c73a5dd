#include "model/convert.h"

#include <errno.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "formats/packed.h"
#include "formats/safetensors.h"
#include "model/config.h"
#include "util/error.h"
#include "util/half.h"
#include "util/progress.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) return st_;                                                              \
    } while (0)

typedef struct conv_ctx {
    const fm_config *cfg;
    const fm_st_set *st;
    const char *prefix; /* "model." or "model.language_model." */
    const fm_convert_options *opt;
    fm_packed_writer *w;
    fm_progress progress;
    fm_dtype expert_dtype; /* chosen at the first expert */
    unsigned char *used; /* [fm_st_count]: tensor consumed */
    float *buf;          /* scratch f32 */
    size_t buf_cap;      /* elements */
    void *enc;           /* scratch encoded */
    size_t enc_cap;      /* bytes */
} conv_ctx;

static fm_status ensure_buf(conv_ctx *x, size_t n) {
    if (n <= x->buf_cap) return FM_OK;
    float *b = realloc(x->buf, n * sizeof(float));
    if (!b) return fm_error_set(FM_ERR_NOMEM, "out of memory (%zu floats)", n);
    x->buf = b;
    x->buf_cap = n;
    return FM_OK;
}

static const fm_st_tensor *find_tensor(conv_ctx *x, const char *name) {
    const fm_st_tensor *t = fm_st_find(x->st, name);
    if (!t) return NULL;
    /* mark as used: the set keeps its tensors in one array, so the index is a pointer difference;
     * the scan is a fallback that keeps this correct should that ever change */
    size_t n = fm_st_count(x->st), i = (size_t)(t - fm_st_get(x->st, 0));
    if (i < n && fm_st_get(x->st, i) == t) {
        x->used[i] = 1;
        return t;
    }
    for (i = 0; i < n; i++)
        if (fm_st_get(x->st, i) == t) x->used[i] = 1;
    return t;
}

/* Converts n source elements of a float dtype into f32. */
static fm_status to_f32(const fm_st_tensor *t, const void *src, int64_t n, float *dst) {
    const unsigned char *p = src;
    switch (t->dtype) {
    case FM_DTYPE_F32: memcpy(dst, p, (size_t)n * 4); break;
    case FM_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = fm_bf16_to_f32(h);
        }
        break;
    case FM_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            dst[i] = fm_f16_to_f32(h);
        }
        break;
    default:
        return fm_error_set(FM_ERR_UNSUPPORTED, "tensor %s: dtype %s is not supported (F32, BF16, F16)", t->name,
                            fm_dtype_name(t->dtype));
    }
    return FM_OK;
}

/* Looks up `name` (prefix added unless absolute), checks its shape, returns it as f32 in x->buf. */
static fm_status load_f32(conv_ctx *x, const char *name, bool with_prefix, int n_dims, const int64_t *shape,
                          const fm_st_tensor **out) {
    char full[512];
    snprintf(full, sizeof full, "%s%s", with_prefix ? x->prefix : "", name);
    const fm_st_tensor *t = find_tensor(x, full);
    if (!t) return fm_error_set(FM_ERR_FORMAT, "missing tensor %s", full);
    bool ok = t->n_dims == n_dims;
    for (int i = 0; ok && i < n_dims; i++) ok = t->shape[i] == shape[i];
    if (!ok) {
        char want[128] = "", got[128] = "";
        for (int i = 0; i < n_dims; i++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", i ? ", " : "", (long long)shape[i]);
        for (int i = 0; i < t->n_dims; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        return fm_error_set(FM_ERR_FORMAT, "tensor %s has shape [%s] but the config implies [%s]", full, got, want);
    }
    TRY(ensure_buf(x, (size_t)t->n_elements));
    TRY(to_f32(t, t->data, t->n_elements, x->buf));
    *out = t;
    return FM_OK;
}

/* Encodes n f32 values as dtype into x->enc; returns the byte count in *n_bytes. */
static fm_status encode(conv_ctx *x, const float *src, int64_t n, fm_dtype dt, uint64_t *n_bytes) {
    size_t need = (size_t)n * fm_dtype_size(dt);
    if (need > x->enc_cap) {
        void *e = realloc(x->enc, need ? need : 1);
        if (!e) return fm_error_set(FM_ERR_NOMEM, "out of memory (%zu bytes)", need);
        x->enc = e;
        x->enc_cap = need;
    }
    unsigned char *d = x->enc;
    switch (dt) {
    case FM_DTYPE_F32: memcpy(d, src, need); break;
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
    default: return fm_error_set(FM_ERR_ARG, "cannot encode to %s", fm_dtype_name(dt));
    }
    *n_bytes = need;
    return FM_OK;
}

typedef enum { KEEP_SOURCE, FORCE_F32 } dtype_rule;
typedef enum { XF_NONE, XF_PLUS_ONE } transform;

static fm_status put_dense(conv_ctx *x, const char *out_name, const float *data, int n_dims, const int64_t *shape,
                           fm_dtype src_dtype, dtype_rule rule) {
    int64_t n = 1;
    for (int i = 0; i < n_dims; i++) n *= shape[i];
    fm_dtype dt = rule == FORCE_F32 ? FM_DTYPE_F32 : (x->opt->dense_dtype ? x->opt->dense_dtype : src_dtype);
    uint64_t nb;
    TRY(encode(x, data, n, dt, &nb));
    TRY(fm_packed_writer_add_dense(x->w, out_name, dt, n_dims, shape, x->enc, nb));
    fm_progress_add(&x->progress, (uint64_t)n * 4);
    return FM_OK;
}

/* Copies one tensor: source name (under the prefix) -> packed name. */
static fm_status copy_dense(conv_ctx *x, const char *src_name, const char *out_name, int n_dims, const int64_t *shape,
                            dtype_rule rule, transform xf) {
    const fm_st_tensor *t;
    TRY(load_f32(x, src_name, true, n_dims, shape, &t));
    int64_t n = t->n_elements;
    if (xf == XF_PLUS_ONE)
        for (int64_t i = 0; i < n; i++) x->buf[i] += 1.0f;
    return put_dense(x, out_name, x->buf, n_dims, shape, t->dtype, rule);
}

/* Qwen3-Next: in_proj_qkvz rows grouped per key head [q_g | k_g | v_g (r heads) | z_g (r heads)]
 * and in_proj_ba rows [b_g (r) | a_g (r)] become Qwen3.5's in_proj_qkv (all q | all k | all v),
 * in_proj_z, in_proj_b and in_proj_a. */
static fm_status split_qwen3_next_projections(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, nk = c->lin_n_k_heads, r = c->lin_n_v_heads / c->lin_n_k_heads;
    int64_t dk = c->lin_k_dim, dv = c->lin_v_dim, kd = fm_config_key_dim(c), vd = fm_config_value_dim(c);
    int64_t group = 2 * dk + 2 * r * dv;
    char src[256], dst[256];
    const fm_st_tensor *t;
    int64_t shape[2] = {nk * group, H};
    snprintf(src, sizeof src, "layers.%d.linear_attn.in_proj_qkvz.weight", l);
    TRY(load_f32(x, src, true, 2, shape, &t));
    float *qkv = malloc(sizeof(float) * (size_t)((2 * kd + vd) * H)), *z = malloc(sizeof(float) * (size_t)(vd * H));
    if (!qkv || !z) {
        free(qkv);
        free(z);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    for (int64_t g = 0; g < nk; g++) {
        const float *blk = x->buf + g * group * H;
        memcpy(qkv + (g * dk) * H, blk, sizeof(float) * (size_t)(dk * H));                       /* q_g */
        memcpy(qkv + (kd + g * dk) * H, blk + dk * H, sizeof(float) * (size_t)(dk * H));          /* k_g */
        memcpy(qkv + (2 * kd + g * r * dv) * H, blk + 2 * dk * H, sizeof(float) * (size_t)(r * dv * H)); /* v */
        memcpy(z + (g * r * dv) * H, blk + (2 * dk + r * dv) * H, sizeof(float) * (size_t)(r * dv * H)); /* z */
    }
    fm_dtype sdt = t->dtype;
    int64_t qkv_shape[2] = {2 * kd + vd, H}, z_shape[2] = {vd, H};
    snprintf(dst, sizeof dst, "layers.%d.linear_attn.in_proj_qkv", l);
    fm_status st = put_dense(x, dst, qkv, 2, qkv_shape, sdt, KEEP_SOURCE);
    snprintf(dst, sizeof dst, "layers.%d.linear_attn.in_proj_z", l);
    if (st == FM_OK) st = put_dense(x, dst, z, 2, z_shape, sdt, KEEP_SOURCE);
    free(qkv);
    free(z);
    TRY(st);

    int64_t nv = c->lin_n_v_heads, ba_shape[2] = {2 * nv, H}, one_shape[2] = {nv, H};
    snprintf(src, sizeof src, "layers.%d.linear_attn.in_proj_ba.weight", l);
    TRY(load_f32(x, src, true, 2, ba_shape, &t));
    float *b = malloc(sizeof(float) * (size_t)(nv * H)), *a = malloc(sizeof(float) * (size_t)(nv * H));
    if (!a || !b) {
        free(a);
        free(b);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    for (int64_t g = 0; g < nk; g++) {
        memcpy(b + g * r * H, x->buf + (g * 2 * r) * H, sizeof(float) * (size_t)(r * H));
        memcpy(a + g * r * H, x->buf + (g * 2 * r + r) * H, sizeof(float) * (size_t)(r * H));
    }
    snprintf(dst, sizeof dst, "layers.%d.linear_attn.in_proj_b", l);
    st = put_dense(x, dst, b, 2, one_shape, t->dtype, KEEP_SOURCE);
    snprintf(dst, sizeof dst, "layers.%d.linear_attn.in_proj_a", l);
    if (st == FM_OK) st = put_dense(x, dst, a, 2, one_shape, t->dtype, KEEP_SOURCE);
    free(a);
    free(b);
    return st;
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
        int64_t s_qkv[2] = {cd, H}, s_z[2] = {vd, H}, s_ba[2] = {nv, H};
        LIN("in_proj_qkv.weight", "in_proj_qkv");
        TRY(copy_dense(x, src, dst, 2, s_qkv, KEEP_SOURCE, XF_NONE));
        LIN("in_proj_z.weight", "in_proj_z");
        TRY(copy_dense(x, src, dst, 2, s_z, KEEP_SOURCE, XF_NONE));
        LIN("in_proj_b.weight", "in_proj_b");
        TRY(copy_dense(x, src, dst, 2, s_ba, KEEP_SOURCE, XF_NONE));
        LIN("in_proj_a.weight", "in_proj_a");
        TRY(copy_dense(x, src, dst, 2, s_ba, KEEP_SOURCE, XF_NONE));
    }
    /* conv1d.weight [C, 1, K] is stored as [C, K] */
    const fm_st_tensor *t;
    int64_t s_conv[3] = {cd, 1, c->conv_kernel}, s_conv2[2] = {cd, c->conv_kernel};
    LIN("conv1d.weight", "conv1d");
    TRY(load_f32(x, src, true, 3, s_conv, &t));
    TRY(put_dense(x, dst, x->buf, 2, s_conv2, t->dtype, FORCE_F32));
    int64_t s_nv[1] = {nv}, s_dv[1] = {c->lin_v_dim}, s_out[2] = {H, vd};
    LIN("dt_bias", "dt_bias");
    TRY(copy_dense(x, src, dst, 1, s_nv, FORCE_F32, XF_NONE));
    LIN("A_log", "A_log");
    TRY(copy_dense(x, src, dst, 1, s_nv, FORCE_F32, XF_NONE));
    LIN("norm.weight", "norm"); /* the gated norm multiplies by plain w */
    TRY(copy_dense(x, src, dst, 1, s_dv, FORCE_F32, XF_NONE));
    LIN("out_proj.weight", "out_proj");
    TRY(copy_dense(x, src, dst, 2, s_out, KEEP_SOURCE, XF_NONE));
#undef LIN
    return FM_OK;
}

static fm_status convert_full_attn(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, d = c->head_dim;
    int64_t s_q[2] = {c->n_head * 2 * d, H}, s_kv[2] = {c->n_head_kv * d, H}, s_o[2] = {H, c->n_head * d};
    int64_t s_n[1] = {d};
    char src[256], dst[256];
#define ATT(s, dd) (snprintf(src, sizeof src, "layers.%d.self_attn.%s", l, s), \
                    snprintf(dst, sizeof dst, "layers.%d.self_attn.%s", l, dd))
    ATT("q_proj.weight", "q_proj");
    TRY(copy_dense(x, src, dst, 2, s_q, KEEP_SOURCE, XF_NONE));
    ATT("k_proj.weight", "k_proj");
    TRY(copy_dense(x, src, dst, 2, s_kv, KEEP_SOURCE, XF_NONE));
    ATT("v_proj.weight", "v_proj");
    TRY(copy_dense(x, src, dst, 2, s_kv, KEEP_SOURCE, XF_NONE));
    ATT("o_proj.weight", "o_proj");
    TRY(copy_dense(x, src, dst, 2, s_o, KEEP_SOURCE, XF_NONE));
    ATT("q_norm.weight", "q_norm");
    TRY(copy_dense(x, src, dst, 1, s_n, FORCE_F32, XF_PLUS_ONE));
    ATT("k_norm.weight", "k_norm");
    TRY(copy_dense(x, src, dst, 1, s_n, FORCE_F32, XF_PLUS_ONE));
#undef ATT
    return FM_OK;
}

/* Routed experts of layer l, fused ([E, 2I, H] + [E, H, I]) or per expert. */
static fm_status convert_experts(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t E = c->n_experts, I = c->n_ff_expert, H = c->n_embd;
    char name[256];
    snprintf(name, sizeof name, "%slayers.%d.mlp.experts.gate_up_proj", x->prefix, l);
    const fm_st_tensor *gu = find_tensor(x, name), *dn = NULL;
    if (gu) {
        snprintf(name, sizeof name, "%slayers.%d.mlp.experts.down_proj", x->prefix, l);
        dn = find_tensor(x, name);
        if (!dn) return fm_error_set(FM_ERR_FORMAT, "missing tensor %s (gate_up_proj is fused)", name);
        if (gu->n_dims != 3 || gu->shape[0] != E || gu->shape[1] != 2 * I || gu->shape[2] != H)
            return fm_error_set(FM_ERR_FORMAT, "tensor %s has the wrong shape (want [%lld, %lld, %lld])", gu->name,
                                (long long)E, (long long)(2 * I), (long long)H);
        if (dn->n_dims != 3 || dn->shape[0] != E || dn->shape[1] != H || dn->shape[2] != I)
            return fm_error_set(FM_ERR_FORMAT, "tensor %s has the wrong shape (want [%lld, %lld, %lld])", dn->name,
                                (long long)E, (long long)H, (long long)I);
    }
    size_t per = (size_t)(I * H);
    float *f = malloc(sizeof(float) * per * 3);
    void *enc[FM_PART_COUNT] = {0};
    fm_status st = FM_OK;
    if (!f) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    for (int e = 0; e < E && st == FM_OK; e++) {
        fm_dtype src_dt;
        if (gu) {
            size_t esz = fm_dtype_size(gu->dtype);
            const unsigned char *g = (const unsigned char *)gu->data + (size_t)e * 2 * per * esz;
            st = to_f32(gu, g, (int64_t)(2 * per), f); /* gate rows then up rows */
            if (st == FM_OK)
                st = to_f32(dn, (const unsigned char *)dn->data + (size_t)e * per * fm_dtype_size(dn->dtype),
                            (int64_t)per, f + 2 * per);
            src_dt = gu->dtype;
        } else {
            static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
            src_dt = FM_DTYPE_UNKNOWN;
            for (int p = 0; p < 3 && st == FM_OK; p++) {
                int64_t shape[2] = {p == 2 ? H : I, p == 2 ? I : H};
                const fm_st_tensor *t;
                snprintf(name, sizeof name, "layers.%d.mlp.experts.%d.%s.weight", l, e, pn[p]);
                st = load_f32(x, name, true, 2, shape, &t);
                if (st == FM_OK) {
                    memcpy(f + (size_t)p * per, x->buf, sizeof(float) * per);
                    src_dt = t->dtype;
                }
            }
        }
        if (st != FM_OK) break;
        if (!x->expert_dtype) {
            x->expert_dtype = x->opt->expert_dtype ? x->opt->expert_dtype : src_dt;
            st = fm_packed_writer_set_expert_dtype(x->w, x->expert_dtype);
            if (st != FM_OK) break;
        }
        fm_dtype dt = x->expert_dtype;
        const void *parts[FM_PART_COUNT];
        for (int p = 0; p < FM_PART_COUNT && st == FM_OK; p++) {
            uint64_t nb;
            st = encode(x, f + (size_t)p * per, (int64_t)per, dt, &nb);
            if (st == FM_OK) {
                free(enc[p]);
                enc[p] = malloc(nb);
                if (!enc[p]) st = fm_error_set(FM_ERR_NOMEM, "out of memory");
                else memcpy(enc[p], x->enc, nb);
            }
            parts[p] = enc[p];
        }
        if (st == FM_OK) st = fm_packed_writer_put_expert(x->w, l, e, parts);
        fm_progress_add(&x->progress, (uint64_t)per * 3 * 4);
    }
    for (int p = 0; p < FM_PART_COUNT; p++) free(enc[p]);
    free(f);
    return st;
}

static fm_status convert_layer(conv_ctx *x, int l) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, s_h[1] = {H};
    char src[256], dst[256];
    snprintf(src, sizeof src, "layers.%d.input_layernorm.weight", l);
    snprintf(dst, sizeof dst, "layers.%d.input_layernorm", l);
    TRY(copy_dense(x, src, dst, 1, s_h, FORCE_F32, XF_PLUS_ONE));
    snprintf(src, sizeof src, "layers.%d.post_attention_layernorm.weight", l);
    snprintf(dst, sizeof dst, "layers.%d.post_attention_layernorm", l);
    TRY(copy_dense(x, src, dst, 1, s_h, FORCE_F32, XF_PLUS_ONE));
    if (c->layer_kind[l] == FM_LAYER_LINEAR) TRY(convert_linear_attn(x, l));
    else TRY(convert_full_attn(x, l));

    int64_t s_router[2] = {c->n_experts, H}, s_sg[2] = {1, H};
    snprintf(src, sizeof src, "layers.%d.mlp.gate.weight", l);
    snprintf(dst, sizeof dst, "layers.%d.mlp.gate", l);
    TRY(copy_dense(x, src, dst, 2, s_router, KEEP_SOURCE, XF_NONE));
    if (c->n_ff_shared > 0) {
        int64_t s_up[2] = {c->n_ff_shared, H}, s_down[2] = {H, c->n_ff_shared};
        static const char *pn[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int p = 0; p < 3; p++) {
            snprintf(src, sizeof src, "layers.%d.mlp.shared_expert.%s.weight", l, pn[p]);
            snprintf(dst, sizeof dst, "layers.%d.mlp.shared_expert.%s", l, pn[p]);
            TRY(copy_dense(x, src, dst, 2, p == 2 ? s_down : s_up, KEEP_SOURCE, XF_NONE));
        }
        snprintf(src, sizeof src, "layers.%d.mlp.shared_expert_gate.weight", l);
        snprintf(dst, sizeof dst, "layers.%d.mlp.shared_expert_gate", l);
        TRY(copy_dense(x, src, dst, 2, s_sg, KEEP_SOURCE, XF_NONE));
    }
    return convert_experts(x, l);
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static int remove_tree(const char *path) { return nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* mkdir -p of the directory that will hold `path`. */
static void make_parent_dirs(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        mkdir(buf, 0755); /* existing components are fine; a real failure shows at the writer's mkdir */
        *p = '/';
    }
}

static fm_status detect_prefix(conv_ctx *x) {
    static const char *prefixes[] = {"model.language_model.", "model.", ""};
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++) {
        char name[256];
        snprintf(name, sizeof name, "%sembed_tokens.weight", prefixes[i]);
        if (fm_st_find(x->st, name)) {
            x->prefix = prefixes[i];
            return FM_OK;
        }
    }
    return fm_error_set(FM_ERR_FORMAT,
                        "missing tensor embed_tokens.weight (looked under model.language_model., model. and no prefix)");
}

static fm_status convert_all(conv_ctx *x) {
    const fm_config *c = x->cfg;
    int64_t H = c->n_embd, V = c->n_vocab, s_emb[2] = {V, H}, s_h[1] = {H};
    TRY(detect_prefix(x));
    uint64_t total = 0;
    for (size_t i = 0, n = fm_st_count(x->st); i < n; i++) {
        const fm_st_tensor *t = fm_st_get(x->st, i);
        if (strncmp(t->name, "mtp.", 4) && strncmp(t->name, "model.visual.", 13)) total += (uint64_t)t->n_elements * 4;
    }
    fm_progress_init(&x->progress, "convert", total, x->opt->progress);
    TRY(copy_dense(x, "embed_tokens.weight", "embed_tokens", 2, s_emb, KEEP_SOURCE, XF_NONE));
    for (int l = 0; l < c->n_layers; l++) {
        fm_status st = convert_layer(x, l);
        if (st != FM_OK) return st;
    }
    TRY(copy_dense(x, "norm.weight", "norm", 1, s_h, FORCE_F32, XF_PLUS_ONE));
    if (fm_st_find(x->st, "lm_head.weight")) {
        const fm_st_tensor *t;
        TRY(load_f32(x, "lm_head.weight", false, 2, s_emb, &t));
        TRY(put_dense(x, "lm_head", x->buf, 2, s_emb, t->dtype, KEEP_SOURCE));
    } else if (c->tie_embeddings) {
        TRY(copy_dense(x, "embed_tokens.weight", "lm_head", 2, s_emb, KEEP_SOURCE, XF_NONE));
    } else {
        return fm_error_set(FM_ERR_FORMAT, "missing tensor lm_head.weight (and tie_word_embeddings is false)");
    }
    fm_progress_finish(&x->progress);
    return FM_OK;
}

fm_status fm_convert_hf(const char *hf_dir, const char *out_dir, const fm_convert_options *opt) {
    char path[4096], tmp[4096], old[4096];
    fm_config cfg;
    fm_status st;
    conv_ctx x = {.opt = opt};
    fm_st_set *st_set = NULL;
    struct stat sb;

    snprintf(path, sizeof path, "%s/config.json", hf_dir);
    if (stat(hf_dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return fm_error_set(FM_ERR_IO, "%s: not a directory (expected a Hugging Face checkpoint)", hf_dir);
    TRY(fm_config_load(path, &cfg));
    if (stat(out_dir, &sb) == 0 && !opt->force)
        return fm_error_set(FM_ERR_ARG, "%s already exists (remove it or pass --force)", out_dir);
    TRY(fm_st_open(hf_dir, &st_set));
    x.cfg = &cfg;
    x.st = st_set;
    x.used = calloc(fm_st_count(st_set) + 1, 1);
    if (!x.used) {
        fm_st_close(st_set);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    make_parent_dirs(out_dir);
    snprintf(tmp, sizeof tmp, "%s.partial", out_dir);
    if (stat(tmp, &sb) == 0 && remove_tree(tmp) != 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot remove a stale partial conversion: %s", tmp, strerror(errno));
        goto done;
    }
    st = fm_packed_writer_init(tmp, &cfg, &x.w);
    if (st != FM_OK) goto done;
    st = convert_all(&x);
    if (st != FM_OK) {
        fm_error_wrap(st, "%s", hf_dir);
        goto done;
    }
    size_t skipped = 0, unknown = 0;
    const char *first_unknown = NULL;
    for (size_t i = 0, n = fm_st_count(st_set); i < n; i++) {
        if (x.used[i]) continue;
        const char *nm = fm_st_get(st_set, i)->name;
        if (!strncmp(nm, "mtp.", 4) || !strncmp(nm, "model.visual.", 13)) skipped++;
        else if (unknown++ == 0) first_unknown = nm;
    }
    if (skipped) fprintf(stderr, "convert: skipped %zu tensors the engine does not use (mtp.*, model.visual.*)\n", skipped);
    if (unknown) {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "%s: %zu tensors are not understood by this converter, e.g. %s",
                          hf_dir, unknown, first_unknown);
        goto done;
    }
    json_t *source = json_pack("{s:s, s:s}", "path", hf_dir, "converter", "flashmoe convert");
    st = fm_packed_writer_finish(x.w, source);
    if (st != FM_OK) goto done;
    fm_packed_writer_free(x.w);
    x.w = NULL;
    if (stat(out_dir, &sb) == 0) { /* --force: move the old one aside, then swap */
        snprintf(old, sizeof old, "%s.old", out_dir);
        if (stat(old, &sb) == 0) remove_tree(old);
        if (rename(out_dir, old) != 0) {
            st = fm_error_set(FM_ERR_IO, "%s: cannot move aside: %s", out_dir, strerror(errno));
            goto done;
        }
        if (rename(tmp, out_dir) != 0) {
            st = fm_error_set(FM_ERR_IO, "%s: cannot rename to %s: %s", tmp, out_dir, strerror(errno));
            goto done;
        }
        remove_tree(old);
    } else if (rename(tmp, out_dir) != 0) {
        st = fm_error_set(FM_ERR_IO, "%s: cannot rename to %s: %s", tmp, out_dir, strerror(errno));
        goto done;
    }
done:
    if (x.w) {
        fm_packed_writer_free(x.w);
        remove_tree(tmp);
    } else if (st != FM_OK) {
        remove_tree(tmp);
    }
    free(x.used);
    free(x.buf);
    free(x.enc);
    fm_st_close(st_set);
    return st;
}
