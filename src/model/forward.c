/* The forward pass of the Qwen3.5-MoE / Qwen3-Next family on the CPU, and the session that holds
 * its state. docs/MODEL.md states the math; the comments here say which line is which.
 *
 * One eval processes its tokens in chunks of at most FM_MAX_CHUNK. Per layer it computes the mixer
 * for the whole chunk (matmuls over all tokens; the DeltaNet recurrence runs token by token per
 * value head, which is exactly the recurrent form HF's chunked kernel equals), then routes every
 * token, groups tokens by expert and fetches each needed expert once per chunk. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/mixer_kernels.h"
#include "backend/cpu/ops.h"
#include "model/forward_cuda.h"
#include "model/model.h"
#include "util/error.h"
#include "util/progress.h"

#define FM_MAX_CHUNK 512 /* tokens per prefill chunk: each expert is read at most once per chunk */

/* Experts that serve one token (all of a decode step's, most of a short prompt's) and whose bytes
 * are all in (fm_store_ready_run) are computed EXPERT_BATCH at a time, their gates and ups in one
 * dispatch of the thread pool, then their downs in one (fm_cpu_matvec_many): a 35B-A3B expert's
 * 512 x 2048 Q4 product alone spends about half its time in the dispatch and the ramp.
 * FLASHMOE_EXPERT_BATCH=0 at session init: one expert at a time (measurements). */
#define EXPERT_BATCH (FM_CPU_MV_MANY / 2)

struct fm_session {
    fm_model *m;
    int64_t n_ctx, n_past;
    float **k_cache, **v_cache; /* [n_layers]; full-attention layers: (n_ctx, n_head_kv, head_dim) */
    float **conv_state;         /* [n_layers]; linear layers: (K-1, conv_dim), oldest input first */
    float **ssm_state;          /* [n_layers]; linear layers: (n_v_heads, k_dim, v_dim) */

    /* scratch for one chunk of up to `cap` tokens */
    int64_t cap;
    float *x;      /* (cap, H) residual stream */
    float *xn;     /* (cap, H) normed input of the current block */
    float *mix;    /* (cap, H) output of the current block */
    float *buf_a;  /* (cap, max(conv_dim, 2*n_head*head_dim, n_ff_shared, n_ff_expert, H)) */
    float *buf_b;  /* (cap, same) */
    float *buf_c;  /* (cap, same) */
    float *buf_d;  /* (cap, same) */
    float *small;  /* (cap, max(2*n_v_heads, n_experts)) */
    int32_t *topk_ids; /* (cap, n_experts_used) */
    float *topk_w;     /* (cap, n_experts_used) */
    int32_t *tok_list; /* (cap * n_experts_used) tokens grouped by expert */
    float *tok_w;      /* (cap * n_experts_used) their routing weights */
    int64_t *expert_start; /* (n_experts + 1) */
    int64_t *expert_fill;  /* (n_experts) */
    int32_t *expert_uniq;  /* (n_experts) */
    fm_layer_timing *timing; /* (n_layers) */
    float *guess_logits;     /* (n_experts) prefetch: the next layer's router on this layer's output */
    int32_t *guess;          /* (n_experts_used) the guessed experts */
    int64_t n_guess;
    int guess_layer;         /* the layer guessed for, -1 if none */
    float *eg, *eu, *ey;     /* a batch of single-token experts (EXPERT_BATCH at most): gate / up (I
                              * floats each), down (H) */
    bool expert_batch;       /* FLASHMOE_EXPERT_BATCH is not 0 (read at session init) */
    double head_seconds; /* final norm + lm_head */
    fm_cuda_session *gpu; /* --backend cuda: the state lives on the GPU (forward_cuda.c) */
    float *greedy_logits; /* (n_vocab) fm_session_eval_greedy's on the CPU, allocated at its first call */
};

const fm_layer_timing *fm_session_layer_timing(const fm_session *s, int layer) { return &s->timing[layer]; }

double fm_session_head_seconds(const fm_session *s) { return s->head_seconds; }

void fm_session_reset_timing(fm_session *s) {
    memset(s->timing, 0, sizeof *s->timing * (size_t)s->m->cfg.n_layers);
    s->head_seconds = 0;
}

/* ------------------------------------------------------------------------ session lifetime */

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

