/* The OpenAI-compatible API of `flashmoe serve` (see server.h and docs/SERVER.md): routing,
 * request validation, prompt building, and answers (JSON or server-sent events). */
#include "server/server.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include "server/engine.h"
#include "server/http.h"
#include "server/output.h"
#include "text/toolcall.h"
#include "util/error.h"

#define MAX_STOP_STRINGS 16
#define MAX_MESSAGES 100000

struct fm_server {
    fm_http_server *http;
    fm_engine *eng;
    fm_model *model;
    const fm_tokenizer *tok;
    fm_chat_template kind;
    int64_t V, n_ctx, max_tokens_cap;
    char *api_key, *model_id;
    fm_sampler_params sp;
    bool seed_set, test_hooks;
    int32_t stop_ids[8];
    size_t n_stop_ids;
    char *stops[8];
    size_t n_stops;
    time_t created;
    atomic_uint_least64_t status_count[600];
    atomic_uint_least64_t seed_counter;
};

/* ================================================================== small helpers */

/* A JSON string of n bytes; invalid UTF-8 (never expected: the decoder emits whole characters)
 * becomes U+FFFD instead of failing. */
static json_t *jstr(const char *p, size_t n) {
    json_t *j = json_stringn(p ? p : "", p ? n : 0);
    if (j) return j;
    char *q = malloc(n * 3 + 1);
    size_t k = 0;
    if (!q) return json_string("");
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)p[i];
        size_t len = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        json_t *probe = len && i + len <= n ? json_stringn(p + i, len) : NULL;
        if (probe) {
            memcpy(q + k, p + i, len);
            k += len;
            i += len;
            json_decref(probe);
        } else {
            memcpy(q + k, "\xef\xbf\xbd", 3);
            k += 3;
            i++;
        }
    }
    j = json_stringn(q, k);
    free(q);
    return j ? j : json_string("");
}

static void count_status(fm_server *s, int status) {
    if (status >= 100 && status < 600) atomic_fetch_add(&s->status_count[status], 1);
}

/* Sends j (stolen) as the whole answer. */
static void send_json(fm_server *s, fm_http_request *req, int status, json_t *j, const char *extra) {
    char *text = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(j);
    count_status(s, text ? status : 500);
    if (!text) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";
        fm_http_respond(req, 500, "application/json", NULL, oom, sizeof oom - 1);
        return;
    }
    size_t n = strlen(text);
    fm_http_respond(req, status, "application/json", extra, text, n);
    free(text);
}

static void send_error(fm_server *s, fm_http_request *req, int status, const char *type, const char *param,
                       const char *code, const char *fmt, ...) __attribute__((format(printf, 7, 8)));
static void send_error(fm_server *s, fm_http_request *req, int status, const char *type, const char *param,
                       const char *code, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *err = json_object();
    json_object_set_new(err, "message", jstr(msg, strlen(msg)));
    json_object_set_new(err, "type", json_string(type));
    json_object_set_new(err, "param", param ? jstr(param, strlen(param)) : json_null());
    json_object_set_new(err, "code", code ? json_string(code) : json_null());
    send_json(s, req, status, json_pack("{s:o}", "error", err),
              status == 503 ? "Retry-After: 1\r\n" : status == 401 ? "WWW-Authenticate: Bearer\r\n" : NULL);
}

/* A random id: prefix + 24 characters of [A-Za-z0-9]. */
static void random_id(const char *prefix, char *out, size_t cap) {
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char r[24];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
        static atomic_uint_least64_t ctr;
        uint64_t x = (uint64_t)time(NULL) * 6364136223846793005ull + atomic_fetch_add(&ctr, 1) * 1442695040888963407ull;
        for (size_t i = 0; i < sizeof r; i++) {
            x ^= x >> 29, x *= 0xbf58476d1ce4e5b9ull, x ^= x >> 32;
            r[i] = (unsigned char)x;
        }
    }
    size_t k = (size_t)snprintf(out, cap, "%s", prefix);
    for (size_t i = 0; i < sizeof r && k + 1 < cap; i++) out[k++] = al[r[i] % (sizeof al - 1)];
    out[k < cap ? k : cap - 1] = 0;
}

/* Constant-time comparison of the presented key with the expected one (time depends on the
 * expected key's length only). */
static bool key_matches(const char *given, const char *expected) {
    size_t gl = strlen(given), el = strlen(expected);
    unsigned char d = (unsigned char)(gl != el);
    for (size_t i = 0; i < el; i++) d |= (unsigned char)((i < gl ? (unsigned char)given[i] : 0) ^ (unsigned char)expected[i]);
    return d == 0;
}

static bool authorized(const fm_server *s, fm_http_request *req) {
    if (!s->api_key) return true;
    const char *h = fm_http_header(req, "authorization");
    if (!h || strncasecmp(h, "Bearer ", 7)) return false;
    h += 7;
    while (*h == ' ') h++;
    return key_matches(h, s->api_key);
}

/* ================================================================== request validation */

typedef struct perr {
    int status;
    char msg[512];
    char param[96];
    const char *code;
} perr;

static bool bad(perr *e, const char *param, const char *code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static bool bad(perr *e, const char *param, const char *code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    e->code = code;
    e->status = 400;
    return false;
}

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* Optional number in [lo, hi]: absent / null leave *out. */
static bool opt_number(json_t *o, const char *key, double lo, double hi, double *out, perr *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return true;
    if (!json_is_number(v)) return bad(e, key, "invalid_type", "'%s' must be a number, not %s", key, type_name(v));
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi)) return bad(e, key, "invalid_value", "'%s' must be between %g and %g", key, lo, hi);
    *out = x;
    return true;
}

static bool opt_int(json_t *o, const char *key, long long lo, long long hi, long long *out, bool *present, perr *e) {
    json_t *v = json_object_get(o, key);
    if (present) *present = false;
    if (!v || json_is_null(v)) return true;
    if (!json_is_integer(v)) return bad(e, key, "invalid_type", "'%s' must be an integer, not %s", key, type_name(v));
    long long x = json_integer_value(v);
    if (x < lo || x > hi) return bad(e, key, "invalid_value", "'%s' must be between %lld and %lld", key, lo, hi);
    *out = x;
    if (present) *present = true;
    return true;
}

static bool opt_bool(json_t *o, const char *key, bool *out, perr *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return true;
    if (!json_is_boolean(v)) return bad(e, key, "invalid_type", "'%s' must be a boolean, not %s", key, type_name(v));
    *out = json_is_true(v);
    return true;
}

