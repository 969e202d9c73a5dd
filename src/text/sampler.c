/* Sampling and stop handling (see sampler.h). */
#include "text/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/mixer_kernels.h"
#include "util/error.h"

/* ============================== generator ================================= */

/* xoshiro256** seeded through splitmix64: fast, good, and the same everywhere. */
static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next64(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* ================================ sampler ================================= */

typedef struct cand {
    float l;
    int32_t id;
} cand;

struct fm_sampler {
    fm_sampler_params p;
    int32_t n;
    uint64_t rng[4];
    int32_t *count; /* occurrences of each id in the window */
    int32_t *where; /* index of the id in seen[], or -1 */
    int32_t *seen;  /* ids with count > 0 */
    int32_t n_seen;
    int32_t *ring; /* the window, when penalty_last_n > 0 */
    int32_t ring_len, ring_head;
    float *work;
    cand *cands;
};

bool fm_sampler_params_greedy(const fm_sampler_params *p) {
    return p->temperature <= 0.0f && p->repetition_penalty == 1.0f && p->presence_penalty == 0.0f &&
           p->frequency_penalty == 0.0f;
}

fm_sampler_params fm_sampler_default_params(void) {
    return (fm_sampler_params){.temperature = 1.0f,
                               .top_k = 0,
                               .top_p = 1.0f,
                               .min_p = 0.0f,
                               .repetition_penalty = 1.0f,
                               .presence_penalty = 0.0f,
                               .frequency_penalty = 0.0f,
                               .penalty_last_n = 0,
                               .seed = 0};
}

void fm_sampler_reset(fm_sampler *s, uint64_t seed) {
    if (!s) return;
    for (int32_t i = 0; i < s->n_seen; i++) {
        s->count[s->seen[i]] = 0;
        s->where[s->seen[i]] = -1;
    }
    s->n_seen = 0;
    s->ring_len = s->ring_head = 0;
    s->p.seed = seed;
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) s->rng[i] = splitmix64(&x);
}

void fm_sampler_free(fm_sampler *s) {
    if (!s) return;
    free(s->count);
    free(s->where);
    free(s->seen);
    free(s->ring);
    free(s->work);
    free(s->cands);
    free(s);
}

fm_status fm_sampler_new(const fm_sampler_params *params, int64_t n_vocab, fm_sampler **out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_sampler_new: NULL output");
    *out = NULL;
    fm_sampler_params p = params ? *params : fm_sampler_default_params();
    if (n_vocab < 1 || n_vocab >= INT32_MAX)
        return fm_error_set(FM_ERR_ARG, "sampler: n_vocab %lld out of range", (long long)n_vocab);
    if (isnan(p.temperature) || isinf(p.temperature))
        return fm_error_set(FM_ERR_ARG, "sampler: temperature must be a finite number");
    if (isnan(p.top_p) || p.top_p <= 0)
        return fm_error_set(FM_ERR_ARG, "sampler: top_p %g must be in (0, 1] (1 = off)", (double)p.top_p);
    if (isnan(p.min_p) || p.min_p > 1)
        return fm_error_set(FM_ERR_ARG, "sampler: min_p %g must be in [0, 1] (0 = off)", (double)p.min_p);
    if (isnan(p.repetition_penalty) || isinf(p.repetition_penalty) || p.repetition_penalty <= 0)
        return fm_error_set(FM_ERR_ARG, "sampler: repetition_penalty %g must be > 0 (1 = off)",
                            (double)p.repetition_penalty);
    if (!isfinite(p.presence_penalty) || !isfinite(p.frequency_penalty))
        return fm_error_set(FM_ERR_ARG, "sampler: presence / frequency penalties must be finite");
    fm_sampler *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory for a sampler");
    s->p = p;
    s->n = (int32_t)n_vocab;
    size_t n = (size_t)n_vocab;
    s->count = calloc(n, sizeof *s->count);
    s->where = malloc(n * sizeof *s->where);
    s->seen = malloc(n * sizeof *s->seen);
    s->work = malloc(n * sizeof *s->work);
    s->cands = malloc(n * sizeof *s->cands);
    if (p.penalty_last_n > 0) s->ring = malloc((size_t)p.penalty_last_n * sizeof *s->ring);
    if (!s->count || !s->where || !s->seen || !s->work || !s->cands || (p.penalty_last_n > 0 && !s->ring)) {
        fm_sampler_free(s);
        return fm_error_set(FM_ERR_NOMEM, "out of memory for a sampler over %lld tokens", (long long)n_vocab);
    }
    memset(s->where, 0xff, n * sizeof *s->where);
    fm_sampler_reset(s, p.seed);
    *out = s;
    return FM_OK;
}

