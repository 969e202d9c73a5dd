#include "store/expert_store.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <liburing.h>

#include "util/error.h"
#include "util/mapguard.h"
#include "util/progress.h"

/* A slot holds one expert block: a request's staging buffer, or a cache entry. */
typedef struct slot {
    int layer;          /* -1 = empty */
    int32_t expert;
    uint64_t last_use;  /* request counter when last used */
    uint32_t uses;      /* times requested while cached */
    uint64_t pinned_by; /* request number that uses it (not evictable during that request) */
    bool speculative;   /* read by fm_store_hint and not requested since */
} slot;

typedef struct job { /* one read for the current request */
    int idx;         /* position in the request */
    int slot;
    int layer;
    int32_t expert;
} job;

/* uring engine: one read of part of a job's block (the whole block, or a piece of it). */
typedef struct upiece {
    int job;       /* index into queue */
    uint64_t base; /* the piece's offset inside the block */
    uint64_t len;  /* its bytes */
    uint64_t got;  /* bytes in so far */
    uint64_t seen; /* most bytes ever reported in (O_DIRECT re-reads from a page boundary) */
} upiece;

struct fm_expert_store {
    const fm_packed_model *pm;
    fm_store_options opt;
    int n_layers, capacity;
    int *fds;               /* [n_layers] */
    bool *direct;           /* [n_layers] fd opened with O_DIRECT */
    void **maps;            /* [n_layers] mmap engine, or map_resident */
    bool map_resident;      /* opt.map_resident, and usable: pread, no cache, stride a multiple of the page */
    unsigned char *resident;/* map_resident: mincore's vector for one expert */
    uint64_t page;          /* the page size */
    uint8_t *slots_mem;     /* n_slots x max_stride, 4 KiB aligned */
    slot *slots;
    int n_slots;
    bool cache;             /* slots beyond one request's staging act as a cache */
    int *index;             /* [n_layers * n_experts] -> slot, -1 if not cached */
    uint64_t request_no;
    fm_store_layer_stats *stats; /* [n_layers] */

    /* the current request */
    int req_layer, req_n;
    int spec_n;             /* speculative jobs appended by fm_store_hint (done[] indices req_n..) */
    int max_request;        /* capacity, or n_experts when streaming (no cache: slots form a ring) */
    int released;           /* streaming: the consumer is done with requests [0, released) */
    int *req_slot;          /* [max_request] */
    const uint8_t **req_ptr;/* [max_request] */
    unsigned char *done;    /* [max_request] 0 pending, 1 ready, 2 failed */
    char (*err)[256];       /* [max_request] */

    /* reader threads (pread, direct) */
    pthread_t *threads;
    int n_threads;
    pthread_mutex_t mu;
    pthread_cond_t work, ready;
    job *queue;             /* [max_request] the current request's reads (all engines) */
    int q_head, q_tail;
    int in_flight;          /* jobs taken by a reader and not finished */
    int64_t reads;          /* reads started (for fault injection) */
    bool stop;

    /* io_uring (the model's thread submits and reaps; no store threads) */
    struct io_uring ring;
    bool ring_ok;
    char ring_broken[160];  /* set when the ring itself failed: every later read fails with it */
    unsigned ring_depth;    /* the ring's size: most pieces in flight */
    unsigned window;        /* most pieces in flight for a small request (0 = ring_depth) */
    bool window_all;        /* the window applies to every request (FLASHMOE_URING_DEPTH) */
    bool poll;              /* fm_store_poll reaps and sends (FLASHMOE_URING_POLL=0: only the waits do) */
    unsigned u_cap;         /* most pieces in flight for the current request */
    uint64_t piece_bytes;   /* a read covers at most this much of a block */
    int pieces_per_job;     /* for the largest stride */
    upiece *pieces;         /* [max_request * pieces_per_job] */
    int *job_left;          /* [max_request] pieces of the job not finished (in flight or not yet sent) */
    double *job_t0;         /* [max_request] when its first piece was sent */
    int *slot_owner;        /* [n_slots] job whose reads may still write into the slot, -1 none */
    int u_job, u_piece;     /* the next piece to send */
    unsigned u_in_flight;   /* pieces prepared or sent and not reaped */
};

const char *fm_io_engine_name(fm_io_engine e) {
    switch (e) {
    case FM_IO_PREAD: return "pread";
    case FM_IO_DIRECT: return "direct";
    case FM_IO_MMAP: return "mmap";
    case FM_IO_URING: return "uring";
    }
    return "?";
}

static uint8_t *slot_mem(fm_expert_store *s, int i) { return s->slots_mem + (size_t)i * s->pm->max_expert_stride; }

