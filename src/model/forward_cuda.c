/* The forward pass on the GPU (see forward_cuda.h and docs/CUDA.md). The math and the order of
 * operations are those of forward.c; each step is a kernel of src/backend/cuda/ (matmuls in the
 * stored weight layout, layers.cu for the rest). Per layer and chunk of T tokens:
 *
 *   xn = rmsnorm(x) * input_norm
 *   mix = DeltaNet(xn) or gated attention(xn)        (state, KV cache on the device)
 *   x += mix; xn = rmsnorm(x) * post_attn_norm
 *   router logits, softmax + top-k on the device -> the ids and weights to the host (the sync)
 *   shared expert enqueued; the host groups tokens by expert, makes each needed expert resident
 *   in a VRAM slot (hit, or fm_store_request / fm_store_wait + copy), enqueues the experts'
 *   gate/up (one batched launch), SwiGLU, down (one batched launch), then
 *   x += sigmoid(g_s) * shared + sum_j w_j * expert_j                (one fused kernel)
 *
 * Resident mode (every routed expert fits the budget: all uploaded at the first session, a device
 * table of their addresses per layer): a one-token step takes the expert ids from the router's
 * output on the device (fm_cuda_expert_matvec: gate+up in one launch, SwiGLU fused into down,
 * then fm_cuda_moe_combine_topk), the position from device memory, and has no host
 * synchronisation until the logits; from the session's second one-token step on, the whole step
 * (uploads of the embedding row and position, every layer, norm, lm_head) is one CUDA graph,
 * captured once and replayed per token. FLASHMOE_CUDA_RESIDENT=0 / FLASHMOE_CUDA_GRAPH=0 turn
 * either off (for measurements and tests).
 */
#include "model/forward_cuda.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"

#ifndef FM_HAVE_CUDA

static fm_status no_cuda(void) {
    return fm_error_set(FM_ERR_UNSUPPORTED, "--backend cuda: this flashmoe was built without CUDA (rebuild with make CUDA=1)");
}
fm_status fm_forward_cuda_open(fm_model *m, const fm_model_params *p) {
    (void)m, (void)p;
    return no_cuda();
}
void fm_forward_cuda_close(fm_model *m) { (void)m; }
fm_status fm_forward_cuda_session_init(fm_model *m, int64_t n_ctx, fm_layer_timing *timing, double *head_seconds,
                                       fm_cuda_session **out) {
    (void)m, (void)n_ctx, (void)timing, (void)head_seconds;
    *out = NULL;
    return no_cuda();
}
void fm_forward_cuda_session_free(fm_cuda_session *g) { (void)g; }
fm_status fm_forward_cuda_session_reset(fm_cuda_session *g) {
    (void)g;
    return no_cuda();
}
fm_status fm_forward_cuda_eval_chunk(fm_cuda_session *g, int64_t pos0, const int32_t *ids, int64_t T, float *logits,
                                     bool all_logits) {
    (void)g, (void)pos0, (void)ids, (void)T, (void)logits, (void)all_logits;
    return no_cuda();
}
fm_status fm_forward_cuda_eval_greedy(fm_cuda_session *g, int64_t pos0, const int32_t *ids, int64_t T, int32_t *next) {
    (void)g, (void)pos0, (void)ids, (void)T, (void)next;
    return no_cuda();
}
fm_cuda_stats fm_forward_cuda_stats(const fm_model *m) {
    (void)m;
    fm_cuda_stats s = {0};
    return s;
}
void fm_forward_cuda_reset_stats(fm_model *m) { (void)m; }
const char *fm_forward_cuda_device(const fm_model *m) {
    (void)m;
    return "";
}
fm_status fm_forward_cuda_copy_gbs(fm_model *m, double *gbs) {
    (void)m;
    *gbs = 0;
    return no_cuda();
}
fm_status fm_forward_cuda_h2d_gbs(fm_model *m, double *gbs) {
    (void)m;
    *gbs = 0;
    return no_cuda();
}

#else /* FM_HAVE_CUDA */

#include <math.h>

#include "backend/cpu/mixer_kernels.h"
#include "backend/cpu/ops.h"
#include "backend/cuda/cuda_backend.h"
#include "util/progress.h"

#define CHUNK_MAX 512     /* as forward.c's FM_MAX_CHUNK: tokens per eval_chunk */
#define LOGIT_ROWS 16     /* lm_head rows per launch (the device logits buffer holds this many) */
#define DEV_ALIGN 256
#define VRAM_RESERVE (1ull << 30) /* left free when no budget is given */

typedef struct vslot {
    int32_t key;      /* layer * n_experts + expert, -1 = empty */
    uint32_t uses;    /* times needed while resident */
    uint64_t last_use;/* step counter when last needed */
    uint64_t pinned;  /* step that needs it (not evictable during that step) */
    int prev, next;   /* LRU list, least recent first */
} vslot;

typedef struct dense_map {
    const uint8_t *host;
    uint8_t *dev;
    uint64_t n;
} dense_map;

struct fm_cuda_model {
    fm_cuda *ctx;
    uint8_t *dense;           /* device copy of every dense tensor but embed_tokens */
    dense_map *map;           /* per tensor: host pointer -> device pointer */
    size_t n_map;
    uint64_t budget, used;    /* bytes: the budget, and dense + sessions + cache */
    fm_layer_weights *layers; /* device views */
    fm_weight lm_head;
    const float *out_norm;

    /* the expert cache */
    fm_vram_policy policy;
    uint8_t *slots_mem;
    vslot *slots;
    int n_slots, n_filled;
    uint64_t slot_bytes;
    int32_t *index;           /* [n_layers * n_experts] -> slot, -1 if not resident */
    int lru_head, lru_tail;
    uint64_t step;
    fm_cuda_stats stats;
    int sessions;

    /* misses (docs/CUDA.md "Streaming misses") */
    bool overlap;             /* FLASHMOE_CUDA_OVERLAP (default on): copy stream, per-expert events */
    void *pinned;             /* the store's buffer memory, page-locked (NULL: pageable or none) */
    int store_ring;           /* blocks the store's buffer memory holds (0: mmap, no buffers) */
    bool hint_early;          /* FLASHMOE_CUDA_HINT: next-layer guess from layer l's output (late, the
                               * default, as the CPU's --prefetch) or from its MoE input (early) */

    /* resident mode */
    bool want_resident, want_graph; /* FLASHMOE_CUDA_RESIDENT / _GRAPH (default on) */
    bool resident;                  /* slot l * n_experts + e holds expert e of layer l */
    bool dev_moe;                   /* resident and fm_cuda_expert_matvec takes every layer's parts */
    void **table;                   /* device: [n_layers * n_experts] expert block addresses */
};

struct fm_cuda_session {
    fm_model *m;
    fm_cuda_model *g;
    fm_cuda *ctx;
    int64_t n_ctx, cap;
    uint64_t vram;
    fm_layer_timing *timing;
    double *head_seconds;
    float **kc, **vc, **conv, **ssm; /* [n_layers] device */
    float *inv_freq;
    int att_split;     /* fm_cuda_attention_decode's blocks a head (docs/CUDA.md) */
    void *att_scratch; /* its scratch when att_split > 1 (zero-filled) */
    float *x, *xn, *mix, *a, *b, *c, *d, *small, *shl, *logits;
    int32_t *rt;  /* (cap*k) ids, then (cap*k) float weights */
    int32_t *tab; /* (cap*k) token list | (cap*k) rows | (cap*k) float weights */
    float *X, *G, *U, *Y;
    /* host */
    float *h_x;       /* pinned (cap, H) embeddings */
    int32_t *h_tab;   /* pinned, as tab */
    int32_t *h_rt;    /* as rt */
    int64_t *start, *fill;
    int32_t *uniq, *miss_ids, *miss_slot, *tcount;
    /* --prefetch: the next layer's guessed experts (docs/CUDA.md "Next-layer hints") */
    float *gxn, *glog;  /* device: the guess's normed hidden (H), router logits (E) */
    int32_t *gids;      /* device: its top-k ids, then k float weights */
    int32_t *h_guess;   /* pinned: the top-k ids */
    int32_t guess[64];  /* the guessed ids of layer guess_layer (n_guess, for the counters) */
    int n_guess, guess_layer;
    /* one-token steps without host synchronisation (resident mode) */
    int64_t *pos_dev;   /* device: the token's position */
    int64_t *h_pos;     /* pinned */
    float *h_logits;    /* pinned, V floats */
    void *argmax_scratch; /* device: fm_cuda_argmax's */
    int32_t *argmax_dev;  /* device: the greedy step's argmax */
    int32_t *h_argmax;    /* pinned: its copy */
    fm_cuda_graph *graph;
    int dev_steps;      /* one-token device steps run (the graph is captured at the second) */
    bool fold;          /* the one-token step folds its RMSNorms into the products (fold_norms_ok) */
    bool conv_fold;     /* and the DeltaNet conv into in_proj_qkv's epilogue (fold && K <= 8) */
};

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ------------------------------------------------------------------------ open / close */

static const void *to_dev(const fm_cuda_model *g, const void *host) {
    if (!host) return NULL;
    const uint8_t *h = host;
    for (size_t i = 0; i < g->n_map; i++)
        if (h >= g->map[i].host && h < g->map[i].host + g->map[i].n) return g->map[i].dev + (h - g->map[i].host);
    return NULL;
}

#define DEV_W(field)                                                                               \
    do {                                                                                           \
        if (src->field.data && !(dst->field.data = to_dev(g, src->field.data))) goto unmapped;     \
    } while (0)
#define DEV_V(field)                                                                               \
    do {                                                                                           \
        if (src->field && !(dst->field = to_dev(g, src->field))) goto unmapped;                    \
    } while (0)

static fm_status bind_layer(fm_cuda_model *g, const fm_layer_weights *src, fm_layer_weights *dst, int l) {
    *dst = *src;
    DEV_V(input_norm);
    DEV_V(post_attn_norm);
    DEV_W(in_qkv);
    DEV_W(in_z);
    DEV_W(in_b);
    DEV_W(in_a);
    DEV_V(conv);
    DEV_V(dt_bias);
    DEV_V(A_log);
    DEV_V(ssm_norm);
    DEV_W(out_proj);
    DEV_W(q_proj);
    DEV_W(k_proj);
    DEV_W(v_proj);
    DEV_W(o_proj);
    DEV_V(q_norm);
    DEV_V(k_norm);
    DEV_W(router);
    DEV_W(sh_gate);
    DEV_W(sh_up);
    DEV_W(sh_down);
    DEV_W(sh_router);
    return FM_OK;
unmapped:
    return fm_error_set(FM_ERR_FORMAT, "--backend cuda: a weight of layer %d is not a dense tensor", l);
}

void fm_forward_cuda_close(fm_model *m) {
    if (!m || !m->gpu) return;
    fm_cuda_model *g = m->gpu;
    fm_cuda_buf_free(g->ctx, g->table);
    fm_cuda_buf_free(g->ctx, g->slots_mem);
    fm_cuda_buf_free(g->ctx, g->dense);
    fm_cuda_host_unregister(g->ctx, g->pinned); /* before the store frees the memory */
    fm_cuda_free(g->ctx);
    free(g->map);
    free(g->layers);
    free(g->slots);
    free(g->index);
    free(g);
    m->gpu = NULL;
}