/* Fields that must be absent or null (features this server does not have). */
static bool must_be_unset(json_t *o, const char *key, const char *why, perr *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v) || json_is_false(v)) return true;
    return bad(e, key, "unsupported_parameter", "'%s' is not supported: %s", key, why);
}

typedef struct gen_req {
    bool stream, include_usage;
    int64_t max_tokens;
    bool max_set;
    fm_sampler_params sp;
    const char *stops[MAX_STOP_STRINGS + 8];
    size_t n_stops;
    const char *forced; /* test hook */
    size_t forced_len;
    int delay_ms;
} gen_req;

/* The fields chat and completions share. Strings point into `body`. */
static bool parse_common(fm_server *s, json_t *body, bool chat, gen_req *g, perr *e) {
    memset(g, 0, sizeof *g);
    g->sp = s->sp;
    json_t *model = json_object_get(body, "model");
    if (model && !json_is_string(model) && !json_is_null(model))
        return bad(e, "model", "invalid_type", "'model' must be a string, not %s", type_name(model));
    if (!opt_bool(body, "stream", &g->stream, e)) return false;
    json_t *so = json_object_get(body, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) return bad(e, "stream_options", "invalid_type", "'stream_options' must be an object");
        json_t *iu = json_object_get(so, "include_usage");
        if (iu && !json_is_null(iu) && !json_is_boolean(iu))
            return bad(e, "stream_options.include_usage", "invalid_type", "'stream_options.include_usage' must be a boolean");
        g->include_usage = json_is_true(iu);
    }
    long long v = 0;
    bool present;
    if (!opt_int(body, "max_tokens", 1, INT32_MAX, &v, &present, e)) return false;
    if (present) g->max_tokens = v, g->max_set = true;
    if (chat) {
        if (!opt_int(body, "max_completion_tokens", 1, INT32_MAX, &v, &present, e)) return false;
        if (present) g->max_tokens = v, g->max_set = true;
    }
    double x;
    x = g->sp.temperature;
    if (!opt_number(body, "temperature", 0, 2, &x, e)) return false;
    g->sp.temperature = (float)x;
    x = g->sp.top_p;
    if (!opt_number(body, "top_p", 0, 1, &x, e)) return false;
    if (x <= 0) return bad(e, "top_p", "invalid_value", "'top_p' must be greater than 0");
    g->sp.top_p = (float)x;
    x = g->sp.min_p;
    if (!opt_number(body, "min_p", 0, 1, &x, e)) return false;
    g->sp.min_p = (float)x;
    x = g->sp.presence_penalty;
    if (!opt_number(body, "presence_penalty", -2, 2, &x, e)) return false;
    g->sp.presence_penalty = (float)x;
    x = g->sp.frequency_penalty;
    if (!opt_number(body, "frequency_penalty", -2, 2, &x, e)) return false;
    g->sp.frequency_penalty = (float)x;
    x = g->sp.repetition_penalty;
    if (!opt_number(body, "repetition_penalty", 0.01, 100, &x, e)) return false;
    g->sp.repetition_penalty = (float)x;
    v = g->sp.top_k;
    if (!opt_int(body, "top_k", -1, INT32_MAX, &v, NULL, e)) return false;
    g->sp.top_k = (int32_t)(v < 0 ? 0 : v);
    if (!opt_int(body, "seed", INT64_MIN, INT64_MAX, &v, &present, e)) return false;
    if (present) g->sp.seed = (uint64_t)v;
    else if (!s->seed_set) {
        uint64_t r;
        if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r) r = (uint64_t)time(NULL) ^ (atomic_fetch_add(&s->seed_counter, 1) << 32);
        g->sp.seed = r;
    }
    v = 1;
    if (!opt_int(body, "n", INT32_MIN, INT32_MAX, &v, NULL, e)) return false;
    if (v != 1) return bad(e, "n", "unsupported_value", "only n = 1 is supported");
    /* stop: a string or a list of strings (empty ones are ignored) */
    json_t *stop = json_object_get(body, "stop");
    if (stop && !json_is_null(stop)) {
        if (json_is_string(stop)) {
            if (json_string_length(stop)) g->stops[g->n_stops++] = json_string_value(stop);
        } else if (json_is_array(stop)) {
            if (json_array_size(stop) > MAX_STOP_STRINGS)
                return bad(e, "stop", "invalid_value", "at most %d stop strings", MAX_STOP_STRINGS);
            size_t i;
            json_t *it;
            json_array_foreach(stop, i, it) {
                if (!json_is_string(it)) return bad(e, "stop", "invalid_type", "'stop' must be a string or a list of strings");
                if (json_string_length(it)) g->stops[g->n_stops++] = json_string_value(it);
            }
        } else {
            return bad(e, "stop", "invalid_type", "'stop' must be a string or a list of strings, not %s", type_name(stop));
        }
    }
    for (size_t i = 0; i < s->n_stops; i++) g->stops[g->n_stops++] = s->stops[i];
    json_t *lb = json_object_get(body, "logit_bias");
    if (lb && !json_is_null(lb) && !(json_is_object(lb) && json_object_size(lb) == 0))
        return bad(e, "logit_bias", "unsupported_parameter", "'logit_bias' is not supported");
    json_t *rf = json_object_get(body, "response_format");
    if (rf && !json_is_null(rf)) {
        const char *t = json_string_value(json_object_get(rf, "type"));
        if (!json_is_object(rf) || !t) return bad(e, "response_format", "invalid_type", "'response_format' must be an object with a 'type'");
        if (strcmp(t, "text")) return bad(e, "response_format", "unsupported_value", "response_format '%s' is not supported (only 'text')", t);
    }
    if (s->test_hooks) {
        json_t *fo = json_object_get(body, "fm_test_output");
        if (fo && !json_is_null(fo)) {
            if (!json_is_string(fo)) return bad(e, "fm_test_output", "invalid_type", "'fm_test_output' must be a string");
            g->forced = json_string_value(fo);
            g->forced_len = json_string_length(fo);
        }
        v = 0;
        if (!opt_int(body, "fm_test_token_delay_ms", 0, 1000, &v, NULL, e)) return false;
        g->delay_ms = (int)v;
    }
    return true;
}

/* ================================================================== chat prompts */

static bool role_ok(const char *r) {
    return !strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant") || !strcmp(r, "tool") || !strcmp(r, "developer");
}