/* No cache and not mmap: a request's experts stream through the ring of `capacity` buffers. */
static bool streaming(const fm_expert_store *s) { return !s->cache && s->opt.engine != FM_IO_MMAP && s->max_request > s->capacity; }

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
        if (got < stride && s->direct[layer] && got % 4096) { /* O_DIRECT stops off a page only at the end */
            snprintf(err, errcap, "%s: short read of expert %d of layer %d (%llu of %llu bytes; file truncated?)", L->file, e,
                     layer, (unsigned long long)got, (unsigned long long)stride);
            return false;
        }
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
                            (streaming(s) && s->queue[s->q_head].idx >= s->released + s->capacity)))
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
            s->stats[j.layer].spec_done += j.idx >= s->req_n;
        } else {
            s->done[j.idx] = 2;
            memcpy(s->err[j.idx], err, sizeof err);
        }
        pthread_cond_broadcast(&s->ready);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- io_uring engine ----
 * fm_store_request queues the request's reads and sends what it may at once (each expert's block
 * in pieces of at most piece_bytes; when streaming, only those whose ring buffer is free). The
 * model's thread reaps completions inside fm_store_wait, in whatever order they come, until the
 * expert it waits for is complete, sending further reads as buffers free up. Short reads are
 * sent again for the rest (with O_DIRECT from the last page boundary); a read that makes no
 * progress is a short read at the end of the file.
 *
 * Reads are split into pieces of URING_PIECE bytes, and a small request (at most URING_SMALL
 * reads: a decode step) keeps only URING_WINDOW pieces in flight, sent in request order: its
 * experts then arrive one after another at the disk's full rate, and the first ones compute while
 * the rest load (sent all at once they arrive together, late). Larger requests (prefill) keep
 * everything in flight: between two waits the model computes for long, and a window refilled
 * only at fm_store_wait would leave the disk idle. docs/SPEED.md has the measurements;
 * FLASHMOE_URING_PIECE / FLASHMOE_URING_DEPTH override both for experiments. */
#define URING_PIECE ((uint64_t)1 << 20)
#define URING_WINDOW 8u
#define URING_SMALL 16

static int job_pieces(const fm_expert_store *s, int jn) {
    uint64_t stride = s->pm->experts[s->queue[jn].layer].stride;
    return (int)((stride + s->piece_bytes - 1) / s->piece_bytes);
}

/* One piece of job jn is finished (read, failed or skipped). */
static void uring_piece_done(fm_expert_store *s, int jn) {
    const job *j = &s->queue[jn];
    if (--s->job_left[jn] > 0) return;
    if (s->slot_owner[j->slot] == jn) s->slot_owner[j->slot] = -1;
    if (s->done[j->idx] == 0) {
        s->done[j->idx] = 1;
        s->stats[j->layer].bytes_read += s->pm->experts[j->layer].stride;
        s->stats[j->layer].spec_done += j->idx >= s->req_n;
        s->stats[j->layer].read_seconds += fm_time_now() - s->job_t0[jn]; /* sent to reaped */
    }
}

/* Fails job jn with msg (the first failure's message is kept); pieces not sent yet are dropped. */
static void uring_fail_job(fm_expert_store *s, int jn, const char *msg) {
    const job *j = &s->queue[jn];
    if (s->done[j->idx] == 0) {
        s->done[j->idx] = 2;
        snprintf(s->err[j->idx], sizeof s->err[j->idx], "%s", msg);
    }
    if (s->u_job == jn) { /* drop its unsent pieces */
        int rest = job_pieces(s, jn) - s->u_piece;
        s->u_job++;
        s->u_piece = 0;
        for (int k = 0; k < rest; k++) uring_piece_done(s, jn);
    }
}

static void uring_prep(fm_expert_store *s, upiece *p) {
    const job *j = &s->queue[p->job];
    const fm_packed_expert_layer *L = &s->pm->experts[j->layer];
    struct io_uring_sqe *sqe = io_uring_get_sqe(&s->ring); /* never NULL: entries >= pieces in flight */
    uint64_t at = p->base + p->got;
    io_uring_prep_read(sqe, s->fds[j->layer], slot_mem(s, j->slot) + at, (unsigned)(p->len - p->got),
                       (uint64_t)j->expert * L->stride + at);
    io_uring_sqe_set_data(sqe, p);
    s->u_in_flight++;
}

/* Marks every unfinished job failed after the ring itself failed (message in ring_broken). */
static void uring_break(fm_expert_store *s, const char *what, int err) {
    if (!s->ring_broken[0])
        snprintf(s->ring_broken, sizeof s->ring_broken, "io_uring %s failed: %s", what, strerror(err));
    for (int jn = 0; jn < s->q_tail; jn++) {
        const job *j = &s->queue[jn];
        if (s->done[j->idx] == 0) {
            s->done[j->idx] = 2;
            snprintf(s->err[j->idx], sizeof s->err[j->idx], "%s: reading expert %d of layer %d: %s",
                     s->pm->experts[j->layer].file, j->expert, j->layer, s->ring_broken);
        }
    }
    s->u_job = s->q_tail;
    s->u_in_flight = 0; /* nothing more will be reaped */
}

/* Hands the prepared entries to the kernel and, with `wait`, waits for one completion; retries
 * while the kernel is short of resources, breaks the ring on any other error. */