static fm_status reserve(fm_session *s, int64_t T) {
    if (T <= s->cap) return FM_OK;
    const fm_config *c = &s->m->cfg;
    int64_t H = c->n_embd, k = s->m->n_experts_used;
    int64_t wide = max_i64(max_i64(fm_config_conv_dim(c), 2LL * c->n_head * c->head_dim),
                           max_i64(max_i64(c->n_ff_shared, c->n_ff_expert), H));
    wide = max_i64(wide, fm_config_value_dim(c));
    int64_t narrow = max_i64(2LL * c->lin_n_v_heads, c->n_experts);
#define GROW(p, n)                                                                                 \
    do {                                                                                           \
        void *np_ = realloc(p, (size_t)(n) * sizeof(*(p)));                                        \
        if (!np_) return fm_error_set(FM_ERR_NOMEM, "out of memory for a batch of %lld tokens", (long long)T); \
        p = np_;                                                                                   \
    } while (0)
    GROW(s->x, T * H);
    GROW(s->xn, T * H);
    GROW(s->mix, T * H);
    GROW(s->buf_a, T * wide);
    GROW(s->buf_b, T * wide);
    GROW(s->buf_c, T * wide);
    GROW(s->buf_d, T * wide);
    GROW(s->small, T * narrow);
    GROW(s->topk_ids, T * k);
    GROW(s->topk_w, T * k);
    GROW(s->tok_list, T * k);
    GROW(s->tok_w, T * k);
#undef GROW
    s->cap = T;
    return FM_OK;
}

fm_status fm_session_init(fm_model *m, int64_t n_ctx, fm_session **out) {
    *out = NULL;
    const fm_config *c = &m->cfg;
    if (n_ctx < 1) return fm_error_set(FM_ERR_ARG, "context size must be at least 1 (got %lld)", (long long)n_ctx);
    fm_session *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    s->m = m;
    s->n_ctx = n_ctx;
    size_t L = (size_t)c->n_layers;
    s->k_cache = calloc(L, sizeof(float *));
    s->v_cache = calloc(L, sizeof(float *));
    s->conv_state = calloc(L, sizeof(float *));
    s->ssm_state = calloc(L, sizeof(float *));
    s->expert_start = calloc((size_t)c->n_experts + 1, sizeof(int64_t));
    s->expert_fill = calloc((size_t)c->n_experts, sizeof(int64_t));
    s->expert_uniq = calloc((size_t)c->n_experts, sizeof(int32_t));
    s->timing = calloc(L, sizeof *s->timing);
    s->guess_logits = calloc((size_t)c->n_experts, sizeof(float));
    s->guess = calloc((size_t)c->n_experts, sizeof(int32_t));
    s->guess_layer = -1;
    const char *batch_env = getenv("FLASHMOE_EXPERT_BATCH");
    s->expert_batch = !(batch_env && !strcmp(batch_env, "0"));
    s->eg = malloc(sizeof(float) * EXPERT_BATCH * (size_t)c->n_ff_expert);
    s->eu = malloc(sizeof(float) * EXPERT_BATCH * (size_t)c->n_ff_expert);
    s->ey = malloc(sizeof(float) * EXPERT_BATCH * (size_t)c->n_embd);
    if (!s->k_cache || !s->v_cache || !s->conv_state || !s->ssm_state || !s->expert_start || !s->expert_fill ||
        !s->expert_uniq || !s->timing || !s->guess_logits || !s->guess || !s->eg || !s->eu || !s->ey)
        goto nomem;
    if (m->gpu) { /* CUDA backend: no CPU state */
        fm_status st = fm_forward_cuda_session_init(m, n_ctx, s->timing, &s->head_seconds, &s->gpu);
        if (st != FM_OK) fm_session_free(s);
        else *out = s;
        return st;
    }
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_kind[l] == FM_LAYER_FULL) {
            size_t n = (size_t)n_ctx * (size_t)c->n_head_kv * (size_t)c->head_dim;
            s->k_cache[l] = malloc(n * sizeof(float));
            s->v_cache[l] = malloc(n * sizeof(float));
            if (!s->k_cache[l] || !s->v_cache[l]) goto nomem;
        } else {
            s->conv_state[l] = calloc((size_t)(c->conv_kernel - 1) * (size_t)fm_config_conv_dim(c) + 1, sizeof(float));
            s->ssm_state[l] = calloc((size_t)c->lin_n_v_heads * (size_t)c->lin_k_dim * (size_t)c->lin_v_dim, sizeof(float));
            if (!s->conv_state[l] || !s->ssm_state[l]) goto nomem;
        }
    }
    *out = s;
    return FM_OK;
nomem:
    fm_session_free(s);
    return fm_error_set(FM_ERR_NOMEM, "out of memory for a session of %lld tokens", (long long)n_ctx);
}

void fm_session_free(fm_session *s) {
    if (!s) return;
    fm_forward_cuda_session_free(s->gpu);
    free(s->greedy_logits);
    for (int l = 0; s->k_cache && l < s->m->cfg.n_layers; l++) {
        free(s->k_cache[l]);
        free(s->v_cache[l]);
        free(s->conv_state[l]);
        free(s->ssm_state[l]);
    }
    free(s->k_cache);
    free(s->v_cache);
    free(s->conv_state);
    free(s->ssm_state);
    free(s->x);
    free(s->xn);
    free(s->mix);
    free(s->buf_a);
    free(s->buf_b);
    free(s->buf_c);
    free(s->buf_d);
    free(s->eg);
    free(s->eu);
    free(s->ey);
    free(s->small);
    free(s->topk_ids);
    free(s->topk_w);
    free(s->tok_list);
    free(s->tok_w);
    free(s->expert_start);
    free(s->expert_fill);
    free(s->expert_uniq);
    free(s->timing);
    free(s->guess_logits);
    free(s->guess);
    free(s);
}

