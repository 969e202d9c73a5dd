/* flashmoe — public C API.
 *
 * Runs Mixture-of-Experts language models from a packed model directory (see docs/FORMAT.md):
 * dense weights are resident, routed experts are read per token from per-layer expert files.
 *
 * Conventions: functions return fm_status (FM_OK = 0, failures negative) or NULL; after a failure
 * fm_last_error() holds one line naming the file / tensor / field at fault (thread-local).
 * A model is read-only after open and may be shared by sessions; a session is used by one thread
 * at a time. */
#ifndef FLASHMOE_H
#define FLASHMOE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum fm_status {
    FM_OK = 0,
    FM_ERR_IO = -1,          /* a file could not be opened, read or written */
    FM_ERR_FORMAT = -2,      /* a file or field is malformed or inconsistent */
    FM_ERR_UNSUPPORTED = -3, /* well-formed but not something this build can run */
    FM_ERR_NOMEM = -4,       /* an allocation failed */
    FM_ERR_ARG = -5,         /* a caller-supplied argument is out of range */
} fm_status;

/* The calling thread's last error message ("" if none yet). Valid until the next failing call. */
const char *fm_last_error(void);

/* A short name for a status ("malformed input", ...). */
const char *fm_status_name(fm_status s);

typedef struct fm_model fm_model;
typedef struct fm_session fm_session;

/* How routed experts are read from their files. */
typedef enum fm_io_engine {
    FM_IO_PREAD = 0,  /* a pool of threads doing pread; the OS page cache caches (default) */
    FM_IO_DIRECT = 1, /* the same with O_DIRECT: bypasses the page cache */
    FM_IO_MMAP = 2,   /* pointers into mapped files (page faults instead of reads; for comparison) */
    FM_IO_URING = 3,  /* io_uring, O_DIRECT where allowed: a request's reads sent at once (falls back
                       * to FM_IO_PREAD where the kernel refuses io_uring) */
} fm_io_engine;

/* Where the forward pass runs. */
typedef enum fm_backend {
    FM_BACKEND_CPU = 0,  /* the CPU kernels (default) */
    FM_BACKEND_CUDA = 1, /* the GPU (a build with `make CUDA=1` and a CUDA device; docs/CUDA.md) */
} fm_backend;

/* Replacement policy of the CUDA backend's VRAM expert cache. */
typedef enum fm_vram_policy {
    FM_VRAM_LRU = 0,  /* least recently used (default) */
    FM_VRAM_FLRU = 1, /* frequency-weighted LRU: lowest uses / (1 + age / slots), as the RAM cache */
} fm_vram_policy;

#define FM_PREFETCH_AUTO (-1)  /* fm_model_params.prefetch: on when there is a RAM cache (CPU backend) */
#define FM_PREFETCH_DEFAULT 2  /* experts read ahead per layer when on (docs/SPEED.md, --prefetch) */

typedef struct fm_model_params {
    int n_threads;         /* worker threads for compute; 0 = number of online CPUs */
    int n_experts_used;    /* routed experts per token; 0 = the model's own top-k (fewer lowers quality) */
    fm_io_engine io_engine;
    int io_threads;        /* expert reader threads; 0 = 4 */
    uint64_t cache_bytes;  /* in-process RAM cache for experts; 0 = none (the page cache still works) */
    uint64_t mem_budget;   /* bytes the process may keep (dense weights, caches, state, buffers); 0 = no
                            * limit. With a budget and no cache_bytes, the cache gets what is left. */
    int prefetch;          /* decode: guess layer l+1's experts with its router applied to layer l's
                            * output and read this many of the likeliest while layer l+1's mixer runs
                            * (into the RAM cache; without one a page-cache hint, pread only); 0 = off;
                            * FM_PREFETCH_AUTO (fm_model_default_params): FM_PREFETCH_DEFAULT experts
                            * when the expert store has a RAM cache (cache_bytes / mem_budget) and the
                            * backend is the CPU (the GPU path measured no gain), else off */
    fm_backend backend;    /* FM_BACKEND_CUDA: dense weights and session state in VRAM, routed experts
                            * through a VRAM cache (fm_model_open fails if this build or machine has no GPU) */
    uint64_t vram_budget;  /* CUDA: device bytes for dense weights, session state and the expert cache;
                            * 0 = the device's free memory at open less 1 GiB */
    fm_vram_policy vram_policy; /* CUDA: the expert cache's replacement policy */
} fm_model_params;

/* Default parameters (all zero: auto threads, the model's own top-k). */
fm_model_params fm_model_default_params(void);

/* Opens a packed model directory (model.json + dense.bin + experts/). `params` may be NULL.
 * On success *out owns the model; free it with fm_model_free. */
fm_status fm_model_open(const char *dir, const fm_model_params *params, fm_model **out);

/* Frees a model (NULL is fine). All its sessions must be freed first. */
void fm_model_free(fm_model *model);

/* Vocabulary size = number of logits per token. */
int64_t fm_model_n_vocab(const fm_model *model);

/* Creates a session (KV cache, DeltaNet conv and recurrent state) for up to n_ctx tokens. */
fm_status fm_session_init(fm_model *model, int64_t n_ctx, fm_session **out);

/* Frees a session (NULL is fine). */
void fm_session_free(fm_session *session);

/* The model a session runs. */
fm_model *fm_session_model(const fm_session *session);

/* Forgets every token: the next eval starts at position 0. */
void fm_session_reset(fm_session *session);

/* Number of tokens already evaluated in this session. */
int64_t fm_session_n_past(const fm_session *session);

/* Evaluates n_tokens ids appended to the session's context as one batch (n_tokens = 1 is a decode
 * step). logits, if not NULL, receives float32 logits: [n_tokens, n_vocab] when all_logits, else
 * [n_vocab] for the last token only. Ids outside [0, n_vocab) and contexts longer than n_ctx are
 * rejected (FM_ERR_ARG) before any state changes. */
fm_status fm_session_eval(fm_session *session, const int32_t *ids, int64_t n_tokens, float *logits,
                          bool all_logits);

/* fm_session_eval for greedy decoding: *next = the id of the last token's largest logit (the lowest
 * id among equal ones), or -1 when a logit is NaN. With --backend cuda and every expert in VRAM the
 * argmax of a decode step runs on the GPU and the logits never leave it. */
fm_status fm_session_eval_greedy(fm_session *session, const int32_t *ids, int64_t n_tokens, int32_t *next);

#ifdef __cplusplus
}
#endif

#endif