fm_status fm_forward_cuda_open(fm_model *m, const fm_model_params *p) {
    const fm_config *c = &m->cfg;
    const fm_packed_model *pm = m->packed;
    char b1[32], b2[32], b3[32];
    fm_status st;
    int n_dev = 0;
    if (fm_cuda_device_count(&n_dev) != FM_OK || n_dev == 0)
        return fm_error_wrap(FM_ERR_UNSUPPORTED, "--backend cuda: no usable CUDA device");
    if (c->head_dim > 512 || c->n_experts > 4096 || c->conv_kernel > 64 || m->n_experts_used > 64)
        return fm_error_set(FM_ERR_UNSUPPORTED,
                            "--backend cuda: head_dim %d, %d experts, conv kernel %d, top-%d: the kernels take at most "
                            "512, 4096, 64, 64",
                            c->head_dim, c->n_experts, c->conv_kernel, m->n_experts_used);
    fm_cuda_model *g = calloc(1, sizeof *g);
    if (!g) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    m->gpu = g;
    g->policy = p->vram_policy;
    g->lru_head = g->lru_tail = -1;
    const char *ev = getenv("FLASHMOE_CUDA_RESIDENT");
    g->want_resident = !(ev && !strcmp(ev, "0"));
    ev = getenv("FLASHMOE_CUDA_GRAPH");
    g->want_graph = !(ev && !strcmp(ev, "0"));
    ev = getenv("FLASHMOE_CUDA_OVERLAP");
    g->overlap = !(ev && !strcmp(ev, "0"));
    ev = getenv("FLASHMOE_CUDA_HINT");
    g->hint_early = ev && !strcmp(ev, "early");
    if ((st = fm_cuda_init(0, &g->ctx)) != FM_OK) goto fail;
    { /* the store's read buffers (and RAM cache) page-locked: misses then go up by DMA from them */
        void *mem = NULL;
        uint64_t mem_bytes = 0;
        fm_store_buffer_memory(m->store, &mem, &mem_bytes);
        g->store_ring = (int)(mem_bytes / pm->max_expert_stride);
        if (g->overlap && mem && fm_cuda_host_register(g->ctx, mem, (size_t)mem_bytes) == FM_OK) g->pinned = mem;
        else if (g->overlap && mem)
            fprintf(stderr, "flashmoe: --backend cuda: the expert buffers stay pageable (%s)\n", fm_last_error());
        g->stats.overlap = g->overlap;
        g->stats.pinned_bytes = g->pinned ? mem_bytes : 0;
    }

    /* the dense tensors but the embedding table, each 256-byte aligned */
    const fm_packed_tensor *emb = fm_packed_find(pm, "embed_tokens");
    g->map = calloc(pm->n_tensors, sizeof *g->map);
    if (!g->map) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    uint64_t total = 0, exact = 0;
    for (size_t i = 0; i < pm->n_tensors; i++) {
        const fm_packed_tensor *t = &pm->tensors[i];
        if (t == emb || !t->n_bytes) continue;
        g->map[g->n_map++] = (dense_map){t->data, (uint8_t *)(uintptr_t)total, t->n_bytes};
        total = align_up(total + t->n_bytes, DEV_ALIGN);
        exact += t->n_bytes;
    }
    uint64_t free_b = 0, total_b = 0;
    if ((st = fm_cuda_mem_info(g->ctx, &free_b, &total_b)) != FM_OK) goto fail;
    g->budget = p->vram_budget ? p->vram_budget : (free_b > VRAM_RESERVE ? free_b - VRAM_RESERVE : 0);
    if (total > g->budget || total > free_b) {
        st = fm_error_set(FM_ERR_NOMEM, "--backend cuda: the dense weights need %s of VRAM but %s %s (device: %s free)",
                          fm_human_bytes((double)total, b1, sizeof b1),
                          p->vram_budget ? "--vram-budget is" : "the default budget is",
                          fm_human_bytes((double)g->budget, b2, sizeof b2), fm_human_bytes((double)free_b, b3, sizeof b3));
        goto fail;
    }
    if ((st = fm_cuda_buf_alloc(g->ctx, total, (void **)&g->dense)) != FM_OK) goto fail;
    g->used = total;
    g->stats.dense_bytes = total;
    g->stats.budget = g->budget;
    for (size_t i = 0; i < g->n_map; i++) {
        g->map[i].dev = g->dense + (uintptr_t)g->map[i].dev;
        if ((st = fm_cuda_buf_upload(g->ctx, g->map[i].dev, g->map[i].host, g->map[i].n)) != FM_OK) goto fail;
    }
    g->layers = calloc((size_t)c->n_layers, sizeof *g->layers);
    if (!g->layers) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int l = 0; l < c->n_layers; l++)
        if ((st = bind_layer(g, &m->layers[l], &g->layers[l], l)) != FM_OK) goto fail;
    g->lm_head = m->lm_head;
    g->lm_head.data = to_dev(g, m->lm_head.data);
    g->out_norm = to_dev(g, m->out_norm);
    if (!g->lm_head.data || !g->out_norm) {
        st = fm_error_set(FM_ERR_FORMAT, "--backend cuda: lm_head or norm is not a dense tensor");
        goto fail;
    }
    g->index = malloc(sizeof(int32_t) * (size_t)c->n_layers * (size_t)c->n_experts);
    if (!g->index) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int64_t i = 0; i < (int64_t)c->n_layers * c->n_experts; i++) g->index[i] = -1;
    for (int l = 0; l < c->n_layers; l++) {
        const fm_packed_expert_layer *L = &pm->experts[l];
        uint64_t end = 0;
        for (int q = 0; q < FM_PART_COUNT; q++)
            if (L->parts[q].offset + L->parts[q].n_bytes > end) end = L->parts[q].offset + L->parts[q].n_bytes;
        if (end > g->slot_bytes) g->slot_bytes = end;
    }
    g->slot_bytes = align_up(g->slot_bytes, DEV_ALIGN);
    g->stats.slot_bytes = g->slot_bytes;
    g->stats.token_bytes = exact; /* every dense tensor on the device (lm_head included) ... */
    for (int l = 0; l < c->n_layers; l++)
        for (int q = 0; q < FM_PART_COUNT; q++) /* ... and the top-k experts of each layer */
            g->stats.token_bytes += (uint64_t)m->n_experts_used * pm->experts[l].parts[q].n_bytes;
    return FM_OK;
fail:
    fm_forward_cuda_close(m);
    return st;
}

const char *fm_forward_cuda_device(const fm_model *m) { return m && m->gpu ? fm_cuda_device_desc(m->gpu->ctx) : ""; }

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

fm_status fm_forward_cuda_copy_gbs(fm_model *m, double *gbs) {
    *gbs = 0;
    if (!m || !m->gpu) return fm_error_set(FM_ERR_ARG, "the model was not opened with --backend cuda");
    fm_cuda *ctx = m->gpu->ctx;
    const size_t n = 256u << 20;
    void *a = NULL, *b = NULL;
    fm_status st = fm_cuda_buf_alloc(ctx, n, &a);
    if (st == FM_OK) st = fm_cuda_buf_alloc(ctx, n, &b);
    if (st == FM_OK) st = fm_cuda_buf_fill(ctx, a, 0x5a, n);
    double ms[5];
    for (int i = -1; st == FM_OK && i < 5; i++) { /* one warm-up */
        double t = 0;
        st = fm_cuda_timer_start(ctx);
        if (st == FM_OK) st = fm_cuda_buf_copy(ctx, b, a, n);
        if (st == FM_OK) st = fm_cuda_timer_stop(ctx, &t);
        if (i >= 0) ms[i] = t;
    }
    fm_cuda_buf_free(ctx, a);
    fm_cuda_buf_free(ctx, b);
    if (st != FM_OK) return st;
    qsort(ms, 5, sizeof *ms, cmp_double);
    *gbs = ms[2] > 0 ? 2.0 * (double)n / (ms[2] * 1e-3) / 1e9 : 0;
    return FM_OK;
}

fm_status fm_forward_cuda_h2d_gbs(fm_model *m, double *gbs) {
    *gbs = 0;
    if (!m || !m->gpu) return fm_error_set(FM_ERR_ARG, "the model was not opened with --backend cuda");
    return fm_cuda_h2d_gbs(m->gpu->ctx, 256u << 20, 5, gbs);
}

fm_cuda_stats fm_forward_cuda_stats(const fm_model *m) {
    fm_cuda_stats s = {0};
    if (!m || !m->gpu) return s;
    s = m->gpu->stats;
    fm_cuda_copy_totals ct;
    if (fm_cuda_copy_stats(m->gpu->ctx, &ct) == FM_OK) { /* waits for the copy stream */
        s.copy_seconds = ct.busy_ms * 1e-3;
        s.copies = ct.copies;
    }
    return s;
}

void fm_forward_cuda_reset_stats(fm_model *m) {
    if (!m || !m->gpu) return;
    fm_cuda_stats *s = &m->gpu->stats;
    s->requested = s->hits = s->misses = s->evictions = s->h2d_bytes = s->dev_steps = s->graph_steps = 0;
    s->upload_seconds = 0;
    (void)fm_cuda_copy_stats_reset(m->gpu->ctx);
}

/* ------------------------------------------------------------------------ session */

/* Device bytes of a session's state and scratch (as session_init allocates them). */
static uint64_t session_bytes(const fm_model *m, int64_t n_ctx, int64_t cap) {
    const fm_config *c = &m->cfg;
    int64_t H = c->n_embd, k = m->n_experts_used, V = c->n_vocab;
    int64_t wide = max64(max64(fm_config_conv_dim(c), 2LL * c->n_head * c->head_dim),
                         max64(max64(c->n_ff_shared, c->n_ff_expert), max64(H, fm_config_value_dim(c))));
    int64_t narrow = max64(2LL * c->lin_n_v_heads, c->n_experts);
    uint64_t b = 0, f = sizeof(float);
    for (int l = 0; l < c->n_layers; l++)
        if (c->layer_kind[l] == FM_LAYER_FULL)
            b += 2 * align_up((uint64_t)n_ctx * (uint64_t)c->n_head_kv * (uint64_t)c->head_dim * f, DEV_ALIGN);
        else
            b += align_up((uint64_t)(c->conv_kernel - 1) * (uint64_t)fm_config_conv_dim(c) * f + f, DEV_ALIGN) +
                 align_up((uint64_t)c->lin_n_v_heads * (uint64_t)c->lin_k_dim * (uint64_t)c->lin_v_dim * f, DEV_ALIGN);
    b += (uint64_t)(3 * cap * H + 4 * cap * wide + cap * narrow + cap + LOGIT_ROWS * V) * f;
    b += (uint64_t)(2 * cap * k + 3 * cap * k) * 4 + (uint64_t)(4 * cap * k * max64(H, c->n_ff_expert)) * f;
    b += (uint64_t)(H + c->n_experts + 2 * k) * f; /* the next-layer guess: gxn, glog, gids */
    int att_split = fm_cuda_attention_decode_splits(m->gpu->ctx, (int)c->n_head, n_ctx);
    b += align_up(fm_cuda_attention_decode_scratch_bytes((int)c->n_head, (int)c->head_dim, att_split), DEV_ALIGN);
    return b + 35 * DEV_ALIGN;
}