void fm_session_reset(fm_session *s) {
    const fm_config *c = &s->m->cfg;
    s->n_past = 0;
    s->guess_layer = -1;
    if (s->gpu) { /* an asynchronous fault shows at the next eval */
        (void)fm_forward_cuda_session_reset(s->gpu);
        return;
    }
    for (int l = 0; l < c->n_layers; l++) {
        if (c->layer_kind[l] != FM_LAYER_LINEAR) continue;
        memset(s->conv_state[l], 0, sizeof(float) * (size_t)(c->conv_kernel - 1) * (size_t)fm_config_conv_dim(c));
        memset(s->ssm_state[l], 0, sizeof(float) * (size_t)c->lin_n_v_heads * (size_t)c->lin_k_dim * (size_t)c->lin_v_dim);
    }
}

int64_t fm_session_n_past(const fm_session *s) { return s->n_past; }

fm_model *fm_session_model(const fm_session *s) { return s->m; }

/* ------------------------------------------------------------------------ Gated DeltaNet */

typedef struct delta_job {
    fm_session *s;
    const fm_layer_weights *w;
    int layer;
    int64_t T;
    const float *conv_out; /* (T, conv_dim): silu(conv(qkv)) */
    const float *z;        /* (T, value_dim) */
    const float *ba;       /* (T, 2*nv): b then a */
    float *core;           /* (T, value_dim) output, gated-normed */
} delta_job;

/* The delta rule for value heads [h0, h1), all T tokens in order:
 *   q, k = l2norm(q), l2norm(k) (eps 1e-6 inside the rsqrt of the sum); q *= dk^-1/2
 *   g = -exp(A_log) * softplus(a + dt_bias); beta = sigmoid(b)
 *   S = exp(g) S;  d = beta (v - S^T k);  S += k d^T;  o = S^T q
 *   o = rmsnorm(o) * w_norm * silu(z)                                     (per head, over dv) */
static void delta_heads(void *arg, int64_t h0, int64_t h1) {
    const delta_job *j = arg;
    const fm_config *c = &j->s->m->cfg;
    int64_t dk = c->lin_k_dim, dv = c->lin_v_dim, nv = c->lin_n_v_heads, r = nv / c->lin_n_k_heads;
    int64_t kd = fm_config_key_dim(c), vd = fm_config_value_dim(c), cd = fm_config_conv_dim(c);
    float qn[1024], kn[1024]; /* dk <= 1024 checked at open */
    float q_scale = 1.0f / sqrtf((float)dk);
    for (int64_t h = h0; h < h1; h++) {
        float *S = j->s->ssm_state[j->layer] + h * dk * dv; /* (dk, dv) */
        int64_t g = h / r;
        float A = -expf(j->w->A_log[h]);
        for (int64_t t = 0; t < j->T; t++) {
            const float *row = j->conv_out + t * cd;
            const float *q = row + g * dk, *k = row + kd + g * dk, *v = row + 2 * kd + h * dv;
            float sq = 0, sk = 0;
            for (int64_t i = 0; i < dk; i++) {
                sq += q[i] * q[i];
                sk += k[i] * k[i];
            }
            float iq = 1.0f / sqrtf(sq + 1e-6f), ik = 1.0f / sqrtf(sk + 1e-6f);
            for (int64_t i = 0; i < dk; i++) {
                qn[i] = q[i] * iq * q_scale;
                kn[i] = k[i] * ik;
            }
            float b = j->ba[t * 2 * nv + h], a = j->ba[t * 2 * nv + nv + h];
            float decay = expf(A * fm_softplus(a + j->w->dt_bias[h]));
            float beta = fm_sigmoid(b);
            float *o = j->core + t * vd + h * dv;
            fm_cpu_delta_rule_token(S, dk, dv, kn, qn, v, decay, beta, o);
            fm_cpu_rmsnorm(o, o, j->w->ssm_norm, dv, c->norm_eps);
            const float *z = j->z + t * vd + h * dv;
            for (int64_t jj = 0; jj < dv; jj++) o[jj] *= fm_silu(z[jj]);
        }
    }
}

typedef struct conv_job {
    const float *w;     /* (cd, K) */
    const float *state; /* (K-1, cd) the previous raw inputs, oldest first */
    const float *qkv;   /* (T, cd) */
    float *out;         /* (T, cd) */
    int64_t T, cd, K;
} conv_job;

/* Channels [c0, c1) of the causal depthwise conv over [state (K-1 rows) ; qkv (T rows)], then SiLU:
 * y[t, ch] = silu(sum_{j<K} W[ch, j] * seq[t + j, ch]). */