static void uring_enter(fm_expert_store *s, bool wait) {
    for (int tries = 0; !s->ring_broken[0]; tries++) {
        int r;
        if (io_uring_sq_ready(&s->ring) > 0) {
            r = wait ? io_uring_submit_and_wait(&s->ring, 1) : io_uring_submit(&s->ring);
        } else if (wait) {
            struct io_uring_cqe *cqe;
            r = io_uring_wait_cqe(&s->ring, &cqe);
        } else {
            return;
        }
        if (r >= 0) return;
        if (r == -EINTR) continue;
        if ((r == -EAGAIN || r == -EBUSY) && tries < 10000) {
            if (!wait) return; /* sent again at the next call */
            usleep(100);
            continue;
        }
        uring_break(s, wait ? "wait" : "submit", -r);
    }
}

/* True when every read of the request proper has finished (speculative ones may then start). */
static bool real_reads_done(const fm_expert_store *s) {
    for (int i = 0; i < s->req_n; i++)
        if (s->done[i] == 0) return false;
    return true;
}

/* Sends every read that may start now: within the ring's depth, when streaming only into buffers
 * the consumer has released and no earlier read still writes into, and speculative reads only
 * once the request's own reads are in (then all of them). */
static void uring_pump(fm_expert_store *s) {
    /* speculative reads all go at once: nothing reaps or sends on this ring until the model's thread
     * comes back, which may be only at the next request (the window is for the request's own order) */
    if (s->u_job < s->q_tail && s->queue[s->u_job].idx >= s->req_n && real_reads_done(s)) s->u_cap = s->ring_depth;
    while (s->u_job < s->q_tail && s->u_in_flight < s->u_cap && !s->ring_broken[0]) {
        int jn = s->u_job;
        const job *j = &s->queue[jn];
        if (s->u_piece == 0) { /* the job starts */
            if (streaming(s) && j->idx >= s->released + s->capacity) break;
            if (j->idx >= s->req_n && !real_reads_done(s)) break; /* speculative reads go last */
            if (s->slot_owner[j->slot] >= 0) break;
            s->slot_owner[j->slot] = jn;
            s->job_left[jn] = job_pieces(s, jn);
            s->job_t0[jn] = fm_time_now();
            if (++s->reads == s->opt.fail_read_at) {
                char msg[256];
                snprintf(msg, sizeof msg, "%s: reading expert %d of layer %d failed: %s (injected: FLASHMOE_FAIL_READ_AT)",
                         s->pm->experts[j->layer].file, j->expert, j->layer, strerror(EIO));
                uring_fail_job(s, jn, msg);
                continue;
            }
        }
        upiece *p = &s->pieces[(size_t)jn * (size_t)s->pieces_per_job + (size_t)s->u_piece];
        uint64_t stride = s->pm->experts[j->layer].stride;
        p->job = jn;
        p->base = (uint64_t)s->u_piece * s->piece_bytes;
        p->len = stride - p->base < s->piece_bytes ? stride - p->base : s->piece_bytes;
        p->got = p->seen = 0;
        uring_prep(s, p);
        if (++s->u_piece == job_pieces(s, jn)) {
            s->u_job++;
            s->u_piece = 0;
        }
    }
    uring_enter(s, false);
}

static void uring_complete(fm_expert_store *s, struct io_uring_cqe *cqe) {
    upiece *p = io_uring_cqe_get_data(cqe);
    int res = cqe->res;
    io_uring_cqe_seen(&s->ring, cqe);
    s->u_in_flight--;
    int jn = p->job;
    const job *j = &s->queue[jn];
    const fm_packed_expert_layer *L = &s->pm->experts[j->layer];
    char msg[256];
    if ((res == -EINTR || res == -EAGAIN) && s->done[j->idx] != 2) {
        uring_prep(s, p);
        return;
    }
    if (res < 0) {
        snprintf(msg, sizeof msg, "%s: reading expert %d of layer %d failed: %s", L->file, j->expert, j->layer, strerror(-res));
        uring_fail_job(s, jn, msg);
        uring_piece_done(s, jn);
        return;
    }
    uint64_t now = p->got + (uint64_t)res;
    if (res == 0 || now <= p->seen) { /* no progress: the file ends inside the block */
        uint64_t off = (uint64_t)j->expert * L->stride, have = p->base + (now > p->seen ? now : p->seen);
        struct stat sb; /* pieces complete in any order: say how much of the block the file holds */
        if (fstat(s->fds[j->layer], &sb) == 0)
            have = (uint64_t)sb.st_size <= off ? 0 : (uint64_t)sb.st_size - off < L->stride ? (uint64_t)sb.st_size - off : L->stride;
        snprintf(msg, sizeof msg, "%s: short read of expert %d of layer %d (%llu of %llu bytes; file truncated?)", L->file,
                 j->expert, j->layer, (unsigned long long)have, (unsigned long long)L->stride);
        uring_fail_job(s, jn, msg);
        uring_piece_done(s, jn);
        return;
    }
    if (s->done[j->idx] == 2) { /* the job failed meanwhile: the rest of this piece is not needed */
        uring_piece_done(s, jn);
        return;
    }
    p->seen = now;
    p->got = now;
    if (p->got < p->len) { /* short read: the rest again (O_DIRECT: from the page boundary) */
        if (s->direct[j->layer]) p->got &= ~(uint64_t)4095;
        uring_prep(s, p);
        return;
    }
    if (s->cache && !s->direct[j->layer]) /* the bytes live in our cache now: not twice */
        posix_fadvise(s->fds[j->layer], (off_t)((uint64_t)j->expert * L->stride + p->base), (off_t)p->len,
                      POSIX_FADV_DONTNEED);
    uring_piece_done(s, jn);
}