void fm_forward_cuda_session_free(fm_cuda_session *s) {
    if (!s) return;
    fm_cuda *ctx = s->ctx;
    /* a diagnostic (docs/CUDA.md), while the graph's buffers still exist: the session is over */
    const char *prof = getenv("FLASHMOE_CUDA_GRAPH_PROFILE");
    if (prof && atoi(prof) > 0 && s->graph && fm_cuda_graph_profile(ctx, s->graph, atoi(prof), stderr) != FM_OK)
        fprintf(stderr, "flashmoe: FLASHMOE_CUDA_GRAPH_PROFILE: %s\n", fm_last_error());
    for (int l = 0; s->kc && l < s->m->cfg.n_layers; l++) {
        fm_cuda_buf_free(ctx, s->kc[l]);
        fm_cuda_buf_free(ctx, s->vc[l]);
        fm_cuda_buf_free(ctx, s->conv[l]);
        fm_cuda_buf_free(ctx, s->ssm[l]);
    }
    float *bufs[] = {s->inv_freq, s->x, s->xn, s->mix, s->a, s->b, s->c, s->d, s->small, s->shl, s->logits,
                     (float *)s->rt, (float *)s->tab, s->X, s->G, s->U, s->Y, s->gxn, s->glog, (float *)s->gids,
                     (float *)s->att_scratch, (float *)s->argmax_scratch, (float *)s->argmax_dev};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) fm_cuda_buf_free(ctx, bufs[i]);
    fm_cuda_graph_free(ctx, s->graph);
    fm_cuda_buf_free(ctx, s->pos_dev);
    fm_cuda_host_free(ctx, s->h_x);
    fm_cuda_host_free(ctx, s->h_tab);
    fm_cuda_host_free(ctx, s->h_pos);
    fm_cuda_host_free(ctx, s->h_logits);
    fm_cuda_host_free(ctx, s->h_argmax);
    fm_cuda_host_free(ctx, s->h_guess);
    free(s->kc);
    free(s->vc);
    free(s->conv);
    free(s->ssm);
    free(s->h_rt);
    free(s->start);
    free(s->fill);
    free(s->uniq);
    free(s->miss_ids);
    free(s->miss_slot);
    free(s->tcount);
    if (s->g) {
        s->g->used -= s->vram;
        s->g->stats.state_bytes -= s->vram;
        s->g->sessions--;
    }
    free(s);
}

fm_status fm_forward_cuda_session_reset(fm_cuda_session *s) {
    const fm_config *c = &s->m->cfg;
    s->guess_layer = -1;
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_kind[l] != FM_LAYER_LINEAR) continue;
        fm_status st = fm_cuda_buf_fill(s->ctx, s->conv[l], 0,
                                        sizeof(float) * (size_t)(c->conv_kernel - 1) * (size_t)fm_config_conv_dim(c));
        if (st == FM_OK)
            st = fm_cuda_buf_fill(s->ctx, s->ssm[l], 0,
                                  sizeof(float) * (size_t)c->lin_n_v_heads * (size_t)c->lin_k_dim * (size_t)c->lin_v_dim);
        if (st != FM_OK) return st;
    }
    return fm_cuda_sync(s->ctx);
}

static void lru_push(fm_cuda_model *g, int i);

/* Bytes of an expert block of layer l up to the end of its last part. */
static uint64_t block_bytes(const fm_packed_expert_layer *L) {
    uint64_t end = 0;
    for (int q = 0; q < FM_PART_COUNT; q++)
        if (L->parts[q].offset + L->parts[q].n_bytes > end) end = L->parts[q].offset + L->parts[q].n_bytes;
    return end;
}

/* True when fm_cuda_expert_matvec takes layer l's parts (gate and up of one shape, every part
 * 16-byte aligned in the block): the one-token step then needs no host synchronisation. */
static bool dev_moe_ok(const fm_model *m, const fm_cuda_model *g, int l) {
    const fm_packed_expert_layer *L = &m->packed->experts[l];
    fm_weight sg = fm_packed_weight(&L->parts[FM_PART_GATE], g->slots_mem),
              su = fm_packed_weight(&L->parts[FM_PART_UP], g->slots_mem),
              sd = fm_packed_weight(&L->parts[FM_PART_DOWN], g->slots_mem);
    for (int q = 0; q < FM_PART_COUNT; q++)
        if (L->parts[q].offset % 16) return false;
    return sg.dtype == su.dtype && sg.rows == su.rows && sg.cols == su.cols && sg.group_size == su.group_size &&
           sg.scale_dtype == su.scale_dtype && m->n_experts_used <= 64 && fm_cuda_expert_matvec_supported(&sg) &&
           fm_cuda_expert_matvec_supported(&sd);
}

/* Resident mode: every expert of every layer into its slot (l * n_experts + e) through the expert
 * store, then the device table of their addresses. Progress on stderr from 1 GB on. */
static fm_status resident_fill(fm_model *m, fm_cuda_model *g) {
    const fm_config *c = &m->cfg;
    int E = c->n_experts, L = c->n_layers, cap = fm_store_capacity(m->store);
    if (cap > E) cap = E;
    if (cap < 1) return fm_error_set(FM_ERR_ARG, "--backend cuda: the expert store takes no request");
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)E);
    void **tab = malloc(sizeof(void *) * (size_t)L * (size_t)E);
    if (!ids || !tab) {
        free(ids);
        free(tab);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    uint64_t total = 0;
    for (int l = 0; l < L; l++) total += (uint64_t)E * block_bytes(&m->packed->experts[l]);
    fm_progress pr;
    fm_progress_init(&pr, "experts to VRAM", total, total >= 1000000000ull);
    fm_status st = FM_OK;
    for (int l = 0; l < L && st == FM_OK; l++) {
        uint64_t bytes = block_bytes(&m->packed->experts[l]);
        for (int e0 = 0; e0 < E && st == FM_OK; e0 += cap) {
            int n = E - e0 < cap ? E - e0 : cap;
            for (int i = 0; i < n; i++) ids[i] = e0 + i;
            st = fm_store_request(m->store, l, ids, n);
            for (int i = 0; st == FM_OK && i < n; i++) {
                const uint8_t *block;
                if ((st = fm_store_wait(m->store, i, &block)) != FM_OK) break;
                int key = l * E + e0 + i;
                double t0 = fm_time_now();
                st = fm_cuda_buf_upload(g->ctx, g->slots_mem + (uint64_t)key * g->slot_bytes, block, bytes);
                g->stats.upload_seconds += fm_time_now() - t0;
                g->stats.requested++;
                g->stats.misses++;
                g->stats.h2d_bytes += bytes;
                fm_progress_add(&pr, bytes);
            }
        }
    }
    fm_progress_finish(&pr);
    for (int key = 0; st == FM_OK && key < L * E; key++) {
        g->slots[key] = (vslot){.key = key, .prev = -1, .next = -1};
        g->index[key] = key;
        lru_push(g, key);
        tab[key] = g->slots_mem + (uint64_t)key * g->slot_bytes;
    }
    if (st == FM_OK) st = fm_cuda_buf_alloc(g->ctx, sizeof(void *) * (size_t)L * (size_t)E, (void **)&g->table);
    if (st == FM_OK) st = fm_cuda_buf_upload(g->ctx, g->table, tab, sizeof(void *) * (size_t)L * (size_t)E);
    free(ids);
    free(tab);
    if (st != FM_OK) return st;
    g->n_filled = L * E;
    g->resident = true;
    g->dev_moe = true;
    for (int l = 0; l < L; l++) g->dev_moe = g->dev_moe && dev_moe_ok(m, g, l);
    return FM_OK;
}

/* True when the one-token step can fold every RMSNorm of x into the products that read it
 * (fm_cuda_mv's norm_w: the input norm into the mixer's input projections, the post-attention norm
 * into the router group) and add the mixer's output projection to x in that product (residual):
 * every such product is taken by the one-token kernel (x: any 16-byte aligned device vector) and
 * the norm weights are 16-byte aligned. Then no norm needs a launch of its own and the MoE's
 * combine only adds (docs/CUDA.md "Norms folded into the products"). FLASHMOE_CUDA_NORM_FOLD=0:
 * never (the launches of before, for measurements). */
static bool fold_norms_ok(const fm_model *m, const fm_cuda_model *g, const float *x) {
    const char *e = getenv("FLASHMOE_CUDA_NORM_FOLD");
    if (e && !strcmp(e, "0")) return false;
    const fm_config *c = &m->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        const fm_layer_weights *w = &g->layers[l];
        const fm_weight *lin[] = {&w->in_qkv, &w->in_z, &w->in_b, &w->in_a, &w->out_proj};
        const fm_weight *att[] = {&w->q_proj, &w->k_proj, &w->v_proj, &w->o_proj};
        const fm_weight *moe[] = {&w->router, &w->sh_gate, &w->sh_up, &w->sh_router};
        const bool is_lin = c->layer_kind[l] == FM_LAYER_LINEAR;
        const fm_weight *const *mixer = is_lin ? lin : att;
        const int n_mixer = is_lin ? 5 : 4, n_moe = c->n_ff_shared > 0 ? 4 : 1;
        for (int i = 0; i < n_mixer; i++)
            if (!fm_cuda_matvec_takes(mixer[i], x)) return false;
        for (int i = 0; i < n_moe; i++)
            if (!fm_cuda_matvec_takes(moe[i], x)) return false;
        if (!w->input_norm || !w->post_attn_norm || (uintptr_t)w->input_norm % 16 || (uintptr_t)w->post_attn_norm % 16)
            return false;
    }
    return true;
}

