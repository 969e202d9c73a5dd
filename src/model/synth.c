#include "model/synth.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/packed.h"
#include "quant/quant.h"
#include "util/error.h"
#include "util/half.h"
#include "util/progress.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) return st_;                                                              \
    } while (0)

typedef struct preset {
    const char *name;
    fm_arch arch;
    int64_t vocab, hidden;
    int layers, heads, kv_heads, head_dim, lin_k, lin_v, lin_dk, lin_dv, experts, top_k;
    int64_t ff_expert, ff_shared;
    double theta;
} preset;

/* Geometries from the models' config.json files (../shared/reference/qwen35-architecture.md §1). */
static const preset presets[] = {
    {"qwen3.5-397b-a17b", FM_ARCH_QWEN35_MOE, 248320, 4096, 60, 32, 2, 256, 16, 64, 128, 128, 512, 10, 1024, 1024, 1e7},
    {"qwen3.5-35b-a3b", FM_ARCH_QWEN35_MOE, 248320, 2048, 40, 16, 2, 256, 16, 32, 128, 128, 256, 8, 512, 512, 1e7},
    {"qwen3-next-80b-a3b", FM_ARCH_QWEN3_NEXT, 151936, 2048, 48, 16, 2, 256, 16, 32, 128, 128, 512, 10, 512, 512, 1e7},
    {"tiny", FM_ARCH_QWEN35_MOE, 512, 128, 4, 4, 2, 32, 2, 4, 16, 16, 16, 4, 64, 64, 1e7},
};

const char *fm_synth_preset_names(void) { return "qwen3.5-397b-a17b, qwen3.5-35b-a3b, qwen3-next-80b-a3b, tiny"; }

fm_status fm_synth_preset(const char *name, fm_config *c) {
    for (size_t i = 0; i < sizeof presets / sizeof *presets; i++) {
        const preset *p = &presets[i];
        if (strcmp(name, p->name) != 0) continue;
        memset(c, 0, sizeof *c);
        c->arch = p->arch;
        c->n_vocab = p->vocab;
        c->n_embd = p->hidden;
        c->n_layers = p->layers;
        for (int l = 0; l < c->n_layers; l++) c->layer_kind[l] = (l + 1) % 4 ? FM_LAYER_LINEAR : FM_LAYER_FULL;
        c->norm_eps = 1e-6;
        c->n_head = p->heads;
        c->n_head_kv = p->kv_heads;
        c->head_dim = p->head_dim;
        c->rot_dim = p->head_dim / 4;
        c->rope_theta = p->theta;
        c->lin_n_k_heads = p->lin_k;
        c->lin_n_v_heads = p->lin_v;
        c->lin_k_dim = p->lin_dk;
        c->lin_v_dim = p->lin_dv;
        c->conv_kernel = 4;
        c->n_experts = p->experts;
        c->n_experts_used = p->top_k;
        c->n_ff_expert = p->ff_expert;
        c->n_ff_shared = p->ff_shared;
        c->norm_topk_prob = true;
        c->max_position = 262144;
        return FM_OK;
    }
    return fm_error_set(FM_ERR_ARG, "unknown preset \"%s\" (%s)", name, fm_synth_preset_names());
}

/* splitmix64: fast, and good enough for weights nobody will read. */
static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float uniform(uint64_t *s, float a) { /* in [-a, a) */
    return ((float)(next_u64(s) >> 40) / (float)(1 << 24) * 2.0f - 1.0f) * a;
}

/* Fills a tensor of this description with values uniform in [-a, a): floats drawn directly; for
 * quantized types random q with s = 2a/(2^bits - 1), b = -a (the same distribution, on the grid). */
static void fill(const fm_packed_tensor *t, uint8_t *buf, uint64_t *rng, float a) {
    int64_t rows = t->shape[0], cols = t->n_dims > 1 ? t->shape[1] : 1, n = rows * cols;
    if (fm_dtype_is_quant(t->dtype)) {
        int bits = fm_quant_bits(t->dtype);
        uint64_t wbytes = (uint64_t)n * (uint64_t)bits / 8, ngroups = (uint64_t)(n / t->group_size);
        for (uint64_t i = 0; i < wbytes; i += 8) {
            uint64_t r = next_u64(rng);
            memcpy(buf + i, &r, wbytes - i < 8 ? wbytes - i : 8);
        }
        float s = 2 * a / (float)((1 << bits) - 1), b = -a;
        size_t es = fm_dtype_size(t->scale_dtype);
        for (uint64_t g = 0; g < ngroups; g++) {
            for (int k = 0; k < 2; k++) {
                float v = k ? b : s;
                uint8_t *dst = buf + wbytes + (uint64_t)k * ngroups * es + g * es;
                if (t->scale_dtype == FM_DTYPE_F32) memcpy(dst, &v, 4);
                else {
                    uint16_t h = t->scale_dtype == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                    memcpy(dst, &h, 2);
                }
            }
        }
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        float v = uniform(rng, a);
        if (t->dtype == FM_DTYPE_F32) memcpy(buf + 4 * i, &v, 4);
        else {
            uint16_t h = t->dtype == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
            memcpy(buf + 2 * i, &h, 2);
        }
    }
}