/* Handles every completion that is ready; with `block`, waits for at least one first. */
static void uring_reap(fm_expert_store *s, bool block) {
    struct io_uring_cqe *cqe;
    if (block && s->u_in_flight > 0) uring_enter(s, true);
    while (s->u_in_flight > 0 && io_uring_peek_cqe(&s->ring, &cqe) == 0) uring_complete(s, cqe);
    uring_enter(s, false); /* short reads sent again */
}

/* Waits for every read in flight (the buffers must not be written after this). */
static void uring_drain(fm_expert_store *s) {
    s->u_job = s->q_tail; /* nothing more is sent */
    while (s->u_in_flight > 0 && !s->ring_broken[0]) uring_reap(s, true);
}

/* Sets up the ring; false (with the reason in why) if this kernel or sandbox refuses io_uring. */
static bool uring_init(fm_expert_store *s, char *why, size_t cap) {
    const char *off = getenv("FLASHMOE_URING_DISABLE");
    if (off && *off && strcmp(off, "0") != 0) {
        snprintf(why, cap, "disabled by FLASHMOE_URING_DISABLE");
        return false;
    }
    uint64_t piece = URING_PIECE;
    const char *ps = getenv("FLASHMOE_URING_PIECE"); /* tuning: bytes per read, rounded to 4 KiB; 0 = whole blocks */
    if (ps) piece = strtoull(ps, NULL, 10) & ~(uint64_t)4095;
    s->piece_bytes = piece && piece < s->pm->max_expert_stride ? piece : s->pm->max_expert_stride;
    s->pieces_per_job = (int)((s->pm->max_expert_stride + s->piece_bytes - 1) / s->piece_bytes);
    uint64_t want = (uint64_t)s->capacity * (uint64_t)s->pieces_per_job;
    unsigned depth = 8;
    while (depth < want && depth < 1024) depth *= 2;
    int r = io_uring_queue_init(depth, &s->ring, 0);
    if (r < 0) {
        snprintf(why, cap, "io_uring_queue_init: %s", strerror(-r));
        return false;
    }
    struct io_uring_probe *probe = io_uring_get_probe_ring(&s->ring);
    bool has_read = probe && io_uring_opcode_supported(probe, IORING_OP_READ);
    if (probe) io_uring_free_probe(probe);
    if (!has_read) {
        io_uring_queue_exit(&s->ring);
        snprintf(why, cap, "the kernel has no IORING_OP_READ (needs Linux 5.6)");
        return false;
    }
    s->ring_ok = true;
    s->ring_depth = s->u_cap = depth;
    s->window = URING_WINDOW;
    const char *ds = getenv("FLASHMOE_URING_DEPTH"); /* tuning: most pieces in flight for every request; 0 = all */
    if (ds) {
        s->window = (unsigned)strtoul(ds, NULL, 10);
        s->window_all = true;
    }
    const char *pv = getenv("FLASHMOE_URING_POLL"); /* experiments: 0 leaves the reaping to fm_store_wait */
    s->poll = !(pv && !strcmp(pv, "0"));
    return true;
}

/* Opens layer l's file: O_DIRECT for the direct engine (refusal is an error) and for uring (where
 * a file system that refuses it, at open or at the first read, gets buffered reads). */