/* The messages as the renderer takes them: "developer" becomes "system", null tool_calls /
 * reasoning_content are dropped. Returns a new array, or NULL with *e set. */
static json_t *prepare_messages(json_t *msgs, perr *e) {
    if (!msgs) {
        bad(e, "messages", "missing_required_parameter", "'messages' is required");
        return NULL;
    }
    if (!json_is_array(msgs)) {
        bad(e, "messages", "invalid_type", "'messages' must be an array, not %s", type_name(msgs));
        return NULL;
    }
    if (json_array_size(msgs) == 0 || json_array_size(msgs) > MAX_MESSAGES) {
        bad(e, "messages", "invalid_value", "'messages' must hold between 1 and %d messages", MAX_MESSAGES);
        return NULL;
    }
    json_t *out = json_array();
    size_t i;
    json_t *m;
    char param[96];
    json_array_foreach(msgs, i, m) {
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(m)) {
            bad(e, param, "invalid_type", "%s must be an object, not %s", param, type_name(m));
            goto fail;
        }
        json_t *role = json_object_get(m, "role");
        if (!json_is_string(role)) {
            snprintf(param, sizeof param, "messages[%zu].role", i);
            bad(e, param, role ? "invalid_type" : "missing_required_parameter", "%s must be a string", param);
            goto fail;
        }
        if (!role_ok(json_string_value(role))) {
            snprintf(param, sizeof param, "messages[%zu].role", i);
            bad(e, param, "invalid_value", "%s must be one of system, developer, user, assistant, tool", param);
            goto fail;
        }
        json_t *content = json_object_get(m, "content");
        if (content && !json_is_string(content) && !json_is_null(content) && !json_is_array(content)) {
            snprintf(param, sizeof param, "messages[%zu].content", i);
            bad(e, param, "invalid_type", "%s must be a string, null or a list of content parts, not %s", param, type_name(content));
            goto fail;
        }
        json_t *tc = json_object_get(m, "tool_calls");
        if (tc && !json_is_null(tc)) {
            size_t k;
            json_t *call;
            if (!json_is_array(tc)) {
                snprintf(param, sizeof param, "messages[%zu].tool_calls", i);
                bad(e, param, "invalid_type", "%s must be an array", param);
                goto fail;
            }
            json_array_foreach(tc, k, call) {
                json_t *fn = json_object_get(call, "function");
                json_t *args = json_object_get(fn, "arguments");
                snprintf(param, sizeof param, "messages[%zu].tool_calls[%zu].function", i, k);
                if (!json_is_object(call) || !json_is_object(fn) || !json_is_string(json_object_get(fn, "name"))) {
                    bad(e, param, "invalid_type", "%s must be an object with a string 'name'", param);
                    goto fail;
                }
                if (args && !json_is_string(args) && !json_is_object(args)) {
                    bad(e, param, "invalid_type", "%s.arguments must be a JSON string or an object", param);
                    goto fail;
                }
            }
        }
        json_t *copy = json_copy(m); /* shallow: the values are shared */
        if (!copy) goto oom;
        if (!strcmp(json_string_value(role), "developer")) json_object_set_new(copy, "role", json_string("system"));
        if (tc && (json_is_null(tc) || json_array_size(tc) == 0)) json_object_del(copy, "tool_calls");
        if (json_is_null(json_object_get(copy, "reasoning_content"))) json_object_del(copy, "reasoning_content");
        json_array_append_new(out, copy);
    }
    return out;
oom:
    bad(e, "messages", NULL, "out of memory");
    e->status = 500;
fail:
    json_decref(out);
    return NULL;
}

/* Validates tools and applies tool_choice. *use_tools gets the tools to render and parse (a new
 * reference, or NULL for none). */
static bool prepare_tools(json_t *body, json_t **use_tools, perr *e) {
    *use_tools = NULL;
    json_t *tools = json_object_get(body, "tools");
    if (tools && json_is_null(tools)) tools = NULL;
    if (tools) {
        if (!json_is_array(tools)) return bad(e, "tools", "invalid_type", "'tools' must be an array, not %s", type_name(tools));
        size_t i;
        json_t *t;
        char param[64];
        json_array_foreach(tools, i, t) {
            snprintf(param, sizeof param, "tools[%zu]", i);
            const char *type = json_string_value(json_object_get(t, "type"));
            json_t *fn = json_object_get(t, "function");
            const char *name = json_string_value(json_object_get(fn, "name"));
            if (!json_is_object(t) || !type || strcmp(type, "function"))
                return bad(e, param, "invalid_value", "%s must be an object with type 'function'", param);
            if (!json_is_object(fn) || !name || !name[0])
                return bad(e, param, "invalid_value", "%s.function must be an object with a non-empty string 'name'", param);
            json_t *params = json_object_get(fn, "parameters");
            json_t *desc = json_object_get(fn, "description");
            if (params && !json_is_object(params) && !json_is_null(params))
                return bad(e, param, "invalid_type", "%s.function.parameters must be an object", param);
            if (desc && !json_is_string(desc) && !json_is_null(desc))
                return bad(e, param, "invalid_type", "%s.function.description must be a string", param);
        }
        if (json_array_size(tools) == 0) tools = NULL;
    }
    json_t *choice = json_object_get(body, "tool_choice");
    if (!choice || json_is_null(choice)) {
        *use_tools = json_incref(tools);
        return true;
    }
    if (json_is_string(choice)) {
        const char *c = json_string_value(choice);
        if (!strcmp(c, "none")) return true;
        if (strcmp(c, "auto") && strcmp(c, "required"))
            return bad(e, "tool_choice", "invalid_value", "'tool_choice' must be 'none', 'auto', 'required' or a function");
        if (!strcmp(c, "required") && !tools)
            return bad(e, "tool_choice", "invalid_value", "tool_choice 'required' needs 'tools'");
        *use_tools = json_incref(tools);
        return true;
    }
    const char *name = json_string_value(json_object_get(json_object_get(choice, "function"), "name"));
    if (!json_is_object(choice) || !name)
        return bad(e, "tool_choice", "invalid_type", "'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}");
    size_t i;
    json_t *t;
    json_array_foreach(tools, i, t) {
        if (!strcmp(json_string_value(json_object_get(json_object_get(t, "function"), "name")), name)) {
            *use_tools = json_pack("[O]", t);
            return true;
        }
    }
    return bad(e, "tool_choice", "invalid_value", "tool_choice names function '%s', which is not among 'tools'", name);
}

