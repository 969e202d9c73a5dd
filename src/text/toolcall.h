/* Tool calls in model output: finds <tool_call>...</tool_call> blocks in generated text and turns
 * each into a function name + JSON arguments object.
 *
 * Two body forms:
 *   JSON (Qwen3):                 <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>
 *   XML (Qwen3.5, Qwen3-Coder):   <tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>
 * XML parameter values are raw text (one leading and one trailing newline removed). With tools given,
 * each is converted by its JSON-schema type: string -> the raw text; integer / number / object /
 * array -> parsed as JSON (an integer must be integral); boolean -> true/false (also Python's
 * True/False, which the templates print); null -> null/None; a list of types tries each. Without a
 * schema for it: JSON if the text parses as JSON, else the raw string.
 *
 * A block that does not parse exactly (bad JSON, unknown key, missing tag, a function not among
 * the tools, a value not of its schema type, duplicate parameter, unterminated at the end) is
 * reported as malformed with its raw text: never a crash, never a guessed call.
 *
 * Streaming: feed decoded text as it is generated; text outside calls comes out as soon as it can
 * no longer begin "<tool_call>", and fm_toolcall_pending() tells the CLI to hold output while a call
 * is being generated. The caller passes the answer only (after </think>): calls inside reasoning are
 * not the parser's business. See docs/CHAT.md. */
#ifndef FM_TEXT_TOOLCALL_H
#define FM_TEXT_TOOLCALL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "flashmoe.h"
#include "text/chat.h"

typedef enum fm_toolcall_format {
    FM_TOOLCALL_ANY = 0,  /* per block: a body starting with '{' is JSON, anything else XML */
    FM_TOOLCALL_JSON = 1, /* Qwen3 */
    FM_TOOLCALL_XML = 2,  /* Qwen3.5, Qwen3-Coder */
} fm_toolcall_format;

typedef struct fm_toolcall {
    bool ok;           /* false: malformed; name and arguments are NULL and error says why */
    char *name;        /* NUL-terminated function name */
    json_t *arguments; /* a JSON object, owned by the call */
    char *raw;         /* the block as generated, "<tool_call>...</tool_call>" (to the end if unterminated) */
    size_t raw_len;
    size_t content_offset; /* bytes of content (text outside calls) the stream had produced before this block */
    char error[192];   /* for malformed calls: one line saying what is wrong */
} fm_toolcall;

typedef struct fm_toolcall_parser fm_toolcall_parser;

/* The tool-call format a chat template teaches its model (JSON for Qwen3, XML otherwise). */
fm_toolcall_format fm_toolcall_format_for(fm_chat_template kind);

/* Creates a streaming parser. tools (an OpenAI-style array, as given to fm_chat_render; may be NULL)
 * gives the known function names and parameter schemas; the parser keeps a reference to it.
 * Errors: FM_ERR_ARG (tools not an array, format out of range), FM_ERR_NOMEM. */
fm_status fm_toolcall_parser_new(fm_toolcall_format fmt, const json_t *tools, fm_toolcall_parser **out);

/* Frees a parser and its calls (NULL is fine). */
void fm_toolcall_parser_free(fm_toolcall_parser *p);

/* Feeds len bytes of generated text (any split, even inside a tag or a UTF-8 character). Text
 * outside tool calls becomes content; completed blocks become calls. Malformed blocks are not an
 * error: the call says so. Errors: FM_ERR_NOMEM, FM_ERR_ARG (feed after finish). */
fm_status fm_toolcall_feed(fm_toolcall_parser *p, const char *text, size_t len);

/* Ends the stream: held-back text becomes content, an unterminated block a malformed call. */
fm_status fm_toolcall_finish(fm_toolcall_parser *p);

/* The content produced since the previous take (*len bytes, NUL-terminated; valid until the next
 * call on p). Concatenating all takes gives all text outside tool calls. */
const char *fm_toolcall_take_content(fm_toolcall_parser *p, size_t *len);

/* True while text is held back: inside a <tool_call> block, or after what may be its beginning. */
bool fm_toolcall_pending(const fm_toolcall_parser *p);

/* Number of blocks completed so far (valid and malformed), and the i-th (NULL if out of range;
 * valid while p lives). */
size_t fm_toolcall_count(const fm_toolcall_parser *p);
const fm_toolcall *fm_toolcall_get(const fm_toolcall_parser *p, size_t i);

typedef struct fm_toolcall_result {
    char *content; /* all text outside tool calls, NUL-terminated */
    size_t content_len;
    fm_toolcall *calls;
    size_t n_calls;
} fm_toolcall_result;

/* One shot: parses a complete output. On success *out owns its parts (free with
 * fm_toolcall_result_free). Errors as for the streaming functions. */
fm_status fm_toolcall_parse(fm_toolcall_format fmt, const json_t *tools, const char *text, size_t len,
                            fm_toolcall_result *out);

/* Frees a result's parts and empties it (NULL is fine). */
void fm_toolcall_result_free(fm_toolcall_result *r);

#endif