static fm_status open_layer(fm_expert_store *s, int l) {
    const fm_packed_expert_layer *L = &s->pm->experts[l];
    const char *buffered = getenv("FLASHMOE_URING_BUFFERED"); /* tests and benchmarks: io_uring without O_DIRECT */
    bool want_direct = s->opt.engine == FM_IO_DIRECT ||
                       (s->opt.engine == FM_IO_URING && !(buffered && *buffered && strcmp(buffered, "0") != 0));
    s->fds[l] = open(L->file, O_RDONLY | O_CLOEXEC | (want_direct ? O_DIRECT : 0));
    s->direct[l] = want_direct && s->fds[l] >= 0;
    if (s->opt.engine == FM_IO_URING && s->fds[l] >= 0) {
        void *probe;
        if (posix_memalign(&probe, 4096, 4096) != 0) return fm_error_set(FM_ERR_NOMEM, "out of memory");
        ssize_t r = pread(s->fds[l], probe, 4096, 0);
        free(probe);
        if (r < 0 && errno == EINVAL) {
            close(s->fds[l]);
            s->fds[l] = -1;
        }
    }
    if (s->fds[l] < 0 && s->opt.engine == FM_IO_URING) {
        s->fds[l] = open(L->file, O_RDONLY | O_CLOEXEC);
        s->direct[l] = false;
    }
    if (s->fds[l] < 0)
        return fm_error_set(FM_ERR_IO, "%s: cannot open the expert file of layer %d%s: %s", L->file, l,
                            s->opt.engine == FM_IO_DIRECT ? " with O_DIRECT" : "", strerror(errno));
    posix_fadvise(s->fds[l], 0, 0, POSIX_FADV_RANDOM); /* one expert = one contiguous read: no readahead */
    return FM_OK;
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
    if (s->opt.engine == FM_IO_URING) {
        char why[160];
        if (!uring_init(s, why, sizeof why)) {
            fprintf(stderr, "flashmoe: io_uring is not available (%s): reading experts with the pread engine\n", why);
            s->opt.engine = FM_IO_PREAD;
        }
    }
    uint64_t stride = pm->max_expert_stride;
    s->n_slots = capacity;
    if (s->opt.engine != FM_IO_MMAP && s->opt.cache_bytes / stride > (uint64_t)capacity) {
        s->cache = true;
        s->n_slots = (int)(s->opt.cache_bytes / stride);
    }
    s->fds = malloc(sizeof(int) * (size_t)s->n_layers);
    s->direct = calloc((size_t)s->n_layers, sizeof(bool));
    s->maps = calloc((size_t)s->n_layers, sizeof(void *));
    s->stats = calloc((size_t)s->n_layers, sizeof *s->stats);
    s->slots = calloc((size_t)s->n_slots, sizeof *s->slots);
    s->index = malloc(sizeof(int) * (size_t)s->n_layers * (size_t)c->n_experts);
    /* with a cache a request may pin every slot: a prefill chunk asks for a whole layer at once */
    s->max_request = s->cache ? (s->n_slots < c->n_experts ? s->n_slots : c->n_experts)
                              : s->opt.engine == FM_IO_MMAP ? capacity : c->n_experts;
    if (s->max_request < capacity) s->max_request = capacity;
    size_t mr = (size_t)s->max_request;
    s->req_slot = calloc(mr, sizeof(int));
    s->req_ptr = calloc(mr, sizeof(uint8_t *));
    s->done = calloc(mr, 1);
    s->err = calloc(mr, sizeof *s->err);
    s->queue = calloc(mr, sizeof *s->queue);
    if (!s->fds || !s->direct || !s->maps || !s->stats || !s->slots || !s->index || !s->req_slot || !s->req_ptr || !s->done ||
        !s->err || !s->queue) {
        free(s->fds);
        s->fds = NULL;
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int l = 0; l < s->n_layers; l++) s->fds[l] = -1;
    for (size_t i = 0; i < (size_t)s->n_layers * (size_t)c->n_experts; i++) s->index[i] = -1;
    for (int i = 0; i < s->n_slots; i++) s->slots[i].layer = -1;
    if (s->opt.engine == FM_IO_URING) {
        s->pieces = calloc(mr * (size_t)s->pieces_per_job, sizeof *s->pieces);
        s->job_left = calloc(mr, sizeof(int));
        s->job_t0 = calloc(mr, sizeof(double));
        s->slot_owner = malloc(sizeof(int) * (size_t)s->n_slots);
        if (!s->pieces || !s->job_left || !s->job_t0 || !s->slot_owner) {
            st = fm_error_set(FM_ERR_NOMEM, "out of memory");
            goto fail;
        }
        for (int i = 0; i < s->n_slots; i++) s->slot_owner[i] = -1;
    }
    if (s->opt.engine != FM_IO_MMAP) {
        /* 2 MiB-aligned and, where the kernel allows, transparent huge pages: a RAM cache of GBs is
         * first touched by the reads themselves, and its 4 KiB page faults (costly in a VM) tripled
         * a cold prefill's expert wait with a 4 GB cache (docs/SPEED.md) */
        size_t bytes = (size_t)s->n_slots * stride, align = (size_t)2 << 20;
        if (posix_memalign((void **)&s->slots_mem, bytes >= align ? align : 4096, bytes) != 0) {
            s->slots_mem = NULL;
            st = fm_error_set(FM_ERR_NOMEM, "out of memory for %d expert buffers of %llu bytes", s->n_slots,
                              (unsigned long long)stride);
            goto fail;
        }
        if (bytes >= align) madvise(s->slots_mem, bytes & ~(align - 1), MADV_HUGEPAGE); /* a hint only */
    }
    long page = sysconf(_SC_PAGESIZE);
    s->page = page > 0 ? (uint64_t)page : 4096;
    s->map_resident = s->opt.map_resident && s->opt.engine == FM_IO_PREAD && !s->cache;
    for (int l = 0; s->map_resident && l < s->n_layers; l++)
        if (pm->experts[l].stride % s->page) s->map_resident = false; /* mincore needs whole pages */
    if (s->map_resident && !(s->resident = malloc((size_t)(stride / s->page)))) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    for (int l = 0; l < s->n_layers; l++) {
        const fm_packed_expert_layer *L = &pm->experts[l];
        if ((st = open_layer(s, l)) != FM_OK) goto fail;
        if (s->opt.engine == FM_IO_MMAP || s->map_resident) {
            size_t len = (size_t)(L->stride * (uint64_t)c->n_experts);
            s->maps[l] = mmap(NULL, len, PROT_READ, MAP_SHARED, s->fds[l], 0);
            if (s->maps[l] == MAP_FAILED) {
                s->maps[l] = NULL;
                st = fm_error_set(FM_ERR_IO, "%s: cannot map: %s", L->file, strerror(errno));
                goto fail;
            }
            madvise(s->maps[l], len, MADV_RANDOM);
            fm_mapguard_add(s->maps[l], len, L->file, l, L->stride); /* a truncated file: a clear error */
        }
    }
    if (s->opt.engine == FM_IO_PREAD || s->opt.engine == FM_IO_DIRECT) {
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
    if (s->ring_ok) {
        uring_drain(s); /* no read may land in freed buffers */
        io_uring_queue_exit(&s->ring);
    }
    if (s->fds)
        for (int l = 0; l < s->n_layers; l++) {
            if (s->maps && s->maps[l]) {
                fm_mapguard_remove(s->maps[l]);
                munmap(s->maps[l], (size_t)(s->pm->experts[l].stride * (uint64_t)s->pm->config.n_experts));
            }
            if (s->fds[l] >= 0) close(s->fds[l]);
        }
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->work);
    pthread_cond_destroy(&s->ready);
    free(s->threads);
    free(s->fds);
    free(s->direct);
    free(s->maps);
    free(s->resident);
    free(s->slots_mem);
    free(s->slots);
    free(s->index);
    free(s->stats);
    free(s->req_slot);
    free(s->req_ptr);
    free(s->done);
    free(s->err);
    free(s->queue);
    free(s->pieces);
    free(s->job_left);
    free(s->job_t0);
    free(s->slot_owner);
    free(s);
}