/* ================================================================== answering */

typedef struct answer {
    fm_server *s;
    fm_http_request *req;
    bool chat, stream, include_usage, headers_sent;
    char id[64];
    time_t created;
    fm_out *out; /* chat only */
    json_t *calls; /* tool calls of a non-streamed chat answer (array) */
    char *text, *reasoning; /* non-streamed: accumulated */
    size_t text_len, text_cap, reasoning_len, reasoning_cap;
    bool failed; /* the client is gone / a send failed */
} answer;

static bool acc(char **b, size_t *n, size_t *cap, const char *p, size_t len) {
    if (*n + len + 1 > *cap) {
        size_t c = (*n + len + 1) * 2;
        char *q = realloc(*b, c);
        if (!q) return false;
        *b = q;
        *cap = c;
    }
    memcpy(*b + *n, p, len);
    *n += len;
    (*b)[*n] = 0;
    return true;
}

static bool sse_send(answer *a, json_t *j) {
    char *text = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(j);
    if (!text) return false;
    size_t n = strlen(text);
    char *ev = malloc(n + 9);
    bool ok = false;
    if (ev) {
        memcpy(ev, "data: ", 6);
        memcpy(ev + 6, text, n);
        memcpy(ev + 6 + n, "\n\n", 2);
        ok = fm_http_stream_write(a->req, ev, n + 8) == FM_OK;
        free(ev);
    }
    free(text);
    if (!ok) a->failed = true;
    return ok;
}

/* A chunk with one choice: delta (chat) or text (completions), stolen; `extra` (stolen, may be
 * NULL) is added as "timings". */
static bool send_chunk_x(answer *a, json_t *delta, const char *finish, json_t *extra) {
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    json_object_set_new(choice, a->chat ? "delta" : "text", delta);
    json_object_set_new(choice, "logprobs", json_null());
    json_object_set_new(choice, "finish_reason", finish ? json_string(finish) : json_null());
    json_t *c = json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", a->id, "object", a->chat ? "chat.completion.chunk" : "text_completion",
                          "created", (json_int_t)a->created, "model", a->s->model_id, "choices", choice);
    if (c && a->include_usage) json_object_set_new(c, "usage", json_null());
    if (c && extra) json_object_set_new(c, "timings", extra);
    else json_decref(extra);
    return sse_send(a, c);
}

static bool send_chunk(answer *a, json_t *delta, const char *finish) { return send_chunk_x(a, delta, finish, NULL); }

static json_t *tool_call_json(const fm_toolcall *tc, size_t index, bool with_index) {
    char id[40], *args = json_dumps(tc->arguments, JSON_COMPACT);
    random_id("call_", id, sizeof id);
    json_t *j = json_pack("{s:s, s:s, s:{s:s, s:s}}", "id", id, "type", "function", "function", "name", tc->name, "arguments",
                          args ? args : "{}");
    free(args);
    if (j && with_index) json_object_set_new(j, "index", json_integer((json_int_t)index));
    return j;
}

/* Passes a piece of generated text on: through the chat splitter (reasoning / content / tool
 * calls) or as completion text; streamed at once or accumulated. */
static bool deliver(answer *a, const char *text, size_t len, bool final) {
    if (!a->chat) {
        if (!len) return true;
        if (a->stream) return send_chunk(a, jstr(text, len), NULL);
        return acc(&a->text, &a->text_len, &a->text_cap, text, len);
    }
    fm_status st = final ? fm_out_finish(a->out) : fm_out_feed(a->out, text, len);
    if (st != FM_OK) return false;
    const char *r, *c;
    size_t rl, cl, first, end;
    fm_out_take(a->out, &r, &rl, &c, &cl, &first, &end);
    if (!a->stream) {
        if (rl && !acc(&a->reasoning, &a->reasoning_len, &a->reasoning_cap, r, rl)) return false;
        if (cl && !acc(&a->text, &a->text_len, &a->text_cap, c, cl)) return false;
        for (size_t i = first; i < end; i++) json_array_append_new(a->calls, tool_call_json(fm_out_call(a->out, i), i, false));
        return true;
    }
    if (rl && !send_chunk(a, json_pack("{s:o}", "reasoning_content", jstr(r, rl)), NULL)) return false;
    if (cl && !send_chunk(a, json_pack("{s:o}", "content", jstr(c, cl)), NULL)) return false;
    for (size_t i = first; i < end; i++)
        if (!send_chunk(a, json_pack("{s:[o]}", "tool_calls", tool_call_json(fm_out_call(a->out, i), i, true)), NULL)) return false;
    return true;
}

static json_t *usage_json(const fm_job_state *st) {
    return json_pack("{s:I, s:I, s:I, s:{s:I}}", "prompt_tokens", (json_int_t)st->n_prompt, "completion_tokens",
                     (json_int_t)st->n_generated, "total_tokens", (json_int_t)(st->n_prompt + st->n_generated),
                     "prompt_tokens_details", "cached_tokens", (json_int_t)st->n_cached);
}

/* llama.cpp-style timings (an extension clients ignore), plus when the request was admitted to a
 * slot (Unix time in microseconds). */
static json_t *timings_json(const fm_job_state *st) {
    int64_t evaluated = st->n_prompt - st->n_cached;
    return json_pack("{s:I, s:f, s:I, s:f, s:I, s:f, s:f, s:f}", "started_at_us", (json_int_t)(st->started_unix * 1e6), "queue_ms",
                     st->queue_seconds * 1e3, "prompt_n", (json_int_t)evaluated,
                     "prompt_ms", st->prefill_seconds * 1e3, "predicted_n", (json_int_t)st->n_generated, "predicted_ms",
                     st->decode_seconds * 1e3, "prompt_per_second",
                     st->prefill_seconds > 0 ? (double)evaluated / st->prefill_seconds : 0.0, "predicted_per_second",
                     st->decode_seconds > 0 ? (double)st->n_generated / st->decode_seconds : 0.0);
}

static const char *finish_name(const answer *a, const fm_job_state *st) {
    if (a->chat && a->out && fm_out_n_calls(a->out) > 0) return "tool_calls";
    return st->finish == FM_FINISH_LENGTH ? "length" : "stop";
}

