/* A fixed pool of worker threads that splits a range of items among itself and the caller.
 * One job at a time; fm_pool_run returns when every item is done. Not re-entrant. */
#ifndef FM_BACKEND_CPU_THREADPOOL_H
#define FM_BACKEND_CPU_THREADPOOL_H

#include <stdint.h>

typedef struct fm_pool fm_pool;

/* fn processes items [begin, end) of a job; `arg` is passed through. */
typedef void (*fm_pool_fn)(void *arg, int64_t begin, int64_t end);

/* Starts n_threads - 1 workers (the caller is the n-th); n_threads <= 0 means the number of online
 * CPUs. Returns NULL if a thread cannot be started. */
fm_pool *fm_pool_init(int n_threads);

/* Stops and joins the workers (NULL is fine). */
void fm_pool_free(fm_pool *pool);

/* Number of threads working on a job, the caller included. */
int fm_pool_size(const fm_pool *pool);

/* Runs fn over [0, n_items) in contiguous chunks, at least min_chunk items each, on all threads.
 * pool may be NULL (runs on the caller). */
void fm_pool_run(fm_pool *pool, fm_pool_fn fn, void *arg, int64_t n_items, int64_t min_chunk);

#endif