int fm_store_capacity(const fm_expert_store *s) { return s->max_request; }

fm_io_engine fm_store_engine(const fm_expert_store *s) { return s->opt.engine; }

bool fm_store_direct(const fm_expert_store *s) {
    for (int l = 0; l < s->n_layers; l++)
        if (!s->direct[l]) return false;
    return s->n_layers > 0;
}

bool fm_store_cached(const fm_expert_store *s) { return s->cache; }

void fm_store_buffer_memory(const fm_expert_store *s, void **base, uint64_t *bytes) {
    *base = s->slots_mem;
    *bytes = s->slots_mem ? (uint64_t)s->n_slots * s->pm->max_expert_stride : 0;
}

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

/* Ends the previous request: reads not started are dropped, reads under way finish, and cache
 * entries whose read failed or never ran are forgotten (so no later hit serves them). The queue is
 * left empty. */
static void finish_request(fm_expert_store *s) {
    int n_jobs = s->q_tail;
    if (s->opt.engine == FM_IO_URING) {
        uring_drain(s);
        for (int jn = 0; jn < n_jobs; jn++) s->slot_owner[s->queue[jn].slot] = -1;
        s->q_head = s->q_tail = s->u_job = s->u_piece = 0;
    } else {
        pthread_mutex_lock(&s->mu);
        n_jobs = s->q_tail;
        s->q_head = s->q_tail = 0;
        while (s->in_flight > 0) pthread_cond_wait(&s->ready, &s->mu);
        pthread_mutex_unlock(&s->mu);
    }
    if (!s->cache) return;
    for (int jn = 0; jn < n_jobs; jn++) {
        const job *j = &s->queue[jn];
        slot *sl = &s->slots[j->slot];
        if (s->done[j->idx] == 1 || sl->layer != j->layer || sl->expert != j->expert) continue;
        s->index[(size_t)sl->layer * (size_t)s->pm->config.n_experts + (size_t)sl->expert] = -1;
        sl->layer = -1;
    }
}

/* Queues the request's n_jobs reads (s->queue[0..n_jobs)) and starts them. */
static void start_jobs(fm_expert_store *s, int n_jobs) {
    if (s->opt.engine == FM_IO_URING) {
        s->released = 0;
        s->q_tail = n_jobs;
        s->u_job = s->u_piece = 0;
        s->u_cap = s->window && (s->window_all || n_jobs <= URING_SMALL) && s->window < s->ring_depth ? s->window : s->ring_depth;
        if (s->ring_broken[0]) uring_break(s, "", 0); /* fails the new jobs with the first message */
        uring_pump(s);
        return;
    }
    pthread_mutex_lock(&s->mu);
    s->released = 0;
    s->q_head = 0;
    s->q_tail = n_jobs;
    pthread_cond_broadcast(&s->work);
    pthread_mutex_unlock(&s->mu);
}

/* map_resident: whether every page of expert e of `layer` is in the page cache (mincore on the
 * layer's mapping; a page evicted after this check is read back by a page fault). */
