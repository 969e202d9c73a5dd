#include "store/expert_store.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "util/error.h"
#include "util/progress.h"

/* A slot holds one expert block: a request's staging buffer, or a cache entry. */
typedef struct slot {
    int layer;          /* -1 = empty */
    int32_t expert;
    uint64_t last_use;  /* request counter when last used */
    uint32_t uses;      /* times requested while cached */
    uint64_t pinned_by; /* request number that uses it (not evictable during that request) */
} slot;

typedef struct job { /* one read for the current request */
    int idx;         /* position in the request */
    int slot;
    int layer;
    int32_t expert;
} job;

struct fm_expert_store {
    const fm_packed_model *pm;
    fm_store_options opt;
    int n_layers, capacity;
    int *fds;               /* [n_layers] */
    void **maps;            /* [n_layers] mmap engine */
    uint8_t *slots_mem;     /* n_slots x max_stride, 4 KiB aligned */
    slot *slots;
    int n_slots;
    bool cache;             /* slots beyond one request's staging act as a cache */
    int *index;             /* [n_layers * n_experts] -> slot, -1 if not cached */
    uint64_t request_no;
    fm_store_layer_stats *stats; /* [n_layers] */

    /* the current request */
    int req_layer, req_n;
    int max_request;        /* capacity, or n_experts when streaming (no cache: slots form a ring) */
    int released;           /* streaming: the consumer is done with requests [0, released) */
    int *req_slot;          /* [max_request] */
    const uint8_t **req_ptr;/* [max_request] */
    unsigned char *done;    /* [max_request] 0 pending, 1 ready, 2 failed */
    char (*err)[256];       /* [max_request] */

    /* reader threads */
    pthread_t *threads;
    int n_threads;
    pthread_mutex_t mu;
    pthread_cond_t work, ready;
    job *queue;             /* [max_request] */
    int q_head, q_tail;
    int in_flight;          /* jobs taken by a reader and not finished */
    int64_t reads;          /* reads started (for fault injection) */
    bool stop;
};

const char *fm_io_engine_name(fm_io_engine e) {
    switch (e) {
    case FM_IO_PREAD: return "pread";
    case FM_IO_DIRECT: return "direct";
    case FM_IO_MMAP: return "mmap";
    }
    return "?";
}

static uint8_t *slot_mem(fm_expert_store *s, int i) { return s->slots_mem + (size_t)i * s->pm->max_expert_stride; }

/* Reads expert `e` of `layer` into dst; on failure writes the message to err. */
static bool read_block(fm_expert_store *s, int layer, int32_t e, uint8_t *dst, char *err, size_t errcap, double *secs) {
    const fm_packed_expert_layer *L = &s->pm->experts[layer];
    uint64_t stride = L->stride, off = (uint64_t)e * stride, got = 0;
    double t0 = fm_time_now();
    while (got < stride) {
        ssize_t r = pread(s->fds[layer], dst + got, stride - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            snprintf(err, errcap, "%s: reading expert %d of layer %d failed: %s", L->file, e, layer, strerror(errno));
            return false;
        }
        if (r == 0) {
            snprintf(err, errcap, "%s: short read of expert %d of layer %d (%llu of %llu bytes; file truncated?)", L->file, e,
                     layer, (unsigned long long)got, (unsigned long long)stride);
            return false;
        }
        got += (uint64_t)r;
    }
    if (s->cache && s->opt.engine == FM_IO_PREAD) /* the bytes live in our cache now: not twice */
        posix_fadvise(s->fds[layer], (off_t)off, (off_t)stride, POSIX_FADV_DONTNEED);
    *secs = fm_time_now() - t0;
    return true;
}