/* Sizes the expert cache with what the budget leaves once the first session is placed. */
static fm_status cache_init(fm_model *m, fm_cuda_model *g) {
    const fm_config *c = &m->cfg;
    char b1[32], b2[32], b3[32];
    uint64_t free_b = 0;
    fm_status st = fm_cuda_mem_info(g->ctx, &free_b, NULL);
    if (st != FM_OK) return st;
    uint64_t avail = g->budget > g->used ? g->budget - g->used : 0;
    uint64_t dev_avail = free_b > (256ull << 20) ? free_b - (256ull << 20) : 0;
    if (avail > dev_avail) avail = dev_avail;
    uint64_t n = avail / g->slot_bytes, all = (uint64_t)c->n_layers * (uint64_t)c->n_experts;
    if (n > all) n = all;
    if (n > INT32_MAX) n = INT32_MAX;
    if (n < (uint64_t)m->n_experts_used)
        return fm_error_set(FM_ERR_NOMEM,
                            "--backend cuda: the VRAM budget %s leaves %s after the dense weights and session state (%s): "
                            "room for %llu expert slots of %s, at least %d needed",
                            fm_human_bytes((double)g->budget, b1, sizeof b1), fm_human_bytes((double)avail, b2, sizeof b2),
                            fm_human_bytes((double)g->used, b3, sizeof b3), (unsigned long long)n,
                            fm_human_bytes((double)g->slot_bytes, b1, sizeof b1), m->n_experts_used);
    g->slots = calloc((size_t)n, sizeof *g->slots);
    if (!g->slots) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    st = fm_cuda_buf_alloc(g->ctx, (size_t)(n * g->slot_bytes), (void **)&g->slots_mem);
    if (st != FM_OK) {
        free(g->slots);
        g->slots = NULL;
        return st;
    }
    for (uint64_t i = 0; i < n; i++) g->slots[i] = (vslot){.key = -1, .prev = -1, .next = -1};
    g->n_slots = (int)n;
    g->used += n * g->slot_bytes;
    g->stats.slots = (int)n;
    if (g->want_resident && n == all && (st = resident_fill(m, g)) != FM_OK) return st; /* the slots stay (empty) */
    g->stats.resident = g->resident;
    g->stats.graphs = g->dev_moe && g->want_graph;
    return FM_OK;
}

fm_status fm_forward_cuda_session_init(fm_model *m, int64_t n_ctx, fm_layer_timing *timing, double *head_seconds,
                                       fm_cuda_session **out) {
    *out = NULL;
    fm_cuda_model *g = m->gpu;
    const fm_config *c = &m->cfg;
    char b1[32], b2[32], b3[32];
    if (!g) return fm_error_set(FM_ERR_ARG, "the model was not opened with --backend cuda");
    int64_t cap = n_ctx < CHUNK_MAX ? n_ctx : CHUNK_MAX;
    uint64_t need = session_bytes(m, n_ctx, cap);
    if (g->used + need > g->budget)
        return fm_error_set(FM_ERR_NOMEM,
                            "--backend cuda: a session of %lld tokens needs %s of VRAM; with %s in use (dense weights%s) "
                            "the budget %s is exceeded",
                            (long long)n_ctx, fm_human_bytes((double)need, b1, sizeof b1),
                            fm_human_bytes((double)g->used, b2, sizeof b2), g->slots ? ", expert cache, other sessions" : "",
                            fm_human_bytes((double)g->budget, b3, sizeof b3));
    fm_cuda_session *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    s->m = m;
    s->g = g;
    s->ctx = g->ctx;
    s->n_ctx = n_ctx;
    s->cap = cap;
    s->timing = timing;
    s->head_seconds = head_seconds;
    s->guess_layer = -1;
    s->vram = need;
    g->used += need;
    g->stats.state_bytes += need;
    g->sessions++;
    fm_status st = FM_OK;
    size_t L = (size_t)c->n_layers, f = sizeof(float);
    int64_t H = c->n_embd, k = m->n_experts_used, E = c->n_experts, V = c->n_vocab;
    int64_t wide = max64(max64(fm_config_conv_dim(c), 2LL * c->n_head * c->head_dim),
                         max64(max64(c->n_ff_shared, c->n_ff_expert), max64(H, fm_config_value_dim(c))));
    int64_t narrow = max64(2LL * c->lin_n_v_heads, E), ewide = max64(H, c->n_ff_expert);
    s->kc = calloc(L, sizeof(float *));
    s->vc = calloc(L, sizeof(float *));
    s->conv = calloc(L, sizeof(float *));
    s->ssm = calloc(L, sizeof(float *));
    s->h_rt = malloc(sizeof(int32_t) * (size_t)(2 * cap * k));
    s->start = calloc((size_t)E + 1, sizeof(int64_t));
    s->fill = calloc((size_t)E, sizeof(int64_t));
    s->uniq = calloc((size_t)E, sizeof(int32_t));
    s->miss_ids = calloc((size_t)E, sizeof(int32_t));
    s->miss_slot = calloc((size_t)E, sizeof(int32_t));
    s->tcount = calloc((size_t)cap, sizeof(int32_t));
    if (!s->kc || !s->vc || !s->conv || !s->ssm || !s->h_rt || !s->start || !s->fill || !s->uniq || !s->miss_ids ||
        !s->miss_slot || !s->tcount) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
#define DALLOC(p, n)                                                                               \
    do {                                                                                           \
        if ((st = fm_cuda_buf_alloc(s->ctx, (size_t)(n), (void **)&(p))) != FM_OK) goto fail;      \
    } while (0)
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_kind[l] == FM_LAYER_FULL) {
            size_t n = (size_t)n_ctx * (size_t)c->n_head_kv * (size_t)c->head_dim * f;
            DALLOC(s->kc[l], n);
            DALLOC(s->vc[l], n);
        } else {
            DALLOC(s->conv[l], (size_t)(c->conv_kernel - 1) * (size_t)fm_config_conv_dim(c) * f + f);
            DALLOC(s->ssm[l], (size_t)c->lin_n_v_heads * (size_t)c->lin_k_dim * (size_t)c->lin_v_dim * f);
        }
    }
    DALLOC(s->x, cap * H * f);
    DALLOC(s->xn, cap * H * f);
    DALLOC(s->mix, cap * H * f);
    DALLOC(s->a, cap * wide * f);
    DALLOC(s->b, cap * wide * f);
    DALLOC(s->c, cap * wide * f);
    DALLOC(s->d, cap * wide * f);
    DALLOC(s->small, cap * narrow * f);
    DALLOC(s->shl, cap * f);
    DALLOC(s->logits, LOGIT_ROWS * V * f);
    DALLOC(s->rt, 2 * cap * k * 4);
    DALLOC(s->tab, 3 * cap * k * 4);
    DALLOC(s->X, cap * k * ewide * f);
    DALLOC(s->G, cap * k * ewide * f);
    DALLOC(s->U, cap * k * ewide * f);
    DALLOC(s->Y, cap * k * ewide * f);
    DALLOC(s->gxn, H * f);
    DALLOC(s->glog, E * f);
    DALLOC(s->gids, 2 * k * 4);
    DALLOC(s->argmax_scratch, fm_cuda_argmax_scratch_bytes());
    DALLOC(s->argmax_dev, sizeof(int32_t));
    s->att_split = fm_cuda_attention_decode_splits(s->ctx, (int)c->n_head, n_ctx);
    size_t att_bytes = fm_cuda_attention_decode_scratch_bytes((int)c->n_head, (int)c->head_dim, s->att_split);
    if (att_bytes) {
        DALLOC(s->att_scratch, att_bytes);
        if ((st = fm_cuda_buf_fill(s->ctx, s->att_scratch, 0, att_bytes)) != FM_OK) goto fail;
    }
#undef DALLOC
    if (c->rot_dim > 0) {
        float inv[4096];
        int half = c->rot_dim / 2;
        if (half > 4096) {
            st = fm_error_set(FM_ERR_UNSUPPORTED, "--backend cuda: rotary dims %d > 8192", c->rot_dim);
            goto fail;
        }
        for (int i = 0; i < half; i++) /* exactly as fm_cpu_rope_neox */
            inv[i] = (float)(1.0 / pow(c->rope_theta, (double)(2 * i) / (double)c->rot_dim));
        if ((st = fm_cuda_buf_alloc(s->ctx, (size_t)half * f, (void **)&s->inv_freq)) != FM_OK ||
            (st = fm_cuda_buf_upload(s->ctx, s->inv_freq, inv, (size_t)half * f)) != FM_OK)
            goto fail;
    }
    if ((st = fm_cuda_host_alloc(s->ctx, (size_t)(cap * H) * f, (void **)&s->h_x)) != FM_OK ||
        (st = fm_cuda_host_alloc(s->ctx, (size_t)(3 * cap * k) * 4, (void **)&s->h_tab)) != FM_OK ||
        (st = fm_cuda_host_alloc(s->ctx, sizeof(int64_t), (void **)&s->h_pos)) != FM_OK ||
        (st = fm_cuda_host_alloc(s->ctx, (size_t)V * f, (void **)&s->h_logits)) != FM_OK ||
        (st = fm_cuda_host_alloc(s->ctx, sizeof(int32_t), (void **)&s->h_argmax)) != FM_OK ||
        (st = fm_cuda_host_alloc(s->ctx, (size_t)k * 4, (void **)&s->h_guess)) != FM_OK ||
        (st = fm_cuda_buf_alloc(s->ctx, sizeof(int64_t), (void **)&s->pos_dev)) != FM_OK)
        goto fail;
    if ((st = fm_forward_cuda_session_reset(s)) != FM_OK) goto fail;
    if (!g->slots && (st = cache_init(m, g)) != FM_OK) goto fail;
    s->fold = fold_norms_ok(m, g, s->x);
    const char *cf = getenv("FLASHMOE_CUDA_CONV_FOLD"); /* =0: the conv's own launch (measurements) */
    s->conv_fold = s->fold && c->conv_kernel >= 2 && c->conv_kernel <= 8 && !(cf && !strcmp(cf, "0"));
    for (int l = 0; l < c->n_layers; l++) /* a channel a row of in_proj_qkv */
        if (c->layer_kind[l] == FM_LAYER_LINEAR && g->layers[l].in_qkv.rows != fm_config_conv_dim(c)) s->conv_fold = false;
    *out = s;
    return FM_OK;
fail:
    fm_forward_cuda_session_free(s);
    return st;
}

/* ------------------------------------------------------------------------ the expert cache */

static void lru_unlink(fm_cuda_model *g, int i) {
    vslot *sl = &g->slots[i];
    if (sl->prev >= 0) g->slots[sl->prev].next = sl->next;
    else if (g->lru_head == i) g->lru_head = sl->next;
    if (sl->next >= 0) g->slots[sl->next].prev = sl->prev;
    else if (g->lru_tail == i) g->lru_tail = sl->prev;
    sl->prev = sl->next = -1;
}

static void lru_push(fm_cuda_model *g, int i) { /* as the most recent */
    vslot *sl = &g->slots[i];
    sl->prev = g->lru_tail;
    sl->next = -1;
    if (g->lru_tail >= 0) g->slots[g->lru_tail].next = i;
    else g->lru_head = i;
    g->lru_tail = i;
}

static void touch(fm_cuda_model *g, int i) {
    vslot *sl = &g->slots[i];
    sl->uses++;
    sl->last_use = g->step;
    sl->pinned = g->step;
    lru_unlink(g, i);
    lru_push(g, i);
}

/* A slot for a new expert: an empty one while any is left, else the policy's victim among the
 * slots the current step does not need; -1 if every slot is needed by this step. */
static int pick_victim(fm_cuda_model *g) {
    if (g->n_filled < g->n_slots) return g->n_filled++;
    if (g->policy == FM_VRAM_LRU) {
        for (int i = g->lru_head; i >= 0; i = g->slots[i].next)
            if (g->slots[i].pinned != g->step) return i;
        return -1;
    }
    int best = -1;
    double best_score = 0;
    for (int i = 0; i < g->n_slots; i++) { /* as the RAM cache (expert_store.c) */
        const vslot *sl = &g->slots[i];
        if (sl->pinned == g->step) continue;
        double age = (double)(g->step - sl->last_use);
        double score = (double)sl->uses / (1.0 + age / (double)g->n_slots);
        if (best < 0 || score < best_score || (score == best_score && sl->last_use < g->slots[best].last_use)) {
            best = i;
            best_score = score;
        }
    }
    return best;
}

