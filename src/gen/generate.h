/* The generation loop shared by `flashmoe run`, `flashmoe chat` and the server: evaluate a prompt,
 * then sample tokens one at a time, streaming only text that is safe to show (whole UTF-8
 * characters, nothing that could still become a stop string), until a stop token, a stop string,
 * the token limit or a cancel. */
#ifndef FM_GEN_GENERATE_H
#define FM_GEN_GENERATE_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "flashmoe.h"
#include "text/sampler.h"
#include "text/tokenizer.h"

typedef struct fm_gen_params {
    int64_t max_tokens;
    fm_sampler_params sampling;
    const int32_t *stop_ids;           /* e.g. <|im_end|>, <|endoftext|> */
    size_t n_stop_ids;
    const char *const *stop_strings;
    size_t n_stop_strings;
    volatile sig_atomic_t *cancel;     /* polled once per token (Ctrl-C); may be NULL */
} fm_gen_params;

typedef enum fm_finish_reason {
    FM_FINISH_STOP = 0,      /* a stop token or stop string */
    FM_FINISH_LENGTH = 1,    /* max_tokens reached */
    FM_FINISH_CANCELLED = 2, /* *cancel was set */
} fm_finish_reason;

typedef struct fm_gen_result {
    fm_finish_reason finish;
    int64_t n_prompt;        /* tokens evaluated for the prompt */
    int64_t n_generated;     /* tokens sampled (the stop token included) */
    int32_t *ids;            /* [n_generated] the sampled ids, malloc'd: free it */
    double prefill_seconds, decode_seconds;
} fm_gen_result;

/* Called with each piece of visible text; return false to stop generating (counts as cancelled). */
typedef bool (*fm_gen_text_fn)(void *user, const char *text, size_t len);

/* Evaluates prompt[0..n_prompt) appended to the session (n_prompt may be 0 when `first_logits`
 * already holds the logits to sample from), then generates as fm_gen_params says. `tok` turns ids
 * into text (NULL: no text callback calls). On success *res is filled (free res->ids). */
fm_status fm_generate(fm_session *s, const fm_tokenizer *tok, const int32_t *prompt, int64_t n_prompt,
                      const fm_gen_params *gp, fm_gen_text_fn on_text, void *user, fm_gen_result *res);

/* The usual stop ids of a Qwen tokenizer: <|im_end|> and <|endoftext|> (those it has); returns how
 * many were written to out (room for 2). */
int fm_gen_default_stop_ids(const fm_tokenizer *tok, int32_t *out);

#endif