static void conv_channels(void *arg, int64_t c0, int64_t c1) {
    const conv_job *j = arg;
    int64_t K = j->K, cd = j->cd;
    for (int64_t t = 0; t < j->T; t++) {
        for (int64_t ch = c0; ch < c1; ch++) {
            const float *wc = j->w + ch * K;
            float acc = 0;
            for (int64_t jj = 0; jj < K; jj++) {
                int64_t idx = t + jj - (K - 1); /* index into qkv; negative = state row K-1+idx */
                float v = idx >= 0 ? j->qkv[idx * cd + ch] : j->state[(K - 1 + idx) * cd + ch];
                acc += wc[jj] * v;
            }
            j->out[t * cd + ch] = fm_silu(acc);
        }
    }
}

/* out[i] (T, W_i.rows) = x (T, cols) W_i^T for n <= 4 products of one input: one token in one
 * dispatch of the pool (fm_cpu_matvec_many, bit-identical), more tokens one matmul each. */
static void matmul_one_input(fm_pool *pool, const float *x, int64_t T, int n, float *const *out, const fm_weight *const *w) {
    if (T == 1) {
        fm_cpu_mv mv[4];
        for (int i = 0; i < n; i++) mv[i] = (fm_cpu_mv){out[i], x, w[i]};
        fm_cpu_matvec_many(pool, mv, n);
        return;
    }
    for (int i = 0; i < n; i++) fm_cpu_matmul(pool, out[i], x, T, w[i]);
}

/* out (T, H) = GatedDeltaNet(xn (T, H)); updates the layer's conv and recurrent state. */
static fm_status linear_attention(fm_session *s, int l, int64_t T, const float *xn, float *out) {
    const fm_config *c = &s->m->cfg;
    const fm_layer_weights *w = &s->m->layers[l];
    fm_pool *pool = s->m->pool;
    int64_t cd = fm_config_conv_dim(c), vd = fm_config_value_dim(c), nv = c->lin_n_v_heads, K = c->conv_kernel;
    float *qkv = s->buf_a, *conv_out = s->buf_b, *z = s->buf_c, *core = s->buf_d, *ba = s->small;
    /* b and a side by side per token: (T, 2*nv) */
    float *b_tmp = core, *a_tmp = core + T * nv; /* core is free until the recurrence */
    matmul_one_input(pool, xn, T, 4, (float *const[]){qkv, z, b_tmp, a_tmp},
                     (const fm_weight *const[]){&w->in_qkv, &w->in_z, &w->in_b, &w->in_a});
    for (int64_t t = 0; t < T; t++) {
        memcpy(ba + t * 2 * nv, b_tmp + t * nv, sizeof(float) * (size_t)nv);
        memcpy(ba + t * 2 * nv + nv, a_tmp + t * nv, sizeof(float) * (size_t)nv);
    }
    float *state = s->conv_state[l];
    conv_job cj = {w->conv, state, qkv, conv_out, T, cd, K};
    fm_pool_run(pool, conv_channels, &cj, cd, 256);
    /* keep the last K-1 raw inputs (reads run ahead of writes, so in-place is safe) */
    for (int64_t i = 0; i < K - 1; i++) {
        int64_t src = T + i; /* index into [state ; qkv] */
        if (src < K - 1) memcpy(state + i * cd, state + src * cd, sizeof(float) * (size_t)cd);
        else memcpy(state + i * cd, qkv + (src - (K - 1)) * cd, sizeof(float) * (size_t)cd);
    }
    delta_job j = {s, w, l, T, conv_out, z, ba, core};
    fm_pool_run(pool, delta_heads, &j, nv, 1);
    fm_cpu_matmul(pool, out, core, T, &w->out_proj);
    (void)vd;
    return FM_OK;
}

/* ------------------------------------------------------------------------ gated attention */

typedef struct attn_job {
    fm_session *s;
    int layer;
    int64_t T, pos0;
    const float *q;    /* (T, n_head, d) normed, rotated */
    const float *gate; /* (T, n_head, d) */
    float *att;        /* (T, n_head, d) */
} attn_job;

/* Causal softmax attention for heads [h0, h1) with a one-pass (online) softmax:
 * att = sum_p softmax_p(q.k_p / sqrt(d)) v_p  over p <= pos, then att *= sigmoid(gate). */
