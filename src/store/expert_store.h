/* The expert store: where the engine gets routed experts' weights from. The model asks for a
 * layer's experts by id as soon as routing is known (fm_store_request), computes what it can, and
 * takes each expert's bytes as they arrive (fm_store_wait). Behind that: a read engine (a pool of
 * pread threads, the same with O_DIRECT, io_uring, or mmap for comparison), and optionally an
 * in-process RAM cache with frequency-weighted LRU replacement. With the pread engine and no
 * cache (trusting the page cache), experts already in the page cache can be used in place through
 * a mapping of the file instead of being copied out (map_resident). Counters per layer feed
 * `flashmoe bench`. One request at a time; the model's thread calls it; the pread/direct engines
 * read on the store's own threads, io_uring has no threads: the model's thread sends a request's
 * reads and reaps their completions while it waits.
 *
 * io_uring (FM_IO_URING): one ring per store, sized for a request's reads; files opened with
 * O_DIRECT where the file system allows it (buffered reads otherwise). When the kernel or a
 * sandbox refuses io_uring (or FLASHMOE_URING_DISABLE=1 is set) the store falls back to the pread
 * engine and says so in one line on stderr. Reads go in 1 MiB pieces; a decode-sized request (at
 * most 16 experts) keeps 8 pieces in flight, in request order, so its experts arrive one after
 * another; a larger one keeps all in flight. FLASHMOE_URING_PIECE=BYTES (0 = one read per expert)
 * and FLASHMOE_URING_DEPTH=N (pieces in flight for every request, 0 = all) override these;
 * FLASHMOE_URING_BUFFERED=1 skips O_DIRECT (tests, benchmarks). */
#ifndef FM_STORE_EXPERT_STORE_H
#define FM_STORE_EXPERT_STORE_H

#include <stdbool.h>
#include <stdint.h>

#include "flashmoe.h"
#include "formats/packed.h"

typedef struct fm_store_options {
    fm_io_engine engine;
    int io_threads;       /* reader threads (0 = 4); not used by io_uring (no threads) */
    uint64_t cache_bytes; /* in-process RAM cache (0 = none: buffers for one request only) */
    int64_t fail_read_at; /* fault injection for tests: the N-th read (1-based) fails with EIO; 0 = never
                           * (set from the environment variable FLASHMOE_FAIL_READ_AT by fm_model_open) */
    bool map_resident;    /* pread engine without a RAM cache: an expert whose pages are all in the page
                           * cache is used in place, through a read-only mapping of its layer file,
                           * instead of being copied out by a read (counted as `mapped`); the others
                           * are read as before */
} fm_store_options;

typedef struct fm_store_layer_stats {
    uint64_t requested; /* experts asked for */
    uint64_t hits;      /* served from the RAM cache (not counting speculative reads) */
    uint64_t mapped;    /* served in place from the page cache (map_resident), not read */
    uint64_t spec_reads; /* speculative reads started by fm_store_hint */
    uint64_t spec_hits;  /* requested experts that a speculative read had brought in */
    uint64_t spec_done;  /* speculative reads that reached RAM (the rest were dropped unstarted) */
    uint64_t bytes_read;
    double read_seconds; /* summed over reads (reads run in parallel: can exceed wall time) */
    double wait_seconds; /* time the model's thread waited for bytes */
} fm_store_layer_stats;

typedef struct fm_expert_store fm_expert_store;

/* Opens every layer's expert file of `pm` (which must outlive the store). `capacity` = the read
 * buffers it keeps without a RAM cache (with one, the cache's slots serve as buffers). */
fm_status fm_store_open(const fm_packed_model *pm, int capacity, const fm_store_options *opt, fm_expert_store **out);

/* Stops the reader threads, closes the files and frees the buffers (NULL is fine). */
void fm_store_free(fm_expert_store *s);

