/* Splits a chat answer, as it streams, into what the OpenAI-style response carries:
 * reasoning_content (the text inside <think>...</think>, as vLLM, SGLang and llama.cpp return it),
 * content, and tool calls (parsed by src/text/toolcall.h from the content only).
 *
 * Where reasoning starts: when the prompt itself ends inside a think block (Qwen3.5's generation
 * prompt opens "<think>\n") the answer starts as reasoning; otherwise an answer that begins with
 * "<think>" (Qwen3) starts a reasoning block, and anything else is content throughout. Reasoning
 * ends at the first "</think>". The newlines the templates put around the reasoning (after
 * <think>, before </think>) and at the start of the content (after </think>) are dropped, as the
 * templates' own split does. Markers split across pieces are handled: text that may still be the
 * start of a marker is held back until it cannot. */
#ifndef FM_SERVER_OUTPUT_H
#define FM_SERVER_OUTPUT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "flashmoe.h"
#include "text/toolcall.h"

typedef struct fm_out fm_out;

/* thinking_open: the prompt ended inside a think block. tools: the tools whose calls to parse in the
 * content (NULL: none; the parser keeps a reference), in format fmt. */
fm_status fm_out_new(bool thinking_open, const json_t *tools, fm_toolcall_format fmt, fm_out **out);

/* Frees the splitter (NULL is fine). */
void fm_out_free(fm_out *o);

/* Feeds generated text (whole UTF-8 characters). */
fm_status fm_out_feed(fm_out *o, const char *text, size_t len);

/* Ends the answer: everything held back is released (an unfinished tool call becomes a malformed
 * one, whose raw text is returned as content). */
fm_status fm_out_finish(fm_out *o);

/* What became ready since the previous take: reasoning text, content text (each NUL-terminated,
 * valid until the next call on o; *len may be 0), and the range [*first, *end) of tool calls now
 * complete (fetch each with fm_out_call). Malformed tool calls are not calls: their raw text is
 * part of the content. */
void fm_out_take(fm_out *o, const char **reasoning, size_t *reasoning_len, const char **content,
                 size_t *content_len, size_t *first_call, size_t *end_call);

/* The i-th valid tool call (NULL if out of range). */
const fm_toolcall *fm_out_call(const fm_out *o, size_t i);

/* Number of valid tool calls so far. */
size_t fm_out_n_calls(const fm_out *o);

#endif