static void attn_heads(void *arg, int64_t h0, int64_t h1) {
    const attn_job *j = arg;
    const fm_config *c = &j->s->m->cfg;
    int64_t d = c->head_dim, nh = c->n_head, nkv = c->n_head_kv, group = nh / nkv;
    const float *kc = j->s->k_cache[j->layer], *vc = j->s->v_cache[j->layer];
    float scale = 1.0f / sqrtf((float)d);
    for (int64_t h = h0; h < h1; h++) {
        int64_t kvh = h / group;
        for (int64_t t = 0; t < j->T; t++) {
            const float *q = j->q + (t * nh + h) * d;
            float *o = j->att + (t * nh + h) * d;
            float m = -INFINITY, sum = 0;
            for (int64_t i = 0; i < d; i++) o[i] = 0;
            for (int64_t p = 0; p <= j->pos0 + t; p++) { /* online softmax */
                const float *k = kc + (p * nkv + kvh) * d, *v = vc + (p * nkv + kvh) * d;
                float sc = fm_cpu_dot(q, k, d) * scale, rescale = 1;
                if (sc > m) {
                    rescale = expf(m - sc);
                    sum *= rescale;
                    m = sc;
                }
                float e = expf(sc - m);
                sum += e;
                fm_cpu_scale_axpy(o, rescale, e, v, d);
            }
            const float *g = j->gate + (t * nh + h) * d;
            for (int64_t i = 0; i < d; i++) o[i] = o[i] / sum * fm_sigmoid(g[i]);
        }
    }
}

static fm_status full_attention(fm_session *s, int l, int64_t T, const float *xn, float *out) {
    const fm_config *c = &s->m->cfg;
    const fm_layer_weights *w = &s->m->layers[l];
    fm_pool *pool = s->m->pool;
    int64_t d = c->head_dim, nh = c->n_head, nkv = c->n_head_kv, pos0 = s->n_past;
    /* k then v in buf_b: (T, nkv, d) each (buf_b's width is at least 2 * n_head * d) */
    float *qg = s->buf_a, *kv = s->buf_b, *vv = s->buf_b + T * nkv * d, *q = s->buf_c, *gate = s->buf_d;
    matmul_one_input(pool, xn, T, 3, (float *const[]){qg, kv, vv},
                     (const fm_weight *const[]){&w->q_proj, &w->k_proj, &w->v_proj});
    /* q_proj rows per head: [query (d) | gate (d)] */
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < nh; h++) {
            const float *src = qg + (t * nh + h) * 2 * d;
            float *qd = q + (t * nh + h) * d;
            memcpy(gate + (t * nh + h) * d, src + d, sizeof(float) * (size_t)d);
            fm_cpu_rmsnorm(qd, src, w->q_norm, d, c->norm_eps);
            fm_cpu_rope_neox(qd, c->rot_dim, pos0 + t, c->rope_theta);
        }
    float *kc = s->k_cache[l], *vc = s->v_cache[l];
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < nkv; h++) {
            float *dst = kc + ((pos0 + t) * nkv + h) * d;
            fm_cpu_rmsnorm(dst, kv + (t * nkv + h) * d, w->k_norm, d, c->norm_eps);
            fm_cpu_rope_neox(dst, c->rot_dim, pos0 + t, c->rope_theta);
        }
    memcpy(vc + pos0 * nkv * d, vv, sizeof(float) * (size_t)(T * nkv * d));
    float *att = s->buf_a; /* q_proj output no longer needed */
    attn_job j = {s, l, T, pos0, q, gate, att};
    fm_pool_run(pool, attn_heads, &j, nh, 1);
    fm_cpu_matmul(pool, out, att, T, &w->o_proj);
    return FM_OK;
}

/* ------------------------------------------------------------------------ MoE */

/* Decode with --prefetch: guesses layer l+1's experts by applying its router to xn (layer l's output
 * normed with layer l+1's post-attention norm: the next mixer's contribution is not known yet), the
 * m->prefetch likeliest into s->guess, for fm_store_hint. */
static void guess_next_layer(fm_session *s, int l, const float *xn) {
    fm_model *m = s->m;
    const fm_config *c = &m->cfg;
    if (l + 1 >= c->n_layers) return;
    int64_t E = c->n_experts, n = m->prefetch < m->n_experts_used ? m->prefetch : m->n_experts_used;
    float *g = s->guess_logits;
    fm_cpu_matmul(m->pool, g, xn, 1, &m->layers[l + 1].router);
    for (int64_t i = 0; i < n; i++) { /* the top n of the logits = the top n of the softmax */
        int32_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            bool taken = false;
            for (int64_t q = 0; q < i; q++) taken |= s->guess[q] == e;
            if (!taken && (best < 0 || g[e] > g[best])) best = (int32_t)e;
        }
        s->guess[i] = best;
    }
    s->n_guess = n;
    s->guess_layer = l + 1;
}

/* out (T, H) = sum over each token's top-k experts of w * SwiGLU_e(xn) + sigmoid(xn . g_s) SwiGLU_shared(xn). */

/* Experts ids[0..nb) of layer l (blocks: their bytes) that each serve one token (xn's row and
 * weight from the chunk's token lists): out[token] += w * expert(xn[token]) in that order, the
 * gates and ups of all in one dispatch of the pool, then the downs in one (fm_cpu_matvec_many;
 * bit-identical to one expert at a time). nb <= EXPERT_BATCH. */