/* Misses j0..n_miss of the current group will not be filled: their slots become empty. */
static void forget_misses(fm_cuda_session *s, int j0, int n_miss) {
    fm_cuda_model *g = s->g;
    for (int i = j0; i < n_miss; i++) {
        vslot *sl = &g->slots[s->miss_slot[i]];
        if (sl->key >= 0) g->index[sl->key] = -1;
        sl->key = -1;
    }
}

/* Places experts ids[0..n) of layer l (n <= n_slots and <= the store's capacity): a hit is used in
 * place; each miss gets a slot (an empty one, else the policy's victim) and is requested from the
 * store, in order: miss j is s->miss_ids[j] -> slot s->miss_slot[j], filled by fetch_miss. slot_of[i]
 * = the slot of ids[i], missed[i] whether it is a miss; *n_miss = the misses. step0: g->step at the layer's host synchronisation;
 * a victim that a group enqueued since then still needs (its kernels may not have run) makes the
 * copy stream wait for the compute stream first. Before the request, the copies of the previous
 * one must be done: they read the store's buffers, which the new request refills. */
static fm_status plan_group(fm_cuda_session *s, int l, const int32_t *ids, int n, int32_t *slot_of, bool *missed,
                            int *n_miss_out, uint64_t step0) {
    fm_model *m = s->m;
    fm_cuda_model *g = s->g;
    const fm_config *c = &m->cfg;
    g->step++;
    int n_miss = 0;
    *n_miss_out = 0;
    for (int i = 0; i < n; i++) {
        int32_t key = (int32_t)(l * c->n_experts + ids[i]);
        int sl = g->index[key];
        g->stats.requested++;
        missed[i] = sl < 0;
        if (sl >= 0) {
            g->stats.hits++;
            touch(g, sl);
            slot_of[i] = sl;
        } else {
            slot_of[i] = -1;
            s->miss_ids[n_miss++] = ids[i];
        }
    }
    if (!n_miss) return FM_OK;
    bool in_use = false;
    for (int i = 0; i < n_miss; i++) {
        int v = pick_victim(g);
        if (v < 0) return fm_error_set(FM_ERR_ARG, "--backend cuda: no free expert slot (internal error)");
        vslot *sl = &g->slots[v];
        if (sl->key >= 0) {
            g->index[sl->key] = -1;
            g->stats.evictions++;
            in_use = in_use || sl->pinned > step0;
        }
        sl->key = (int32_t)(l * c->n_experts + s->miss_ids[i]);
        sl->uses = 0;
        g->index[sl->key] = v;
        touch(g, v);
        s->miss_slot[i] = v;
    }
    for (int a = 0, b = 0; a < n; a++)
        if (slot_of[a] < 0) slot_of[a] = s->miss_slot[b++];
    *n_miss_out = n_miss;
    fm_status st = FM_OK;
    if (g->overlap) {
        st = fm_cuda_copy_sync(s->ctx);
        if (st == FM_OK && in_use) st = fm_cuda_copies_wait_compute(s->ctx);
    }
    if (st == FM_OK) st = fm_store_request(m->store, l, s->miss_ids, n_miss);
    if (st != FM_OK) { /* the new slots hold nothing */
        forget_misses(s, 0, n_miss);
        *n_miss_out = 0;
    }
    return st;
}

/* Waits for miss j of the current group and copies it into its slot: with overlap an enqueued copy
 * on the copy stream (the compute stream waits for it before the expert's kernels), else a
 * synchronous upload. On failure, misses j.. are forgotten (their slots hold nothing). */
static fm_status fetch_miss(fm_cuda_session *s, int l, int j, int n_miss, double *waited) {
    fm_model *m = s->m;
    fm_cuda_model *g = s->g;
    uint64_t bytes = block_bytes(&m->packed->experts[l]);
    const uint8_t *block;
    double t0 = fm_time_now();
    fm_status st = fm_store_wait(m->store, j, &block);
    double t1 = fm_time_now();
    *waited += t1 - t0;
    uint8_t *dst = g->slots_mem + (uint64_t)s->miss_slot[j] * g->slot_bytes;
    if (st == FM_OK) {
        if (g->overlap) {
            st = fm_cuda_copy_upload(s->ctx, dst, block, bytes);
            if (st == FM_OK) st = fm_cuda_compute_wait_copies(s->ctx);
        } else {
            st = fm_cuda_buf_upload(s->ctx, dst, block, bytes);
        }
    }
    g->stats.upload_seconds += fm_time_now() - t1;
    if (st != FM_OK) {
        forget_misses(s, j, n_miss);
        return st;
    }
    g->stats.misses++;
    g->stats.h2d_bytes += bytes;
    return FM_OK;
}

/* ------------------------------------------------------------------------ layers */

#define TRY(expr)                                                                                  \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) return st_;                                                              \
    } while (0)

static bool same_shape(const fm_weight *a, const fm_weight *b) {
    return a->dtype == b->dtype && a->rows == b->rows && a->cols == b->cols && a->group_size == b->group_size &&
           a->scale_dtype == b->scale_dtype;
}

/* out_a = x a^T and out_b = x b^T: one launch when the weights have one shape. */
static fm_status matmul_pair(fm_cuda *ctx, float *out_a, const fm_weight *a, float *out_b, const fm_weight *b,
                             const float *x, int64_t T) {
    if (same_shape(a, b)) {
        fm_cuda_mat mats[2] = {{a->data, x, out_a, T}, {b->data, x, out_b, T}};
        return fm_cuda_matmul_batch(ctx, a, mats, 2);
    }
    TRY(fm_cuda_matmul(ctx, out_a, x, T, a));
    return fm_cuda_matmul(ctx, out_b, x, T, b);
}

static fm_status linear_attention(fm_cuda_session *s, int l, int64_t T) {
    const fm_config *c = &s->m->cfg;
    const fm_layer_weights *w = &s->g->layers[l];
    fm_cuda *ctx = s->ctx;
    int64_t cd = fm_config_conv_dim(c), vd = fm_config_value_dim(c), nv = c->lin_n_v_heads;
    float *qkv = s->a, *conv_out = s->b, *z = s->c, *core = s->d, *bb = s->small, *aa = s->small + T * nv;
    TRY(fm_cuda_matmul(ctx, qkv, s->xn, T, &w->in_qkv));
    TRY(fm_cuda_matmul(ctx, z, s->xn, T, &w->in_z));
    TRY(matmul_pair(ctx, bb, &w->in_b, aa, &w->in_a, s->xn, T));
    TRY(fm_cuda_conv1d_silu(ctx, conv_out, qkv, s->conv[l], w->conv, T, cd, c->conv_kernel));
    TRY(fm_cuda_delta_rule(ctx, core, conv_out, bb, aa, s->ssm[l], w->A_log, w->dt_bias, T, c->lin_n_k_heads, (int)nv,
                           c->lin_k_dim, c->lin_v_dim));
    TRY(fm_cuda_rmsnorm_gated(ctx, core, core, z, w->ssm_norm, T * nv, c->lin_v_dim, (float)c->norm_eps));
    (void)vd;
    return fm_cuda_matmul(ctx, s->mix, core, T, &w->out_proj);
}

static fm_status full_attention(fm_cuda_session *s, int l, int64_t T, int64_t pos0) {
    const fm_config *c = &s->m->cfg;
    const fm_layer_weights *w = &s->g->layers[l];
    fm_cuda *ctx = s->ctx;
    int64_t d = c->head_dim, nh = c->n_head, nkv = c->n_head_kv;
    float *qg = s->a, *kv = s->b, *q = s->c, *att = s->d, eps = (float)c->norm_eps;
    TRY(fm_cuda_matmul(ctx, qg, s->xn, T, &w->q_proj)); /* per head [query (d) | gate (d)] */
    TRY(fm_cuda_head_norm_rope(ctx, q, d, qg, 2 * d, w->q_norm, T, (int)nh, (int)d, eps, c->rot_dim, s->inv_freq, pos0));
    TRY(fm_cuda_matmul(ctx, kv, s->xn, T, &w->k_proj));
    TRY(fm_cuda_head_norm_rope(ctx, s->kc[l] + pos0 * nkv * d, d, kv, d, w->k_norm, T, (int)nkv, (int)d, eps, c->rot_dim,
                               s->inv_freq, pos0));
    TRY(fm_cuda_matmul(ctx, s->vc[l] + pos0 * nkv * d, s->xn, T, &w->v_proj));
    TRY(fm_cuda_attention(ctx, att, q, qg + d, 2 * d, s->kc[l], s->vc[l], T, pos0, (int)nh, (int)nkv, (int)d));
    return fm_cuda_matmul(ctx, s->mix, att, T, &w->o_proj);
}

/* Enqueues the routed experts es[0..n) of layer l (their blocks in slots ss[0..n), ascending id, so
 * their rows s->start[e].. are in ascending order) for the rows gathered in s->X: gate and up in one
 * batched launch (two when their shapes differ), SwiGLU over each run of adjacent rows, down in one
 * batched launch, into s->Y. */
static fm_status experts_compute(fm_cuda_session *s, int l, const int32_t *es, const int32_t *ss, int n) {
    fm_model *m = s->m;
    fm_cuda_model *g = s->g;
    fm_cuda *ctx = s->ctx;
    int64_t H = m->cfg.n_embd, I = m->cfg.n_ff_expert;
    const int64_t *start = s->start;
    const fm_packed_expert_layer *L = &m->packed->experts[l];
    const fm_packed_tensor *pg = &L->parts[FM_PART_GATE], *pu = &L->parts[FM_PART_UP], *pd = &L->parts[FM_PART_DOWN];
    /* shapes only (fm_cuda_matmul_batch ignores their data pointers) */
    fm_weight sg = fm_packed_weight(pg, g->slots_mem), su = fm_packed_weight(pu, g->slots_mem),
              sd = fm_packed_weight(pd, g->slots_mem);
    bool fused = same_shape(&sg, &su);
    fm_cuda_mat mats[FM_CUDA_BATCH_MAX];
    int nm = 0;
    for (int i = 0; i < n; i++) {
        const uint8_t *base = g->slots_mem + (uint64_t)ss[i] * g->slot_bytes;
        int64_t r0 = start[es[i]], nt = start[es[i] + 1] - r0;
        mats[nm++] = (fm_cuda_mat){base + pg->offset, s->X + r0 * H, s->G + r0 * I, nt};
        if (fused) mats[nm++] = (fm_cuda_mat){base + pu->offset, s->X + r0 * H, s->U + r0 * I, nt};
    }
    TRY(fm_cuda_matmul_batch(ctx, &sg, mats, nm));
    if (!fused) {
        for (int i = 0; i < n; i++) {
            int64_t r0 = start[es[i]];
            mats[i] = (fm_cuda_mat){g->slots_mem + (uint64_t)ss[i] * g->slot_bytes + pu->offset, s->X + r0 * H,
                                    s->U + r0 * I, start[es[i] + 1] - r0};
        }
        TRY(fm_cuda_matmul_batch(ctx, &su, mats, n));
    }
    for (int i = 0; i < n;) { /* SwiGLU over runs of adjacent rows */
        int j = i + 1;
        while (j < n && start[es[j]] == start[es[j - 1] + 1]) j++;
        int64_t r_lo = start[es[i]], r_hi = start[es[j - 1] + 1];
        TRY(fm_cuda_swiglu(ctx, s->G + r_lo * I, s->G + r_lo * I, s->U + r_lo * I, (r_hi - r_lo) * I));
        i = j;
    }
    for (int i = 0; i < n; i++) {
        int64_t r0 = start[es[i]];
        mats[i] = (fm_cuda_mat){g->slots_mem + (uint64_t)ss[i] * g->slot_bytes + pd->offset, s->G + r0 * I, s->Y + r0 * H,
                                start[es[i] + 1] - r0};
    }
    return fm_cuda_matmul_batch(ctx, &sd, mats, n);
}

