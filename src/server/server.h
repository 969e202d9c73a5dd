/* `flashmoe serve`: an OpenAI-compatible HTTP API over one model.
 *
 * Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (and /v1/models/ID),
 * GET /health, GET /metrics (Prometheus text). The /v1 prefix is optional. docs/SERVER.md lists
 * the request fields understood, the extensions, the errors and the design:
 *
 *   HTTP threads (src/server/http.c, one per connection) parse and validate a request, render the
 *   chat template and tokenize, then queue a job (src/server/engine.c) and stream what the engine
 *   thread generates; one engine thread owns the model and N sessions. A client that disconnects
 *   cancels its job; a full queue is answered 503 with Retry-After. Errors are 4xx in OpenAI's
 *   {"error": {"message", "type", "param", "code"}} shape. */
#ifndef FM_SERVER_SERVER_H
#define FM_SERVER_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"
#include "text/chat.h"
#include "text/sampler.h"
#include "text/tokenizer.h"

typedef struct fm_server fm_server;

typedef struct fm_server_config {
    const char *host;         /* NULL = "127.0.0.1" */
    int port;                 /* 0 = any free port */
    const char *api_key;      /* NULL or "": no authentication; else "Authorization: Bearer KEY" on all but /health */
    int n_parallel;           /* sessions (slots) generating in turn; 0 = 1 */
    int queue_size;           /* requests that may wait for a slot; 0 = 16 */
    int64_t n_ctx;            /* context tokens per session; 0 = 4096 */
    int64_t max_tokens_cap;   /* most tokens one answer may have; 0 = what the context leaves */
    size_t max_body_bytes;    /* 0 = 8 MiB */
    int max_connections;      /* 0 = 128 */
    int request_timeout_ms;   /* to receive one request; 0 = 30 s */
    const char *model_id;     /* the name /v1/models lists and answers carry; NULL = "flashmoe" */
    fm_sampler_params sampling; /* defaults for fields a request leaves out */
    bool seed_set;            /* sampling.seed was given: use it when a request has no seed (else random) */
    const int32_t *stop_ids;  /* end-of-sequence ids (<|im_end|>, ...); at most 8 */
    size_t n_stop_ids;
    const char *const *stop_strings; /* added to every request's stop list; at most 8 */
    size_t n_stop_strings;
    bool test_hooks;          /* accept the test-only request fields (docs/SERVER.md); never in production */
} fm_server_config;

/* Starts serving `model` with tokenizer `tok` and chat template `kind` (FM_CHAT_UNKNOWN: the chat
 * endpoint answers 400, completions still work). model and tok must outlive the server; the server
 * is the model's only user until fm_server_stop. Errors: those of binding the port and of creating
 * the sessions. */
fm_status fm_server_start(fm_model *model, const fm_tokenizer *tok, fm_chat_template kind, const fm_server_config *cfg,
                          fm_server **out);

/* The port the server listens on. */
int fm_server_port(const fm_server *s);

/* Stops: ends queued and running requests, closes connections, joins every thread, frees (NULL is
 * fine). */
void fm_server_stop(fm_server *s);

#endif