static void count_add(fm_sampler *s, int32_t id, int d) {
    if (s->count[id] == 0 && d > 0) {
        s->where[id] = s->n_seen;
        s->seen[s->n_seen++] = id;
    }
    s->count[id] += d;
    if (s->count[id] == 0) {
        int32_t w = s->where[id], last = s->seen[--s->n_seen];
        s->seen[w] = last;
        s->where[last] = w;
        s->where[id] = -1;
    }
}

fm_status fm_sampler_accept(fm_sampler *s, int32_t id) {
    if (!s) return fm_error_set(FM_ERR_ARG, "fm_sampler_accept: NULL sampler");
    if (id < 0 || id >= s->n) return fm_error_set(FM_ERR_ARG, "sampler: token id %d outside [0, %d)", id, s->n);
    if (s->p.penalty_last_n > 0) {
        int32_t cap = s->p.penalty_last_n;
        if (s->ring_len == cap) {
            count_add(s, s->ring[s->ring_head], -1);
            s->ring[s->ring_head] = id;
            s->ring_head = (s->ring_head + 1) % cap;
        } else {
            s->ring[(s->ring_head + s->ring_len) % cap] = id;
            s->ring_len++;
        }
    }
    count_add(s, id, 1);
    return FM_OK;
}

static bool better(const cand *a, const cand *b) { return a->l > b->l || (a->l == b->l && a->id < b->id); }

