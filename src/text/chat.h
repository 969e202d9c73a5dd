/* Chat prompt rendering for the ChatML family as Qwen3, Qwen3.5 and Qwen3-Coder use it.
 *
 * The renderers are C transcriptions of the models' own Jinja chat templates (the copies in
 * shared/reference/templates/) and give the same text as Hugging Face's
 * apply_chat_template(messages, tools=..., tokenize=False, add_generation_prompt=...,
 * enable_thinking=...) byte for byte; tests/fixtures/chat/ holds transformers' renderings.
 *
 * Messages are a jansson array in the OpenAI shape:
 *   {"role": "system" | "user" | "assistant" | "tool",
 *    "content": string | null | [{"type": "text", "text": ...}, ...],
 *    "reasoning_content": string (assistant, optional),
 *    "tool_calls": [{"type": "function", "function": {"name": ..., "arguments": {...} or "<JSON text>"}}]}
 * and tools an OpenAI-style array ([{"type": "function", "function": {"name", "description",
 * "parameters"}}]) or NULL. Key order is kept (jansson keeps insertion order), since the templates
 * print objects in order.
 *
 * Security rule: the prompt comes back as segments. Only SPECIAL segments, which the template itself
 * emits (<|im_start|>, <|im_end|>, <think>, <tool_call>, ...), become control tokens; everything else,
 * message text above all, is tokenized with allow_special = false, so a user who types
 * "<|im_start|>system" gets ordinary text tokens. See docs/CHAT.md. */
#ifndef FM_TEXT_CHAT_H
#define FM_TEXT_CHAT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flashmoe.h"
#include "text/tokenizer.h"

typedef enum fm_chat_template {
    FM_CHAT_UNKNOWN = 0,
    FM_CHAT_QWEN3 = 1,       /* Qwen3 (hybrid thinking): JSON tool calls, <think> for the last turn */
    FM_CHAT_QWEN35 = 2,      /* Qwen3.5: XML tool calls, thinking on unless enable_thinking=false */
    FM_CHAT_QWEN3_CODER = 3, /* Qwen3-Coder: XML tool calls, tools listed as XML, no thinking */
} fm_chat_template;

/* enable_thinking as the template sees it: not passed, true or false. */
typedef enum fm_chat_thinking {
    FM_CHAT_THINKING_UNSET = 0,
    FM_CHAT_THINKING_ON = 1,
    FM_CHAT_THINKING_OFF = 2,
} fm_chat_thinking;

typedef struct fm_chat_flags {
    bool add_generation_prompt;       /* end with the assistant header (and <think> as the template says) */
    fm_chat_thinking enable_thinking; /* Qwen3 / Qwen3.5 only; Qwen3-Coder ignores it */
} fm_chat_flags;

typedef enum fm_chat_seg_kind {
    FM_CHAT_SEG_DATA = 0,     /* caller text: content, reasoning, tool JSON, names, arguments, results */
    FM_CHAT_SEG_TEMPLATE = 1, /* the template's own literal text, with no special token inside */
    FM_CHAT_SEG_SPECIAL = 2,  /* exactly one special token the template emits, e.g. "<|im_start|>" */
} fm_chat_seg_kind;

/* One piece of the prompt text. Segments tile the text in order; "is control" = kind != DATA. */
typedef struct fm_chat_segment {
    size_t offset, length;
    fm_chat_seg_kind kind;
} fm_chat_segment;

typedef struct fm_chat_prompt {
    char *text; /* NUL-terminated (content may hold NUL bytes: use len) */
    size_t len;
    fm_chat_segment *segs;
    size_t n_segs;
} fm_chat_prompt;

/* Which built-in renderer matches a chat template's Jinja text (a checkpoint's chat_template.jinja,
 * or tokenizer_config.json's "chat_template" string). Each built-in is recognised by a set of
 * distinctive substrings that pin the parts of its logic the renderer reproduces (tool format,
 * thinking default, reasoning handling) and by strings that must be absent (see docs/CHAT.md).
 * Unknown text -> FM_ERR_UNSUPPORTED naming the closest built-in and what it lacks. */
fm_status fm_chat_template_detect(const char *template_text, fm_chat_template *out);

/* The same for a model directory: reads DIR/chat_template.jinja, else DIR/tokenizer_config.json's
 * "chat_template" (a string, or a list of {"name", "template"} where "default" is used).
 * FM_ERR_IO when neither file has a template, FM_ERR_FORMAT for a malformed tokenizer_config.json. */
fm_status fm_chat_template_detect_dir(const char *dir, fm_chat_template *out);

/* "qwen3", "qwen3.5", "qwen3-coder" ("unknown" otherwise). */
const char *fm_chat_template_name(fm_chat_template kind);

/* Renders messages (+ tools, may be NULL or empty) the way the template `kind` does. flags NULL =
 * {add_generation_prompt = false, thinking unset}. On success *out owns the text and segments
 * (free with fm_chat_prompt_free); on failure *out is empty. Errors (FM_ERR_ARG, message naming the
 * message index and field): what the template itself rejects (no messages; Qwen3.5: no user query,
 * system message not first, a role other than system/user/assistant/tool), messages that are not
 * objects with a string role, content that is not a string / null / list of text parts, tool calls
 * without a string name. Images and videos in content -> FM_ERR_UNSUPPORTED (text-only engine).
 * Where the Jinja template would fail on ordinary OpenAI input, the renderer is lenient in a
 * documented way (docs/CHAT.md): null content renders as "" (a tool message's null content as the
 * template prints it, "None"), a list of text parts as their concatenation, arguments given as a
 * JSON string are parsed for the XML templates, missing arguments render as {} (Qwen3). */
fm_status fm_chat_render(fm_chat_template kind, const json_t *messages, const json_t *tools,
                         const fm_chat_flags *flags, fm_chat_prompt *out);

/* Frees a prompt's buffers and empties it (NULL or an empty prompt is fine). */
void fm_chat_prompt_free(fm_chat_prompt *p);

/* Token ids of a rendered prompt: each SPECIAL segment becomes its one token id (looked up in tok;
 * a template token the tokenizer lacks -> FM_ERR_UNSUPPORTED), and each run of the other segments
 * between them is encoded as one text with allow_special = false. This equals HF's tokenization of
 * the whole text whenever caller text holds no added-token text, and never turns caller text into
 * a control token. On success *ids is malloc'd (caller frees). */
fm_status fm_chat_tokenize(const fm_tokenizer *tok, const fm_chat_prompt *p, int32_t **ids, size_t *n);

/* Serialises a JSON value as Python's json.dumps(v, ensure_ascii=False) does (the templates'
 * `tojson`): ", " and ": " separators, keys in order, non-ASCII kept, floats as Python repr
 * ("1e-07", "100.0"). *out is malloc'd and NUL-terminated. */
fm_status fm_chat_json_dumps(const json_t *v, char **out, size_t *len);

#endif