static bool resident(fm_expert_store *s, int layer, int32_t e) {
    uint64_t stride = s->pm->experts[layer].stride;
    size_t pages = (size_t)(stride / s->page);
    uint8_t *at = (uint8_t *)s->maps[layer] + (uint64_t)e * stride;
    /* the first page alone first: a cold expert (the disk-bound case) costs one page's lookup */
    if (mincore(at, (size_t)s->page, s->resident) != 0 || !(s->resident[0] & 1)) return false;
    if (mincore(at, (size_t)stride, s->resident) != 0) return false;
    for (size_t i = 1; i < pages; i++)
        if (!(s->resident[i] & 1)) return false;
    return true;
}

fm_status fm_store_request(fm_expert_store *s, int layer, const int32_t *ids, int n) {
    const fm_config *c = &s->pm->config;
    if (layer < 0 || layer >= s->n_layers || n < 0 || n > s->max_request)
        return fm_error_set(FM_ERR_ARG, "expert store: bad request (layer %d, %d experts, at most %d)", layer, n,
                            s->max_request);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->n_experts)
            return fm_error_set(FM_ERR_ARG, "expert store: expert %d of layer %d out of range", ids[i], layer);
    finish_request(s);
    s->request_no++;
    s->req_layer = layer;
    s->req_n = n;
    s->spec_n = 0;
    s->stats[layer].requested += (uint64_t)n;
    int n_jobs = 0;
    /* hits first, so that no miss evicts a block this request uses (a speculative one, say) */
    for (int i = 0; i < n; i++) {
        s->done[i] = 0;
        s->req_slot[i] = -1;
        int ix = s->index[(size_t)layer * (size_t)c->n_experts + (size_t)ids[i]];
        if (!s->cache || s->opt.engine == FM_IO_MMAP || ix < 0) continue;
        slot *h = &s->slots[ix];
        if (h->speculative) s->stats[layer].spec_hits++;
        else s->stats[layer].hits++;
        h->speculative = false;
        h->pinned_by = h->last_use = s->request_no;
        h->uses++;
        s->done[i] = 1;
        s->req_slot[i] = ix;
        s->req_ptr[i] = slot_mem(s, ix);
    }
    for (int i = 0; i < n; i++) {
        if (s->opt.engine == FM_IO_MMAP) {
            s->req_ptr[i] = (const uint8_t *)s->maps[layer] + (uint64_t)ids[i] * s->pm->experts[layer].stride;
            s->done[i] = 1;
            continue;
        }
        if (s->req_slot[i] >= 0) continue; /* a hit */
        if (s->map_resident && resident(s, layer, ids[i])) {
            s->req_ptr[i] = (const uint8_t *)s->maps[layer] + (uint64_t)ids[i] * s->pm->experts[layer].stride;
            s->done[i] = 1;
            s->stats[layer].mapped++;
            continue;
        }
        int *ix = &s->index[(size_t)layer * (size_t)c->n_experts + (size_t)ids[i]];
        int sl = s->cache ? pick_victim(s) : i % s->capacity; /* no cache: a ring of staging slots */
        if (sl < 0) { /* cannot happen (n <= capacity <= slots); the next request forgets these jobs */
            s->req_n = 0;
            pthread_mutex_lock(&s->mu);
            s->q_tail = s->q_head = s->u_job = n_jobs; /* queued as taken: no reader starts them */
            pthread_mutex_unlock(&s->mu);
            return fm_error_set(FM_ERR_ARG, "expert store: no free buffer (capacity %d)", s->capacity);
        }
        slot *old = &s->slots[sl];
        if (s->cache && old->layer >= 0) s->index[(size_t)old->layer * (size_t)c->n_experts + (size_t)old->expert] = -1;
        old->layer = layer;
        old->expert = ids[i];
        old->uses = 0;
        old->speculative = false;
        if (s->cache) *ix = sl;
        s->queue[n_jobs++] = (job){.idx = i, .slot = sl, .layer = layer, .expert = ids[i]};
        s->slots[sl].pinned_by = s->request_no;
        s->slots[sl].last_use = s->request_no;
        s->slots[sl].uses++;
        s->req_slot[i] = sl;
        s->req_ptr[i] = slot_mem(s, sl);
    }
    start_jobs(s, n_jobs);
    return FM_OK;
}

/* The consumer is done with every expert of the request before i (it waits for i, or takes a
 * ready run from i): a streaming read may take their buffers. Reader-thread engines: s->mu held. */
static void release_before(fm_expert_store *s, int i) {
    if (i <= s->released) return;
    s->released = i;
    /* only a queued read can be waiting for a buffer to be released: waking idle readers for
     * nothing cost ~0.25 ms a layer on 2 cores when every expert was served in place */
    if (s->opt.engine != FM_IO_URING && s->q_head < s->q_tail) pthread_cond_broadcast(&s->work);
}