static void experts_single_token(fm_session *s, int l, const int32_t *ids, const uint8_t *const *blocks, int nb,
                                 const float *xn, float *out) {
    fm_model *m = s->m;
    const fm_config *c = &m->cfg;
    const fm_packed_expert_layer *L = &m->packed->experts[l];
    const int64_t H = c->n_embd, I = c->n_ff_expert;
    fm_weight wg[EXPERT_BATCH], wu[EXPERT_BATCH], wd[EXPERT_BATCH];
    fm_cpu_mv mv[2 * EXPERT_BATCH];
    for (int j = 0; j < nb; j++) {
        const float *x = xn + (int64_t)s->tok_list[s->expert_start[ids[j]]] * H;
        wg[j] = fm_packed_weight(&L->parts[FM_PART_GATE], blocks[j]);
        wu[j] = fm_packed_weight(&L->parts[FM_PART_UP], blocks[j]);
        wd[j] = fm_packed_weight(&L->parts[FM_PART_DOWN], blocks[j]);
        mv[2 * j] = (fm_cpu_mv){s->eg + j * I, x, &wg[j]};
        mv[2 * j + 1] = (fm_cpu_mv){s->eu + j * I, x, &wu[j]};
    }
    fm_cpu_matvec_many(m->pool, mv, 2 * nb);
    fm_store_poll(m->store); /* later experts' reads go on while these compute */
    for (int64_t q = 0; q < nb * I; q++) s->eg[q] = fm_silu(s->eg[q]) * s->eu[q];
    for (int j = 0; j < nb; j++) mv[j] = (fm_cpu_mv){s->ey + j * H, s->eg + j * I, &wd[j]};
    fm_cpu_matvec_many(m->pool, mv, nb);
    for (int j = 0; j < nb; j++) {
        const int64_t at = s->expert_start[ids[j]];
        const float wt = s->tok_w[at], *y = s->ey + j * H;
        float *o = out + (int64_t)s->tok_list[at] * H;
        for (int64_t q = 0; q < H; q++) o[q] += wt * y[q];
    }
}