/* --prefetch on the GPU path (docs/CUDA.md "Next-layer hints"), decode only: whether layer l
 * guesses layer l + 1's experts. Not in resident mode (every expert is in VRAM). Late (default):
 * after layer l's combine, from its output, waited for there (one extra host synchronisation a
 * layer); early (FLASHMOE_CUDA_HINT=early): from layer l's residual after the mixer, downloaded
 * with layer l's routing and hinted right after layer l's request, so the reads queue behind it. */
static bool guess_wanted(const fm_cuda_session *s, int l, int64_t T) {
    return T == 1 && s->m->prefetch > 0 && l + 1 < s->m->cfg.n_layers && !s->g->resident;
}

/* Enqueues the guess of layer l + 1's experts: its router applied to s->x normed with its
 * post-attention norm (early: x is layer l's residual after the mixer; late: layer l's output),
 * top-k on the device, the ids downloaded into s->h_guess, there after the next synchronisation. */
static fm_status guess_enqueue(fm_cuda_session *s, int l) {
    const fm_config *c = &s->m->cfg;
    const fm_layer_weights *w1 = &s->g->layers[l + 1];
    int k = s->m->n_experts_used;
    TRY(fm_cuda_add_rmsnorm(s->ctx, s->x, s->gxn, NULL, w1->post_attn_norm, 1, c->n_embd, (float)c->norm_eps));
    TRY(fm_cuda_matmul(s->ctx, s->glog, s->gxn, 1, &w1->router));
    TRY(fm_cuda_router_topk(s->ctx, s->gids, (float *)(s->gids + k), s->glog, 1, (int)c->n_experts, k, false));
    return fm_cuda_download_async(s->ctx, s->h_guess, s->gids, sizeof(int32_t) * (size_t)k);
}

/* With the guess on the host (after a synchronisation): its m->prefetch likeliest experts (the
 * top of the ranking) are kept for the counters, and those not resident in VRAM are hinted to the
 * store (fm_store_hint: read into its RAM cache behind the current request's reads). */
static void guess_hint(fm_cuda_session *s, int l) {
    fm_model *m = s->m;
    const fm_config *c = &m->cfg;
    int n = m->prefetch < m->n_experts_used ? m->prefetch : m->n_experts_used, nh = 0;
    int32_t hint[64];
    for (int i = 0; i < n; i++) {
        int32_t e = s->h_guess[i];
        s->guess[i] = e;
        if (e >= 0 && e < c->n_experts && s->g->index[(int64_t)(l + 1) * c->n_experts + e] < 0) hint[nh++] = e;
    }
    s->n_guess = n;
    s->guess_layer = l + 1;
    if (nh) fm_store_hint(m->store, l + 1, hint, nh);
}

/* x += moe(xn) for the chunk (xn already holds the post-attention norm). */
static fm_status moe(fm_cuda_session *s, int l, int64_t T) {
    fm_model *m = s->m;
    fm_cuda_model *g = s->g;
    const fm_config *c = &m->cfg;
    const fm_layer_weights *w = &g->layers[l];
    fm_cuda *ctx = s->ctx;
    int64_t H = c->n_embd, E = c->n_experts, k = m->n_experts_used;
    fm_layer_timing *tm = &s->timing[l];
    double t_start = fm_time_now();

    /* router: softmax + top-k on the device; ids and weights to the host (the layer's one sync) */
    float *probs = s->small;
    int32_t *ids = s->rt;
    float *tw = (float *)(s->rt + T * k);
    TRY(fm_cuda_matmul(ctx, probs, s->xn, T, &w->router));
    TRY(fm_cuda_router_topk(ctx, ids, tw, probs, T, (int)E, (int)k, c->norm_topk_prob));
    bool guess = guess_wanted(s, l, T);
    if (guess && g->hint_early) TRY(guess_enqueue(s, l)); /* arrives with the download below */
    TRY(fm_cuda_buf_download(ctx, s->h_rt, s->rt, sizeof(int32_t) * (size_t)(2 * T * k)));
    double t_routed = fm_time_now();
    tm->mixer += t_routed - t_start; /* the layer's kernels so far ran until this download returned */
    if (s->guess_layer == l) { /* how good the previous layer's guess for this one was */
        for (int i = 0; T == 1 && i < s->n_guess; i++)
            for (int64_t j = 0; j < k; j++) tm->guessed_right += s->guess[i] == s->h_rt[j];
        tm->guessed += (uint64_t)s->n_guess;
    }
    s->guess_layer = -1;

    /* shared expert, enqueued: y_s = down(silu(gate(xn)) * up(xn)); its gate logit in shl */
    float *ysh = NULL;
    if (c->n_ff_shared > 0) {
        int64_t Is = c->n_ff_shared;
        float *gs = s->a, *us = s->b;
        ysh = s->c;
        if (same_shape(&w->sh_gate, &w->sh_up)) {
            fm_cuda_mat mats[2] = {{w->sh_gate.data, s->xn, gs, T}, {w->sh_up.data, s->xn, us, T}};
            TRY(fm_cuda_matmul_batch(ctx, &w->sh_gate, mats, 2));
        } else {
            TRY(fm_cuda_matmul(ctx, gs, s->xn, T, &w->sh_gate));
            TRY(fm_cuda_matmul(ctx, us, s->xn, T, &w->sh_up));
        }
        TRY(fm_cuda_swiglu(ctx, gs, gs, us, T * Is));
        TRY(fm_cuda_matmul(ctx, ysh, gs, T, &w->sh_down));
        TRY(fm_cuda_matmul(ctx, s->shl, s->xn, T, &w->sh_router));
    }

    /* group (token, weight) pairs by expert: counting sort, as forward.c */
    const int32_t *h_ids = s->h_rt;
    const float *h_w = (const float *)(s->h_rt + T * k);
    int64_t *start = s->start, *fill = s->fill;
    int32_t *uniq = s->uniq;
    int32_t *tok_list = s->h_tab, *rows = s->h_tab + T * k;
    float *rw = (float *)(s->h_tab + 2 * T * k);
    memset(start, 0, sizeof(int64_t) * (size_t)(E + 1));
    memset(fill, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t i = 0; i < T * k; i++) {
        if (h_ids[i] < 0 || h_ids[i] >= E)
            return fm_error_set(FM_ERR_IO, "--backend cuda: layer %d: the router chose expert %d of %lld", l, h_ids[i],
                                (long long)E);
        start[h_ids[i] + 1]++;
    }
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < k; i++) {
            int32_t e = h_ids[t * k + i];
            int64_t at = start[e] + fill[e]++;
            tok_list[at] = (int32_t)t;
        }
    int n_uniq = 0;
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e]) uniq[n_uniq++] = (int32_t)e;
    /* per token, its k (row, weight) pairs in ascending expert id: the CPU's order of accumulation */
    memset(s->tcount, 0, sizeof(int32_t) * (size_t)T);
    for (int u = 0; u < n_uniq; u++) {
        int32_t e = uniq[u];
        for (int64_t r = start[e]; r < start[e + 1]; r++) {
            int32_t t = tok_list[r];
            float wt = 0;
            for (int64_t i = 0; i < k; i++)
                if (h_ids[t * k + i] == e) wt = h_w[t * k + i];
            int64_t j = t * k + s->tcount[t]++;
            rows[j] = (int32_t)r;
            rw[j] = wt;
        }
    }
    TRY(fm_cuda_upload_async(ctx, s->tab, s->h_tab, sizeof(int32_t) * (size_t)(3 * T * k)));
    TRY(fm_cuda_gather_rows(ctx, s->X, s->xn, s->tab, T * k, H));
    double t_grouped = fm_time_now();
    tm->route += t_grouped - t_routed;

    /* routed experts, in groups that fit the cache and the store. With overlap (the default), a
     * group's hits are computed first, in one batch, while the store reads its misses; then miss j
     * is copied on the copy stream as soon as its bytes are in, and its kernels wait for that copy
     * only, so expert j computes while j + 1 is copied and later ones are still being read. */
    int group = g->n_slots < fm_store_capacity(m->store) ? g->n_slots : fm_store_capacity(m->store);
    if (group > FM_CUDA_BATCH_MAX / 2) group = FM_CUDA_BATCH_MAX / 2;
    if (g->overlap && g->store_ring > 0 && group > g->store_ring) group = g->store_ring; /* no buffer reused under a copy */
    int32_t slot_of[FM_CUDA_BATCH_MAX / 2], hit_e[FM_CUDA_BATCH_MAX / 2], hit_s[FM_CUDA_BATCH_MAX / 2];
    bool missed[FM_CUDA_BATCH_MAX / 2];
    double waited = 0;
    uint64_t step0 = g->step; /* every kernel enqueued before this layer's download has run */
    for (int g0 = 0; g0 < n_uniq; g0 += group) {
        int n = n_uniq - g0 < group ? n_uniq - g0 : group, n_miss = 0;
        TRY(plan_group(s, l, uniq + g0, n, slot_of, missed, &n_miss, step0));
        if (guess && g->hint_early && g0 + n >= n_uniq) guess_hint(s, l); /* queued behind this request's reads */
        if (!g->overlap) {
            for (int j = 0; j < n_miss; j++) TRY(fetch_miss(s, l, j, n_miss, &waited));
            TRY(experts_compute(s, l, uniq + g0, slot_of, n));
            continue;
        }
        int nh = 0;
        for (int i = 0; i < n; i++)
            if (!missed[i]) hit_e[nh] = uniq[g0 + i], hit_s[nh++] = slot_of[i];
        fm_status st = nh ? experts_compute(s, l, hit_e, hit_s, nh) : FM_OK;
        for (int j = 0; st == FM_OK && j < n_miss; j++) {
            if ((st = fetch_miss(s, l, j, n_miss, &waited)) != FM_OK) break;
            if ((st = experts_compute(s, l, s->miss_ids + j, s->miss_slot + j, 1)) != FM_OK) forget_misses(s, j + 1, n_miss);
        }
        if (st != FM_OK) return st; /* misses not filled were forgotten */
    }
    TRY(fm_cuda_moe_combine(ctx, s->x, ysh, s->shl, s->Y, s->tab + T * k, (const float *)(s->tab + 2 * T * k), T, (int)k,
                            H));
    if (guess && !g->hint_early) { /* late: from this layer's output, waited for here (as the CPU) */
        TRY(guess_enqueue(s, l));
        TRY(fm_cuda_sync(ctx));
        guess_hint(s, l);
    }
    double t_end = fm_time_now();
    tm->expert_wait += waited;
    tm->expert_compute += t_end - t_grouped - waited;
    tm->experts_used += (uint64_t)n_uniq;
    return FM_OK;
}