/* A matrix [rows, cols] at `dt`; vectors (cols = 0) are always F32. */
static fm_packed_tensor describe(const char *name, fm_dtype dt, int64_t rows, int64_t cols) {
    fm_packed_tensor t = {.name = name, .dtype = cols ? dt : FM_DTYPE_F32, .n_dims = cols ? 2 : 1, .shape = {rows, cols}};
    if (fm_dtype_is_quant(t.dtype)) {
        if (cols % 64) t.dtype = FM_DTYPE_BF16;
        else {
            t.group_size = 64;
            t.scale_dtype = FM_DTYPE_BF16;
        }
    }
    t.n_bytes = fm_packed_tensor_nbytes(&t);
    return t;
}

typedef struct synth_ctx {
    fm_packed_writer *w;
    uint64_t rng;
    uint8_t *buf;
    uint64_t cap;
    fm_progress progress;
} synth_ctx;

static fm_status reserve(synth_ctx *x, uint64_t n) {
    if (n <= x->cap) return FM_OK;
    uint8_t *b = realloc(x->buf, n);
    if (!b) return fm_error_set(FM_ERR_NOMEM, "out of memory (%llu bytes)", (unsigned long long)n);
    x->buf = b;
    x->cap = n;
    return FM_OK;
}

/* Adds a dense tensor: random in [-a, a) (a = sqrt(3/cols): unit-variance outputs), or `fixed`. */
static fm_status dense(synth_ctx *x, const char *name, fm_dtype dt, int64_t rows, int64_t cols, const float *fixed,
                       float fixed_noise) {
    fm_packed_tensor t = describe(name, dt, rows, cols);
    TRY(reserve(x, t.n_bytes));
    if (fixed) { /* vectors: fixed value plus optional noise */
        for (int64_t i = 0; i < rows; i++) {
            float v = fixed[0] + (fixed_noise > 0 ? uniform(&x->rng, fixed_noise) : 0.0f);
            memcpy(x->buf + 4 * i, &v, 4);
        }
    } else {
        fill(&t, x->buf, &x->rng, sqrtf(3.0f / (float)(cols ? cols : 1)));
    }
    t.data = x->buf;
    fm_progress_add(&x->progress, t.n_bytes);
    return fm_packed_writer_add_dense(x->w, &t);
}