static void send_final(answer *a, const fm_job_state *st) {
    fm_server *s = a->s;
    const char *finish = finish_name(a, st);
    if (a->stream) {
        if (!send_chunk_x(a, a->chat ? json_object() : json_string(""), finish, timings_json(st))) return;
        if (a->include_usage) {
            json_t *u = json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", a->id, "object",
                                  a->chat ? "chat.completion.chunk" : "text_completion", "created", (json_int_t)a->created,
                                  "model", s->model_id, "choices", "usage", usage_json(st));
            if (!sse_send(a, u)) return;
        }
        static const char done[] = "data: [DONE]\n\n";
        if (fm_http_stream_write(a->req, done, sizeof done - 1) != FM_OK || fm_http_stream_end(a->req) != FM_OK) a->failed = true;
        return;
    }
    json_t *choice;
    if (a->chat) {
        json_t *msg = json_pack("{s:s}", "role", "assistant");
        bool calls = json_array_size(a->calls) > 0;
        json_object_set_new(msg, "content", a->text_len || !calls ? jstr(a->text, a->text_len) : json_null());
        if (a->reasoning_len) json_object_set_new(msg, "reasoning_content", jstr(a->reasoning, a->reasoning_len));
        if (calls) json_object_set(msg, "tool_calls", a->calls);
        choice = json_pack("{s:i, s:o, s:n, s:s}", "index", 0, "message", msg, "logprobs", "finish_reason", finish);
    } else {
        choice = json_pack("{s:i, s:o, s:n, s:s}", "index", 0, "text", jstr(a->text, a->text_len), "logprobs", "finish_reason", finish);
    }
    json_t *resp = json_pack("{s:s, s:s, s:I, s:s, s:[o], s:o, s:o}", "id", a->id, "object",
                             a->chat ? "chat.completion" : "text_completion", "created", (json_int_t)a->created, "model",
                             s->model_id, "choices", choice, "usage", usage_json(st), "timings", timings_json(st));
    send_json(s, a->req, 200, resp, NULL);
}

/* Queues the job and answers the request from what it generates. Frees the job. */
static void run_job(answer *a, fm_job *job) {
    fm_server *s = a->s;
    fm_submit_result sr = fm_engine_submit(s->eng, job);
    if (sr != FM_SUBMIT_OK) {
        fm_job_free(NULL, job);
        if (sr == FM_SUBMIT_FULL)
            send_error(s, a->req, 503, "server_error", NULL, "queue_full",
                       "all slots are busy and the queue of waiting requests is full: retry later");
        else send_error(s, a->req, 503, "server_error", NULL, "shutting_down", "the server is stopping");
        return;
    }
    fm_job_state st = {0};
    for (;;) {
        fm_http_wait_result w = fm_http_wait(a->req, fm_job_fd(job), 1000);
        if (w == FM_HTTP_WAIT_CLOSED) {
            a->failed = true;
            break;
        }
        char *text;
        size_t len;
        fm_job_take(job, &st, &text, &len);
        if (st.started && a->stream && !a->headers_sent && st.status == FM_OK) {
            a->headers_sent = true;
            count_status(s, 200);
            if (fm_http_stream_begin(a->req, 200, "text/event-stream", "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n") != FM_OK ||
                !send_chunk(a, a->chat ? json_pack("{s:s, s:s}", "role", "assistant", "content", "") : json_string(""), NULL)) {
                a->failed = true;
                free(text);
                break;
            }
        }
        bool ok = !len || deliver(a, text, len, false);
        free(text);
        if (!ok) {
            a->failed = true;
            break;
        }
        if (st.done) break;
    }
    fm_job_free(s->eng, job); /* a job still running is cancelled here */
    if (a->failed) return;
    if (st.status != FM_OK) {
        bool stopping = st.status == FM_ERR_IO;
        if (!a->headers_sent) {
            send_error(s, a->req, stopping ? 503 : 500, "server_error", NULL, stopping ? "shutting_down" : "generation_failed",
                       "%s", st.error);
        } else {
            json_t *err = json_pack("{s:{s:o, s:s, s:n, s:s}}", "error", "message", jstr(st.error, strlen(st.error)), "type",
                                    "server_error", "param", "code", stopping ? "shutting_down" : "generation_failed");
            if (sse_send(a, err)) fm_http_stream_end(a->req);
        }
        return;
    }
    if (!deliver(a, NULL, 0, true)) {
        if (!a->headers_sent) send_error(s, a->req, 500, "server_error", NULL, NULL, "out of memory");
        return;
    }
    send_final(a, &st);
}

/* ================================================================== endpoints */

static json_t *parse_body(fm_server *s, fm_http_request *req) {
    size_t n;
    const char *b = fm_http_body(req, &n);
    if (!n) {
        send_error(s, req, 400, "invalid_request_error", NULL, "invalid_json", "the request needs a JSON body");
        return NULL;
    }
    json_error_t err;
    json_t *j = json_loadb(b, n, JSON_REJECT_DUPLICATES, &err);
    if (!j) {
        send_error(s, req, 400, "invalid_request_error", NULL, "invalid_json",
                   "the body is not valid JSON (line %d, column %d: %s)", err.line, err.column, err.text);
        return NULL;
    }
    if (!json_is_object(j)) {
        send_error(s, req, 400, "invalid_request_error", NULL, "invalid_json", "the body must be a JSON object, not %s", type_name(j));
        json_decref(j);
        return NULL;
    }
    return j;
}

static void send_perr(fm_server *s, fm_http_request *req, const perr *e) {
    send_error(s, req, e->status ? e->status : 400, e->status >= 500 ? "server_error" : "invalid_request_error",
               e->param[0] ? e->param : NULL, e->code, "%s", e->msg);
}

/* Context check and default length; false (and *e) when it does not fit. */
static bool fit_context(fm_server *s, size_t n_prompt, gen_req *g, int64_t default_max, perr *e) {
    if ((int64_t)n_prompt >= s->n_ctx)
        return bad(e, "messages", "context_length_exceeded",
                   "This model's maximum context length is %lld tokens. However, your prompt has %zu tokens, which leaves no room "
                   "for an answer.",
                   (long long)s->n_ctx, n_prompt);
    int64_t room = s->n_ctx - (int64_t)n_prompt;
    if (g->max_set && s->max_tokens_cap && g->max_tokens > s->max_tokens_cap) g->max_tokens = s->max_tokens_cap;
    if (g->max_set && g->max_tokens > room)
        return bad(e, "max_tokens", "context_length_exceeded",
                   "This model's maximum context length is %lld tokens. However, you requested %lld tokens (%zu in the prompt, "
                   "%lld for the answer). Please reduce the length of the messages or the answer.",
                   (long long)s->n_ctx, (long long)(n_prompt + (size_t)g->max_tokens), n_prompt, (long long)g->max_tokens);
    if (!g->max_set) {
        g->max_tokens = default_max > 0 && default_max < room ? default_max : room;
        if (s->max_tokens_cap && g->max_tokens > s->max_tokens_cap) g->max_tokens = s->max_tokens_cap;
    }
    return true;
}

