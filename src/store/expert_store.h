/* The expert store: where the engine gets routed experts' weights from. The model asks for a
 * layer's experts by id and receives pointers to their packed blocks (docs/FORMAT.md); how the bytes
 * get there (plain reads today; caches, io_uring, O_DIRECT, overlap later) is this module's business.
 * Not thread-safe: one session evaluates at a time per store. */
#ifndef FM_STORE_EXPERT_STORE_H
#define FM_STORE_EXPERT_STORE_H

#include <stdint.h>

#include "flashmoe.h"
#include "formats/packed.h"

typedef struct fm_expert_store fm_expert_store;

typedef struct fm_store_stats {
    uint64_t experts_read; /* expert blocks fetched from files */
    uint64_t bytes_read;
    double read_seconds;   /* wall time spent in reads */
} fm_store_stats;

/* Opens every layer's expert file of `pm` (which must outlive the store). `capacity` = most experts
 * one fetch may ask for. */
fm_status fm_store_open(const fm_packed_model *pm, int capacity, fm_expert_store **out);

/* Closes the files and frees the buffers (NULL is fine). */
void fm_store_free(fm_expert_store *s);

/* Most experts one fetch may ask for. */
int fm_store_capacity(const fm_expert_store *s);

/* Makes experts ids[0..n) of `layer` available: blocks[i] points to expert ids[i]'s block
 * (pm->experts[layer].stride bytes) and stays valid until the next fetch. n <= capacity. A short read, a
 * read error or an id out of range fails with a message naming the layer, the expert and the file. */
fm_status fm_store_fetch(fm_expert_store *s, int layer, const int32_t *ids, int n, const uint8_t **blocks);

/* Counters since open. */
fm_store_stats fm_store_get_stats(const fm_expert_store *s);

#endif
