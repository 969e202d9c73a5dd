/* The inference side of `flashmoe serve`: one thread owns the model and N sessions ("slots").
 *
 * Requests arrive as jobs (token ids + generation parameters) through a bounded FIFO queue; the
 * HTTP threads make them and wait on them. The engine thread admits the oldest queued job whenever
 * a slot is free, into the free slot whose session already holds the longest prefix of the job's
 * prompt (its prompt cache), and then advances every busy slot in turn: a chunk of prompt (prefill)
 * or one generated token per step, so N clients stream concurrently. A slot keeps its session and
 * the ids it holds after its job ends; a later job whose prompt extends them evaluates only the new
 * tokens. A session cannot be rolled back (DeltaNet layers keep a recurrent state), so a slot whose
 * tokens are not all a prefix of the new prompt starts over.
 *
 * Generated text is appended to the job as it becomes safe to show (whole UTF-8 characters, stop
 * strings held back: the rules of src/gen/generate.h) and the job's eventfd is signalled. A job is
 * cancelled by fm_job_free (the client went away): a queued job leaves the queue at once, a running
 * one stops at its slot's next step. The engine also asks the job's `gone` callback before each
 * step, so a client that hangs up is noticed there even while compute keeps every core busy and the
 * HTTP thread waiting for it cannot run. */
#ifndef FM_SERVER_ENGINE_H
#define FM_SERVER_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"
#include "gen/generate.h"
#include "text/sampler.h"
#include "text/tokenizer.h"

typedef struct fm_engine fm_engine;
typedef struct fm_job fm_job;

typedef struct fm_engine_config {
    int n_slots;           /* sessions; 0 = 1 */
    int queue_cap;         /* jobs that may wait for a slot; 0 = 16 */
    int64_t n_ctx;         /* tokens per session; 0 = 4096 */
    int64_t prefill_chunk; /* prompt tokens evaluated per step; 0 = 512 */
} fm_engine_config;

/* Starts the engine thread with cfg->n_slots sessions of `model` (which must outlive the engine;
 * the engine is its only user until fm_engine_stop). tok decodes the generated ids.
 * Errors: FM_ERR_NOMEM, those of fm_session_init. */
fm_status fm_engine_start(fm_model *model, const fm_tokenizer *tok, const fm_engine_config *cfg, fm_engine **out);

/* Ends every job (queued and running ones finish with FM_ERR_IO "the server is stopping"; later
 * submits are refused) and joins the engine thread (NULL is fine). The jobs stay their owners' to
 * free with fm_job_free, which needs the engine: free the engine after every owner is done. */
void fm_engine_stop(fm_engine *e);

/* Frees a stopped engine: its sessions and itself (NULL is fine). */
void fm_engine_free(fm_engine *e);

typedef struct fm_job_params {
    const int32_t *prompt;  /* [n_prompt] ids, copied; n_prompt >= 1 */
    size_t n_prompt;
    int64_t max_tokens;     /* >= 1 */
    fm_sampler_params sampling;
    const int32_t *stop_ids; /* copied; at most 16 */
    size_t n_stop_ids;
    const char *const *stop_strings; /* copied; at most 16 */
    size_t n_stop_strings;
    const int32_t *forced;  /* test hook: these ids replace sampling, then the first stop id; NULL = sample */
    size_t n_forced;
    int token_delay_ms;     /* test hook: sleep after each generated token (0..1000) */
    bool (*gone)(void *ctx); /* optional: asked by the engine thread before each step; true cancels the
                              * job (e.g. its client hung up). Must not block. */
    void *gone_ctx;
} fm_job_params;

/* Makes a job from p (everything copied). Errors: FM_ERR_ARG (empty prompt, max_tokens < 1, too
 * many stops, an empty stop string), FM_ERR_NOMEM. */
fm_status fm_job_new(const fm_job_params *p, fm_job **out);

typedef enum fm_submit_result {
    FM_SUBMIT_OK = 0,
    FM_SUBMIT_FULL = 1,     /* the queue holds queue_cap jobs already: try later */
    FM_SUBMIT_STOPPING = 2, /* the engine is stopping */
} fm_submit_result;

/* Queues a new job (not yet submitted). On FM_SUBMIT_OK the engine works on it until it is done or
 * freed; otherwise the caller still owns it and frees it with fm_job_free. */
fm_submit_result fm_engine_submit(fm_engine *e, fm_job *j);

/* A descriptor that becomes readable when the job has news (text, start, end); fm_job_take
 * consumes the notification. */
int fm_job_fd(const fm_job *j);

typedef struct fm_job_state {
    bool started;            /* admitted to a slot (n_prompt, n_cached are set) */
    bool done;               /* finished: finish (and status) are set; no more text will come */
    fm_finish_reason finish;
    fm_status status;        /* FM_OK, or why the job failed (error holds the message) */
    char error[256];
    int64_t n_prompt;        /* prompt tokens */
    int64_t n_cached;        /* of which the slot's session already held (not evaluated again) */
    int64_t n_generated;     /* tokens generated (a stop token included) */
    double queue_seconds, prefill_seconds, decode_seconds;
    double started_unix;     /* wall-clock time of admission (CLOCK_REALTIME, seconds) */
} fm_job_state;

/* Takes the text generated since the previous take (*text malloc'd, caller frees; NULL when
 * *len is 0) and copies the job's state into *st. */
void fm_job_take(fm_job *j, fm_job_state *st, char **text, size_t *len);

/* Cancels the job if it is not done (a queued job leaves the queue; a running one stops at its
 * next step, which this waits for), then frees it (NULL is fine). e may be NULL for a job never
 * submitted. */
void fm_job_free(fm_engine *e, fm_job *j);

typedef struct fm_engine_stats {
    int n_slots, slots_busy, queue_depth, queue_cap;
    int64_t n_ctx;
    uint64_t jobs_done, jobs_cancelled, jobs_failed, jobs_rejected;
    uint64_t prompt_tokens;    /* prompt tokens of admitted jobs */
    uint64_t cached_tokens;    /* of those, served from a slot's session */
    uint64_t prefill_tokens;   /* prompt tokens evaluated */
    uint64_t generated_tokens;
    double prefill_seconds, decode_seconds; /* engine-thread time spent in each */
    uint64_t expert_requested, expert_hits, expert_mapped, expert_bytes_read; /* the expert store's counters */
} fm_engine_stats;

/* A consistent copy of the engine's counters (any thread). */
void fm_engine_stats_get(fm_engine *e, fm_engine_stats *out);

#endif