static bool client_gone(void *req) { return fm_http_client_gone(req); }

/* Makes the job for req (the test hook's forced text included). */
static bool make_job(fm_server *s, fm_http_request *req, const int32_t *ids, size_t n, const gen_req *g, fm_job **job, perr *e) {
    int32_t *forced = NULL;
    size_t n_forced = 0;
    if (g->forced && g->forced_len) {
        if (fm_tokenizer_encode(s->tok, g->forced, g->forced_len, true, &forced, &n_forced) != FM_OK)
            return bad(e, "fm_test_output", "invalid_value", "%s", fm_last_error());
    }
    fm_job_params p = {.prompt = ids,
                       .n_prompt = n,
                       .max_tokens = g->max_tokens,
                       .sampling = g->sp,
                       .stop_ids = s->stop_ids,
                       .n_stop_ids = s->n_stop_ids,
                       .stop_strings = g->stops,
                       .n_stop_strings = g->n_stops,
                       .forced = g->forced ? (forced ? forced : ids) : NULL,
                       .n_forced = n_forced,
                       .token_delay_ms = g->delay_ms,
                       .gone = client_gone,
                       .gone_ctx = req};
    fm_status st = fm_job_new(&p, job);
    free(forced);
    if (st != FM_OK) {
        bad(e, NULL, NULL, "%s", fm_last_error());
        if (st == FM_ERR_NOMEM) e->status = 500;
        return false;
    }
    /* the sampler's own range checks, before the request is queued */
    fm_sampler *smp;
    if ((st = fm_sampler_new(&g->sp, 1, &smp)) != FM_OK) {
        fm_job_free(NULL, *job);
        *job = NULL;
        return bad(e, NULL, "invalid_value", "%s", fm_last_error());
    }
    fm_sampler_free(smp);
    return true;
}

static void chat_completions(fm_server *s, fm_http_request *req) {
    json_t *body = parse_body(s, req);
    if (!body) return;
    perr e = {0};
    gen_req g;
    json_t *msgs = NULL, *tools = NULL;
    fm_chat_prompt cp = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    fm_job *job = NULL;
    answer a = {.s = s, .req = req, .chat = true};
    if (s->kind == FM_CHAT_UNKNOWN) {
        bad(&e, NULL, "no_chat_template", "this model has no chat template the server knows: use /v1/completions");
        goto fail;
    }
    if (!parse_common(s, body, true, &g, &e)) goto fail;
    if (!must_be_unset(body, "logprobs", "log probabilities are not returned", &e)) goto fail;
    if (!must_be_unset(body, "top_logprobs", "log probabilities are not returned", &e)) goto fail;
    if (!(msgs = prepare_messages(json_object_get(body, "messages"), &e))) goto fail;
    if (!prepare_tools(body, &tools, &e)) goto fail;
    fm_chat_flags fl = {.add_generation_prompt = true, .enable_thinking = FM_CHAT_THINKING_UNSET};
    json_t *kw = json_object_get(body, "chat_template_kwargs");
    if (kw && !json_is_null(kw)) {
        json_t *et = json_object_get(kw, "enable_thinking");
        if (!json_is_object(kw) || (et && !json_is_boolean(et) && !json_is_null(et))) {
            bad(&e, "chat_template_kwargs", "invalid_type", "'chat_template_kwargs' must be an object; enable_thinking a boolean");
            goto fail;
        }
        if (json_is_boolean(et)) fl.enable_thinking = json_is_true(et) ? FM_CHAT_THINKING_ON : FM_CHAT_THINKING_OFF;
    }
    fm_status st = fm_chat_render(s->kind, msgs, tools, &fl, &cp);
    if (st == FM_OK) st = fm_chat_tokenize(s->tok, &cp, &ids, &n);
    if (st != FM_OK) {
        bad(&e, "messages", st == FM_ERR_UNSUPPORTED ? "unsupported_content" : "invalid_value", "%s", fm_last_error());
        if (st == FM_ERR_NOMEM) e.status = 500;
        goto fail;
    }
    bool thinking_open = cp.len >= 8 && !memcmp(cp.text + cp.len - 8, "<think>\n", 8);
    if (!fit_context(s, n, &g, 0, &e)) goto fail;
    if (!make_job(s, req, ids, n, &g, &job, &e)) goto fail;
    if (fm_out_new(thinking_open, tools, fm_toolcall_format_for(s->kind), &a.out) != FM_OK) {
        bad(&e, "tools", "invalid_value", "%s", fm_last_error());
        goto fail;
    }
    a.stream = g.stream;
    a.include_usage = g.stream && g.include_usage;
    a.calls = json_array();
    a.created = time(NULL);
    random_id("chatcmpl-", a.id, sizeof a.id);
    run_job(&a, job);
    job = NULL;
    goto done;
fail:
    send_perr(s, req, &e);
done:
    fm_job_free(NULL, job);
    fm_out_free(a.out);
    json_decref(a.calls);
    free(a.text);
    free(a.reasoning);
    free(ids);
    fm_chat_prompt_free(&cp);
    json_decref(tools);
    json_decref(msgs);
    json_decref(body);
}

/* The prompt of /v1/completions: a string, a list of one string, a list of ids, or a list of one
 * list of ids. Strings are tokenized with special tokens recognised (raw prompts, as HF's encode). */