static void *reader(void *arg) {
    fm_expert_store *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        /* a streaming job reuses the ring slot of the job `capacity` places before it: it may start
         * once the consumer has released that one */
        while (!s->stop && (s->q_head == s->q_tail ||
                            (s->max_request > s->capacity && s->queue[s->q_head].idx >= s->released + s->capacity)))
            pthread_cond_wait(&s->work, &s->mu);
        if (s->stop) break;
        job j = s->queue[s->q_head++];
        s->in_flight++;
        bool inject = ++s->reads == s->opt.fail_read_at;
        pthread_mutex_unlock(&s->mu);
        char err[256];
        double secs = 0;
        bool ok;
        if (inject) {
            snprintf(err, sizeof err, "%s: reading expert %d of layer %d failed: %s (injected: FLASHMOE_FAIL_READ_AT)",
                     s->pm->experts[j.layer].file, j.expert, j.layer, strerror(EIO));
            ok = false;
        } else {
            ok = read_block(s, j.layer, j.expert, slot_mem(s, j.slot), err, sizeof err, &secs);
        }
        pthread_mutex_lock(&s->mu);
        s->in_flight--;
        if (ok) {
            s->done[j.idx] = 1;
            s->stats[j.layer].read_seconds += secs;
            s->stats[j.layer].bytes_read += s->pm->experts[j.layer].stride;
        } else {
            s->done[j.idx] = 2;
            memcpy(s->err[j.idx], err, sizeof err);
        }
        pthread_cond_broadcast(&s->ready);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

fm_status fm_store_open(const fm_packed_model *pm, int capacity, const fm_store_options *opt, fm_expert_store **out) {
    *out = NULL;
    fm_status st;
    const fm_config *c = &pm->config;
    fm_expert_store *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    s->pm = pm;
    if (opt) s->opt = *opt;
    if (s->opt.io_threads <= 0) s->opt.io_threads = 4;
    s->n_layers = c->n_layers;
    s->capacity = capacity;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->work, NULL);
    pthread_cond_init(&s->ready, NULL);
    uint64_t stride = pm->max_expert_stride;
    s->n_slots = capacity;
    if (s->opt.engine != FM_IO_MMAP && s->opt.cache_bytes / stride > (uint64_t)capacity) {
        s->cache = true;
        s->n_slots = (int)(s->opt.cache_bytes / stride);
    }
    s->fds = malloc(sizeof(int) * (size_t)s->n_layers);
    s->maps = calloc((size_t)s->n_layers, sizeof(void *));
    s->stats = calloc((size_t)s->n_layers, sizeof *s->stats);
    s->slots = calloc((size_t)s->n_slots, sizeof *s->slots);
    s->index = malloc(sizeof(int) * (size_t)s->n_layers * (size_t)c->n_experts);
    s->max_request = s->cache || s->opt.engine == FM_IO_MMAP ? capacity : c->n_experts;
    if (s->max_request < capacity) s->max_request = capacity;
    size_t mr = (size_t)s->max_request;
    s->req_slot = calloc(mr, sizeof(int));
    s->req_ptr = calloc(mr, sizeof(uint8_t *));
    s->done = calloc(mr, 1);
    s->err = calloc(mr, sizeof *s->err);
    s->queue = calloc(mr, sizeof *s->queue);
    if (!s->fds || !s->maps || !s->stats || !s->slots || !s->index || !s->req_slot || !s->req_ptr || !s->done || !s->err ||
        !s->queue) {
        free(s->fds);
        s->fds = NULL;
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int l = 0; l < s->n_layers; l++) s->fds[l] = -1;
    for (size_t i = 0; i < (size_t)s->n_layers * (size_t)c->n_experts; i++) s->index[i] = -1;
    for (int i = 0; i < s->n_slots; i++) s->slots[i].layer = -1;
    if (s->opt.engine != FM_IO_MMAP &&
        posix_memalign((void **)&s->slots_mem, 4096, (size_t)s->n_slots * stride) != 0) {
        s->slots_mem = NULL;
        st = fm_error_set(FM_ERR_NOMEM, "out of memory for %d expert buffers of %llu bytes", s->n_slots,
                          (unsigned long long)stride);
        goto fail;
    }
    for (int l = 0; l < s->n_layers; l++) {
        const fm_packed_expert_layer *L = &pm->experts[l];
        int flags = O_RDONLY | O_CLOEXEC | (s->opt.engine == FM_IO_DIRECT ? O_DIRECT : 0);
        s->fds[l] = open(L->file, flags);
        if (s->fds[l] < 0) {
            st = fm_error_set(FM_ERR_IO, "%s: cannot open the expert file of layer %d%s: %s", L->file, l,
                              s->opt.engine == FM_IO_DIRECT ? " with O_DIRECT" : "", strerror(errno));
            goto fail;
        }
        posix_fadvise(s->fds[l], 0, 0, POSIX_FADV_RANDOM); /* one expert = one contiguous read: no readahead */
        if (s->opt.engine == FM_IO_MMAP) {
            size_t len = (size_t)(L->stride * (uint64_t)c->n_experts);
            s->maps[l] = mmap(NULL, len, PROT_READ, MAP_SHARED, s->fds[l], 0);
            if (s->maps[l] == MAP_FAILED) {
                s->maps[l] = NULL;
                st = fm_error_set(FM_ERR_IO, "%s: cannot map: %s", L->file, strerror(errno));
                goto fail;
            }
            madvise(s->maps[l], len, MADV_RANDOM);
        }
    }
    if (s->opt.engine != FM_IO_MMAP) {
        s->threads = calloc((size_t)s->opt.io_threads, sizeof(pthread_t));
        if (!s->threads) {
            st = fm_error_set(FM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        for (int i = 0; i < s->opt.io_threads; i++) {
            if (pthread_create(&s->threads[i], NULL, reader, s) != 0) {
                st = fm_error_set(FM_ERR_NOMEM, "cannot start reader thread %d", i);
                goto fail;
            }
            s->n_threads++;
        }
    }
    *out = s;
    return FM_OK;
fail:
    fm_store_free(s);
    return st;
}

void fm_store_free(fm_expert_store *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < s->n_threads; i++) pthread_join(s->threads[i], NULL);
    if (s->fds)
        for (int l = 0; l < s->n_layers; l++) {
            if (s->maps && s->maps[l])
                munmap(s->maps[l], (size_t)(s->pm->experts[l].stride * (uint64_t)s->pm->config.n_experts));
            if (s->fds[l] >= 0) close(s->fds[l]);
        }
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->ready);
    free(s->threads);
    free(s->fds);
    free(s->maps);
    free(s->slots_mem);
    free(s->slots);
    free(s->index);
    free(s->stats);
    free(s->req_slot);
    free(s->req_ptr);
    free(s->done);
    free(s->err);
    free(s->queue);
    free(s);
}