fm_status fm_store_wait(fm_expert_store *s, int i, const uint8_t **block) {
    if (i < 0 || i >= s->req_n) return fm_error_set(FM_ERR_ARG, "expert store: wait for %d of %d", i, s->req_n);
    unsigned char state;
    if (s->opt.engine == FM_IO_URING) {
        release_before(s, i);
        uring_reap(s, false);
        uring_pump(s);
        if ((state = s->done[i]) == 0) {
            double t0 = fm_time_now();
            while ((state = s->done[i]) == 0) {
                if (s->u_in_flight == 0) { /* cannot happen: i's read is either done or sent */
                    snprintf(s->err[i], sizeof s->err[i], "expert store: expert %d of the request was never read", i);
                    s->done[i] = state = 2;
                    break;
                }
                uring_reap(s, true);
                uring_pump(s);
            }
            s->stats[s->req_layer].wait_seconds += fm_time_now() - t0;
        }
        if (s->spec_n) uring_pump(s); /* the request's reads may all be in now */
    } else {
        pthread_mutex_lock(&s->mu);
        release_before(s, i);
        state = s->done[i];
        if (state == 0) {
            double t0 = fm_time_now();
            while ((state = s->done[i]) == 0) pthread_cond_wait(&s->ready, &s->mu);
            s->stats[s->req_layer].wait_seconds += fm_time_now() - t0;
        }
        pthread_mutex_unlock(&s->mu);
    }
    if (state == 2) {
        if (s->cache) { /* do not keep a half-read block as if it were cached */
            slot *sl = &s->slots[s->req_slot[i]];
            if (sl->layer >= 0) s->index[(size_t)sl->layer * (size_t)s->pm->config.n_experts + (size_t)sl->expert] = -1;
            sl->layer = -1;
        }
        return fm_error_set(FM_ERR_IO, "%s", s->err[i]);
    }
    *block = s->req_ptr[i];
    return FM_OK;
}

int fm_store_ready_run(fm_expert_store *s, int i0, int max, const uint8_t **blocks) {
    bool threads = s->opt.engine == FM_IO_PREAD || s->opt.engine == FM_IO_DIRECT;
    bool ring = streaming(s); /* buffers reused once a later expert is waited for */
    int n = 0;
    if (s->opt.engine == FM_IO_URING) { /* take the reads finished since the last look */
        release_before(s, i0);
        uring_reap(s, false);
        uring_pump(s);
    }
    if (threads) {
        pthread_mutex_lock(&s->mu);
        release_before(s, i0);
    }
    for (int i = i0; i >= 0 && i < s->req_n && n < max; i++, n++) {
        if (s->done[i] != 1 || (ring && s->req_slot[i] >= 0)) break;
        blocks[n] = s->req_ptr[i];
    }
    if (threads) pthread_mutex_unlock(&s->mu);
    return n;
}

void fm_store_hint(fm_expert_store *s, int layer, const int32_t *ids, int n) {
    const fm_config *c = &s->pm->config;
    if (s->opt.engine == FM_IO_MMAP || layer < 0 || layer >= s->n_layers) return;
    uint64_t stride = s->pm->experts[layer].stride;
    if (!s->cache) { /* no buffers to spare: ask the kernel (the page cache) instead */
        if (s->opt.engine != FM_IO_PREAD) return;
        for (int i = 0; i < n; i++)
            if (ids[i] >= 0 && ids[i] < c->n_experts)
                posix_fadvise(s->fds[layer], (off_t)((uint64_t)ids[i] * stride), (off_t)stride, POSIX_FADV_WILLNEED);
        return;
    }
    /* speculative reads into cache slots, queued behind the current request's reads */
    int added = 0;
    bool threads = s->opt.engine != FM_IO_URING;
    if (threads) pthread_mutex_lock(&s->mu);
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= c->n_experts) continue;
        int *ix = &s->index[(size_t)layer * (size_t)c->n_experts + (size_t)ids[i]];
        if (*ix >= 0 || s->req_n + s->spec_n >= s->max_request || s->q_tail >= s->max_request) continue;
        int sl = pick_victim(s);
        if (sl < 0) break;
        slot *v = &s->slots[sl];
        if (v->layer >= 0) s->index[(size_t)v->layer * (size_t)c->n_experts + (size_t)v->expert] = -1;
        *v = (slot){.layer = layer, .expert = ids[i], .last_use = s->request_no, .pinned_by = s->request_no,
                    .speculative = true};
        *ix = sl;
        int idx = s->req_n + s->spec_n++;
        s->done[idx] = 0;
        s->queue[s->q_tail++] = (job){.idx = idx, .slot = sl, .layer = layer, .expert = ids[i]};
        s->stats[layer].spec_reads++;
        added++;
    }
    if (threads) {
        if (added) pthread_cond_broadcast(&s->work);
        pthread_mutex_unlock(&s->mu);
    } else if (added) {
        uring_pump(s);
    }
}

void fm_store_poll(fm_expert_store *s) {
    if (s->opt.engine != FM_IO_URING || !s->poll) return;
    uring_reap(s, false);
    uring_pump(s);
}

fm_store_layer_stats fm_store_layer_stats_get(const fm_expert_store *s, int layer) { return s->stats[layer]; }

void fm_store_reset_stats(fm_expert_store *s) { memset(s->stats, 0, sizeof *s->stats * (size_t)s->n_layers); }