static bool completion_prompt(fm_server *s, json_t *p, int32_t **ids, size_t *n, perr *e) {
    *ids = NULL;
    *n = 0;
    if (!p || json_is_null(p)) return bad(e, "prompt", "missing_required_parameter", "'prompt' is required");
    if (json_is_array(p) && json_array_size(p) == 1 && (json_is_string(json_array_get(p, 0)) || json_is_array(json_array_get(p, 0))))
        p = json_array_get(p, 0);
    if (json_is_string(p)) {
        if (fm_tokenizer_encode(s->tok, json_string_value(p), json_string_length(p), true, ids, n) != FM_OK)
            return bad(e, "prompt", "invalid_value", "%s", fm_last_error());
    } else if (json_is_array(p)) {
        size_t k = json_array_size(p);
        *ids = malloc(sizeof(int32_t) * (k ? k : 1));
        if (!*ids) return bad(e, "prompt", NULL, "out of memory");
        for (size_t i = 0; i < k; i++) {
            json_t *v = json_array_get(p, i);
            if (!json_is_integer(v))
                return bad(e, "prompt", "invalid_type", "'prompt' must be a string, a list of token ids, or a list of one of these (batches are not supported)");
            json_int_t id = json_integer_value(v);
            if (id < 0 || id >= s->V) return bad(e, "prompt", "invalid_value", "token id %lld is out of range [0, %lld)", (long long)id, (long long)s->V);
            (*ids)[i] = (int32_t)id;
        }
        *n = k;
    } else {
        return bad(e, "prompt", "invalid_type", "'prompt' must be a string or a list of token ids, not %s", type_name(p));
    }
    if (!*n) return bad(e, "prompt", "invalid_value", "the prompt is empty");
    return true;
}

static void completions(fm_server *s, fm_http_request *req) {
    json_t *body = parse_body(s, req);
    if (!body) return;
    perr e = {0};
    gen_req g;
    int32_t *ids = NULL;
    size_t n = 0;
    fm_job *job = NULL;
    answer a = {.s = s, .req = req, .chat = false};
    if (!parse_common(s, body, false, &g, &e)) goto fail;
    if (!must_be_unset(body, "logprobs", "log probabilities are not returned", &e)) goto fail;
    if (!must_be_unset(body, "echo", "the prompt is not echoed", &e)) goto fail;
    if (!must_be_unset(body, "suffix", "no fill-in-the-middle", &e)) goto fail;
    long long best_of = 1;
    if (!opt_int(body, "best_of", 1, 1, &best_of, NULL, &e)) goto fail;
    if (!completion_prompt(s, json_object_get(body, "prompt"), &ids, &n, &e)) goto fail;
    if (!fit_context(s, n, &g, 16, &e)) goto fail; /* OpenAI's default max_tokens for completions */
    if (!make_job(s, req, ids, n, &g, &job, &e)) goto fail;
    a.stream = g.stream;
    a.include_usage = g.stream && g.include_usage;
    a.created = time(NULL);
    random_id("cmpl-", a.id, sizeof a.id);
    run_job(&a, job);
    job = NULL;
    goto done;
fail:
    send_perr(s, req, &e);
done:
    fm_job_free(NULL, job);
    free(a.text);
    free(ids);
    json_decref(body);
}

static json_t *model_json(const fm_server *s) {
    return json_pack("{s:s, s:s, s:I, s:s, s:I}", "id", s->model_id, "object", "model", "created", (json_int_t)s->created,
                     "owned_by", "flashmoe", "context_length", (json_int_t)s->n_ctx);
}

/* Prometheus text exposition (version 0.0.4). */
static void metrics(fm_server *s, fm_http_request *req) {
    fm_engine_stats st;
    fm_engine_stats_get(s->eng, &st);
    char *b = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&b, &n);
    if (!f) {
        send_error(s, req, 500, "server_error", NULL, NULL, "out of memory");
        return;
    }
#define COUNTER(name, help, fmt, v) fprintf(f, "# HELP " name " " help "\n# TYPE " name " counter\n" name " " fmt "\n", v)
#define GAUGE(name, help, fmt, v) fprintf(f, "# HELP " name " " help "\n# TYPE " name " gauge\n" name " " fmt "\n", v)
    COUNTER("flashmoe_prompt_tokens_total", "Prompt tokens of requests admitted to a slot.", "%llu", (unsigned long long)st.prompt_tokens);
    COUNTER("flashmoe_prompt_tokens_cached_total", "Prompt tokens served from a slot's prompt cache.", "%llu", (unsigned long long)st.cached_tokens);
    COUNTER("flashmoe_prompt_tokens_evaluated_total", "Prompt tokens evaluated (prefill).", "%llu", (unsigned long long)st.prefill_tokens);
    COUNTER("flashmoe_generated_tokens_total", "Tokens generated.", "%llu", (unsigned long long)st.generated_tokens);
    COUNTER("flashmoe_prefill_seconds_total", "Engine time spent evaluating prompts.", "%.6f", st.prefill_seconds);
    COUNTER("flashmoe_decode_seconds_total", "Engine time spent generating tokens.", "%.6f", st.decode_seconds);
    GAUGE("flashmoe_prefill_tokens_per_second", "Prompt tokens evaluated per second of prefill (since start).", "%.3f",
          st.prefill_seconds > 0 ? (double)st.prefill_tokens / st.prefill_seconds : 0.0);
    GAUGE("flashmoe_decode_tokens_per_second", "Tokens generated per second of decoding (since start).", "%.3f",
          st.decode_seconds > 0 ? (double)st.generated_tokens / st.decode_seconds : 0.0);
    GAUGE("flashmoe_queue_depth", "Requests waiting for a slot.", "%d", st.queue_depth);
    GAUGE("flashmoe_queue_capacity", "Requests that may wait before new ones get 503.", "%d", st.queue_cap);
    GAUGE("flashmoe_slots_busy", "Slots generating.", "%d", st.slots_busy);
    GAUGE("flashmoe_slots_total", "Slots (sessions).", "%d", st.n_slots);
    GAUGE("flashmoe_context_tokens", "Context size of each slot.", "%lld", (long long)st.n_ctx);
    fprintf(f, "# HELP flashmoe_requests_total Generation requests by outcome.\n# TYPE flashmoe_requests_total counter\n");
    fprintf(f, "flashmoe_requests_total{outcome=\"done\"} %llu\n", (unsigned long long)st.jobs_done);
    fprintf(f, "flashmoe_requests_total{outcome=\"cancelled\"} %llu\n", (unsigned long long)st.jobs_cancelled);
    fprintf(f, "flashmoe_requests_total{outcome=\"failed\"} %llu\n", (unsigned long long)st.jobs_failed);
    fprintf(f, "flashmoe_requests_total{outcome=\"rejected\"} %llu\n", (unsigned long long)st.jobs_rejected);
    COUNTER("flashmoe_expert_requests_total", "Routed experts the model asked the expert store for.", "%llu",
            (unsigned long long)st.expert_requested);
    COUNTER("flashmoe_expert_cache_hits_total", "Of those, served from the in-process expert cache.", "%llu",
            (unsigned long long)st.expert_hits);
    COUNTER("flashmoe_expert_in_place_total", "Of those, used in place from the page cache (not read).", "%llu",
            (unsigned long long)st.expert_mapped);
    GAUGE("flashmoe_expert_cache_hit_ratio", "Expert cache hits / expert requests (since start).", "%.6f",
          st.expert_requested ? (double)st.expert_hits / (double)st.expert_requested : 0.0);
    COUNTER("flashmoe_expert_bytes_read_total", "Bytes of experts read from the expert files.", "%llu",
            (unsigned long long)st.expert_bytes_read);
    fprintf(f, "# HELP flashmoe_http_responses_total HTTP answers of the API by status code.\n# TYPE flashmoe_http_responses_total counter\n");
    for (int c = 100; c < 600; c++) {
        uint64_t v = atomic_load(&s->status_count[c]);
        if (v) fprintf(f, "flashmoe_http_responses_total{code=\"%d\"} %llu\n", c, (unsigned long long)v);
    }
