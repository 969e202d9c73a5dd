#include "backend/cpu/threadpool.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define SPIN_POLLS 20000 /* ~50-100 us of pause instructions before a worker sleeps */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

struct fm_pool {
    int n_threads;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    uint64_t generation; /* bumped for each job; read and written atomically (workers spin on it) */
    int pending;         /* workers still busy with the current job (atomic: the caller polls it) */
    int stop;
    fm_pool_fn fn;
    void *arg;
    int64_t n_items, chunk;
};

static void run_share(fm_pool *p, int idx) {
    int64_t begin = (int64_t)idx * p->chunk, end = begin + p->chunk;
    if (end > p->n_items) end = p->n_items;
    if (begin < end) p->fn(p->arg, begin, end);
}

typedef struct worker_arg {
    fm_pool *pool;
    int idx;
} worker_arg;

static void *worker(void *varg) {
    worker_arg *wa = varg;
    fm_pool *p = wa->pool;
    int idx = wa->idx;
    free(wa);
    uint64_t seen = 0;
    for (;;) {
        /* jobs come in bursts (a layer is dozens of matmuls): poll a little before sleeping, since
         * a futex wake-up costs more than a small matmul */
        for (int i = 0; i < SPIN_POLLS && __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE) == seen &&
                        !__atomic_load_n(&p->stop, __ATOMIC_RELAXED);
             i++)
            cpu_relax();
        pthread_mutex_lock(&p->mu);
        while (!p->stop && __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&p->start, &p->mu);
        if (p->stop) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE);
        pthread_mutex_unlock(&p->mu);
        run_share(p, idx);
        if (__atomic_sub_fetch(&p->pending, 1, __ATOMIC_ACQ_REL) == 0) {
            /* under the mutex: the caller either saw pending > 0 there and sleeps, or sees 0 */
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

fm_pool *fm_pool_init(int n_threads) {
    if (n_threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = n > 0 ? (int)n : 1;
    }
    fm_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    p->threads = calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->threads) {
        free(p);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            wa->pool = p;
            wa->idx = i;
        }
        if (!wa || pthread_create(&p->threads[i], NULL, worker, wa) != 0) {
            free(wa);
            p->n_threads = i; /* join only those started */
            fm_pool_free(p);
            return NULL;
        }
    }
    return p;
}

void fm_pool_free(fm_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    free(p);
}

int fm_pool_size(const fm_pool *p) { return p ? p->n_threads : 1; }

void fm_pool_run(fm_pool *p, fm_pool_fn fn, void *arg, int64_t n_items, int64_t min_chunk) {
    if (n_items <= 0) return;
    if (min_chunk < 1) min_chunk = 1;
    int64_t max_parts = (n_items + min_chunk - 1) / min_chunk;
    if (!p || p->n_threads == 1 || max_parts <= 1) {
        fn(arg, 0, n_items);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n_items = n_items;
    p->chunk = (n_items + p->n_threads - 1) / p->n_threads;
    if (p->chunk < min_chunk) p->chunk = min_chunk;
    __atomic_store_n(&p->pending, p->n_threads - 1, __ATOMIC_RELAXED);
    __atomic_store_n(&p->generation, __atomic_load_n(&p->generation, __ATOMIC_RELAXED) + 1, __ATOMIC_RELEASE); /* publishes the job above */
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    run_share(p, 0);
    /* the workers usually finish within microseconds of the caller: poll before sleeping, since
     * a futex wake-up costs more than that */
    for (int i = 0; i < SPIN_POLLS && __atomic_load_n(&p->pending, __ATOMIC_ACQUIRE) > 0; i++) cpu_relax();
    pthread_mutex_lock(&p->mu);
    while (__atomic_load_n(&p->pending, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
