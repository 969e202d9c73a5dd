/* The engine thread: slots, the job queue, step-wise generation (see engine.h). */
#include "server/engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "model/model.h"
#include "store/expert_store.h"
#include "util/error.h"
#include "util/progress.h"

#define MAX_STOPS 16

enum { JOB_NEW = 0, JOB_QUEUED, JOB_ACTIVE };

struct fm_job {
    /* set by fm_job_new, read-only afterwards */
    int32_t *prompt;
    size_t n_prompt;
    int64_t max_tokens;
    fm_sampler_params sp;
    int32_t stop_ids[MAX_STOPS];
    size_t n_stop_ids;
    char *stops[MAX_STOPS];
    size_t n_stops;
    int32_t *forced;
    size_t n_forced;
    bool force;
    int delay_ms;
    bool (*gone)(void *ctx);
    void *gone_ctx;
    int efd;
    /* under mu: what the owner takes */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *text;
    size_t text_len, text_cap;
    fm_job_state st;
    /* under the engine's mutex */
    int where;
    fm_job *next;
    double t_submit;
    atomic_bool cancel;
};

typedef struct slot {
    fm_session *s;
    int32_t *hist; /* ids the session holds */
    int64_t n_hist;
    uint64_t last_used;
    fm_job *job; /* NULL: idle */
    bool begun;
    int64_t pos; /* prompt ids evaluated (cached ones included) */
    int64_t n_gen;
    fm_sampler *smp;
    fm_stop *stop;
    fm_detok dt;
    float *logits;
    bool greedy;  /* plain greedy sampling: only the argmax comes back (fm_session_eval_greedy) */
    int32_t next; /* greedy: the last eval's argmax (-1: a NaN logit) */
    double t_begin, prefill_s, decode_s;
} slot;

struct fm_engine {
    fm_model *model;
    const fm_tokenizer *tok;
    fm_engine_config cfg;
    int64_t V;
    slot *slots;
    pthread_t th;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    fm_job *q_head, *q_tail;
    int q_len;
    bool stopping;
    uint64_t use_clock;
    fm_engine_stats stats;
};

/* ------------------------------------------------------------------ jobs */

fm_status fm_job_new(const fm_job_params *p, fm_job **out) {
    *out = NULL;
    if (!p->prompt || p->n_prompt < 1) return fm_error_set(FM_ERR_ARG, "empty prompt");
    if (p->max_tokens < 1) return fm_error_set(FM_ERR_ARG, "max_tokens must be at least 1");
    if (p->n_stop_ids > MAX_STOPS || p->n_stop_strings > MAX_STOPS)
        return fm_error_set(FM_ERR_ARG, "at most %d stop ids and %d stop strings", MAX_STOPS, MAX_STOPS);
    fm_job *j = calloc(1, sizeof *j);
    if (!j) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    j->efd = -1;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    atomic_init(&j->cancel, false);
    j->prompt = malloc(sizeof(int32_t) * p->n_prompt);
    j->forced = p->forced && p->n_forced ? malloc(sizeof(int32_t) * p->n_forced) : NULL;
    j->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!j->prompt || (p->forced && p->n_forced && !j->forced) || j->efd < 0) {
        fm_job_free(NULL, j);
        return fm_error_set(FM_ERR_NOMEM, "out of memory (or no eventfd)");
    }
    memcpy(j->prompt, p->prompt, sizeof(int32_t) * p->n_prompt);
    j->n_prompt = p->n_prompt;
    if (j->forced) memcpy(j->forced, p->forced, sizeof(int32_t) * p->n_forced);
    j->n_forced = j->forced ? p->n_forced : 0;
    j->force = p->forced != NULL;
    j->max_tokens = p->max_tokens;
    j->sp = p->sampling;
    if (p->n_stop_ids) memcpy(j->stop_ids, p->stop_ids, sizeof(int32_t) * p->n_stop_ids);
    j->n_stop_ids = p->n_stop_ids;
    for (size_t i = 0; i < p->n_stop_strings; i++) {
        if (!p->stop_strings[i] || !p->stop_strings[i][0]) {
            fm_job_free(NULL, j);
            return fm_error_set(FM_ERR_ARG, "empty stop string");
        }
        j->stops[i] = strdup(p->stop_strings[i]);
        j->n_stops = i + 1;
        if (!j->stops[i]) {
            fm_job_free(NULL, j);
            return fm_error_set(FM_ERR_NOMEM, "out of memory");
        }
    }
    j->delay_ms = p->token_delay_ms < 0 ? 0 : p->token_delay_ms > 1000 ? 1000 : p->token_delay_ms;
    j->gone = p->gone;
    j->gone_ctx = p->gone_ctx;
    *out = j;
    return FM_OK;
}

