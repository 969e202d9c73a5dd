/* Byte-level BPE tokenizer, exact to Hugging Face `tokenizers` for the Qwen2 / Qwen3 / Qwen3.5 family.
 *
 * Reads the pipeline from a tokenizer.json: model BPE (vocab + merges by rank, merges written as
 * "a b" strings or ["a", "b"] pairs), normalizer NFC or none, pre-tokenizer
 * Sequence[Split(Regex, Isolated)..., ByteLevel(use_regex=false)] or ByteLevel(use_regex=true)
 * (GPT-2 pattern), decoder ByteLevel, added tokens matched before splitting (longest first).
 * Anything else is refused at load with FM_ERR_UNSUPPORTED and a message naming it.
 * See docs/TOKENIZER.md. A loaded tokenizer is read-only and may be shared by threads. */
#ifndef FM_TEXT_TOKENIZER_H
#define FM_TEXT_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"

typedef struct fm_tokenizer fm_tokenizer;

/* Loads a Hugging Face tokenizer.json. On success *out owns the tokenizer (free with
 * fm_tokenizer_free). Errors: FM_ERR_IO (cannot read), FM_ERR_FORMAT (not JSON, missing
 * model / vocab / merges, a merge naming an unknown token, ...), FM_ERR_UNSUPPORTED (a model kind
 * other than BPE, or a pipeline step this tokenizer does not implement). */
fm_status fm_tokenizer_load(const char *tokenizer_json_path, fm_tokenizer **out);

/* Frees a tokenizer (NULL is fine). */
void fm_tokenizer_free(fm_tokenizer *tok);

/* Number of ids: the largest vocab or added-token id + 1. */
int64_t fm_tokenizer_n_vocab(const fm_tokenizer *tok);

/* Encodes len bytes of UTF-8 text (NUL bytes are ordinary characters) as HF's
 * encode(text).ids does. Added tokens ("<|im_start|>", "<think>", ...) are matched only when
 * allow_special is true; with false every added token is ordinary text (a user's message must be
 * encoded that way). On success *ids is malloc'd (caller frees; may be NULL when *n_ids is 0).
 * Invalid UTF-8 -> FM_ERR_ARG with the byte offset in the message. */
fm_status fm_tokenizer_encode(const fm_tokenizer *tok, const char *text, size_t len, bool allow_special,
                              int32_t **ids, size_t *n_ids);

/* Raw bytes of one token as HF's ByteLevel decoder produces them (an added token: its content).
 * Not NUL-terminated and possibly not valid UTF-8 on its own. NULL (and *len = 0) if id is out of
 * range or names no token. `len` may be NULL. Valid while tok lives. */
const char *fm_tokenizer_token_bytes(const fm_tokenizer *tok, int32_t id, size_t *len);

/* Id of a token by its text as written in tokenizer.json: an added token's content
 * ("<|im_end|>") or a vocab entry in byte-level form ("Ġhello"); -1 if absent. */
int32_t fm_tokenizer_find(const fm_tokenizer *tok, const char *token_text);

/* Streaming decoder with UTF-8 hold-back. Feed ids one at a time; each push writes only complete,
 * valid UTF-8 characters and keeps an incomplete tail (at most 3 bytes) for the next push. Byte
 * sequences that can no longer become valid are written as U+FFFD, one per maximal invalid subpart,
 * so the concatenated output of all pushes plus the flush equals HF's decode(ids) (errors="replace").
 * All ids are written, special ones included. No allocation; copy freely. */
typedef struct fm_detok {
    const fm_tokenizer *tok;
    unsigned char pend[4]; /* held-back bytes: a valid prefix of one UTF-8 character */
    uint32_t n_pend;
    uint32_t need;         /* total length of the character pend starts */
} fm_detok;

/* Output room that makes a push of a token of n bytes never truncate: every byte may become a
 * 3-byte U+FFFD, plus the held-back tail. */
#define FM_DETOK_CAP(n) (3 * ((size_t)(n) + 4))

/* Starts a decoder over tok with nothing held back. */
void fm_detok_init(fm_detok *d, const fm_tokenizer *tok);

/* Feeds one id; writes the newly completed text to out and returns the number of bytes written
 * (never more than cap; a character that does not fit is dropped, so give
 * cap >= FM_DETOK_CAP(token length), e.g. 4096 for any Qwen token). Unknown ids write nothing. */
size_t fm_detok_push(fm_detok *d, int32_t id, char *out, size_t cap);

/* Ends the stream: writes the held-back tail (an incomplete character becomes one U+FFFD, 3 bytes)
 * and resets the decoder. Returns the bytes written. */
size_t fm_detok_flush(fm_detok *d, char *out, size_t cap);

#endif
