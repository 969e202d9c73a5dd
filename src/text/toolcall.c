/* Tool-call parsing of model output (see toolcall.h). A small state machine splits the stream into
 * content and <tool_call> blocks; each complete block is then parsed strictly as JSON or XML. */
#include "text/toolcall.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"

static const char OPEN[] = "<tool_call>", CLOSE[] = "</tool_call>";
static const char P_OPEN[] = "<parameter=", P_CLOSE[] = "</parameter>", F_OPEN[] = "<function=",
                  F_CLOSE[] = "</function>";
#define LEN(s) (sizeof(s) - 1)

typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

static bool buf_put(buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) return false;
        b->p = np;
        b->cap = nc;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return true;
}

struct fm_toolcall_parser {
    fm_toolcall_format fmt;
    json_t *tools;
    bool finished;
    buf hold; /* outside a call: unprocessed text that may begin "<tool_call>" */
    buf out;  /* content not yet taken */
    bool clear_out;
    size_t content_total;
    bool inside;
    buf body;       /* text after "<tool_call>" */
    size_t scan;    /* next body byte the end scanner looks at */
    int body_fmt;   /* 0 undecided, 1 JSON, 2 XML */
    bool in_str, esc; /* JSON scanner: inside a string literal, after a backslash */
    int xml_state;  /* XML scanner: 0 between tags, 1 inside "<parameter=...", 2 inside a value */
    fm_toolcall *calls;
    size_t n_calls, cap_calls;
};

fm_toolcall_format fm_toolcall_format_for(fm_chat_template kind) {
    switch (kind) {
    case FM_CHAT_QWEN3: return FM_TOOLCALL_JSON;
    case FM_CHAT_QWEN35:
    case FM_CHAT_QWEN3_CODER: return FM_TOOLCALL_XML;
    default: return FM_TOOLCALL_ANY;
    }
}

fm_status fm_toolcall_parser_new(fm_toolcall_format fmt, const json_t *tools, fm_toolcall_parser **out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_toolcall_parser_new: NULL output");
    *out = NULL;
    if (fmt != FM_TOOLCALL_ANY && fmt != FM_TOOLCALL_JSON && fmt != FM_TOOLCALL_XML)
        return fm_error_set(FM_ERR_ARG, "fm_toolcall_parser_new: unknown format %d", (int)fmt);
    if (tools && !json_is_null(tools) && !json_is_array(tools))
        return fm_error_set(FM_ERR_ARG, "tools: expected an array of tool definitions");
    fm_toolcall_parser *p = calloc(1, sizeof *p);
    if (!p) return fm_error_set(FM_ERR_NOMEM, "out of memory for a tool-call parser");
    p->fmt = fmt;
    if (json_is_array(tools)) p->tools = json_incref((json_t *)tools);
    *out = p;
    return FM_OK;
}

static void call_free(fm_toolcall *c) {
    free(c->name);
    free(c->raw);
    json_decref(c->arguments);
}

void fm_toolcall_parser_free(fm_toolcall_parser *p) {
    if (!p) return;
    for (size_t i = 0; i < p->n_calls; i++) call_free(&p->calls[i]);
    free(p->calls);
    free(p->hold.p);
    free(p->out.p);
    free(p->body.p);
    json_decref(p->tools);
    free(p);
}

/* ============================== block parsing ============================= */

static bool is_ws(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }

static bool at(const char *s, size_t n, size_t i, const char *tag, size_t tl) {
    return n - i >= tl && memcmp(s + i, tag, tl) == 0;
}

