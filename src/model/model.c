/* Model open: binds every packed tensor to its place, checking name, dtype and shape. */
#include "model/model.h"
#include "model/forward_cuda.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"
#include "util/progress.h"

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) return st_;                                                              \
    } while (0)

fm_model_params fm_model_default_params(void) {
    fm_model_params p = {0};
    p.prefetch = FM_PREFETCH_AUTO;
    return p;
}

int64_t fm_model_n_vocab(const fm_model *m) { return m->cfg.n_vocab; }

static fm_status lookup(const fm_model *m, const char *name, int n_dims, int64_t d0, int64_t d1,
                        const fm_packed_tensor **out) {
    const fm_packed_tensor *t = fm_packed_find(m->packed, name);
    if (!t) return fm_error_set(FM_ERR_FORMAT, "%s: missing tensor %s", m->packed->dir, name);
    if (t->n_dims != n_dims || t->shape[0] != d0 || (n_dims > 1 && t->shape[1] != d1))
        return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s has shape [%lld%s%lld] but the config implies [%lld%s%lld]",
                            m->packed->dir, name, (long long)t->shape[0], t->n_dims > 1 ? ", " : "",
                            t->n_dims > 1 ? (long long)t->shape[1] : 0LL, (long long)d0, n_dims > 1 ? ", " : "",
                            n_dims > 1 ? (long long)d1 : 0LL);
    *out = t;
    return FM_OK;
}

