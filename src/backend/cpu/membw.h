/* Measures this machine's RAM read bandwidth, the floor for anything that streams weights from
 * memory (flashmoe bench, kernelbench). */
#ifndef FM_BACKEND_CPU_MEMBW_H
#define FM_BACKEND_CPU_MEMBW_H

#include <stddef.h>

#include "backend/cpu/threadpool.h"

/* Reads a fresh buffer of `bytes` (allocated, written once, then summed) on all the pool's threads,
 * `repeats` times, and returns the median read rate in GB/s (1e9 bytes/s); 0 if allocation fails. */
double fm_ram_read_gbs(fm_pool *pool, size_t bytes, int repeats);

#endif