int fm_job_fd(const fm_job *j) { return j->efd; }

void fm_job_take(fm_job *j, fm_job_state *st, char **text, size_t *len) {
    pthread_mutex_lock(&j->mu);
    uint64_t v;
    ssize_t r = read(j->efd, &v, sizeof v); /* consume the notification (EAGAIN if none) */
    (void)r;
    *st = j->st;
    *text = j->text_len ? j->text : NULL;
    *len = j->text_len;
    if (j->text_len) {
        j->text = NULL;
        j->text_len = j->text_cap = 0;
    }
    pthread_mutex_unlock(&j->mu);
}

static void destroy_job(fm_job *j) {
    free(j->prompt);
    free(j->forced);
    for (size_t i = 0; i < j->n_stops; i++) free(j->stops[i]);
    free(j->text);
    if (j->efd >= 0) close(j->efd);
    pthread_cond_destroy(&j->cv);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

void fm_job_free(fm_engine *e, fm_job *j) {
    if (!j) return;
    bool wait = false;
    if (e) {
        pthread_mutex_lock(&e->mu);
        if (j->where == JOB_QUEUED) { /* not the engine's yet: take it out of the queue */
            fm_job **pp = &e->q_head;
            fm_job *prev = NULL;
            while (*pp && *pp != j) {
                prev = *pp;
                pp = &(*pp)->next;
            }
            if (*pp) {
                *pp = j->next;
                if (e->q_tail == j) e->q_tail = prev;
                e->q_len--;
                e->stats.queue_depth = e->q_len;
                e->stats.jobs_cancelled++;
            }
            j->where = JOB_NEW;
        } else if (j->where == JOB_ACTIVE) {
            atomic_store(&j->cancel, true);
            wait = true;
        }
        pthread_mutex_unlock(&e->mu);
    }
    if (wait) { /* the engine's last touch of the job is setting done */
        pthread_mutex_lock(&j->mu);
        while (!j->st.done) pthread_cond_wait(&j->cv, &j->mu);
        pthread_mutex_unlock(&j->mu);
    }
    destroy_job(j);
}

/* Appends text for the owner and wakes it (engine thread). */
static void job_append(fm_job *j, const char *text, size_t len) {
    pthread_mutex_lock(&j->mu);
    if (j->text_len + len + 1 > j->text_cap) {
        size_t cap = (j->text_len + len + 1) * 2;
        char *b = realloc(j->text, cap);
        if (!b) { /* keep going without this piece; the answer will be short rather than lost */
            pthread_mutex_unlock(&j->mu);
            return;
        }
        j->text = b;
        j->text_cap = cap;
    }
    memcpy(j->text + j->text_len, text, len);
    j->text_len += len;
    j->text[j->text_len] = 0;
    uint64_t one = 1;
    ssize_t w = write(j->efd, &one, sizeof one);
    (void)w;
    pthread_mutex_unlock(&j->mu);
}

/* Marks the job done (its last touch by the engine). */
static void job_done(fm_job *j, fm_finish_reason why, fm_status status, const char *error, const slot *sl) {
    pthread_mutex_lock(&j->mu);
    j->st.done = true;
    j->st.finish = why;
    j->st.status = status;
    if (error) snprintf(j->st.error, sizeof j->st.error, "%s", error);
    if (sl) {
        j->st.n_generated = sl->n_gen;
        j->st.prefill_seconds = sl->prefill_s;
        j->st.decode_seconds = sl->decode_s;
    }
    uint64_t one = 1;
    ssize_t w = write(j->efd, &one, sizeof one);
    (void)w;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

/* ------------------------------------------------------------------ the engine thread */

static void forget_history(slot *sl) {
    fm_session_reset(sl->s);
    sl->n_hist = 0;
}

/* Records ids the session has just evaluated (at most n_ctx in all: eval refuses more). */
static void hist_append(slot *sl, const int32_t *ids, int64_t n) {
    memcpy(sl->hist + sl->n_hist, ids, sizeof(int32_t) * (size_t)n);
    sl->n_hist += n;
}

/* Usable cached prefix of `j` in slot `sl`: the slot's ids must all be a prefix of the prompt, and
 * at least one prompt id must remain (its logits are needed). */
static int64_t usable_prefix(const slot *sl, const fm_job *j) {
    int64_t n = (int64_t)j->n_prompt, k = 0;
    if (sl->n_hist >= n) return 0;
    while (k < sl->n_hist && sl->hist[k] == j->prompt[k]) k++;
    return k == sl->n_hist ? k : 0;
}

/* Ends the slot's job and makes the slot idle (keeping its session and ids as a prompt cache). */
static void finish(fm_engine *e, slot *sl, fm_finish_reason why, fm_status status, const char *error) {
    fm_job *j = sl->job;
    if (status == FM_OK && why != FM_FINISH_STOP && why != FM_FINISH_CANCELLED && sl->stop) {
        /* what was held back is shown, as fm_generate does */
        char text[4096];
        size_t n_text = fm_detok_flush(&sl->dt, text, sizeof text);
        fm_stop_reason r;
        const char *emit;
        size_t emit_len;
        if (n_text && fm_stop_push(sl->stop, -1, text, n_text, &r, &emit, &emit_len) == FM_OK && emit_len)
            job_append(j, emit, emit_len);
        if (fm_stop_matched(sl->stop) < 0) {
            const char *tail = fm_stop_flush(sl->stop, &emit_len);
            if (emit_len) job_append(j, tail, emit_len);
        }
    }
    if (status != FM_OK) forget_history(sl); /* its state is unknown */
    fm_sampler_free(sl->smp);
    fm_stop_free(sl->stop);
    sl->smp = NULL;
    sl->stop = NULL;
    pthread_mutex_lock(&e->mu);
    sl->last_used = ++e->use_clock;
    if (status != FM_OK) e->stats.jobs_failed++;
    else if (why == FM_FINISH_CANCELLED) e->stats.jobs_cancelled++;
    else e->stats.jobs_done++;
    pthread_mutex_unlock(&e->mu);
    sl->job = NULL;
    sl->begun = false;
    job_done(j, why, status, error, sl);
}

static void fail(fm_engine *e, slot *sl, fm_status st) {
    char msg[256];
    snprintf(msg, sizeof msg, "%s", fm_last_error());
    finish(e, sl, FM_FINISH_STOP, st, msg);
}

/* Admission work on the engine thread: reuse the cached prefix or start over, make the sampler. */
static void begin(fm_engine *e, slot *sl) {
    fm_job *j = sl->job;
    int64_t lcp = usable_prefix(sl, j);
    if (lcp == 0 && sl->n_hist) forget_history(sl);
    sl->pos = lcp;
    sl->n_gen = 0;
    sl->prefill_s = sl->decode_s = 0;
    sl->t_begin = fm_time_now();
    sl->begun = true;
    sl->greedy = fm_sampler_params_greedy(&j->sp);
    sl->next = -1;
    fm_status st = fm_sampler_new(&j->sp, e->V, &sl->smp);
    for (size_t i = 0; st == FM_OK && i < j->n_prompt; i++) st = fm_sampler_accept(sl->smp, j->prompt[i]);
    if (st == FM_OK)
        st = fm_stop_new(j->stop_ids, j->n_stop_ids, (const char *const *)j->stops, j->n_stops, &sl->stop);
    if (e->tok) fm_detok_init(&sl->dt, e->tok);
    pthread_mutex_lock(&e->mu);
    e->stats.prompt_tokens += j->n_prompt;
    e->stats.cached_tokens += (uint64_t)lcp;
    double queued = fm_time_now() - j->t_submit;
    pthread_mutex_unlock(&e->mu);
    pthread_mutex_lock(&j->mu);
    j->st.started = true;
    j->st.n_prompt = (int64_t)j->n_prompt;
    j->st.n_cached = lcp;
    j->st.queue_seconds = queued;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    j->st.started_unix = (double)wall.tv_sec + (double)wall.tv_nsec * 1e-9;
    uint64_t one = 1;
    ssize_t w = write(j->efd, &one, sizeof one);
    (void)w;
    pthread_mutex_unlock(&j->mu);
    if (st != FM_OK) fail(e, sl, st);
}

/* One step of a busy slot: a chunk of prompt, or one token. */
static void step(fm_engine *e, slot *sl) {
    fm_job *j = sl->job;
    if (!sl->begun) {
        begin(e, sl);
        if (!sl->job) return;
    }
    if (atomic_load(&j->cancel) || (j->gone && j->gone(j->gone_ctx))) {
        finish(e, sl, FM_FINISH_CANCELLED, FM_OK, NULL);
        return;
    }
    double t0 = fm_time_now();
    fm_status st;
    if (sl->pos < (int64_t)j->n_prompt) {
        int64_t n = (int64_t)j->n_prompt - sl->pos;
        if (n > e->cfg.prefill_chunk) n = e->cfg.prefill_chunk;
        bool last = sl->pos + n == (int64_t)j->n_prompt;
        st = last && sl->greedy ? fm_session_eval_greedy(sl->s, j->prompt + sl->pos, n, &sl->next)
                                : fm_session_eval(sl->s, j->prompt + sl->pos, n, last ? sl->logits : NULL, false);
        if (st != FM_OK) {
            fail(e, sl, st);
            return;
        }
        hist_append(sl, j->prompt + sl->pos, n);
        sl->pos += n;
        double dt = fm_time_now() - t0;
        sl->prefill_s += dt;
        pthread_mutex_lock(&e->mu);
        e->stats.prefill_tokens += (uint64_t)n;
        e->stats.prefill_seconds += dt;
        pthread_mutex_unlock(&e->mu);
        return;
    }
    int32_t id;
    if (j->force) {
        if (sl->n_gen < (int64_t)j->n_forced) id = j->forced[sl->n_gen];
        else if (j->n_stop_ids) id = j->stop_ids[0];
        else {
            finish(e, sl, FM_FINISH_LENGTH, FM_OK, NULL);
            return;
        }
    } else if (sl->greedy) {
        if ((id = sl->next) < 0) {
            fail(e, sl, fm_error_set(FM_ERR_ARG, "sampler: a logit is NaN"));
            return;
        }
    } else if ((st = fm_sampler_sample(sl->smp, sl->logits, &id)) != FM_OK) {
        fail(e, sl, st);
        return;
    }
    if ((st = fm_sampler_accept(sl->smp, id)) != FM_OK) {
        fail(e, sl, st);
        return;
    }
    sl->n_gen++;
    char text[4096];
    size_t n_text = e->tok ? fm_detok_push(&sl->dt, id, text, sizeof text) : 0;
    fm_stop_reason why;
    const char *emit;
    size_t emit_len;
    if ((st = fm_stop_push(sl->stop, id, text, n_text, &why, &emit, &emit_len)) != FM_OK) {
        fail(e, sl, st);
        return;
    }
    if (emit_len) job_append(j, emit, emit_len);
    bool more = why == FM_STOP_NONE && sl->n_gen < j->max_tokens;
    if (more) { /* the last token is never evaluated: the session holds prompt + all but the last */
        st = sl->greedy ? fm_session_eval_greedy(sl->s, &id, 1, &sl->next) : fm_session_eval(sl->s, &id, 1, sl->logits, false);
        if (st != FM_OK) {
            fail(e, sl, st);
            return;
        }
        hist_append(sl, &id, 1);
    }
    double dt = fm_time_now() - t0;
    sl->decode_s += dt;
    pthread_mutex_lock(&e->mu);
    e->stats.generated_tokens++;
    e->stats.decode_seconds += dt;
    pthread_mutex_unlock(&e->mu);
    if (j->delay_ms) {
        struct timespec ts = {.tv_sec = j->delay_ms / 1000, .tv_nsec = (long)(j->delay_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
    if (!more) finish(e, sl, why != FM_STOP_NONE ? FM_FINISH_STOP : FM_FINISH_LENGTH, FM_OK, NULL);
}

/* Moves queued jobs into free slots (under e->mu): the oldest job goes to the free slot holding
 * the longest usable prefix of its prompt, else the least recently used one. */
static void admit(fm_engine *e) {
    while (e->q_head) {
        slot *best = NULL;
        int64_t best_lcp = -1;
        for (int i = 0; i < e->cfg.n_slots; i++) {
            slot *sl = &e->slots[i];
            if (sl->job) continue;
            int64_t lcp = usable_prefix(sl, e->q_head);
            if (lcp > best_lcp || (lcp == best_lcp && sl->last_used < best->last_used)) {
                best = sl;
                best_lcp = lcp;
            }
        }
        if (!best) return;
        fm_job *j = e->q_head;
        e->q_head = j->next;
        if (!e->q_head) e->q_tail = NULL;
        e->q_len--;
        j->next = NULL;
        j->where = JOB_ACTIVE;
        best->job = j;
        best->begun = false;
    }
}

static void snapshot_store(fm_engine *e) {
    const fm_model *m = e->model;
    uint64_t req = 0, hits = 0, mapped = 0, bytes = 0;
    for (int l = 0; m->store && l < m->cfg.n_layers; l++) {
        fm_store_layer_stats s = fm_store_layer_stats_get(m->store, l);
        req += s.requested;
        hits += s.hits;
        mapped += s.mapped;
        bytes += s.bytes_read;
    }
    pthread_mutex_lock(&e->mu);
    e->stats.expert_requested = req;
    e->stats.expert_hits = hits;
    e->stats.expert_mapped = mapped;
    e->stats.expert_bytes_read = bytes;
    pthread_mutex_unlock(&e->mu);
}

static void *engine_main(void *arg) {
    fm_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        if (e->stopping) break;
        admit(e);
        int busy = 0;
        for (int i = 0; i < e->cfg.n_slots; i++) busy += e->slots[i].job != NULL;
        e->stats.slots_busy = busy;
        e->stats.queue_depth = e->q_len;
        if (!busy) {
            pthread_cond_wait(&e->cv, &e->mu);
            continue;
        }
        pthread_mutex_unlock(&e->mu);
        for (int i = 0; i < e->cfg.n_slots; i++)
            if (e->slots[i].job) step(e, &e->slots[i]);
        snapshot_store(e);
        pthread_mutex_lock(&e->mu);
    }
    /* stopping: every queued job becomes the engine's, then every job ends */
    while (e->q_head) {
        fm_job *j = e->q_head;
        e->q_head = j->next;
        j->where = JOB_ACTIVE;
        j->next = NULL;
        e->q_len--;
        pthread_mutex_unlock(&e->mu);
        job_done(j, FM_FINISH_CANCELLED, FM_ERR_IO, "the server is stopping", NULL);
        pthread_mutex_lock(&e->mu);
    }
    e->q_tail = NULL;
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; i < e->cfg.n_slots; i++)
        if (e->slots[i].job) {
            fm_error_set(FM_ERR_IO, "the server is stopping");
            fail(e, &e->slots[i], FM_ERR_IO);
        }
    return NULL;
}

/* ------------------------------------------------------------------ public */

fm_status fm_engine_start(fm_model *model, const fm_tokenizer *tok, const fm_engine_config *cfg, fm_engine **out) {
    *out = NULL;
    fm_engine *e = calloc(1, sizeof *e);
    if (!e) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    e->model = model;
    e->tok = tok;
    e->cfg = cfg ? *cfg : (fm_engine_config){0};
    if (e->cfg.n_slots <= 0) e->cfg.n_slots = 1;
    if (e->cfg.queue_cap <= 0) e->cfg.queue_cap = 16;
    if (e->cfg.n_ctx <= 0) e->cfg.n_ctx = 4096;
    if (e->cfg.prefill_chunk <= 0) e->cfg.prefill_chunk = 512;
    e->V = fm_model_n_vocab(model);
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->stats.n_slots = e->cfg.n_slots;
    e->stats.queue_cap = e->cfg.queue_cap;
    e->stats.n_ctx = e->cfg.n_ctx;
    fm_status st = FM_OK;
    e->slots = calloc((size_t)e->cfg.n_slots, sizeof *e->slots);
    if (!e->slots) {
        fm_engine_free(e);
        return fm_error_set(FM_ERR_NOMEM, "out of memory");
    }
    for (int i = 0; i < e->cfg.n_slots; i++) {
        slot *sl = &e->slots[i];
        if ((st = fm_session_init(model, e->cfg.n_ctx, &sl->s)) != FM_OK) {
            fm_engine_free(e);
            return st;
        }
        sl->hist = malloc(sizeof(int32_t) * (size_t)e->cfg.n_ctx);
        sl->logits = malloc(sizeof(float) * (size_t)e->V);
        if (!sl->hist || !sl->logits) {
            fm_engine_free(e);
            return fm_error_set(FM_ERR_NOMEM, "out of memory for %d sessions", e->cfg.n_slots);
        }
    }
    if (pthread_create(&e->th, NULL, engine_main, e) != 0) {
        fm_engine_free(e);
        return fm_error_set(FM_ERR_IO, "cannot start the engine thread");
    }
    e->started = true;
    *out = e;
    return FM_OK;
}

void fm_engine_stop(fm_engine *e) {
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->started) pthread_join(e->th, NULL);
    e->started = false;
}

void fm_engine_free(fm_engine *e) {
    if (!e) return;
    fm_engine_stop(e);
    for (int i = 0; e->slots && i < e->cfg.n_slots; i++) {
        fm_session_free(e->slots[i].s);
        free(e->slots[i].hist);
        free(e->slots[i].logits);
    }
    free(e->slots);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

fm_submit_result fm_engine_submit(fm_engine *e, fm_job *j) {
    pthread_mutex_lock(&e->mu);
    if (e->stopping) {
        pthread_mutex_unlock(&e->mu);
        return FM_SUBMIT_STOPPING;
    }
    if (e->q_len >= e->cfg.queue_cap) {
        e->stats.jobs_rejected++;
        pthread_mutex_unlock(&e->mu);
        return FM_SUBMIT_FULL;
    }
    j->where = JOB_QUEUED;
    j->next = NULL;
    j->t_submit = fm_time_now();
    if (e->q_tail) e->q_tail->next = j;
    else e->q_head = j;
    e->q_tail = j;
    e->q_len++;
    e->stats.queue_depth = e->q_len;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return FM_SUBMIT_OK;
}

void fm_engine_stats_get(fm_engine *e, fm_engine_stats *out) {
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    pthread_mutex_unlock(&e->mu);
}