/* ---- one token without host synchronisation (resident mode): the position in s->pos_dev ---- */

/* mv[0..n) read the RMSNorm of their x with weights norm_w (fm_cuda_mv's folded norm). */
static void fold_norm(fm_cuda_mv *mv, int n, const float *norm_w, float eps) {
    for (int i = 0; i < n; i++) {
        mv[i].norm_w = norm_w;
        mv[i].norm_eps = eps;
    }
}

/* The mixer's output projection of a: with folded norms x += W a in one product (its residual),
 * else s->mix = W a (added to x by the post-attention norm's launch). */
static fm_status mixer_out_dev(fm_cuda_session *s, const fm_weight *w, const float *a) {
    fm_cuda_mv mv = {.w = w, .x = a, .out = s->fold ? s->x : s->mix, .residual = s->fold ? s->x : NULL};
    return fm_cuda_matvec(s->ctx, &mv, 1);
}

/* linear_attention for one token: the four input projections in one launch (they share xn). */
static fm_status linear_attention_dev(fm_cuda_session *s, int l) {
    const fm_config *c = &s->m->cfg;
    const fm_layer_weights *w = &s->g->layers[l];
    fm_cuda *ctx = s->ctx;
    int64_t cd = fm_config_conv_dim(c), nv = c->lin_n_v_heads;
    float *qkv = s->a, *conv_out = s->b, *z = s->c, *core = s->d, *bb = s->small, *aa = s->small + nv;
    const float *in = s->fold ? s->x : s->xn; /* folded: the input norm inside the products */
    fm_cuda_mv mv[4] = {{.w = &w->in_qkv, .x = in, .out = qkv},
                        {.w = &w->in_z, .x = in, .out = z},
                        {.w = &w->in_b, .x = in, .out = bb},
                        {.w = &w->in_a, .x = in, .out = aa}};
    if (s->fold) fold_norm(mv, 4, w->input_norm, (float)c->norm_eps);
    if (s->conv_fold) { /* the conv and its SiLU in in_proj_qkv's epilogue */
        mv[0].conv_w = w->conv;
        mv[0].conv_state = s->conv[l];
        mv[0].conv_out = conv_out;
        mv[0].conv_k = c->conv_kernel;
    }
    TRY(fm_cuda_matvec(ctx, mv, 4));
    if (!s->conv_fold) TRY(fm_cuda_conv1d_silu(ctx, conv_out, qkv, s->conv[l], w->conv, 1, cd, c->conv_kernel));
    /* the delta rule and the gated norm in one kernel; FLASHMOE_CUDA_DELTA_FUSE=0: two (measurements) */
    static int fuse = -1;
    if (fuse < 0) {
        const char *e = getenv("FLASHMOE_CUDA_DELTA_FUSE");
        fuse = !(e && !strcmp(e, "0"));
    }
    if (fuse) {
        TRY(fm_cuda_delta_rule_gated(ctx, core, conv_out, bb, aa, s->ssm[l], w->A_log, w->dt_bias, z, w->ssm_norm,
                                     (float)c->norm_eps, 1, c->lin_n_k_heads, (int)nv, c->lin_k_dim, c->lin_v_dim));
    } else {
        TRY(fm_cuda_delta_rule(ctx, core, conv_out, bb, aa, s->ssm[l], w->A_log, w->dt_bias, 1, c->lin_n_k_heads,
                               (int)nv, c->lin_k_dim, c->lin_v_dim));
        TRY(fm_cuda_rmsnorm_gated(ctx, core, core, z, w->ssm_norm, nv, c->lin_v_dim, (float)c->norm_eps));
    }
    return mixer_out_dev(s, &w->out_proj, core);
}

static fm_status full_attention_dev(fm_cuda_session *s, int l) {
    const fm_config *c = &s->m->cfg;
    const fm_layer_weights *w = &s->g->layers[l];
    fm_cuda *ctx = s->ctx;
    int64_t d = c->head_dim, nh = c->n_head, nkv = c->n_head_kv;
    float *qg = s->a, *kv = s->b, *q = s->c, *att = s->d, eps = (float)c->norm_eps;
    /* q (per head [query (d) | gate (d)]), k and v: one launch */
    const float *in = s->fold ? s->x : s->xn; /* folded: the input norm inside the products */
    fm_cuda_mv mv[3] = {{.w = &w->q_proj, .x = in, .out = qg},
                        {.w = &w->k_proj, .x = in, .out = kv},
                        {.w = &w->v_proj, .x = in, .out = kv + nkv * d}};
    if (s->fold) fold_norm(mv, 3, w->input_norm, eps);
    TRY(fm_cuda_matvec(ctx, mv, 3));
    /* q / k norms, RoPE, the cache store and the attention in one kernel; FLASHMOE_CUDA_ATT_FUSE=0: four */
    static int fuse = -1;
    if (fuse < 0) {
        const char *e = getenv("FLASHMOE_CUDA_ATT_FUSE");
        fuse = !(e && !strcmp(e, "0"));
    }
    if (fuse) {
        TRY(fm_cuda_attention_decode(ctx, att, qg, kv, w->q_norm, w->k_norm, eps, c->rot_dim, s->inv_freq, s->kc[l],
                                     s->vc[l], s->pos_dev, (int)nh, (int)nkv, (int)d, s->att_split, s->att_scratch));
        return mixer_out_dev(s, &w->o_proj, att);
    }
    TRY(fm_cuda_head_norm_rope_at(ctx, q, 0, d, qg, 2 * d, w->q_norm, 1, (int)nh, (int)d, eps, c->rot_dim, s->inv_freq,
                                  s->pos_dev));
    TRY(fm_cuda_head_norm_rope_at(ctx, s->kc[l], nkv * d, d, kv, d, w->k_norm, 1, (int)nkv, (int)d, eps, c->rot_dim,
                                  s->inv_freq, s->pos_dev));
    TRY(fm_cuda_store_at(ctx, s->vc[l], nkv * d, kv + nkv * d, nkv * d, s->pos_dev));
    TRY(fm_cuda_attention_at(ctx, att, q, qg + d, 2 * d, s->kc[l], s->vc[l], 1, s->pos_dev, (int)nh, (int)nkv, (int)d));
    return mixer_out_dev(s, &w->o_proj, att);
}

/* x += moe(rmsnorm(x) * post_attn_norm) for one token, the expert ids staying on the device (with
 * s->fold the router group normalises x and stores xn for the experts, else xn is the post-attention
 * norm's output); then, with norm_after, xn = rmsnorm(x) * next_norm (the next layer's input norm or
 * the final norm) fused into the combine, else the combine alone (the next layer's products
 * normalise x). */
static fm_status moe_dev(fm_cuda_session *s, int l, bool norm_after, const float *next_norm) {
    fm_model *m = s->m;
    fm_cuda_model *g = s->g;
    const fm_config *c = &m->cfg;
    const fm_layer_weights *w = &g->layers[l];
    fm_cuda *ctx = s->ctx;
    int64_t H = c->n_embd, E = c->n_experts, k = m->n_experts_used, I = c->n_ff_expert;
    int32_t *ids = s->rt;
    float *tw = (float *)(s->rt + k);
    /* the router and the shared expert's gate, up and gate logit share xn: one launch (per type),
     * the shared expert's SwiGLU in its output when the one-token kernel takes gate/up as a pair */
    float *ysh = NULL, *gs = s->a, *us = s->b;
    const float *in = s->fold ? s->x : s->xn;
    fm_cuda_mv mv[4] = {{.w = &w->router, .x = in, .out = s->small}};
    int nmv = 1;
    bool pair = false;
    if (c->n_ff_shared > 0) {
        pair = same_shape(&w->sh_gate, &w->sh_up) && fm_cuda_matvec_takes(&w->sh_gate, in) &&
               fm_cuda_matvec_takes(&w->sh_up, in);
        mv[nmv++] = (fm_cuda_mv){.w = &w->sh_gate, .x = in, .out = gs, .w_up = pair ? &w->sh_up : NULL};
        if (!pair) mv[nmv++] = (fm_cuda_mv){.w = &w->sh_up, .x = in, .out = us};
        mv[nmv++] = (fm_cuda_mv){.w = &w->sh_router, .x = in, .out = s->shl};
    }
    if (s->fold) { /* the post-attention norm in the products; the router's product stores xn */
        fold_norm(mv, nmv, w->post_attn_norm, (float)c->norm_eps);
        mv[0].norm_out = s->xn;
    }
    /* the router's top-k: the same launch's last block (or, FLASHMOE_CUDA_TOPK_FUSE=0, a second
     * launch) */
    TRY(fm_cuda_matvec_topk(ctx, mv, nmv, ids, tw, (int)k, c->norm_topk_prob));
    fm_cuda_mv shd = {0}; /* the shared expert's down: in the routed experts' down launch */
    if (c->n_ff_shared > 0) { /* as moe() */
        ysh = s->c;
        if (!pair) TRY(fm_cuda_swiglu(ctx, gs, gs, us, c->n_ff_shared));
        shd = (fm_cuda_mv){.w = &w->sh_down, .x = gs, .out = ysh};
    }
    const fm_packed_expert_layer *L = &m->packed->experts[l];
    const fm_packed_tensor *pg = &L->parts[FM_PART_GATE], *pu = &L->parts[FM_PART_UP], *pd = &L->parts[FM_PART_DOWN];
    fm_weight sg = fm_packed_weight(pg, g->slots_mem), sd = fm_packed_weight(pd, g->slots_mem); /* shapes */
    const void *const *table = (const void *const *)(g->table + (size_t)l * (size_t)E);
    /* gate+up and down of the k experts (and the shared down) in one launch of clusters where the
     * device and the shapes allow and FLASHMOE_CUDA_FFN asks for it (fm_cuda_expert_ffn, opt-in:
     * slower than the two launches where measured; its parts need parts * H floats a slot of Y) */
    if (!norm_after) {
        /* the combine too, by the last block of each slice of rows; FLASHMOE_CUDA_FFN_COMBINE=0: its
         * own launch (measurements) */
        static int comb = -1;
        if (comb < 0) {
            const char *e = getenv("FLASHMOE_CUDA_FFN_COMBINE");
            comb = !(e && !strcmp(e, "0"));
        }
        const int parts = fm_cuda_expert_ffn_parts(ctx, &sg, &sd, (int)k, ysh ? &shd : NULL, comb);
        if (parts > 0 && k <= 16 && parts * H <= s->cap * max64(H, I)) {
            fm_cuda_expert_ffn_args f = {.table = table, .ids = ids, .k = (int)k, .n_experts = (int)E,
                                         .gate_off = (int64_t)pg->offset, .up_off = (int64_t)pu->offset,
                                         .down_off = (int64_t)pd->offset, .x = s->xn, .out = s->Y,
                                         .combine_x = comb ? s->x : NULL, .shared_logit = s->shl, .weights = tw};
            TRY(fm_cuda_expert_ffn(ctx, &sg, &sd, &f, ysh ? &shd : NULL));
            return comb ? FM_OK : fm_cuda_moe_combine_parts(ctx, s->x, ysh, s->shl, s->Y, ids, tw, (int)k, parts, H);
        }
    }
    /* gate and up of the k experts with the SwiGLU in their output (G = silu(gate) * up), then down;
     * FLASHMOE_CUDA_EMV_OLD=1 keeps the earlier kernel with the SwiGLU in down's input staging */
    static int old_emv = -1;
    if (old_emv < 0) old_emv = getenv("FLASHMOE_CUDA_EMV_OLD") != NULL;
    fm_cuda_expert_mv gu = {.table = table, .ids = ids, .k = (int)k, .n_parts = 2, .n_experts = (int)E,
                            .part_off = {(int64_t)pg->offset, (int64_t)pu->offset}, .x = s->xn, .x_stride = 0,
                            .out = {s->G, s->U}, .out_stride = I, .swiglu_out = !old_emv};
    TRY(fm_cuda_expert_matvec(ctx, &sg, &gu));
    fm_cuda_expert_mv dn = {.table = table, .ids = ids, .k = (int)k, .n_parts = 1, .n_experts = (int)E,
                            .part_off = {(int64_t)pd->offset, 0}, .x = s->G, .x_up = old_emv ? s->U : NULL,
                            .x_stride = I, .out = {s->Y, NULL}, .out_stride = H};
    TRY(fm_cuda_expert_matvec_with(ctx, &sd, &dn, ysh ? &shd : NULL));
    if (!norm_after) return fm_cuda_moe_combine_topk(ctx, s->x, ysh, s->shl, s->Y, ids, tw, 1, (int)k, H);
    return fm_cuda_moe_combine_topk_norm(ctx, s->x, s->xn, next_norm, (float)c->norm_eps, ysh, s->shl, s->Y, ids, tw, 1,
                                         (int)k, H);
}