/* Most experts one request may ask for: with a RAM cache, as many as it has slots (up to every
 * expert of a layer: a prefill chunk's whole layer in one request, its reads all under way); with
 * mmap, `capacity`; otherwise every expert of a layer, streamed through a ring of `capacity`
 * buffers (a buffer is reused once the consumer waits for a later expert, so experts must be
 * waited for in order). */
int fm_store_capacity(const fm_expert_store *s);

/* Starts making experts ids[0..n) of `layer` available (ids distinct, n <= fm_store_capacity) and
 * returns at once. Blocks from the previous request become invalid; when streaming, waiting for
 * expert i also ends the validity of the blocks of experts before i. */
fm_status fm_store_request(fm_expert_store *s, int layer, const int32_t *ids, int n);

/* Waits until the i-th expert of the current request is in memory and returns a pointer to its
 * block (pm->experts[layer].stride bytes), valid until the next request. A short read, a read error
 * or an id out of range fails with a message naming the layer, the expert and the file. */
fm_status fm_store_wait(fm_expert_store *s, int i, const uint8_t **block);

/* Without waiting: how many experts of the current request from i0 on (at most max) are in memory
 * in a row with blocks that stay valid until the next request (RAM cache hits and finished reads
 * with a cache, experts used in place, mmap); their blocks into blocks[]. 0 when expert i0 is not
 * in yet, or its block is a streaming buffer (which only fm_store_wait hands out). Like a wait for
 * i0, it ends the validity of the streaming buffers of the experts before i0. Lets the model
 * compute several ready experts in one go. */
int fm_store_ready_run(fm_expert_store *s, int i0, int max, const uint8_t **blocks);

/* A hint, given after fm_store_request, that experts ids[0..n) of `layer` are likely to be
 * requested next. With a RAM cache (and the pread, direct or uring engine) their reads start at
 * once into cache slots, queued behind the current request's own reads: the next request finds
 * them as hits (counted as spec_hits), waits for one still being read, and drops those not yet
 * started. Without a cache the pread engine asks the kernel to read them into the page cache
 * (posix_fadvise WILLNEED); other engines ignore it. ids beyond the room of one request are
 * ignored. */
void fm_store_hint(fm_expert_store *s, int layer, const int32_t *ids, int n);

/* Lets the read engine move on without blocking: with io_uring, whose reads only advance when the
 * model's thread reaps them, takes the finished reads and sends the next ones (the request's
 * window and the speculative reads stay full while the model computes); the other engines read
 * on their own threads and return at once. Cheap: call it between the matmuls of a layer. */
void fm_store_poll(fm_expert_store *s);

/* Counters of one layer since open (or the last reset). */
fm_store_layer_stats fm_store_layer_stats_get(const fm_expert_store *s, int layer);

/* Zeroes the counters. */
void fm_store_reset_stats(fm_expert_store *s);

/* The engine the store reads with: the one asked for, or FM_IO_PREAD where io_uring was refused. */
fm_io_engine fm_store_engine(const fm_expert_store *s);

/* True when every expert file is read with O_DIRECT (direct engine; io_uring where the file
 * system allows it). */
bool fm_store_direct(const fm_expert_store *s);

/* The engine's name ("pread", "direct", "mmap", "uring"). */
const char *fm_io_engine_name(fm_io_engine e);

/* The one block of memory every block that fm_store_wait hands out lies in (the read buffers and
 * the RAM cache's slots: *base, *bytes, page-aligned), so that a caller may page-lock it for DMA
 * (the CUDA backend registers it). The mmap engine has none (*base NULL, *bytes 0): its blocks are
 * in the file mappings, as are the blocks served in place with map_resident. The block stays
 * valid and in place until fm_store_free. */
void fm_store_buffer_memory(const fm_expert_store *s, void **base, uint64_t *bytes);

/* True when the store keeps a RAM cache (cache_bytes above one request's buffers, not mmap). */
bool fm_store_cached(const fm_expert_store *s);

/* Bytes the store keeps in memory (buffers and cache). */
uint64_t fm_store_memory_bytes(const fm_expert_store *s);

#endif