#undef COUNTER
#undef GAUGE
    fclose(f);
    count_status(s, 200);
    fm_http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, b, n);
    free(b);
}

static void handle(void *user, fm_http_request *req) {
    fm_server *s = user;
    const char *m = fm_http_method(req), *path = fm_http_path(req);
    bool get = !strcmp(m, "GET"), post = !strcmp(m, "POST");
    const char *p = !strncmp(path, "/v1/", 4) ? path + 3 : path;
    if (!strcmp(path, "/health")) {
        if (!get) {
            send_error(s, req, 405, "invalid_request_error", NULL, "method_not_allowed", "use GET for %s", path);
            return;
        }
        send_json(s, req, 200, json_pack("{s:s}", "status", "ok"), NULL);
        return;
    }
    if (!authorized(s, req)) {
        send_error(s, req, 401, "invalid_request_error", NULL, "invalid_api_key",
                   "Incorrect or missing API key: send the header \"Authorization: Bearer KEY\"");
        return;
    }
    bool want_post = !strcmp(p, "/chat/completions") || !strcmp(p, "/completions");
    bool want_get = !strcmp(path, "/metrics") || !strcmp(p, "/models") || !strncmp(p, "/models/", 8);
    if ((want_post && !post) || (want_get && !get)) {
        char allow[64];
        snprintf(allow, sizeof allow, "Allow: %s\r\n", want_post ? "POST" : "GET");
        json_t *err = json_pack("{s:{s:s, s:s, s:n, s:s}}", "error", "message", want_post ? "use POST" : "use GET", "type",
                                "invalid_request_error", "param", "code", "method_not_allowed");
        send_json(s, req, 405, err, allow);
        return;
    }
    if (!strcmp(p, "/chat/completions")) chat_completions(s, req);
    else if (!strcmp(p, "/completions")) completions(s, req);
    else if (!strcmp(path, "/metrics")) metrics(s, req);
    else if (!strcmp(p, "/models")) send_json(s, req, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", model_json(s)), NULL);
    else if (!strncmp(p, "/models/", 8) && !strcmp(p + 8, s->model_id)) send_json(s, req, 200, model_json(s), NULL);
    else if (!strncmp(p, "/models/", 8))
        send_error(s, req, 404, "invalid_request_error", "model", "model_not_found", "The model '%.200s' does not exist", p + 8);
    else send_error(s, req, 404, "invalid_request_error", NULL, "not_found", "no such endpoint: %s %.200s", m, path);
}

/* ================================================================== lifetime */

fm_status fm_server_start(fm_model *model, const fm_tokenizer *tok, fm_chat_template kind, const fm_server_config *cfg,
                          fm_server **out) {
    *out = NULL;
    fm_server *s = calloc(1, sizeof *s);
    if (!s) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    s->model = model;
    s->tok = tok;
    s->kind = kind;
    s->V = fm_model_n_vocab(model);
    s->n_ctx = cfg->n_ctx > 0 ? cfg->n_ctx : 4096;
    s->max_tokens_cap = cfg->max_tokens_cap > 0 ? cfg->max_tokens_cap : 0;
    s->api_key = cfg->api_key && cfg->api_key[0] ? strdup(cfg->api_key) : NULL;
    s->model_id = strdup(cfg->model_id ? cfg->model_id : "flashmoe");
    s->sp = cfg->sampling;
    s->seed_set = cfg->seed_set;
    s->test_hooks = cfg->test_hooks;
    s->created = time(NULL);
    for (size_t i = 0; i < cfg->n_stop_ids && s->n_stop_ids < 8; i++) s->stop_ids[s->n_stop_ids++] = cfg->stop_ids[i];
    for (size_t i = 0; i < cfg->n_stop_strings && s->n_stops < 8; i++)
        if (cfg->stop_strings[i] && cfg->stop_strings[i][0]) s->stops[s->n_stops++] = strdup(cfg->stop_strings[i]);
    fm_status st = FM_OK;
    if (!s->model_id || (cfg->api_key && cfg->api_key[0] && !s->api_key)) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    fm_sampler *probe;
    if ((st = fm_sampler_new(&s->sp, 1, &probe)) != FM_OK) goto fail;
    fm_sampler_free(probe);
    fm_engine_config ec = {.n_slots = cfg->n_parallel, .queue_cap = cfg->queue_size, .n_ctx = s->n_ctx};
    if ((st = fm_engine_start(model, tok, &ec, &s->eng)) != FM_OK) goto fail;
    fm_http_options ho = {.host = cfg->host,
                          .port = cfg->port,
                          .max_body_bytes = cfg->max_body_bytes,
                          .max_connections = cfg->max_connections,
                          .request_timeout_ms = cfg->request_timeout_ms};
    if ((st = fm_http_start(&ho, handle, s, &s->http)) != FM_OK) goto fail;
    *out = s;
    return FM_OK;
fail:
    fm_server_stop(s);
    return st;
}

int fm_server_port(const fm_server *s) { return s ? fm_http_port(s->http) : 0; }

void fm_server_stop(fm_server *s) {
    if (!s) return;
    fm_engine_stop(s->eng); /* every job ends; handlers waiting on one answer and return */
    fm_http_stop(s->http);  /* no handler runs after this */
    fm_engine_free(s->eng);
    for (size_t i = 0; i < s->n_stops; i++) free(s->stops[i]);
    free(s->api_key);
    free(s->model_id);
    free(s);
}
