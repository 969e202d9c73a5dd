/* Token sampling from float logits, and stop conditions on the generated stream.
 *
 * Sampler pipeline, in Hugging Face's order (transformers' logits processors / warpers, which vLLM
 * follows too):
 *   1. penalties on tokens recorded with fm_sampler_accept (within the last penalty_last_n):
 *      repetition (HF / llama.cpp: a positive logit is divided by the penalty, a negative one
 *      multiplied), then presence (subtract once) and frequency (subtract per occurrence)
 *   2. temperature <= 0: greedy, the highest logit (lowest id among equals); otherwise logits / T
 *   3. top-k: the k highest (lowest id first among equals)
 *   4. top-p: the smallest set, by descending probability, whose mass reaches p
 *   5. min-p: tokens whose probability is at least min_p times the most likely one's
 *   6. one draw from what is left, renormalised, with the sampler's own seeded generator
 * The same seed, parameters, history and logits give the same tokens on every machine.
 *
 * Stop handling (fm_stop) watches the decoded text for stop strings, across token boundaries, and
 * the ids for stop tokens, and tells what text is safe to show. */
#ifndef FM_TEXT_SAMPLER_H
#define FM_TEXT_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"

typedef struct fm_sampler_params {
    float temperature;        /* <= 0: greedy */
    int32_t top_k;            /* <= 0: off */
    float top_p;              /* >= 1: off; else in (0, 1) */
    float min_p;              /* <= 0: off; else in (0, 1] */
    float repetition_penalty; /* 1: off; > 0 */
    float presence_penalty;   /* 0: off */
    float frequency_penalty;  /* 0: off */
    int32_t penalty_last_n;   /* how many recent accepted tokens the penalties see; <= 0: all */
    uint64_t seed;
} fm_sampler_params;

typedef struct fm_sampler fm_sampler;

/* Neutral parameters: temperature 1, no top-k / top-p / min-p, no penalties, seed 0. */
fm_sampler_params fm_sampler_default_params(void);

/* True when the parameters pick the largest logit and nothing else (temperature <= 0, no
 * penalties): then the caller may take the argmax where the logits are (fm_session_eval_greedy). */
bool fm_sampler_params_greedy(const fm_sampler_params *params);

/* Creates a sampler for n_vocab logits. params NULL = defaults. Errors: FM_ERR_ARG naming the
 * parameter out of range (NaN, top_p <= 0, min_p > 1, repetition_penalty <= 0, n_vocab < 1 or
 * >= 2^31), FM_ERR_NOMEM. */
fm_status fm_sampler_new(const fm_sampler_params *params, int64_t n_vocab, fm_sampler **out);

/* Frees a sampler (NULL is fine). */
void fm_sampler_free(fm_sampler *s);

/* Forgets the token history and restarts the generator from `seed`. */
void fm_sampler_reset(fm_sampler *s, uint64_t seed);

/* Records a token for the penalties (prompt tokens too, if they should count, then each generated
 * token). FM_ERR_ARG for an id outside [0, n_vocab). */
fm_status fm_sampler_accept(fm_sampler *s, int32_t id);

/* Picks the next token from n_vocab logits (not modified). Does not record it: call accept.
 * FM_ERR_ARG when a logit is NaN or +inf, or every token is -inf. */
fm_status fm_sampler_sample(fm_sampler *s, const float *logits, int32_t *out_id);

/* The distribution sample() draws from for these logits (after penalties and every filter):
 * probs[n_vocab] gets each token's probability, 0 for tokens filtered out (greedy: 1 for the
 * chosen token). Uses no randomness. Same errors as sample. */
fm_status fm_sampler_probs(fm_sampler *s, const float *logits, float *probs);

/* ================================ stopping ================================ */

typedef enum fm_stop_reason {
    FM_STOP_NONE = 0,   /* go on */
    FM_STOP_TOKEN = 1,  /* a stop id was generated (its text is not shown) */
    FM_STOP_STRING = 2, /* a stop string appeared in the text (it and anything after it are not shown) */
} fm_stop_reason;

typedef struct fm_stop fm_stop;

/* Stop ids and stop strings (non-empty UTF-8; copied). Either list may be empty.
 * Errors: FM_ERR_ARG (empty string, NULL with a count), FM_ERR_NOMEM. */
fm_status fm_stop_new(const int32_t *ids, size_t n_ids, const char *const *strings, size_t n_strings, fm_stop **out);

/* Frees a stop watcher (NULL is fine). */
void fm_stop_free(fm_stop *s);

/* Feeds one generated token: its id and the text it decoded to (e.g. fm_detok output; may be empty).
 * *emit / *emit_len get the text now safe to show (valid until the next call on s): everything
 * except a tail that could still be the start of a stop string. *reason says whether to stop; on a
 * stop, emit ends right before the stop string (or holds everything before the stop token), and
 * later pushes are refused (FM_ERR_ARG). Errors: FM_ERR_NOMEM, FM_ERR_ARG. */
fm_status fm_stop_push(fm_stop *s, int32_t id, const char *text, size_t len, fm_stop_reason *reason,
                       const char **emit, size_t *emit_len);

/* Generation ended for another reason (length limit, EOS handled by the caller): returns the
 * held-back text (valid until the next call on s). */
const char *fm_stop_flush(fm_stop *s, size_t *len);

/* After a stop: the index of the stop id (FM_STOP_TOKEN) or stop string (FM_STOP_STRING) that
 * matched; -1 before any stop. */
int fm_stop_matched(const fm_stop *s);

#endif