static fm_status bind_matrix(const fm_model *m, fm_weight *w, int64_t rows, int64_t cols, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static fm_status bind_matrix(const fm_model *m, fm_weight *w, int64_t rows, int64_t cols, const char *fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const fm_packed_tensor *t;
    TRY(lookup(m, name, 2, rows, cols, &t));
    *w = fm_packed_weight(t, m->packed->dense_map);
    return FM_OK;
}

static fm_status bind_vector(const fm_model *m, const float **v, int64_t n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static fm_status bind_vector(const fm_model *m, const float **v, int64_t n, const char *fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const fm_packed_tensor *t;
    TRY(lookup(m, name, 1, n, 0, &t));
    if (t->dtype != FM_DTYPE_F32)
        return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s must be F32 (is %s)", m->packed->dir, name,
                            fm_dtype_name(t->dtype));
    *v = t->data;
    return FM_OK;
}

static fm_status bind_layer(fm_model *m, int l) {
    const fm_config *c = &m->cfg;
    fm_layer_weights *w = &m->layers[l];
    int64_t H = c->n_embd, nv = c->lin_n_v_heads, vd = fm_config_value_dim(c), cd = fm_config_conv_dim(c);
    int64_t d = c->head_dim;
    TRY(bind_vector(m, &w->input_norm, H, "layers.%d.input_layernorm", l));
    TRY(bind_vector(m, &w->post_attn_norm, H, "layers.%d.post_attention_layernorm", l));
    if (c->layer_kind[l] == FM_LAYER_LINEAR) {
        const fm_packed_tensor *t;
        char name[128];
        TRY(bind_matrix(m, &w->in_qkv, cd, H, "layers.%d.linear_attn.in_proj_qkv", l));
        TRY(bind_matrix(m, &w->in_z, vd, H, "layers.%d.linear_attn.in_proj_z", l));
        TRY(bind_matrix(m, &w->in_b, nv, H, "layers.%d.linear_attn.in_proj_b", l));
        TRY(bind_matrix(m, &w->in_a, nv, H, "layers.%d.linear_attn.in_proj_a", l));
        TRY(bind_matrix(m, &w->out_proj, H, vd, "layers.%d.linear_attn.out_proj", l));
        snprintf(name, sizeof name, "layers.%d.linear_attn.conv1d", l);
        TRY(lookup(m, name, 2, cd, c->conv_kernel, &t));
        if (t->dtype != FM_DTYPE_F32)
            return fm_error_set(FM_ERR_FORMAT, "%s: tensor %s must be F32", m->packed->dir, name);
        w->conv = t->data;
        TRY(bind_vector(m, &w->dt_bias, nv, "layers.%d.linear_attn.dt_bias", l));
        TRY(bind_vector(m, &w->A_log, nv, "layers.%d.linear_attn.A_log", l));
        TRY(bind_vector(m, &w->ssm_norm, c->lin_v_dim, "layers.%d.linear_attn.norm", l));
    } else {
        TRY(bind_matrix(m, &w->q_proj, c->n_head * 2 * d, H, "layers.%d.self_attn.q_proj", l));
        TRY(bind_matrix(m, &w->k_proj, c->n_head_kv * d, H, "layers.%d.self_attn.k_proj", l));
        TRY(bind_matrix(m, &w->v_proj, c->n_head_kv * d, H, "layers.%d.self_attn.v_proj", l));
        TRY(bind_matrix(m, &w->o_proj, H, c->n_head * d, "layers.%d.self_attn.o_proj", l));
        TRY(bind_vector(m, &w->q_norm, d, "layers.%d.self_attn.q_norm", l));
        TRY(bind_vector(m, &w->k_norm, d, "layers.%d.self_attn.k_norm", l));
    }
    TRY(bind_matrix(m, &w->router, c->n_experts, H, "layers.%d.mlp.gate", l));
    if (c->n_ff_shared > 0) {
        TRY(bind_matrix(m, &w->sh_gate, c->n_ff_shared, H, "layers.%d.mlp.shared_expert.gate_proj", l));
        TRY(bind_matrix(m, &w->sh_up, c->n_ff_shared, H, "layers.%d.mlp.shared_expert.up_proj", l));
        TRY(bind_matrix(m, &w->sh_down, H, c->n_ff_shared, "layers.%d.mlp.shared_expert.down_proj", l));
        TRY(bind_matrix(m, &w->sh_router, 1, H, "layers.%d.mlp.shared_expert_gate", l));
    }
    return FM_OK;
}

/* Experts one store request may hold: a decode step's top-k, and room for prefill groups. */
static int store_capacity(const fm_model *m) {
    int k = m->n_experts_used, cap = k < 16 ? 32 : 2 * k;
    return cap > m->cfg.n_experts ? m->cfg.n_experts : cap;
}

/* Checks the memory budget before anything large is touched: the dense weights (mapped, resident
 * once used), the store's buffers, and a reserve for session state and scratch. With a budget and
 * no explicit cache size, the cache gets what is left. */
static fm_status plan_memory(fm_model *m, const fm_model_params *p, fm_store_options *so) {
    uint64_t dense = 0;
    for (size_t i = 0; i < m->packed->n_tensors; i++) dense += m->packed->tensors[i].n_bytes;
    uint64_t stride = m->packed->max_expert_stride, buffers = (uint64_t)store_capacity(m) * stride;
    uint64_t reserve = 64ull << 20; /* session state, scratch, the process itself: a rough floor */
    m->dense_bytes = dense;
    if (!p->mem_budget) return FM_OK;
    char b1[32], b2[32], b3[32], b4[32];
    if (dense + buffers + reserve > p->mem_budget)
        return fm_error_set(FM_ERR_ARG,
                            "memory budget %s is too small: the dense weights alone need %s, expert buffers %s, plus %s "
                            "for state",
                            fm_human_bytes((double)p->mem_budget, b1, sizeof b1), fm_human_bytes((double)dense, b2, sizeof b2),
                            fm_human_bytes((double)buffers, b3, sizeof b3), fm_human_bytes((double)reserve, b4, sizeof b4));
    if (!so->cache_bytes) so->cache_bytes = p->mem_budget - dense - reserve;
    else if (dense + so->cache_bytes + reserve > p->mem_budget)
        return fm_error_set(FM_ERR_ARG, "cache %s + dense weights %s exceed the memory budget %s",
                            fm_human_bytes((double)so->cache_bytes, b1, sizeof b1), fm_human_bytes((double)dense, b2, sizeof b2),
                            fm_human_bytes((double)p->mem_budget, b3, sizeof b3));
    return FM_OK;
}

fm_status fm_model_open(const char *dir, const fm_model_params *params, fm_model **out) {
    *out = NULL;
    fm_model_params p = params ? *params : fm_model_default_params();
    fm_status st;
    fm_model *m = calloc(1, sizeof *m);
    if (!m) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    st = fm_packed_open(dir, &m->packed);
    if (st != FM_OK) goto fail;
    m->cfg = m->packed->config;
    const fm_config *c = &m->cfg;
    m->n_experts_used = c->n_experts_used;
    if (p.n_experts_used < 0 || p.n_experts_used > c->n_experts) {
        st = fm_error_set(FM_ERR_ARG, "experts per token must be between 1 and %d (got %d)", c->n_experts,
                          p.n_experts_used);
        goto fail;
    }
    if (p.n_experts_used > 0) m->n_experts_used = p.n_experts_used;
    m->prefetch = p.prefetch;
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = bind_matrix(m, &m->embed, c->n_vocab, c->n_embd, "embed_tokens")) != FM_OK) goto fail;
    if ((st = bind_matrix(m, &m->lm_head, c->n_vocab, c->n_embd, "lm_head")) != FM_OK) goto fail;
    if ((st = bind_vector(m, &m->out_norm, c->n_embd, "norm")) != FM_OK) goto fail;
    for (int l = 0; l < c->n_layers; l++)
        if ((st = bind_layer(m, l)) != FM_OK) goto fail;
    fm_store_options so = {.engine = p.io_engine, .io_threads = p.io_threads, .cache_bytes = p.cache_bytes};
    const char *fail_at = getenv("FLASHMOE_FAIL_READ_AT"); /* fault injection for tests */
    if (fail_at) so.fail_read_at = strtoll(fail_at, NULL, 10);
    /* experts in the page cache used in place (no copy): on the CPU backend (the GPU path copies
     * from page-locked buffers), not when injected faults test the reads; FLASHMOE_MAP_RESIDENT=0
     * turns it off (measurements) */
    const char *map_env = getenv("FLASHMOE_MAP_RESIDENT");
    so.map_resident = p.backend != FM_BACKEND_CUDA && !so.fail_read_at && !(map_env && !strcmp(map_env, "0"));
    st = plan_memory(m, &p, &so);
    if (st != FM_OK) goto fail;
    st = fm_store_open(m->packed, store_capacity(m), &so, &m->store);
    if (st != FM_OK) goto fail;
    if (m->prefetch < 0) /* FM_PREFETCH_AUTO: speculative reads need cache slots to land in; the
                          * GPU path measured no gain from them (docs/SPEED.md, next-layer hints) */
        m->prefetch = fm_store_cached(m->store) && p.backend != FM_BACKEND_CUDA ? FM_PREFETCH_DEFAULT : 0;
    m->pool = fm_pool_init(p.n_threads);
    if (!m->pool) {
        st = fm_error_set(FM_ERR_NOMEM, "cannot start worker threads");
        goto fail;
    }
    if (p.backend == FM_BACKEND_CUDA && (st = fm_forward_cuda_open(m, &p)) != FM_OK) goto fail;
    *out = m;
    return FM_OK;
fail:
    fm_model_free(m);
    return st;
}

void fm_model_free(fm_model *m) {
    if (!m) return;
    fm_forward_cuda_close(m);
    fm_pool_free(m->pool);
    fm_store_free(m->store);
    free(m->layers);
    fm_packed_close(m->packed);
    free(m);
}