static fm_status moe(fm_session *s, int l, int64_t T, const float *xn, float *out) {
    fm_model *m = s->m;
    const fm_config *c = &m->cfg;
    const fm_layer_weights *w = &m->layers[l];
    fm_pool *pool = m->pool;
    int64_t H = c->n_embd, E = c->n_experts, k = m->n_experts_used, I = c->n_ff_expert;

    double t_start = fm_time_now();
    /* router: softmax over all experts in f32, top-k, renormalise */
    float *probs = s->small;
    fm_cpu_matmul(pool, probs, xn, T, &w->router);
    for (int64_t t = 0; t < T; t++) {
        float *p = probs + t * E, mx = -INFINITY, sum = 0;
        for (int64_t e = 0; e < E; e++) mx = p[e] > mx ? p[e] : mx;
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        int32_t *ids = s->topk_ids + t * k;
        float *tw = s->topk_w + t * k, tsum = 0;
        for (int64_t i = 0; i < k; i++) { /* k passes of max-selection: ties go to the lower id */
            int32_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                bool taken = false;
                for (int64_t q = 0; q < i; q++) taken |= ids[q] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = (int32_t)e;
            }
            ids[i] = best;
            tw[i] = p[best];
            tsum += p[best];
        }
        if (c->norm_topk_prob)
            for (int64_t i = 0; i < k; i++) tw[i] /= tsum;
    }

    /* how good the previous layer's guess for this one was */
    if (T == 1 && s->guess_layer == l) {
        for (int64_t i = 0; i < k; i++)
            for (int64_t q = 0; q < s->n_guess; q++) s->timing[l].guessed_right += s->guess[q] == s->topk_ids[i];
        s->timing[l].guessed += (uint64_t)s->n_guess;
    }
    s->guess_layer = -1;
    double t_routed = fm_time_now();
    s->timing[l].route += t_routed - t_start;

    /* group (token, weight) pairs by expert: counting sort */
    int64_t *start = s->expert_start, *fill = s->expert_fill;
    int32_t *uniq = s->expert_uniq;
    memset(start, 0, sizeof(int64_t) * (size_t)(E + 1));
    memset(fill, 0, sizeof(int64_t) * (size_t)E);
    for (int64_t i = 0; i < T * k; i++) start[s->topk_ids[i] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < k; i++) {
            int32_t e = s->topk_ids[t * k + i];
            int64_t at = start[e] + fill[e]++;
            s->tok_list[at] = (int32_t)t;
            s->tok_w[at] = s->topk_w[t * k + i];
        }
    int n_uniq = 0;
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e]) uniq[n_uniq++] = (int32_t)e;

    /* each needed expert is fetched once for the whole chunk, in groups the store can hold; the
     * first group's reads start now and overlap the shared expert */
    int cap = fm_store_capacity(m->store);
    fm_status st = n_uniq ? fm_store_request(m->store, l, uniq, n_uniq < cap ? n_uniq : cap) : FM_OK;
    if (st != FM_OK) return st;

    /* shared expert: out = sigmoid(xn . g_s) * down(silu(gate(xn)) * up(xn)) */
    if (c->n_ff_shared > 0) {
        int64_t Is = c->n_ff_shared;
        float *g = s->buf_a, *u = s->buf_b, *y = s->buf_c;
        matmul_one_input(pool, xn, T, 2, (float *const[]){g, u}, (const fm_weight *const[]){&w->sh_gate, &w->sh_up});
        fm_store_poll(m->store); /* the routed experts' reads go on while this computes */
        for (int64_t i = 0; i < T * Is; i++) g[i] = fm_silu(g[i]) * u[i];
        fm_cpu_matmul(pool, y, g, T, &w->sh_down);
        fm_cpu_matmul(pool, u, xn, T, &w->sh_router); /* (T, 1) */
        for (int64_t t = 0; t < T; t++) {
            float sg = fm_sigmoid(u[t]);
            for (int64_t i = 0; i < H; i++) out[t * H + i] = sg * y[t * H + i];
        }
    } else {
        memset(out, 0, sizeof(float) * (size_t)(T * H));
    }
    double t_shared = fm_time_now();
    s->timing[l].shared += t_shared - t_routed;

    /* routed experts, each computed as soon as its bytes are in */
    const fm_packed_expert_layer *L = &m->packed->experts[l];
    float *X = s->buf_a, *G = s->buf_b, *U = s->buf_c, *Y = s->buf_d;
    double waited = 0;
    for (int g0 = 0; g0 < n_uniq && st == FM_OK; g0 += cap) {
        int n = n_uniq - g0 < cap ? n_uniq - g0 : cap;
        if (g0 > 0) st = fm_store_request(m->store, l, uniq + g0, n);
        for (int i = 0; i < n && st == FM_OK;) {
            int32_t e = uniq[g0 + i];
            int64_t n_tok = start[e + 1] - start[e];
            /* a run of experts with one token each (every expert of a decode step): those already in
             * go EXPERT_BATCH at a time; when none is, the next is waited for and goes alone */
            int run = 0;
            while (s->expert_batch && i + run < n && run < EXPERT_BATCH &&
                   start[uniq[g0 + i + run] + 1] - start[uniq[g0 + i + run]] == 1)
                run++;
            const uint8_t *blocks[EXPERT_BATCH];
            int nb = run ? fm_store_ready_run(m->store, i, run, blocks) : 0;
            if (run && !nb) {
                double tw = fm_time_now();
                st = fm_store_wait(m->store, i, &blocks[0]);
                waited += fm_time_now() - tw;
                nb = 1;
            }
            if (run) {
                if (st == FM_OK) experts_single_token(s, l, uniq + g0 + i, blocks, nb, xn, out);
                i += nb;
                continue;
            }
            const uint8_t *block;
            double tw = fm_time_now();
            st = fm_store_wait(m->store, i, &block);
            waited += fm_time_now() - tw;
            if (st != FM_OK) break;
            i++;
            fm_weight wg = fm_packed_weight(&L->parts[FM_PART_GATE], block);
            fm_weight wu = fm_packed_weight(&L->parts[FM_PART_UP], block);
            fm_weight wd = fm_packed_weight(&L->parts[FM_PART_DOWN], block);
            for (int64_t r = 0; r < n_tok; r++)
                memcpy(X + r * H, xn + (int64_t)s->tok_list[start[e] + r] * H, sizeof(float) * (size_t)H);
            fm_cpu_matmul(pool, G, X, n_tok, &wg);
            fm_cpu_matmul(pool, U, X, n_tok, &wu);
            fm_store_poll(m->store); /* later experts' reads go on while this one computes */
            for (int64_t q = 0; q < n_tok * I; q++) G[q] = fm_silu(G[q]) * U[q];
            fm_cpu_matmul(pool, Y, G, n_tok, &wd);
            for (int64_t r = 0; r < n_tok; r++) {
                float wt = s->tok_w[start[e] + r];
                float *o = out + (int64_t)s->tok_list[start[e] + r] * H;
                for (int64_t q = 0; q < H; q++) o[q] += wt * Y[r * H + q];
            }
        }
    }
    double t_end = fm_time_now();
    s->timing[l].expert_wait += waited;
    s->timing[l].expert_compute += t_end - t_shared - waited;
    s->timing[l].experts_used += (uint64_t)n_uniq;
    return st;
}

/* ------------------------------------------------------------------------ eval */