int fm_store_capacity(const fm_expert_store *s) { return s->max_request; }

uint64_t fm_store_memory_bytes(const fm_expert_store *s) {
    return s->slots_mem ? (uint64_t)s->n_slots * s->pm->max_expert_stride : 0;
}

/* Frequency-weighted LRU: among unpinned slots, an empty one if any, else the one whose
 * use count is lowest once aged by recency (uses / (1 + age/ n_slots)), ties to the oldest. */
static int pick_victim(fm_expert_store *s) {
    int best = -1;
    double best_score = 0;
    for (int i = 0; i < s->n_slots; i++) {
        slot *sl = &s->slots[i];
        if (sl->pinned_by == s->request_no) continue;
        if (sl->layer < 0) return i;
        double age = (double)(s->request_no - sl->last_use);
        double score = (double)sl->uses / (1.0 + age / (double)s->n_slots);
        if (best < 0 || score < best_score || (score == best_score && sl->last_use < s->slots[best].last_use)) {
            best = i;
            best_score = score;
        }
    }
    return best;
}

fm_status fm_store_request(fm_expert_store *s, int layer, const int32_t *ids, int n) {
    const fm_config *c = &s->pm->config;
    if (layer < 0 || layer >= s->n_layers || n < 0 || n > s->max_request)
        return fm_error_set(FM_ERR_ARG, "expert store: bad request (layer %d, %d experts, at most %d)", layer, n,
                            s->max_request);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->n_experts)
            return fm_error_set(FM_ERR_ARG, "expert store: expert %d of layer %d out of range", ids[i], layer);
    pthread_mutex_lock(&s->mu);
    while (s->q_head != s->q_tail || s->in_flight > 0) /* readers finish the old request first */
        pthread_cond_wait(&s->ready, &s->mu);
    pthread_mutex_unlock(&s->mu);
    s->request_no++;
    s->req_layer = layer;
    s->req_n = n;
    s->stats[layer].requested += (uint64_t)n;
    int n_jobs = 0;
    for (int i = 0; i < n; i++) {
        s->done[i] = 0;
        if (s->opt.engine == FM_IO_MMAP) {
            s->req_ptr[i] = (const uint8_t *)s->maps[layer] + (uint64_t)ids[i] * s->pm->experts[layer].stride;
            s->done[i] = 1;
            continue;
        }
        int *ix = &s->index[(size_t)layer * (size_t)c->n_experts + (size_t)ids[i]];
        int sl;
        if (s->cache && *ix >= 0) { /* hit */
            sl = *ix;
            s->done[i] = 1;
            s->stats[layer].hits++;
        } else {
            sl = s->cache ? pick_victim(s) : i % s->capacity; /* no cache: a ring of staging slots */
            if (sl < 0) return fm_error_set(FM_ERR_ARG, "expert store: no free buffer (capacity %d)", s->capacity);
            slot *old = &s->slots[sl];
            if (s->cache && old->layer >= 0) s->index[(size_t)old->layer * (size_t)c->n_experts + (size_t)old->expert] = -1;
            old->layer = layer;
            old->expert = ids[i];
            old->uses = 0;
            if (s->cache) *ix = sl;
            s->queue[n_jobs++] = (job){.idx = i, .slot = sl, .layer = layer, .expert = ids[i]};
        }
        s->slots[sl].pinned_by = s->request_no;
        s->slots[sl].last_use = s->request_no;
        s->slots[sl].uses++;
        s->req_slot[i] = sl;
        s->req_ptr[i] = slot_mem(s, sl);
    }
    pthread_mutex_lock(&s->mu);
    s->released = 0;
    s->q_head = 0;
    s->q_tail = n_jobs;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->mu);
    return FM_OK;
}