static fm_status synth_layer(synth_ctx *x, const fm_config *c, int l, const fm_synth_options *o) {
    char n[128];
    int64_t H = c->n_embd;
    const float one = 1.0f, zero = 0.0f;
    fm_dtype dd = o->dense_dtype;
#define NAME(...) (snprintf(n, sizeof n, __VA_ARGS__), n)
    TRY(dense(x, NAME("layers.%d.input_layernorm", l), dd, H, 0, &one, 0.1f));
    TRY(dense(x, NAME("layers.%d.post_attention_layernorm", l), dd, H, 0, &one, 0.1f));
    if (c->layer_kind[l] == FM_LAYER_LINEAR) {
        int64_t nv = c->lin_n_v_heads, vd = fm_config_value_dim(c), cd = fm_config_conv_dim(c);
        TRY(dense(x, NAME("layers.%d.linear_attn.in_proj_qkv", l), dd, cd, H, NULL, 0));
        TRY(dense(x, NAME("layers.%d.linear_attn.in_proj_z", l), dd, vd, H, NULL, 0));
        TRY(dense(x, NAME("layers.%d.linear_attn.in_proj_b", l), dd, nv, H, NULL, 0));
        TRY(dense(x, NAME("layers.%d.linear_attn.in_proj_a", l), dd, nv, H, NULL, 0));
        TRY(dense(x, NAME("layers.%d.linear_attn.conv1d", l), FM_DTYPE_F32, cd, c->conv_kernel, NULL, 0));
        TRY(dense(x, NAME("layers.%d.linear_attn.dt_bias", l), dd, nv, 0, &zero, 0.5f));
        const float alog = 1.0f; /* A = -e: a moderate decay */
        TRY(dense(x, NAME("layers.%d.linear_attn.A_log", l), dd, nv, 0, &alog, 0.5f));
        TRY(dense(x, NAME("layers.%d.linear_attn.norm", l), dd, c->lin_v_dim, 0, &one, 0.1f));
        TRY(dense(x, NAME("layers.%d.linear_attn.out_proj", l), dd, H, vd, NULL, 0));
    } else {
        int64_t d = c->head_dim;
        TRY(dense(x, NAME("layers.%d.self_attn.q_proj", l), dd, c->n_head * 2 * d, H, NULL, 0));
        TRY(dense(x, NAME("layers.%d.self_attn.k_proj", l), dd, c->n_head_kv * d, H, NULL, 0));
        TRY(dense(x, NAME("layers.%d.self_attn.v_proj", l), dd, c->n_head_kv * d, H, NULL, 0));
        TRY(dense(x, NAME("layers.%d.self_attn.o_proj", l), dd, H, c->n_head * d, NULL, 0));
        TRY(dense(x, NAME("layers.%d.self_attn.q_norm", l), dd, d, 0, &one, 0.1f));
        TRY(dense(x, NAME("layers.%d.self_attn.k_norm", l), dd, d, 0, &one, 0.1f));
    }
    fm_dtype router = fm_dtype_is_quant(dd) && fm_quant_bits(dd) < 8 ? FM_DTYPE_Q8 : dd;
    TRY(dense(x, NAME("layers.%d.mlp.gate", l), router, c->n_experts, H, NULL, 0));
    TRY(dense(x, NAME("layers.%d.mlp.shared_expert.gate_proj", l), dd, c->n_ff_shared, H, NULL, 0));
    TRY(dense(x, NAME("layers.%d.mlp.shared_expert.up_proj", l), dd, c->n_ff_shared, H, NULL, 0));
    TRY(dense(x, NAME("layers.%d.mlp.shared_expert.down_proj", l), dd, H, c->n_ff_shared, NULL, 0));
    TRY(dense(x, NAME("layers.%d.mlp.shared_expert_gate", l), router, 1, H, NULL, 0));
#undef NAME
    fm_packed_tensor parts[FM_PART_COUNT] = {describe("gate", o->expert_dtype, c->n_ff_expert, H),
                                             describe("up", o->expert_dtype, c->n_ff_expert, H),
                                             describe("down", o->expert_dtype, H, c->n_ff_expert)};
    TRY(fm_packed_writer_set_expert_layout(x->w, l, parts));
    uint64_t total = parts[0].n_bytes + parts[1].n_bytes + parts[2].n_bytes;
    TRY(reserve(x, total));
    for (int e = 0; e < c->n_experts; e++) {
        const void *data[FM_PART_COUNT];
        uint64_t off = 0;
        for (int p = 0; p < FM_PART_COUNT; p++) {
            fill(&parts[p], x->buf + off, &x->rng, sqrtf(3.0f / (float)parts[p].shape[1]));
            data[p] = x->buf + off;
            off += parts[p].n_bytes;
        }
        TRY(fm_packed_writer_put_expert(x->w, l, e, data));
        fm_progress_add(&x->progress, total);
    }
    return FM_OK;
}

fm_status fm_synth_write(const char *out_dir, const fm_synth_options *o) {
    fm_config c;
    TRY(fm_synth_preset(o->preset, &c));
    if (o->n_layers < 0 || o->n_layers > c.n_layers)
        return fm_error_set(FM_ERR_ARG, "--layers must be between 1 and %d for %s", c.n_layers, o->preset);
    if (o->n_layers) c.n_layers = o->n_layers;
    if (o->n_vocab < 0 || o->n_vocab > ((int64_t)1 << 31)) return fm_error_set(FM_ERR_ARG, "bad vocabulary size");
    if (o->n_vocab) c.n_vocab = o->n_vocab;
    synth_ctx x = {.rng = o->seed ? o->seed : 1};
    fm_status st = fm_packed_writer_init(out_dir, &c, o->force, &x.w);
    if (st != FM_OK) return st;
    /* progress in stored bytes: an estimate from one expert and the large dense tensors */
    fm_packed_tensor g = describe("gate", o->expert_dtype, c.n_ff_expert, c.n_embd);
    uint64_t est = 3 * g.n_bytes * (uint64_t)c.n_experts * (uint64_t)c.n_layers +
                   2 * describe("e", o->dense_dtype, c.n_vocab, c.n_embd).n_bytes;
    fm_progress_init(&x.progress, "synth", est, o->progress);
    st = dense(&x, "embed_tokens", o->dense_dtype, c.n_vocab, c.n_embd, NULL, 0);
    for (int l = 0; l < c.n_layers && st == FM_OK; l++) st = synth_layer(&x, &c, l, o);
    const float one = 1.0f;
    if (st == FM_OK) st = dense(&x, "norm", o->dense_dtype, c.n_embd, 0, &one, 0.1f);
    if (st == FM_OK) st = dense(&x, "lm_head", o->dense_dtype, c.n_vocab, c.n_embd, NULL, 0);
    if (st == FM_OK) {
        fm_progress_finish(&x.progress);
        json_t *source = json_pack("{s:s, s:s, s:I}", "synthetic", o->preset, "converter", "flashmoe synth", "seed",
                                   (json_int_t)(o->seed ? o->seed : 1));
        st = fm_packed_writer_finish(x.w, source);
    }
    fm_packed_writer_free(x.w);
    free(x.buf);
    return st;
}
