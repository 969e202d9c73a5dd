/* Measures this machine's RAM read bandwidth: the floor for anything that streams weights from
 * memory (flashmoe bench, flashmoe kernelbench). */
#ifndef FM_BACKEND_CPU_MEMBW_H
#define FM_BACKEND_CPU_MEMBW_H

#include <stddef.h>

#include "backend/cpu/ops.h"
#include "backend/cpu/threadpool.h"

/* Reads buf[0..bytes) split among the pool's threads (pool NULL: the calling thread) with `level`'s
 * widest loads, `repeats` times (1..64); returns the median rate in GB/s (1e9 bytes/s). */
double fm_ram_read_gbs_buf(fm_pool *pool, fm_cpu_level level, const void *buf, size_t bytes, int repeats);

/* Allocates and writes a buffer of `bytes` (real pages, not the zero page), measures it with the
 * best SIMD level as above, frees it; 0 if the allocation fails. */
double fm_ram_read_gbs(fm_pool *pool, size_t bytes, int repeats);

#endif