fm_status fm_store_wait(fm_expert_store *s, int i, const uint8_t **block) {
    if (i < 0 || i >= s->req_n) return fm_error_set(FM_ERR_ARG, "expert store: wait for %d of %d", i, s->req_n);
    pthread_mutex_lock(&s->mu);
    if (i > s->released) { /* waiting for i: the consumer is done with every earlier one */
        s->released = i;
        pthread_cond_broadcast(&s->work);
    }
    unsigned char state = s->done[i];
    if (state == 0) {
        double t0 = fm_time_now();
        while ((state = s->done[i]) == 0) pthread_cond_wait(&s->ready, &s->mu);
        s->stats[s->req_layer].wait_seconds += fm_time_now() - t0;
    }
    pthread_mutex_unlock(&s->mu);
    if (state == 2) {
        if (s->cache) { /* do not keep a half-read block as if it were cached */
            slot *sl = &s->slots[s->req_slot[i]];
            s->index[(size_t)sl->layer * (size_t)s->pm->config.n_experts + (size_t)sl->expert] = -1;
            sl->layer = -1;
        }
        return fm_error_set(FM_ERR_IO, "%s", s->err[i]);
    }
    *block = s->req_ptr[i];
    return FM_OK;
}

void fm_store_hint(fm_expert_store *s, int layer, const int32_t *ids, int n) {
    if (s->opt.engine != FM_IO_PREAD || layer < 0 || layer >= s->n_layers) return;
    uint64_t stride = s->pm->experts[layer].stride;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->pm->config.n_experts) continue;
        if (s->cache && s->index[(size_t)layer * (size_t)s->pm->config.n_experts + (size_t)ids[i]] >= 0) continue;
        posix_fadvise(s->fds[layer], (off_t)((uint64_t)ids[i] * stride), (off_t)stride, POSIX_FADV_WILLNEED);
    }
}

fm_store_layer_stats fm_store_layer_stats_get(const fm_expert_store *s, int layer) { return s->stats[layer]; }

void fm_store_reset_stats(fm_expert_store *s) { memset(s->stats, 0, sizeof *s->stats * (size_t)s->n_layers); }