static fm_status eval_chunk(fm_session *s, const int32_t *ids, int64_t T, float *logits, bool all_logits) {
    fm_model *m = s->m;
    const fm_config *c = &m->cfg;
    int64_t H = c->n_embd;
    fm_status st = reserve(s, T);
    if (st != FM_OK) return st;
    for (int64_t t = 0; t < T; t++) fm_cpu_get_row(s->x + t * H, &m->embed, ids[t]);
    for (int l = 0; l < c->n_layers; l++) {
        const fm_layer_weights *w = &m->layers[l];
        double t0 = fm_time_now();
        for (int64_t t = 0; t < T; t++) fm_cpu_rmsnorm(s->xn + t * H, s->x + t * H, w->input_norm, H, c->norm_eps);
        st = c->layer_kind[l] == FM_LAYER_LINEAR ? linear_attention(s, l, T, s->xn, s->mix)
                                                  : full_attention(s, l, T, s->xn, s->mix);
        s->timing[l].mixer += fm_time_now() - t0;
        if (st != FM_OK) return st;
        for (int64_t i = 0; i < T * H; i++) s->x[i] += s->mix[i];
        for (int64_t t = 0; t < T; t++) fm_cpu_rmsnorm(s->xn + t * H, s->x + t * H, w->post_attn_norm, H, c->norm_eps);
        st = moe(s, l, T, s->xn, s->mix);
        if (st != FM_OK) return st;
        for (int64_t i = 0; i < T * H; i++) s->x[i] += s->mix[i];
        if (T == 1 && m->prefetch > 0 && l + 1 < c->n_layers) {
            /* --prefetch: guess the next layer's experts from this layer's output and start reading
             * them, so the disk works while the next mixer runs (its router names them only after) */
            fm_cpu_rmsnorm(s->xn, s->x, m->layers[l + 1].post_attn_norm, H, c->norm_eps);
            guess_next_layer(s, l, s->xn);
            fm_store_hint(m->store, l + 1, s->guess, (int)s->n_guess);
        }
    }
    s->n_past += T;
    if (!logits) return FM_OK;
    int64_t first = all_logits ? 0 : T - 1;
    for (int64_t t = first; t < T; t++) fm_cpu_rmsnorm(s->xn + t * H, s->x + t * H, m->out_norm, H, c->norm_eps);
    double t0 = fm_time_now();
    fm_cpu_matmul(m->pool, logits, s->xn + first * H, T - first, &m->lm_head);
    s->head_seconds += fm_time_now() - t0;
    return FM_OK;
}

/* fm_session_eval, and with next (logits NULL) fm_session_eval_greedy's argmax of the last token. */
static fm_status session_eval(fm_session *s, const int32_t *ids, int64_t n, float *logits, bool all_logits,
                              int32_t *next) {
    const fm_config *c = &s->m->cfg;
    if (n < 1) return fm_error_set(FM_ERR_ARG, "nothing to evaluate (0 tokens)");
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->n_vocab)
            return fm_error_set(FM_ERR_ARG, "token id %d at position %lld is out of range [0, %lld)", ids[i],
                                (long long)i, (long long)c->n_vocab);
    if (s->n_past + n > s->n_ctx)
        return fm_error_set(FM_ERR_ARG, "context overflow: %lld + %lld tokens exceed the context size %lld",
                            (long long)s->n_past, (long long)n, (long long)s->n_ctx);
    for (int64_t i = 0; i < n; i += FM_MAX_CHUNK) {
        int64_t T = n - i < FM_MAX_CHUNK ? n - i : FM_MAX_CHUNK;
        bool last = i + T == n;
        float *out = NULL;
        if (logits && all_logits) out = logits + i * c->n_vocab;
        else if (logits && last) out = logits;
        else if (next && last && !s->gpu) out = s->greedy_logits;
        fm_status st;
        if (s->gpu && next && last) st = fm_forward_cuda_eval_greedy(s->gpu, s->n_past, ids + i, T, next);
        else if (s->gpu) st = fm_forward_cuda_eval_chunk(s->gpu, s->n_past, ids + i, T, out, all_logits);
        else st = eval_chunk(s, ids + i, T, out, all_logits);
        if (st != FM_OK) return st;
        if (s->gpu) s->n_past += T;
    }
    if (next && !s->gpu) {
        float top;
        *next = (int32_t)fm_cpu_argmax(s->greedy_logits, c->n_vocab, &top);
    }
    return FM_OK;
}

fm_status fm_session_eval(fm_session *s, const int32_t *ids, int64_t n, float *logits, bool all_logits) {
    return session_eval(s, ids, n, logits, all_logits, NULL);
}

fm_status fm_session_eval_greedy(fm_session *s, const int32_t *ids, int64_t n, int32_t *next) {
    if (!next) return fm_error_set(FM_ERR_ARG, "fm_session_eval_greedy: next is NULL");
    if (!s->gpu && !s->greedy_logits &&
        !(s->greedy_logits = malloc(sizeof(float) * (size_t)s->m->cfg.n_vocab)))
        return fm_error_set(FM_ERR_NOMEM, "out of memory for the logits");
    return session_eval(s, ids, n, NULL, false, next);
}