static void bad(fm_toolcall *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bad(fm_toolcall *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    c->ok = false;
}

/* The function definition named `name` among the tools ({"function": {...}} unwrapped), or NULL. */
static const json_t *find_tool(const json_t *tools, const char *name) {
    for (size_t i = 0; i < json_array_size(tools); i++) {
        const json_t *t = json_array_get(tools, i);
        const json_t *fn = json_object_get(t, "function");
        if (json_is_object(fn)) t = fn;
        const char *nm = json_string_value(json_object_get(t, "name"));
        if (nm && !strcmp(nm, name)) return t;
    }
    return NULL;
}

static char *dup_n(const char *s, size_t n) {
    char *r = malloc(n + 1);
    if (!r) return NULL;
    memcpy(r, s, n);
    r[n] = 0;
    return r;
}

/* Parses text as one JSON value (surrounding white space allowed); NULL if it is not JSON. */
static json_t *json_of(const char *s, size_t n) {
    return json_loadb(s, n, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
}

enum { T_STRING = 1, T_INTEGER = 2, T_NUMBER = 4, T_BOOLEAN = 8, T_OBJECT = 16, T_ARRAY = 32, T_NULL = 64 };

static int type_bit(const json_t *t) {
    const char *s = json_string_value(t);
    if (!s) return 0;
    if (!strcmp(s, "string")) return T_STRING;
    if (!strcmp(s, "integer")) return T_INTEGER;
    if (!strcmp(s, "number")) return T_NUMBER;
    if (!strcmp(s, "boolean")) return T_BOOLEAN;
    if (!strcmp(s, "object")) return T_OBJECT;
    if (!strcmp(s, "array")) return T_ARRAY;
    if (!strcmp(s, "null")) return T_NULL;
    return -1; /* a type this parser does not know: treat the parameter as untyped */
}

/* The set of JSON types a parameter schema allows: "type" (a name or a list), else the types of
 * anyOf / oneOf branches, else string for an enum of strings. 0 = untyped. */
static int schema_types(const json_t *sch) {
    if (!json_is_object(sch)) return 0;
    const json_t *ty = json_object_get(sch, "type");
    int m = 0;
    if (json_is_string(ty)) {
        m = type_bit(ty);
    } else if (json_is_array(ty)) {
        for (size_t i = 0; i < json_array_size(ty) && m >= 0; i++) {
            int b = type_bit(json_array_get(ty, i));
            m = b < 0 ? -1 : (m | b);
        }
    } else if (!ty) {
        const json_t *alts = json_object_get(sch, "anyOf");
        if (!alts) alts = json_object_get(sch, "oneOf");
        if (json_is_array(alts)) {
            for (size_t i = 0; i < json_array_size(alts) && m >= 0; i++) {
                int b = schema_types(json_array_get(alts, i));
                m = b <= 0 ? -1 : (m | b);
            }
        } else if (json_is_array(json_object_get(sch, "enum"))) {
            const json_t *en = json_object_get(sch, "enum");
            m = T_STRING;
            for (size_t i = 0; i < json_array_size(en); i++)
                if (!json_is_string(json_array_get(en, i))) m = 0;
        }
    }
    return m < 0 ? 0 : m;
}

/* Converts an XML parameter value by its schema (NULL = none). Returns NULL with *why set when the
 * text is not of any allowed type. */
static json_t *convert_value(const char *s, size_t n, const json_t *schema, const char **why) {
    int types = schema_types(schema);
    *why = NULL;
    if (types == 0) {
        json_t *v = json_of(s, n);
        if (!v && !(v = json_stringn(s, n))) *why = "valid UTF-8";
        return v;
    }
    if ((types & T_NULL) && ((n == 4 && !memcmp(s, "null", 4)) || (n == 4 && !memcmp(s, "None", 4))))
        return json_null();
    if (types & T_BOOLEAN) {
        if ((n == 4 && (!memcmp(s, "true", 4) || !memcmp(s, "True", 4)))) return json_true();
        if ((n == 5 && (!memcmp(s, "false", 5) || !memcmp(s, "False", 5)))) return json_false();
    }
    if (types & (T_INTEGER | T_NUMBER | T_OBJECT | T_ARRAY)) {
        json_t *v = json_of(s, n);
        if (v) {
            if ((types & (T_INTEGER | T_NUMBER)) && json_is_integer(v)) return v;
            if ((types & T_NUMBER) && json_is_real(v)) return v;
            if ((types & T_INTEGER) && json_is_real(v)) {
                double x = json_real_value(v);
                if (x == floor(x) && x >= -9223372036854775808.0 && x < 9223372036854775808.0) {
                    json_decref(v);
                    return json_integer((json_int_t)x);
                }
            }
            if ((types & T_OBJECT) && json_is_object(v)) return v;
            if ((types & T_ARRAY) && json_is_array(v)) return v;
            json_decref(v);
        }
    }
    if (types & T_STRING) {
        json_t *v = json_stringn(s, n);
        if (!v) *why = "valid UTF-8";
        return v;
    }
    *why = (types & T_INTEGER)   ? "an integer"
           : (types & T_NUMBER)  ? "a number"
           : (types & T_BOOLEAN) ? "a boolean"
           : (types & T_OBJECT)  ? "a JSON object"
           : (types & T_ARRAY)   ? "a JSON array"
                                 : "null";
    return NULL;
}

/* A name inside "<function=NAME>" / "<parameter=NAME>" starting at s[i]: up to '>', non-empty,
 * without '<', newline or NUL. Returns the index of '>' or 0 on failure. */
static size_t tag_name(const char *s, size_t n, size_t i) {
    size_t j = i;
    while (j < n && s[j] != '>') {
        if (s[j] == '<' || s[j] == '\n' || s[j] == '\r' || s[j] == 0) return 0;
        j++;
    }
    return (j < n && j > i) ? j : 0;
}

static void parse_xml(fm_toolcall *c, const json_t *tools, const char *s, size_t n) {
    size_t i = 0;
    while (i < n && is_ws(s[i])) i++;
    if (!at(s, n, i, F_OPEN, LEN(F_OPEN))) return bad(c, "expected <function=NAME> after <tool_call>");
    i += LEN(F_OPEN);
    size_t e = tag_name(s, n, i);
    if (!e) return bad(c, "bad function name in <function=...>");
    char *name = dup_n(s + i, e - i);
    json_t *args = json_object();
    if (!name || !args) {
        free(name);
        json_decref(args);
        return bad(c, "out of memory");
    }
    const json_t *fn = NULL, *props = NULL;
    if (tools) {
        fn = find_tool(tools, name);
        if (!fn) {
            bad(c, "unknown function \"%.64s\" (not among the tools)", name);
            goto fail;
        }
        props = json_object_get(json_object_get(fn, "parameters"), "properties");
    }
    i = e + 1;
    for (;;) {
        while (i < n && is_ws(s[i])) i++;
        if (at(s, n, i, F_CLOSE, LEN(F_CLOSE))) {
            i += LEN(F_CLOSE);
            while (i < n && is_ws(s[i])) i++;
            if (i != n) {
                bad(c, "text after </function>");
                goto fail;
            }
            break;
        }
        if (!at(s, n, i, P_OPEN, LEN(P_OPEN))) {
            bad(c, i == n ? "missing </function>" : "expected <parameter=NAME> or </function>");
            goto fail;
        }
        i += LEN(P_OPEN);
        e = tag_name(s, n, i);
        if (!e) {
            bad(c, "bad parameter name in <parameter=...>");
            goto fail;
        }
        char pname[256];
        if (e - i >= sizeof pname) {
            bad(c, "parameter name longer than %zu bytes", sizeof pname - 1);
            goto fail;
        }
        memcpy(pname, s + i, e - i);
        pname[e - i] = 0;
        size_t v = e + 1;
        const char *end = memmem(s + v, n - v, P_CLOSE, LEN(P_CLOSE));
        if (!end) {
            bad(c, "parameter \"%.64s\" has no </parameter>", pname);
            goto fail;
        }
        size_t ve = (size_t)(end - s);
        i = ve + LEN(P_CLOSE);
        if (v < ve && s[v] == '\n') v++;
        if (ve > v && s[ve - 1] == '\n') ve--;
        if (json_object_get(args, pname)) {
            bad(c, "parameter \"%.64s\" given twice", pname);
            goto fail;
        }
        const char *why;
        json_t *val = convert_value(s + v, ve - v, json_object_get(props, pname), &why);
        if (!val) {
            bad(c, "parameter \"%.64s\" is not %s", pname, why ? why : "valid");
            goto fail;
        }
        if (json_object_set_new(args, pname, val) != 0) {
            bad(c, "parameter name \"%.64s\" is not valid UTF-8", pname);
            goto fail;
        }
    }
    c->ok = true;
    c->name = name;
    c->arguments = args;
    return;
fail:
    free(name);
    json_decref(args);
}

static void parse_json(fm_toolcall *c, const json_t *tools, const char *s, size_t n) {
    json_error_t err;
    json_t *v = json_loadb(s, n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &err);
    if (!v) return bad(c, "invalid JSON in tool call: %s", err.text);
    if (!json_is_object(v)) {
        json_decref(v);
        return bad(c, "tool call is not a JSON object");
    }
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
        if (strcmp(k, "name") && strcmp(k, "arguments")) {
            bad(c, "unexpected key \"%.64s\" in tool call (only name and arguments)", k);
            json_decref(v);
            return;
        }
    }
    const json_t *nm = json_object_get(v, "name");
    json_t *args = json_object_get(v, "arguments");
    if (!json_is_string(nm) || json_string_length(nm) == 0 || strlen(json_string_value(nm)) != json_string_length(nm)) {
        bad(c, "tool call without a function name");
        json_decref(v);
        return;
    }
    if (tools && !find_tool(tools, json_string_value(nm))) {
        bad(c, "unknown function \"%.64s\" (not among the tools)", json_string_value(nm));
        json_decref(v);
        return;
    }
    if (!args) {
        args = json_object();
    } else if (json_is_string(args)) {
        args = json_loadb(json_string_value(args), json_string_length(args), JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL,
                          &err);
        if (!json_is_object(args)) {
            json_decref(args);
            bad(c, "arguments string is not a JSON object");
            json_decref(v);
            return;
        }
    } else if (json_is_object(args)) {
        json_incref(args);
    } else {
        bad(c, "arguments is not a JSON object");
        json_decref(v);
        return;
    }
    c->name = strdup(json_string_value(nm));
    c->arguments = args;
    json_decref(v);
    if (!c->name || !c->arguments) {
        free(c->name);
        json_decref(c->arguments);
        c->name = NULL;
        c->arguments = NULL;
        return bad(c, "out of memory");
    }
    c->ok = true;
}

/* ================================ streaming =============================== */

static fm_status emit(fm_toolcall_parser *p, const char *s, size_t n) {
    if (p->clear_out) {
        p->out.n = 0;
        if (p->out.p) p->out.p[0] = 0;
        p->clear_out = false;
    }
    if (!n) return FM_OK;
    if (!buf_put(&p->out, s, n)) return fm_error_set(FM_ERR_NOMEM, "out of memory for tool-call parser output");
    p->content_total += n;
    return FM_OK;
}

/* Finishes the block in p->body[0..len) (terminated = it ended with </tool_call>). */
static fm_status add_call(fm_toolcall_parser *p, size_t len, bool terminated) {
    if (p->n_calls == p->cap_calls) {
        size_t nc = p->cap_calls ? 2 * p->cap_calls : 4;
        fm_toolcall *na = realloc(p->calls, nc * sizeof *na);
        if (!na) return fm_error_set(FM_ERR_NOMEM, "out of memory for tool calls");
        p->calls = na;
        p->cap_calls = nc;
    }
    fm_toolcall *c = &p->calls[p->n_calls];
    memset(c, 0, sizeof *c);
    c->content_offset = p->content_total;
    c->raw_len = LEN(OPEN) + len + (terminated ? LEN(CLOSE) : 0);
    c->raw = malloc(c->raw_len + 1);
    if (!c->raw) return fm_error_set(FM_ERR_NOMEM, "out of memory for tool calls");
    memcpy(c->raw, OPEN, LEN(OPEN));
    if (len) memcpy(c->raw + LEN(OPEN), p->body.p, len);
    if (terminated) memcpy(c->raw + LEN(OPEN) + len, CLOSE, LEN(CLOSE));
    c->raw[c->raw_len] = 0;
    p->n_calls++;
    const char *s = p->body.p ? p->body.p : "";
    if (!terminated) {
        bad(c, "unterminated tool call (no </tool_call> before the end)");
    } else {
        size_t a = 0, e = len;
        while (a < e && is_ws(s[a])) a++;
        while (e > a && is_ws(s[e - 1])) e--;
        if (a == e)
            bad(c, "empty tool call");
        else if (p->body_fmt == 1)
            parse_json(c, p->tools, s + a, e - a);
        else
            parse_xml(c, p->tools, s + a, e - a);
    }
    if (!c->ok && !c->error[0]) bad(c, "malformed tool call");
    return FM_OK;
}

/* Looks for the end of the current block from p->scan. Returns the offset of "</tool_call>" in the
 * body, or SIZE_MAX when it is not there yet (scan stops before a possibly incomplete tag). */
static size_t scan_end(fm_toolcall_parser *p) {
    const char *s = p->body.p;
    size_t n = p->body.n;
    while (p->scan < n) {
        size_t i = p->scan;
        char ch = s[i];
        if (p->body_fmt == 0) {
            if (is_ws(ch)) {
                p->scan++;
                continue;
            }
            p->body_fmt = p->fmt == FM_TOOLCALL_JSON ? 1 : p->fmt == FM_TOOLCALL_XML ? 2 : ch == '{' ? 1 : 2;
        }
        /* a tag that may be cut off by the end of what has arrived: wait for more */
#define PARTIAL(tag) (n - i < LEN(tag) && memcmp(s + i, tag, n - i) == 0)
        if (p->body_fmt == 1) {
            if (p->in_str) {
                if (p->esc)
                    p->esc = false;
                else if (ch == '\\')
                    p->esc = true;
                else if (ch == '"')
                    p->in_str = false;
            } else if (ch == '"') {
                p->in_str = true;
            } else if (ch == '<') {
                if (at(s, n, i, CLOSE, LEN(CLOSE))) return i;
                if (PARTIAL(CLOSE)) return SIZE_MAX;
            }
            p->scan++;
        } else if (p->xml_state == 0) {
            if (ch == '<') {
                if (at(s, n, i, CLOSE, LEN(CLOSE))) return i;
                if (at(s, n, i, P_OPEN, LEN(P_OPEN))) {
                    p->xml_state = 1;
                    p->scan += LEN(P_OPEN);
                    continue;
                }
                if (PARTIAL(CLOSE) || PARTIAL(P_OPEN)) return SIZE_MAX;
            }
            p->scan++;
        } else if (p->xml_state == 1) {
            if (ch == '>') {
                p->xml_state = 2;
                p->scan++;
            } else if (ch == '<' || ch == '\n' || ch == '\r') {
                p->xml_state = 0; /* not a parameter tag after all; the block parser will say so */
            } else {
                p->scan++;
            }
        } else {
            if (ch == '<') {
                if (at(s, n, i, P_CLOSE, LEN(P_CLOSE))) {
                    p->xml_state = 0;
                    p->scan += LEN(P_CLOSE);
                    continue;
                }
                if (PARTIAL(P_CLOSE)) return SIZE_MAX;
            }
            p->scan++;
        }
#undef PARTIAL
    }
    return SIZE_MAX;
}

/* Length of the longest suffix of s[0..n) that is a proper prefix of "<tool_call>". */
static size_t open_prefix(const char *s, size_t n) {
    size_t k = n < LEN(OPEN) - 1 ? n : LEN(OPEN) - 1;
    for (; k > 0; k--)
        if (memcmp(s + n - k, OPEN, k) == 0) return k;
    return 0;
}

static fm_status feed(fm_toolcall_parser *p, const char *text, size_t len) {
    char *own = NULL; /* a private copy of the text still to process, once it came from a buffer */
    fm_status st = FM_OK;
    while (st == FM_OK) {
        if (!p->inside) {
            if (!buf_put(&p->hold, text, len)) {
                st = fm_error_set(FM_ERR_NOMEM, "out of memory for tool-call parser input");
                break;
            }
            const char *h = p->hold.p;
            size_t hn = p->hold.n;
            const char *o = hn >= LEN(OPEN) ? memmem(h, hn, OPEN, LEN(OPEN)) : NULL;
            if (!o) {
                size_t k = open_prefix(h, hn);
                st = emit(p, h, hn - k);
                memmove(p->hold.p, h + hn - k, k);
                p->hold.n = k;
                p->hold.p[k] = 0;
                break;
            }
            size_t at_open = (size_t)(o - h), rest = hn - at_open - LEN(OPEN);
            st = emit(p, h, at_open);
            if (st != FM_OK) break;
            free(own);
            own = dup_n(o + LEN(OPEN), rest);
            if (!own) {
                st = fm_error_set(FM_ERR_NOMEM, "out of memory for tool-call parser input");
                break;
            }
            text = own;
            len = rest;
            p->hold.n = 0;
            p->inside = true;
            p->body.n = 0;
            p->scan = 0;
            p->body_fmt = 0;
            p->in_str = p->esc = false;
            p->xml_state = 0;
        } else {
            if (!buf_put(&p->body, text, len)) {
                st = fm_error_set(FM_ERR_NOMEM, "out of memory for a tool call");
                break;
            }
            size_t e = scan_end(p);
            if (e == SIZE_MAX) break;
            size_t rest = p->body.n - e - LEN(CLOSE);
            char *next = dup_n(p->body.p + e + LEN(CLOSE), rest);
            if (!next) {
                st = fm_error_set(FM_ERR_NOMEM, "out of memory for tool-call parser input");
                break;
            }
            st = add_call(p, e, true);
            free(own);
            own = next;
            text = own;
            len = rest;
            p->inside = false;
            p->body.n = 0;
        }
    }
    free(own);
    return st;
}

fm_status fm_toolcall_feed(fm_toolcall_parser *p, const char *text, size_t len) {
    if (!p || (!text && len)) return fm_error_set(FM_ERR_ARG, "fm_toolcall_feed: NULL argument");
    if (p->finished) return fm_error_set(FM_ERR_ARG, "fm_toolcall_feed: the stream was already finished");
    if (p->clear_out) emit(p, NULL, 0);
    return feed(p, text ? text : "", len);
}

fm_status fm_toolcall_finish(fm_toolcall_parser *p) {
    if (!p) return fm_error_set(FM_ERR_ARG, "fm_toolcall_finish: NULL parser");
    if (p->finished) return FM_OK;
    p->finished = true;
    if (p->clear_out) emit(p, NULL, 0);
    if (p->inside) {
        p->inside = false;
        return add_call(p, p->body.n, false);
    }
    fm_status st = emit(p, p->hold.p, p->hold.n);
    p->hold.n = 0;
    return st;
}

const char *fm_toolcall_take_content(fm_toolcall_parser *p, size_t *len) {
    if (!p) {
        if (len) *len = 0;
        return "";
    }
    if (p->clear_out) emit(p, NULL, 0);
    if (len) *len = p->out.n;
    p->clear_out = true;
    return p->out.p ? p->out.p : "";
}

bool fm_toolcall_pending(const fm_toolcall_parser *p) { return p && (p->inside || p->hold.n > 0); }

size_t fm_toolcall_count(const fm_toolcall_parser *p) { return p ? p->n_calls : 0; }

const fm_toolcall *fm_toolcall_get(const fm_toolcall_parser *p, size_t i) {
    return p && i < p->n_calls ? &p->calls[i] : NULL;
}

fm_status fm_toolcall_parse(fm_toolcall_format fmt, const json_t *tools, const char *text, size_t len,
                            fm_toolcall_result *out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_toolcall_parse: NULL output");
    memset(out, 0, sizeof *out);
    if (!text && len) return fm_error_set(FM_ERR_ARG, "fm_toolcall_parse: NULL text");
    fm_toolcall_parser *p;
    fm_status st = fm_toolcall_parser_new(fmt, tools, &p);
    if (st != FM_OK) return st;
    st = fm_toolcall_feed(p, text, len);
    if (st == FM_OK) st = fm_toolcall_finish(p);
    if (st == FM_OK) {
        size_t n;
        const char *c = fm_toolcall_take_content(p, &n);
        out->content = dup_n(c, n);
        if (!out->content) st = fm_error_set(FM_ERR_NOMEM, "out of memory for tool-call content");
        out->content_len = n;
    }
    if (st == FM_OK) {
        out->calls = p->calls;
        out->n_calls = p->n_calls;
        p->calls = NULL;
        p->n_calls = 0;
    } else {
        free(out->content);
        memset(out, 0, sizeof *out);
    }
    fm_toolcall_parser_free(p);
    return st;
}

void fm_toolcall_result_free(fm_toolcall_result *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_calls; i++) call_free(&r->calls[i]);
    free(r->calls);
    free(r->content);
    memset(r, 0, sizeof *r);
}