/* Enqueues one token's step: the embedding row (s->h_x) and position (s->h_pos) up, every layer,
 * and with head the final norm and lm_head into s->logits. No synchronisation, so it can be
 * captured as a graph; the host buffers are read when the step runs. */
static fm_status step_dev(fm_cuda_session *s, bool head) {
    fm_model *m = s->m;
    fm_cuda_model *g = s->g;
    const fm_config *c = &m->cfg;
    fm_cuda *ctx = s->ctx;
    int64_t H = c->n_embd;
    float eps = (float)c->norm_eps;
    TRY(fm_cuda_upload_async(ctx, s->x, s->h_x, sizeof(float) * (size_t)H));
    TRY(fm_cuda_upload_async(ctx, s->pos_dev, s->h_pos, sizeof(int64_t)));
    /* With s->fold every norm of x but the final one is inside the products that read it. Else the
     * first layer's input norm here, and every later norm of x (the next layer's input norm, the
     * final norm) fused into the previous layer's MoE combine. */
    if (!s->fold) TRY(fm_cuda_add_rmsnorm(ctx, s->x, s->xn, NULL, g->layers[0].input_norm, 1, H, eps));
    for (int l = 0; l < c->n_layers; l++) {
        const fm_layer_weights *w = &g->layers[l];
        double t0 = fm_time_now();
        TRY(c->layer_kind[l] == FM_LAYER_LINEAR ? linear_attention_dev(s, l) : full_attention_dev(s, l));
        if (!s->fold) TRY(fm_cuda_add_rmsnorm(ctx, s->x, s->xn, s->mix, w->post_attn_norm, 1, H, eps));
        const bool last = l + 1 == c->n_layers;
        TRY(moe_dev(s, l, last || !s->fold, last ? g->out_norm : g->layers[l + 1].input_norm));
        s->timing[l].mixer += fm_time_now() - t0; /* enqueueing only: the GPU time shows in the head's wait */
    }
    if (!head) return FM_OK;
    return fm_cuda_matmul(ctx, s->logits, s->xn, 1, &g->lm_head); /* mm_fast: faster than the one-token kernel here */
}

/* One token at pos0 in resident mode: eagerly at the session's first such step, then as a replay
 * of the graph captured at the second. logits: NULL or [V]; next: NULL, or the argmax of the
 * logits, found on the device (only 4 bytes come back; -1 when a logit is NaN). */
static fm_status eval_token_dev(fm_cuda_session *s, int64_t pos0, int32_t id, float *logits, int32_t *next) {
    fm_model *m = s->m;
    fm_cuda *ctx = s->ctx;
    const fm_config *c = &m->cfg;
    int64_t V = c->n_vocab, k = m->n_experts_used;
    fm_cpu_get_row(s->h_x, &m->embed, id); /* the previous step has finished reading h_x and h_pos */
    *s->h_pos = pos0;
    for (int l = 0; l < c->n_layers; l++) s->timing[l].experts_used += (uint64_t)k;
    s->g->stats.requested += (uint64_t)(c->n_layers * k); /* all resident: every one a hit */
    s->g->stats.hits += (uint64_t)(c->n_layers * k);
    if (!logits && !next) {
        s->g->stats.dev_steps++;
        TRY(step_dev(s, false));
        return fm_cuda_sync(ctx); /* h_x and h_pos are read by then */
    }
    s->g->stats.dev_steps++;
    if (s->graph) {
        TRY(fm_cuda_graph_launch(ctx, s->graph));
        s->g->stats.graph_steps++;
    } else if (s->g->want_graph && s->dev_steps > 0) { /* the first step ran eagerly (one-time setup) */
        TRY(fm_cuda_capture_begin(ctx));
        fm_status st = step_dev(s, true);
        if (st == FM_OK) st = fm_cuda_capture_end(ctx, &s->graph);
        if (st != FM_OK) {
            fm_cuda_capture_abort(ctx);
            return fm_error_wrap(st, "--backend cuda: capturing the decode step as a CUDA graph");
        }
        TRY(fm_cuda_graph_launch(ctx, s->graph));
        s->g->stats.graph_steps++;
    } else {
        TRY(step_dev(s, true));
    }
    s->dev_steps++;
    double t1 = fm_time_now();
    if (next) {
        TRY(fm_cuda_argmax(ctx, s->argmax_dev, s->logits, V, s->argmax_scratch));
        TRY(fm_cuda_download_async(ctx, s->h_argmax, s->argmax_dev, sizeof(int32_t)));
    } else {
        TRY(fm_cuda_download_async(ctx, s->h_logits, s->logits, sizeof(float) * (size_t)V));
    }
    TRY(fm_cuda_sync(ctx));
    if (next) *next = *s->h_argmax;
    else memcpy(logits, s->h_logits, sizeof(float) * (size_t)V);
    *s->head_seconds += fm_time_now() - t1; /* the wait for the whole step's GPU work */
    return FM_OK;
}

/* A chunk of T tokens at pos0 fits the session's scratch and context. */
static fm_status chunk_check(const fm_cuda_session *s, int64_t pos0, int64_t T) {
    if (T < 1 || T > s->cap || pos0 < 0 || pos0 + T > s->n_ctx)
        return fm_error_set(FM_ERR_ARG, "--backend cuda: a chunk of %lld tokens at %lld (at most %lld, context %lld)",
                            (long long)T, (long long)pos0, (long long)s->cap, (long long)s->n_ctx);
    return FM_OK;
}

fm_status fm_forward_cuda_eval_chunk(fm_cuda_session *s, int64_t pos0, const int32_t *ids, int64_t T, float *logits,
                                     bool all_logits) {
    fm_model *m = s->m;
    fm_cuda_model *g = s->g;
    const fm_config *c = &m->cfg;
    fm_cuda *ctx = s->ctx;
    int64_t H = c->n_embd, V = c->n_vocab;
    float eps = (float)c->norm_eps;
    TRY(chunk_check(s, pos0, T));
    if (T == 1 && g->dev_moe) return eval_token_dev(s, pos0, ids[0], logits, NULL);
    /* the embedding rows, looked up in host memory */
    for (int64_t t = 0; t < T; t++) fm_cpu_get_row(s->h_x + t * H, &m->embed, ids[t]);
    TRY(fm_cuda_upload_async(ctx, s->x, s->h_x, sizeof(float) * (size_t)(T * H)));
    for (int l = 0; l < c->n_layers; l++) {
        const fm_layer_weights *w = &g->layers[l];
        double t0 = fm_time_now();
        TRY(fm_cuda_add_rmsnorm(ctx, s->x, s->xn, NULL, w->input_norm, T, H, eps));
        TRY(c->layer_kind[l] == FM_LAYER_LINEAR ? linear_attention(s, l, T) : full_attention(s, l, T, pos0));
        TRY(fm_cuda_add_rmsnorm(ctx, s->x, s->xn, s->mix, w->post_attn_norm, T, H, eps));
        s->timing[l].mixer += fm_time_now() - t0; /* enqueueing; moe() adds the wait for the GPU */
        TRY(moe(s, l, T));
    }
    if (!logits) return FM_OK;
    double t0 = fm_time_now();
    int64_t first = all_logits ? 0 : T - 1;
    TRY(fm_cuda_add_rmsnorm(ctx, s->x + first * H, s->xn + first * H, NULL, g->out_norm, T - first, H, eps));
    for (int64_t r = first; r < T; r += LOGIT_ROWS) {
        int64_t n = T - r < LOGIT_ROWS ? T - r : LOGIT_ROWS;
        TRY(fm_cuda_matmul(ctx, s->logits, s->xn + r * H, n, &g->lm_head));
        TRY(fm_cuda_buf_download(ctx, logits + (r - first) * V, s->logits, sizeof(float) * (size_t)(n * V)));
    }
    *s->head_seconds += fm_time_now() - t0;
    return FM_OK;
}

fm_status fm_forward_cuda_eval_greedy(fm_cuda_session *s, int64_t pos0, const int32_t *ids, int64_t T, int32_t *next) {
    TRY(chunk_check(s, pos0, T));
    if (T == 1 && s->g->dev_moe) return eval_token_dev(s, pos0, ids[0], NULL, next);
    TRY(fm_forward_cuda_eval_chunk(s, pos0, ids, T, s->h_logits, false)); /* the logits to the host */
    float top;
    *next = (int32_t)fm_cpu_argmax(s->h_logits, s->m->cfg.n_vocab, &top);
    return FM_OK;
}

#endif /* FM_HAVE_CUDA */