static int cmp_cand(const void *x, const void *y) {
    const cand *a = x, *b = y;
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

/* Min-heap (worst candidate at the root) of size k. */
static void sift_down(cand *h, int32_t k, int32_t i) {
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < k && better(&h[w], &h[l])) w = l;
        if (r < k && better(&h[w], &h[r])) w = r;
        if (w == i) return;
        cand t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

static void sift_up(cand *h, int32_t i) {
    while (i > 0) {
        int32_t par = (i - 1) / 2;
        if (!better(&h[par], &h[i])) return;
        cand t = h[i];
        h[i] = h[par];
        h[par] = t;
        i = par;
    }
}

/* Penalised logits (s->work or the input itself), checked; *max_out = the largest. */
static fm_status prepare(fm_sampler *s, const float *logits, const float **out, float *max_out, int32_t *argmax) {
    const float *l = logits;
    bool pen = s->n_seen > 0 && (s->p.repetition_penalty != 1.0f || s->p.presence_penalty != 0.0f ||
                                 s->p.frequency_penalty != 0.0f);
    if (pen) {
        memcpy(s->work, logits, (size_t)s->n * sizeof *s->work);
        float rp = s->p.repetition_penalty;
        for (int32_t i = 0; i < s->n_seen; i++) {
            int32_t id = s->seen[i];
            float x = s->work[id];
            if (rp != 1.0f) x = x > 0 ? x / rp : x * rp;
            x -= s->p.presence_penalty + s->p.frequency_penalty * (float)s->count[id];
            s->work[id] = x;
        }
        l = s->work;
    }
    float m = 0;
    int64_t am = fm_cpu_argmax(l, s->n, &m); /* vectorised: a token's scan of the vocabulary */
    if (am < 0) {
        int32_t i = 0;
        while (i < s->n && l[i] == l[i]) i++;
        return fm_error_set(FM_ERR_ARG, "sampler: logit %d is NaN", i);
    }
    if (m == -INFINITY) return fm_error_set(FM_ERR_ARG, "sampler: every logit is -inf");
    if (isinf(m)) return fm_error_set(FM_ERR_ARG, "sampler: logit %lld is +inf", (long long)am);
    *out = l;
    *max_out = m;
    *argmax = (int32_t)am;
    return FM_OK;
}

/* Top-p over candidates c[0..n) in no particular order: reorders them so that the kept set, in
 * descending order, is c[0..keep), and returns keep. target = top_p * (normaliser of what top-p
 * sees). A quickselect on probability mass: a block of better tokens whose mass keeps the running
 * total below the target is kept whole, else the boundary lies inside it. */
static int32_t top_p_select(cand *c, int32_t n, float m, double target) {
    int32_t lo = 0, hi = n;
    double acc = 0;
    while (hi - lo > 64) {
        cand a = c[lo], b = c[lo + (hi - lo) / 2], d = c[hi - 1], piv;
        if (better(&a, &b))
            piv = better(&b, &d) ? b : better(&a, &d) ? d : a;
        else
            piv = better(&a, &d) ? a : better(&b, &d) ? d : b;
        int32_t mid = lo;
        double mass = 0;
        for (int32_t k = lo; k < hi; k++)
            if (!better(&piv, &c[k])) {
                cand t = c[mid];
                c[mid] = c[k];
                c[k] = t;
                mass += expf(c[mid].l - m);
                mid++;
            }
        if (acc + mass < target) {
            acc += mass; /* all of them are kept, and the boundary is further down */
            lo = mid;
        } else {
            hi = mid;
        }
    }
    qsort(c + lo, (size_t)(hi - lo), sizeof *c, cmp_cand);
    int32_t keep = lo;
    while (keep < hi && (keep == 0 || acc < target)) acc += expf(c[keep++].l - m);
    qsort(c, (size_t)keep, sizeof *c, cmp_cand);
    return keep;
}

/* The candidates left after temperature, top-k, top-p and min-p, with scaled logits; returns how
 * many (at least 1) and the largest scaled logit in *m_out. */
static int32_t candidates(fm_sampler *s, const float *l, float lmax, float *m_out) {
    const float inv_t = 1.0f / s->p.temperature;
    const float m = lmax * inv_t;
    cand *c = s->cands;
    int32_t nc = 0;
    bool top_k = s->p.top_k > 0, top_p = s->p.top_p < 1.0f;
    if (top_k) {
        int32_t k = s->p.top_k;
        for (int32_t i = 0; i < s->n; i++) {
            if (l[i] == -INFINITY) continue;
            cand x = {l[i] * inv_t, i};
            if (nc < k) {
                c[nc] = x;
                sift_up(c, nc++);
            } else if (better(&x, &c[0])) {
                c[0] = x;
                sift_down(c, nc, 0);
            }
        }
        qsort(c, (size_t)nc, sizeof *c, cmp_cand);
        if (top_p) {
            double z = 0;
            for (int32_t i = 0; i < nc; i++) z += expf(c[i].l - m);
            nc = top_p_select(c, nc, m, (double)s->p.top_p * z);
        }
    } else if (top_p) {
        /* Only tokens with probability >= (1 - p) / n can be in the top-p set: the last token it
         * keeps follows a remaining mass of more than 1 - p spread over at most n tokens. */
        double z = 0;
        int32_t nf = 0;
        for (int32_t i = 0; i < s->n; i++)
            if (l[i] != -INFINITY) {
                z += expf(l[i] * inv_t - m);
                nf++;
            }
        double cut = m + log((1.0 - (double)s->p.top_p) * z / nf) - 1e-3;
        for (int32_t i = 0; i < s->n; i++) {
            float x = l[i] * inv_t;
            if (l[i] != -INFINITY && (double)x >= cut) c[nc++] = (cand){x, i};
        }
        nc = top_p_select(c, nc, m, (double)s->p.top_p * z);
    } else {
        for (int32_t i = 0; i < s->n; i++)
            if (l[i] != -INFINITY) c[nc++] = (cand){l[i] * inv_t, i};
    }
    if (s->p.min_p > 0) {
        float cut = m + logf(s->p.min_p);
        int32_t w = 0;
        for (int32_t i = 0; i < nc; i++)
            if (c[i].l >= cut || c[i].l == m) c[w++] = c[i];
        nc = w;
    }
    *m_out = m;
    return nc;
}

/* Unnormalised weights of the candidates into s->work (free once candidates() is done); returns
 * their sum. */
static double weights(fm_sampler *s, int32_t nc, float m) {
    double z = 0;
    for (int32_t i = 0; i < nc; i++) {
        s->work[i] = expf(s->cands[i].l - m);
        z += s->work[i];
    }
    return z;
}

fm_status fm_sampler_sample(fm_sampler *s, const float *logits, int32_t *out_id) {
    if (!s || !logits || !out_id) return fm_error_set(FM_ERR_ARG, "fm_sampler_sample: NULL argument");
    const float *l;
    float lmax;
    int32_t am;
    fm_status st = prepare(s, logits, &l, &lmax, &am);
    if (st != FM_OK) return st;
    if (s->p.temperature <= 0 || s->p.top_k == 1) {
        *out_id = am;
        return FM_OK;
    }
    float m;
    int32_t nc = candidates(s, l, lmax, &m);
    double z = weights(s, nc, m);
    double u = (double)(next64(s->rng) >> 11) * 0x1.0p-53 * z, acc = 0;
    int32_t pick = s->cands[nc - 1].id;
    for (int32_t i = 0; i < nc; i++) {
        acc += s->work[i];
        if (u < acc) {
            pick = s->cands[i].id;
            break;
        }
    }
    *out_id = pick;
    return FM_OK;
}

fm_status fm_sampler_probs(fm_sampler *s, const float *logits, float *probs) {
    if (!s || !logits || !probs) return fm_error_set(FM_ERR_ARG, "fm_sampler_probs: NULL argument");
    const float *l;
    float lmax;
    int32_t am;
    fm_status st = prepare(s, logits, &l, &lmax, &am);
    if (st != FM_OK) return st;
    memset(probs, 0, (size_t)s->n * sizeof *probs);
    if (s->p.temperature <= 0 || s->p.top_k == 1) {
        probs[am] = 1.0f;
        return FM_OK;
    }
    float m;
    int32_t nc = candidates(s, l, lmax, &m);
    double z = weights(s, nc, m);
    for (int32_t i = 0; i < nc; i++) probs[s->cands[i].id] = (float)(s->work[i] / z);
    return FM_OK;
}

/* ================================ stopping ================================ */

struct fm_stop {
    int32_t *ids;
    size_t n_ids;
    char **strs;
    size_t *lens;
    size_t n_strs;
    char *buf; /* held-back text, then (after a push) the text to emit followed by the new held part */
    size_t held, cap;
    size_t emit_start, emit_len;
    bool stopped;
    int matched;
};

void fm_stop_free(fm_stop *s) {
    if (!s) return;
    for (size_t i = 0; i < s->n_strs; i++) free(s->strs[i]);
    free(s->strs);
    free(s->lens);
    free(s->ids);
    free(s->buf);
    free(s);
}

fm_status fm_stop_new(const int32_t *ids, size_t n_ids, const char *const *strings, size_t n_strings, fm_stop **out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_stop_new: NULL output");
    *out = NULL;
    if ((n_ids && !ids) || (n_strings && !strings)) return fm_error_set(FM_ERR_ARG, "fm_stop_new: NULL list");
    for (size_t i = 0; i < n_strings; i++)
        if (!strings[i] || !strings[i][0]) return fm_error_set(FM_ERR_ARG, "stop string %zu is empty", i);
    fm_stop *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory for stop conditions");
    s->matched = -1;
    s->n_ids = n_ids;
    s->n_strs = n_strings;
    s->ids = malloc((n_ids ? n_ids : 1) * sizeof *s->ids);
    s->strs = calloc(n_strings ? n_strings : 1, sizeof *s->strs);
    s->lens = malloc((n_strings ? n_strings : 1) * sizeof *s->lens);
    bool ok = s->ids && s->strs && s->lens;
    if (ok && n_ids) memcpy(s->ids, ids, n_ids * sizeof *ids);
    for (size_t i = 0; ok && i < n_strings; i++) {
        s->lens[i] = strlen(strings[i]);
        ok = (s->strs[i] = strdup(strings[i])) != NULL;
    }
    if (!ok) {
        fm_stop_free(s);
        return fm_error_set(FM_ERR_NOMEM, "out of memory for stop conditions");
    }
    *out = s;
    return FM_OK;
}

fm_status fm_stop_push(fm_stop *s, int32_t id, const char *text, size_t len, fm_stop_reason *reason,
                       const char **emit, size_t *emit_len) {
    if (reason) *reason = FM_STOP_NONE;
    if (emit) *emit = "";
    if (emit_len) *emit_len = 0;
    if (!s || !reason || !emit || !emit_len || (!text && len))
        return fm_error_set(FM_ERR_ARG, "fm_stop_push: NULL argument");
    if (s->stopped) return fm_error_set(FM_ERR_ARG, "fm_stop_push: generation already stopped");
    /* drop what the previous push emitted */
    if (s->emit_len) {
        memmove(s->buf, s->buf + s->emit_start + s->emit_len, s->held);
        s->emit_start = s->emit_len = 0;
    }
    for (size_t i = 0; i < s->n_ids; i++)
        if (s->ids[i] == id) {
            s->stopped = true;
            s->matched = (int)i;
            *reason = FM_STOP_TOKEN;
            *emit = s->buf ? s->buf : "";
            *emit_len = s->held;
            s->held = 0;
            return FM_OK;
        }
    if (s->held + len + 1 > s->cap) {
        size_t nc = s->cap ? s->cap : 256;
        while (nc < s->held + len + 1) nc *= 2;
        char *nb = realloc(s->buf, nc);
        if (!nb) return fm_error_set(FM_ERR_NOMEM, "out of memory for stop conditions");
        s->buf = nb;
        s->cap = nc;
    }
    if (len) memcpy(s->buf + s->held, text, len);
    size_t n = s->held + len;
    s->buf[n] = 0;
    /* the earliest stop string occurrence (a match can only involve the new bytes and the tail
     * held back before them, which is all of buf) */
    size_t best = n;
    int which = -1;
    for (size_t k = 0; k < s->n_strs; k++) {
        const char *f = s->lens[k] <= n ? memmem(s->buf, n, s->strs[k], s->lens[k]) : NULL;
        if (f && (size_t)(f - s->buf) < best) {
            best = (size_t)(f - s->buf);
            which = (int)k;
        }
    }
    if (which >= 0) {
        s->stopped = true;
        s->matched = which;
        *reason = FM_STOP_STRING;
        s->buf[best] = 0;
        *emit = s->buf;
        *emit_len = best;
        s->held = 0;
        return FM_OK;
    }
    /* hold back the longest tail that is a proper prefix of some stop string */
    size_t keep = 0;
    for (size_t k = 0; k < s->n_strs; k++) {
        size_t m = s->lens[k] - 1 < n ? s->lens[k] - 1 : n;
        for (; m > keep; m--)
            if (memcmp(s->buf + n - m, s->strs[k], m) == 0) {
                keep = m;
                break;
            }
    }
    s->emit_start = 0;
    s->emit_len = n - keep;
    s->held = keep;
    *emit = s->buf;
    *emit_len = s->emit_len;
    return FM_OK;
}

const char *fm_stop_flush(fm_stop *s, size_t *len) {
    if (len) *len = 0;
    if (!s || !s->buf) return "";
    if (s->emit_len) {
        memmove(s->buf, s->buf + s->emit_start + s->emit_len, s->held);
        s->emit_start = s->emit_len = 0;
    }
    if (len) *len = s->held;
    s->emit_len = s->held; /* consumed by the next push */
    s->held = 0;
    return s->buf;
}

int fm_stop_matched(const fm_stop *s) { return s ? s->matched : -1; }
