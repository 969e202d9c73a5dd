/* Chat prompt rendering: C transcriptions of the Qwen3, Qwen3.5 and Qwen3-Coder Jinja chat templates
 * (shared/reference/templates/), with Python / Jinja semantics reproduced where they show in the
 * output: str.strip() white space, json.dumps(ensure_ascii=False), str() of values ("True", "None",
 * float repr). See chat.h for the contract and docs/CHAT.md for the rules. */
#include "text/chat.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "util/error.h"

/* ============================== byte buffer ============================== */

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->oom || n == 0) return;
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 256;
        while (nc < b->n + n + 1) nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_putc(sbuf *b, char c) { sb_put(b, &c, 1); }

/* ========================== Python-style strings ========================= */

typedef struct str_t {
    const char *p;
    size_t n;
} str_t;

static str_t S(const char *p, size_t n) { return (str_t){p, n}; }

static str_t SZ(const char *p) { return (str_t){p, strlen(p)}; }

/* Python's str.isspace(): Unicode White_Space-like set (bidi WS/B/S or category Zs). */
static bool py_isspace(uint32_t c) {
    if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f);
    return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 ||
           c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Decodes the (valid, jansson-checked) UTF-8 character at s[0..n); returns its length. */
static size_t u8_dec(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    size_t len = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    if (len > n) len = n;
    uint32_t v = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
    for (size_t i = 1; i < len; i++) v = (v << 6) | (s[i] & 0x3f);
    *cp = v;
    return len;
}

/* Python str.strip() with no argument. */
static str_t py_trim(str_t s) {
    const unsigned char *p = (const unsigned char *)s.p;
    size_t a = 0, e = s.n;
    while (a < e) {
        uint32_t cp;
        size_t l = u8_dec(p + a, e - a, &cp);
        if (!py_isspace(cp)) break;
        a += l;
    }
    while (e > a) {
        size_t st = e - 1;
        while (st > a && (p[st] & 0xc0) == 0x80) st--;
        uint32_t cp;
        u8_dec(p + st, e - st, &cp);
        if (!py_isspace(cp)) break;
        e = st;
    }
    return S(s.p + a, e - a);
}

static str_t lstrip_nl(str_t s) {
    while (s.n && s.p[0] == '\n') s.p++, s.n--;
    return s;
}

static str_t rstrip_nl(str_t s) {
    while (s.n && s.p[s.n - 1] == '\n') s.n--;
    return s;
}

static const char *find(str_t s, const char *pat) {
    size_t m = strlen(pat);
    if (m > s.n) return NULL;
    return memmem(s.p, s.n, pat, m);
}

static bool starts(str_t s, const char *pat) {
    size_t m = strlen(pat);
    return s.n >= m && memcmp(s.p, pat, m) == 0;
}

static bool ends(str_t s, const char *pat) {
    size_t m = strlen(pat);
    return s.n >= m && memcmp(s.p + s.n - m, pat, m) == 0;
}

/* s.split(pat)[0] */
static str_t before_first(str_t s, const char *pat) {
    const char *f = find(s, pat);
    return f ? S(s.p, (size_t)(f - s.p)) : s;
}

/* s.split(pat)[-1] */
static str_t after_last(str_t s, const char *pat) {
    size_t m = strlen(pat);
    str_t r = s;
    const char *f;
    while ((f = find(r, pat)) != NULL) r = S(f + m, (size_t)(r.p + r.n - (f + m)));
    return r;
}

/* ====================== JSON / Python value printing ===================== */

/* repr() of a finite double, Python 3 style: shortest round-trip digits, exponent form when the
 * decimal point position is <= -4 or > 16, ".0" on integral values. */
static void py_float(sbuf *b, double x) {
    if (isnan(x)) {
        sb_puts(b, "NaN");
        return;
    }
    if (isinf(x)) {
        sb_puts(b, x < 0 ? "-Infinity" : "Infinity");
        return;
    }
    if (x == 0) {
        sb_puts(b, signbit(x) ? "-0.0" : "0.0");
        return;
    }
    char buf[64];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*e", prec - 1, x);
        if (strtod(buf, NULL) == x) break;
    }
    char digits[32];
    int nd = 0;
    const char *q = buf;
    if (*q == '-') {
        sb_putc(b, '-');
        q++;
    }
    for (; *q && *q != 'e' && *q != 'E'; q++)
        if (*q >= '0' && *q <= '9' && nd < 31) digits[nd++] = *q;
    int e10 = (*q) ? atoi(q + 1) : 0;
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    int decpt = e10 + 1;
    if (decpt <= -4 || decpt > 16) {
        sb_putc(b, digits[0]);
        if (nd > 1) {
            sb_putc(b, '.');
            sb_put(b, digits + 1, (size_t)nd - 1);
        }
        snprintf(buf, sizeof buf, "e%c%02d", e10 < 0 ? '-' : '+', e10 < 0 ? -e10 : e10);
        sb_puts(b, buf);
    } else if (decpt <= 0) {
        sb_puts(b, "0.");
        for (int i = 0; i < -decpt; i++) sb_putc(b, '0');
        sb_put(b, digits, (size_t)nd);
    } else if (decpt >= nd) {
        sb_put(b, digits, (size_t)nd);
        for (int i = nd; i < decpt; i++) sb_putc(b, '0');
        sb_puts(b, ".0");
    } else {
        sb_put(b, digits, (size_t)decpt);
        sb_putc(b, '.');
        sb_put(b, digits + decpt, (size_t)(nd - decpt));
    }
}

static void json_str(sbuf *b, const char *s, size_t n) {
    sb_putc(b, '"');
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char u[8];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (c < 0x20) {
                snprintf(u, sizeof u, "\\u%04x", c);
                esc = u;
            }
        }
        if (esc) {
            sb_put(b, s + run, i - run);
            sb_puts(b, esc);
            run = i + 1;
        }
    }
    sb_put(b, s + run, n - run);
    sb_putc(b, '"');
}

/* json.dumps(v, ensure_ascii=False) */
static void json_dump(sbuf *b, const json_t *v) {
    char num[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        sb_putc(b, '{');
        bool first = true;
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x) {
            if (!first) sb_puts(b, ", ");
            first = false;
            json_str(b, k, strlen(k));
            sb_puts(b, ": ");
            json_dump(b, x);
        }
        sb_putc(b, '}');
        break;
    }
    case JSON_ARRAY:
        sb_putc(b, '[');
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) sb_puts(b, ", ");
            json_dump(b, json_array_get(v, i));
        }
        sb_putc(b, ']');
        break;
    case JSON_STRING: json_str(b, json_string_value(v), json_string_length(v)); break;
    case JSON_INTEGER:
        snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        sb_puts(b, num);
        break;
    case JSON_REAL: py_float(b, json_real_value(v)); break;
    case JSON_TRUE: sb_puts(b, "true"); break;
    case JSON_FALSE: sb_puts(b, "false"); break;
    case JSON_NULL: sb_puts(b, "null"); break;
    }
}

/* Python str.isprintable() for one code point (Unicode general category test). */
static bool py_isprintable(uint32_t c) {
    if (c < 0x80) return c >= 0x20 && c < 0x7f;
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
    case UTF8PROC_CATEGORY_ZS: return false;
    default: return true;
    }
}

/* repr() of a str. */
static void py_repr_str(sbuf *b, const char *s, size_t n) {
    char quote = (memchr(s, '\'', n) && !memchr(s, '"', n)) ? '"' : '\'';
    sb_putc(b, quote);
    const unsigned char *p = (const unsigned char *)s;
    char e[16];
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t l = u8_dec(p + i, n - i, &cp);
        if (cp == (uint32_t)quote || cp == '\\') {
            sb_putc(b, '\\');
            sb_putc(b, (char)cp);
        } else if (cp == '\t') {
            sb_puts(b, "\\t");
        } else if (cp == '\n') {
            sb_puts(b, "\\n");
        } else if (cp == '\r') {
            sb_puts(b, "\\r");
        } else if (py_isprintable(cp)) {
            sb_put(b, s + i, l);
        } else {
            snprintf(e, sizeof e, cp <= 0xff ? "\\x%02x" : cp <= 0xffff ? "\\u%04x" : "\\U%08x", (unsigned)cp);
            sb_puts(b, e);
        }
        i += l;
    }
    sb_putc(b, quote);
}

/* str(v) for a value coming from JSON: str raw, True/False/None, int, float repr, and the repr of
 * lists and dicts. repr = true gives repr(v) (strings quoted), used inside containers. */
static void py_str(sbuf *b, const json_t *v, bool repr) {
    switch (json_typeof(v)) {
    case JSON_STRING:
        if (repr)
            py_repr_str(b, json_string_value(v), json_string_length(v));
        else
            sb_put(b, json_string_value(v), json_string_length(v));
        break;
    case JSON_TRUE: sb_puts(b, "True"); break;
    case JSON_FALSE: sb_puts(b, "False"); break;
    case JSON_NULL: sb_puts(b, "None"); break;
    case JSON_OBJECT: {
        sb_putc(b, '{');
        bool first = true;
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x) {
            if (!first) sb_puts(b, ", ");
            first = false;
            py_repr_str(b, k, strlen(k));
            sb_puts(b, ": ");
            py_str(b, x, true);
        }
        sb_putc(b, '}');
        break;
    }
    case JSON_ARRAY:
        sb_putc(b, '[');
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) sb_puts(b, ", ");
            py_str(b, json_array_get(v, i), true);
        }
        sb_putc(b, ']');
        break;
    case JSON_INTEGER:
    case JSON_REAL: json_dump(b, v); break;
    }
}

fm_status fm_chat_json_dumps(const json_t *v, char **out, size_t *len) {
    *out = NULL;
    if (len) *len = 0;
    if (!v) return fm_error_set(FM_ERR_ARG, "fm_chat_json_dumps: NULL value");
    sbuf b = {0};
    json_dump(&b, v);
    if (!b.p && !b.oom) b.p = calloc(1, 1);
    if (b.oom || !b.p) {
        free(b.p);
        return fm_error_set(FM_ERR_NOMEM, "out of memory serialising JSON");
    }
    *out = b.p;
    if (len) *len = b.n;
    return FM_OK;
}

/* ============================ prompt builder ============================= */

static const char *const SPECIALS[] = {"<|im_start|>", "<|im_end|>",  "<think>",         "</think>",
                                       "<tool_call>",  "</tool_call>", "<tool_response>", "</tool_response>"};

typedef struct rctx {
    sbuf text;
    fm_chat_segment *segs;
    size_t n_segs, cap_segs;
    bool oom;
    /* scratch owned by the render call */
    char **owned;
    size_t n_owned, cap_owned;
    json_t **parsed;
    size_t n_parsed, cap_parsed;
} rctx;

static void seg_add(rctx *c, fm_chat_seg_kind kind, const char *s, size_t n) {
    if (n == 0 || c->oom || c->text.oom) return;
    size_t off = c->text.n;
    sb_put(&c->text, s, n);
    if (c->text.oom) return;
    if (kind != FM_CHAT_SEG_SPECIAL && c->n_segs && c->segs[c->n_segs - 1].kind == kind) {
        c->segs[c->n_segs - 1].length += n;
        return;
    }
    if (c->n_segs == c->cap_segs) {
        size_t nc = c->cap_segs ? 2 * c->cap_segs : 64;
        fm_chat_segment *ns = realloc(c->segs, nc * sizeof *ns);
        if (!ns) {
            c->oom = true;
            return;
        }
        c->segs = ns;
        c->cap_segs = nc;
    }
    c->segs[c->n_segs++] = (fm_chat_segment){off, n, kind};
}

/* Caller text. */
static void D(rctx *c, str_t s) { seg_add(c, FM_CHAT_SEG_DATA, s.p, s.n); }

/* Template literal text: special tokens inside become SPECIAL segments. */
static void T(rctx *c, const char *s) {
    size_t n = strlen(s), run = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '<') continue;
        for (size_t k = 0; k < sizeof SPECIALS / sizeof *SPECIALS; k++) {
            size_t m = strlen(SPECIALS[k]);
            if (m <= n - i && memcmp(s + i, SPECIALS[k], m) == 0) {
                seg_add(c, FM_CHAT_SEG_TEMPLATE, s + run, i - run);
                seg_add(c, FM_CHAT_SEG_SPECIAL, s + i, m);
                i += m - 1;
                run = i + 1;
                break;
            }
        }
    }
    seg_add(c, FM_CHAT_SEG_TEMPLATE, s + run, n - run);
}

/* A role name: template text when it is one the template names itself, caller text otherwise. */
static void ROLE(rctx *c, str_t role) {
    static const char *const known[] = {"system", "user", "assistant", "tool"};
    for (size_t i = 0; i < 4; i++)
        if (role.n == strlen(known[i]) && memcmp(role.p, known[i], role.n) == 0) {
            seg_add(c, FM_CHAT_SEG_TEMPLATE, role.p, role.n);
            return;
        }
    D(c, role);
}

/* Keeps a malloc'd string alive until the render ends; returns it as a slice. */
static fm_status own(rctx *c, sbuf *b, str_t *out) {
    if (b->oom) {
        free(b->p);
        return fm_error_set(FM_ERR_NOMEM, "out of memory rendering the chat prompt");
    }
    if (c->n_owned == c->cap_owned) {
        size_t nc = c->cap_owned ? 2 * c->cap_owned : 16;
        char **no = realloc(c->owned, nc * sizeof *no);
        if (!no) {
            free(b->p);
            return fm_error_set(FM_ERR_NOMEM, "out of memory rendering the chat prompt");
        }
        c->owned = no;
        c->cap_owned = nc;
    }
    c->owned[c->n_owned++] = b->p;
    *out = S(b->p ? b->p : "", b->n);
    return FM_OK;
}

static fm_status keep_json(rctx *c, json_t *v) {
    if (c->n_parsed == c->cap_parsed) {
        size_t nc = c->cap_parsed ? 2 * c->cap_parsed : 8;
        json_t **np = realloc(c->parsed, nc * sizeof *np);
        if (!np) {
            json_decref(v);
            return fm_error_set(FM_ERR_NOMEM, "out of memory rendering the chat prompt");
        }
        c->parsed = np;
        c->cap_parsed = nc;
    }
    c->parsed[c->n_parsed++] = v;
    return FM_OK;
}

/* Caller JSON as json.dumps prints it. */
static fm_status DJSON(rctx *c, const json_t *v) {
    sbuf b = {0};
    json_dump(&b, v);
    str_t s;
    fm_status st = own(c, &b, &s);
    if (st == FM_OK) D(c, s);
    return st;
}

/* Caller value as str() prints it. */
static fm_status DSTR(rctx *c, const json_t *v) {
    if (json_is_string(v)) {
        D(c, S(json_string_value(v), json_string_length(v)));
        return FM_OK;
    }
    sbuf b = {0};
    py_str(&b, v, false);
    str_t s;
    fm_status st = own(c, &b, &s);
    if (st == FM_OK) D(c, s);
    return st;
}

/* A tool-call argument value as the XML templates print it: tojson for mappings and lists, str()
 * for the rest. */
static fm_status DARG(rctx *c, const json_t *v) {
    return (json_is_object(v) || json_is_array(v)) ? DJSON(c, v) : DSTR(c, v);
}

#define TRY(x)                                                                                                         \
    do {                                                                                                               \
        fm_status st_ = (x);                                                                                           \
        if (st_ != FM_OK) return st_;                                                                                  \
    } while (0)

/* ============================ message access ============================= */

typedef enum content_mode {
    CONTENT_CONCAT, /* used in string concatenation: null / missing -> "" (Jinja would fail) */
    CONTENT_PRINT,  /* printed with {{ }}: null -> "None", missing -> "" */
} content_mode;

static str_t role_of(const json_t *msgs, size_t i) {
    const json_t *r = json_object_get(json_array_get(msgs, i), "role");
    return S(json_string_value(r), json_string_length(r));
}

static bool role_is(const json_t *msgs, size_t i, const char *role) {
    str_t r = role_of(msgs, i);
    return r.n == strlen(role) && memcmp(r.p, role, r.n) == 0;
}

/* The message's content as text (see content_mode); a list of parts is concatenated as Qwen3.5's
 * render_content does; images / videos are refused. */
static fm_status content_of(rctx *c, const json_t *msgs, size_t i, content_mode mode, str_t *out) {
    const json_t *v = json_object_get(json_array_get(msgs, i), "content");
    if (!v) {
        *out = S("", 0);
        return FM_OK;
    }
    if (json_is_string(v)) {
        *out = S(json_string_value(v), json_string_length(v));
        return FM_OK;
    }
    if (json_is_null(v)) {
        *out = mode == CONTENT_PRINT ? SZ("None") : S("", 0);
        return FM_OK;
    }
    if (!json_is_array(v))
        return fm_error_set(FM_ERR_ARG, "messages[%zu].content: expected a string, null or a list of parts", i);
    sbuf b = {0};
    for (size_t k = 0; k < json_array_size(v); k++) {
        const json_t *item = json_array_get(v, k);
        if (!json_is_object(item)) {
            free(b.p);
            return fm_error_set(FM_ERR_ARG, "messages[%zu].content[%zu]: expected an object", i, k);
        }
        const char *ty = json_string_value(json_object_get(item, "type"));
        if (json_object_get(item, "image") || json_object_get(item, "image_url") || (ty && !strcmp(ty, "image")) ||
            json_object_get(item, "video") || (ty && !strcmp(ty, "video"))) {
            free(b.p);
            return fm_error_set(FM_ERR_UNSUPPORTED, "messages[%zu].content[%zu]: images and videos are not supported",
                                i, k);
        }
        const json_t *t = json_object_get(item, "text");
        if (!json_is_string(t)) {
            free(b.p);
            return fm_error_set(FM_ERR_ARG, "messages[%zu].content[%zu]: expected a text part with a string \"text\"",
                                i, k);
        }
        sb_put(&b, json_string_value(t), json_string_length(t));
    }
    return own(c, &b, out);
}

/* The tool calls of message i (NULL when none), checked to be an array of objects. */
static fm_status tool_calls_of(const json_t *msgs, size_t i, const json_t **out) {
    const json_t *tc = json_object_get(json_array_get(msgs, i), "tool_calls");
    *out = NULL;
    if (!tc || json_is_null(tc)) return FM_OK;
    if (!json_is_array(tc)) return fm_error_set(FM_ERR_ARG, "messages[%zu].tool_calls: expected an array", i);
    for (size_t j = 0; j < json_array_size(tc); j++)
        if (!json_is_object(json_array_get(tc, j)))
            return fm_error_set(FM_ERR_ARG, "messages[%zu].tool_calls[%zu]: expected an object", i, j);
    *out = json_array_size(tc) ? tc : NULL;
    return FM_OK;
}

/* One tool call: {"function": {...}} unwrapped, its name (a string) and arguments (may be NULL). */
static fm_status call_parts(size_t i, size_t j, const json_t *call, str_t *name, const json_t **args) {
    const json_t *fn = json_object_get(call, "function");
    if (fn && !json_is_null(fn)) {
        if (!json_is_object(fn))
            return fm_error_set(FM_ERR_ARG, "messages[%zu].tool_calls[%zu].function: expected an object", i, j);
        call = fn;
    }
    const json_t *nm = json_object_get(call, "name");
    if (!json_is_string(nm))
        return fm_error_set(FM_ERR_ARG, "messages[%zu].tool_calls[%zu]: no function name (a string)", i, j);
    *name = S(json_string_value(nm), json_string_length(nm));
    *args = json_object_get(call, "arguments");
    return FM_OK;
}

/* Arguments as an object for the XML templates' `arguments|items`: a JSON string is parsed (as
 * OpenAI clients send it), missing or null means none. */
static fm_status call_args_object(rctx *c, size_t i, size_t j, const json_t *args, const json_t **out) {
    *out = NULL;
    if (!args || json_is_null(args)) return FM_OK;
    if (json_is_string(args)) {
        json_error_t err;
        json_t *v = json_loadb(json_string_value(args), json_string_length(args), JSON_DECODE_ANY, &err);
        if (!v)
            return fm_error_set(FM_ERR_ARG, "messages[%zu].tool_calls[%zu].arguments: invalid JSON: %s", i, j,
                                err.text);
        TRY(keep_json(c, v));
        args = v;
    }
    if (!json_is_object(args))
        return fm_error_set(FM_ERR_ARG, "messages[%zu].tool_calls[%zu].arguments: expected an object", i, j);
    *out = args;
    return FM_OK;
}

/* Reasoning and answer of an assistant message, as the templates split them: reasoning_content
 * when given, else the text around </think> in content. qwen35 selects Qwen3.5's rule
 * (`reasoning_content is string`) over Qwen3's (`is defined and is not none`). */
static fm_status split_reasoning(const json_t *msgs, size_t i, str_t content, bool qwen35, str_t *reasoning,
                                 str_t *answer) {
    const json_t *rc = json_object_get(json_array_get(msgs, i), "reasoning_content");
    *answer = content;
    *reasoning = S("", 0);
    if (qwen35 ? json_is_string(rc) : (rc && !json_is_null(rc))) {
        if (!json_is_string(rc))
            return fm_error_set(FM_ERR_ARG, "messages[%zu].reasoning_content: expected a string", i);
        *reasoning = S(json_string_value(rc), json_string_length(rc));
    } else if (find(content, "</think>")) {
        *reasoning = lstrip_nl(after_last(rstrip_nl(before_first(content, "</think>")), "<think>"));
        *answer = lstrip_nl(after_last(content, "</think>"));
    }
    return FM_OK;
}

static bool is_tool_response(str_t s) { return starts(s, "<tool_response>") && ends(s, "</tool_response>"); }

/* =============================== Qwen3 =================================== */

static fm_status render_qwen3(rctx *c, const json_t *msgs, const json_t *tools, const fm_chat_flags *f) {
    size_t n = json_array_size(msgs);
    str_t ct;
    if (tools && json_array_size(tools)) {
        T(c, "<|im_start|>system\n");
        if (role_is(msgs, 0, "system")) {
            TRY(content_of(c, msgs, 0, CONTENT_CONCAT, &ct));
            D(c, ct);
            T(c, "\n\n");
        }
        T(c, "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
             "function signatures within <tools></tools> XML tags:\n<tools>");
        for (size_t k = 0; k < json_array_size(tools); k++) {
            T(c, "\n");
            TRY(DJSON(c, json_array_get(tools, k)));
        }
        T(c, "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
             "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
             "<args-json-object>}\n</tool_call><|im_end|>\n");
    } else if (role_is(msgs, 0, "system")) {
        TRY(content_of(c, msgs, 0, CONTENT_CONCAT, &ct));
        T(c, "<|im_start|>system\n");
        D(c, ct);
        T(c, "<|im_end|>\n");
    }
    size_t last_query = n - 1;
    for (size_t k = n; k-- > 0;) {
        if (!role_is(msgs, k, "user")) continue;
        TRY(content_of(c, msgs, k, CONTENT_CONCAT, &ct));
        if (!is_tool_response(ct)) {
            last_query = k;
            break;
        }
    }
    for (size_t i = 0; i < n; i++) {
        str_t role = role_of(msgs, i);
        if (role_is(msgs, i, "user") || (role_is(msgs, i, "system") && i > 0)) {
            TRY(content_of(c, msgs, i, CONTENT_CONCAT, &ct));
            T(c, "<|im_start|>");
            ROLE(c, role);
            T(c, "\n");
            D(c, ct);
            T(c, "<|im_end|>\n");
        } else if (role_is(msgs, i, "assistant")) {
            str_t content, reasoning;
            TRY(content_of(c, msgs, i, CONTENT_CONCAT, &ct));
            TRY(split_reasoning(msgs, i, ct, false, &reasoning, &content));
            if (i > last_query && (i == n - 1 || reasoning.n)) {
                T(c, "<|im_start|>assistant\n<think>\n");
                D(c, rstrip_nl(lstrip_nl(reasoning)));
                T(c, "\n</think>\n\n");
                D(c, lstrip_nl(content));
            } else {
                T(c, "<|im_start|>assistant\n");
                D(c, content);
            }
            const json_t *calls;
            TRY(tool_calls_of(msgs, i, &calls));
            for (size_t j = 0; calls && j < json_array_size(calls); j++) {
                str_t name;
                const json_t *args;
                TRY(call_parts(i, j, json_array_get(calls, j), &name, &args));
                if (j > 0 || content.n) T(c, "\n");
                T(c, "<tool_call>\n{\"name\": \"");
                D(c, name);
                T(c, "\", \"arguments\": ");
                if (json_is_string(args))
                    D(c, S(json_string_value(args), json_string_length(args)));
                else if (args)
                    TRY(DJSON(c, args));
                else
                    D(c, SZ("{}"));
                T(c, "}\n</tool_call>");
            }
            T(c, "<|im_end|>\n");
        } else if (role_is(msgs, i, "tool")) {
            TRY(content_of(c, msgs, i, CONTENT_PRINT, &ct));
            if (i == 0 || !role_is(msgs, i - 1, "tool")) T(c, "<|im_start|>user");
            T(c, "\n<tool_response>\n");
            D(c, ct);
            T(c, "\n</tool_response>");
            if (i == n - 1 || !role_is(msgs, i + 1, "tool")) T(c, "<|im_end|>\n");
        }
        /* the first system message was rendered above; other roles are dropped, as the template does */
    }
    if (f->add_generation_prompt) {
        T(c, "<|im_start|>assistant\n");
        if (f->enable_thinking == FM_CHAT_THINKING_OFF) T(c, "<think>\n\n</think>\n\n");
    }
    return FM_OK;
}

/* ============================== Qwen3.5 ================================== */

static const char QWEN35_TOOLS_TAIL[] =
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple "
    "lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the "
    "specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML "
    "tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in "
    "natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer "
    "the question like normal with your current knowledge and do not tell the user about function "
    "calls\n</IMPORTANT>";

/* `<parameter=K>\nV\n</parameter>\n` for each argument (shared by Qwen3.5 and Qwen3-Coder). */
static fm_status xml_params(rctx *c, size_t i, size_t j, const json_t *args) {
    const json_t *obj;
    TRY(call_args_object(c, i, j, args, &obj));
    if (!obj) return FM_OK;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)obj, k, v) {
        T(c, "<parameter=");
        D(c, SZ(k));
        T(c, ">\n");
        TRY(DARG(c, v));
        T(c, "\n</parameter>\n");
    }
    return FM_OK;
}

static fm_status render_qwen35(rctx *c, const json_t *msgs, const json_t *tools, const fm_chat_flags *f) {
    size_t n = json_array_size(msgs);
    str_t ct;
    if (tools && json_array_size(tools)) {
        T(c, "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>");
        for (size_t k = 0; k < json_array_size(tools); k++) {
            T(c, "\n");
            TRY(DJSON(c, json_array_get(tools, k)));
        }
        T(c, "\n</tools>");
        T(c, QWEN35_TOOLS_TAIL);
        if (role_is(msgs, 0, "system")) {
            TRY(content_of(c, msgs, 0, CONTENT_CONCAT, &ct));
            ct = py_trim(ct);
            if (ct.n) {
                T(c, "\n\n");
                D(c, ct);
            }
        }
        T(c, "<|im_end|>\n");
    } else if (role_is(msgs, 0, "system")) {
        TRY(content_of(c, msgs, 0, CONTENT_CONCAT, &ct));
        T(c, "<|im_start|>system\n");
        D(c, py_trim(ct));
        T(c, "<|im_end|>\n");
    }
    size_t last_query = n;
    for (size_t k = n; k-- > 0;) {
        if (!role_is(msgs, k, "user")) continue;
        TRY(content_of(c, msgs, k, CONTENT_CONCAT, &ct));
        if (!is_tool_response(py_trim(ct))) {
            last_query = k;
            break;
        }
    }
    if (last_query == n) return fm_error_set(FM_ERR_ARG, "messages: no user query found (the template requires one)");
    for (size_t i = 0; i < n; i++) {
        TRY(content_of(c, msgs, i, CONTENT_CONCAT, &ct));
        str_t content = py_trim(ct);
        if (role_is(msgs, i, "system")) {
            if (i != 0)
                return fm_error_set(FM_ERR_ARG, "messages[%zu]: a system message must be the first message", i);
        } else if (role_is(msgs, i, "user")) {
            T(c, "<|im_start|>user\n");
            D(c, content);
            T(c, "<|im_end|>\n");
        } else if (role_is(msgs, i, "assistant")) {
            str_t reasoning;
            TRY(split_reasoning(msgs, i, content, true, &reasoning, &content));
            reasoning = py_trim(reasoning);
            if (i > last_query) {
                T(c, "<|im_start|>assistant\n<think>\n");
                D(c, reasoning);
                T(c, "\n</think>\n\n");
                D(c, content);
            } else {
                T(c, "<|im_start|>assistant\n");
                D(c, content);
            }
            const json_t *calls;
            TRY(tool_calls_of(msgs, i, &calls));
            for (size_t j = 0; calls && j < json_array_size(calls); j++) {
                str_t name;
                const json_t *args;
                TRY(call_parts(i, j, json_array_get(calls, j), &name, &args));
                if (j == 0)
                    T(c, py_trim(content).n ? "\n\n<tool_call>\n<function=" : "<tool_call>\n<function=");
                else
                    T(c, "\n<tool_call>\n<function=");
                D(c, name);
                T(c, ">\n");
                TRY(xml_params(c, i, j, args));
                T(c, "</function>\n</tool_call>");
            }
            T(c, "<|im_end|>\n");
        } else if (role_is(msgs, i, "tool")) {
            if (i > 0 && !role_is(msgs, i - 1, "tool")) T(c, "<|im_start|>user");
            T(c, "\n<tool_response>\n");
            D(c, content);
            T(c, "\n</tool_response>");
            if (i == n - 1 || !role_is(msgs, i + 1, "tool")) T(c, "<|im_end|>\n");
        } else {
            return fm_error_set(FM_ERR_ARG, "messages[%zu]: role \"%.*s\" is not one of system, user, assistant, tool",
                                i, (int)role_of(msgs, i).n, role_of(msgs, i).p);
        }
    }
    if (f->add_generation_prompt) {
        T(c, "<|im_start|>assistant\n");
        T(c, f->enable_thinking == FM_CHAT_THINKING_OFF ? "<think>\n\n</think>\n\n" : "<think>\n");
    }
    return FM_OK;
}

/* ============================ Qwen3-Coder ================================ */

static const char CODER_TOOLS_TAIL[] =
    "\n</tools>\n\nIf you choose to call a tool ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nvalue_2\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: the tool calling block MUST begin with an opening "
    "<tool_call> tag and end with a closing </tool_call> tag.\n- Required parameters MUST be specified\n- You may "
    "provide optional reasoning for your function call in natural language BEFORE the function call, but NOT "
    "after\n- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>";

/* The template's render_extra_keys macro: `\n<key>value</key>` for each key not handled. */
static fm_status extra_keys(rctx *c, const json_t *dict, const char *const *handled, size_t n_handled) {
    if (!json_is_object(dict)) return FM_OK;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)dict, k, v) {
        bool skip = false;
        for (size_t h = 0; h < n_handled; h++) skip |= strcmp(k, handled[h]) == 0;
        if (skip) continue;
        T(c, "\n<");
        D(c, SZ(k));
        T(c, ">");
        TRY(DARG(c, v));
        T(c, "</");
        D(c, SZ(k));
        T(c, ">");
    }
    return FM_OK;
}

/* `value | trim` of a value: str() then strip(). */
static fm_status DTRIM(rctx *c, const json_t *v) {
    sbuf b = {0};
    py_str(&b, v, false);
    str_t s;
    TRY(own(c, &b, &s));
    D(c, py_trim(s));
    return FM_OK;
}

static fm_status coder_tool(rctx *c, const json_t *tool) {
    const json_t *fn = json_object_get(tool, "function");
    if (fn) tool = fn;
    static const char *const param_keys[] = {"name", "type", "description"};
    static const char *const params_keys[] = {"type", "properties"};
    static const char *const tool_keys[] = {"type", "name", "description", "parameters"};
    T(c, "\n<function>\n<name>");
    const json_t *name = json_object_get(tool, "name");
    if (name) TRY(DSTR(c, name));
    T(c, "</name>");
    const json_t *desc = json_object_get(tool, "description");
    if (desc) {
        T(c, "\n<description>");
        TRY(DTRIM(c, desc));
        T(c, "</description>");
    }
    T(c, "\n<parameters>");
    const json_t *params = json_object_get(tool, "parameters");
    const json_t *props = json_object_get(params, "properties");
    if (json_is_object(params) && json_is_object(props)) {
        const char *pname;
        json_t *pf;
        json_object_foreach((json_t *)props, pname, pf) {
            T(c, "\n<parameter>\n<name>");
            D(c, SZ(pname));
            T(c, "</name>");
            const json_t *ty = json_object_get(pf, "type");
            if (ty) {
                T(c, "\n<type>");
                TRY(DSTR(c, ty));
                T(c, "</type>");
            }
            const json_t *pd = json_object_get(pf, "description");
            if (pd) {
                T(c, "\n<description>");
                TRY(DTRIM(c, pd));
                T(c, "</description>");
            }
            TRY(extra_keys(c, pf, param_keys, 3));
            T(c, "\n</parameter>");
        }
    }
    TRY(extra_keys(c, params, params_keys, 2));
    T(c, "\n</parameters>");
    TRY(extra_keys(c, tool, tool_keys, 4));
    T(c, "\n</function>");
    return FM_OK;
}

static fm_status render_coder(rctx *c, const json_t *msgs, const json_t *tools, const fm_chat_flags *f) {
    size_t n = json_array_size(msgs), first = 0;
    bool has_tools = tools && json_array_size(tools);
    str_t ct;
    if (role_is(msgs, 0, "system")) {
        TRY(content_of(c, msgs, 0, CONTENT_CONCAT, &ct));
        T(c, "<|im_start|>system\n");
        D(c, ct);
        first = 1;
    } else if (has_tools) {
        T(c, "<|im_start|>system\nYou are Qwen, a helpful AI assistant that can interact with a computer to solve "
             "tasks.");
    }
    if (has_tools) {
        T(c, "\n\n# Tools\n\nYou have access to the following tools:\n\n<tools>");
        for (size_t k = 0; k < json_array_size(tools); k++) TRY(coder_tool(c, json_array_get(tools, k)));
        T(c, CODER_TOOLS_TAIL);
    }
    if (first || has_tools) T(c, "<|im_end|>\n");
    for (size_t i = first; i < n; i++) {
        str_t role = role_of(msgs, i);
        const json_t *calls = NULL;
        if (role_is(msgs, i, "assistant")) TRY(tool_calls_of(msgs, i, &calls));
        if (calls) {
            T(c, "<|im_start|>assistant");
            const json_t *cv = json_object_get(json_array_get(msgs, i), "content");
            if (json_is_string(cv)) {
                str_t t = py_trim(S(json_string_value(cv), json_string_length(cv)));
                if (t.n) {
                    T(c, "\n");
                    D(c, t);
                    T(c, "\n");
                }
            }
            for (size_t j = 0; j < json_array_size(calls); j++) {
                str_t name;
                const json_t *args;
                TRY(call_parts(i, j, json_array_get(calls, j), &name, &args));
                T(c, "\n<tool_call>\n<function=");
                D(c, name);
                T(c, ">\n");
                TRY(xml_params(c, i, j, args));
                T(c, "</function>\n</tool_call>");
            }
            T(c, "<|im_end|>\n");
        } else if (role_is(msgs, i, "tool")) {
            TRY(content_of(c, msgs, i, CONTENT_PRINT, &ct));
            if (i > first && !role_is(msgs, i - 1, "tool")) T(c, "<|im_start|>user\n");
            T(c, "<tool_response>\n");
            D(c, ct);
            T(c, "\n</tool_response>\n");
            if (i == n - 1 || !role_is(msgs, i + 1, "tool")) T(c, "<|im_end|>\n");
        } else {
            /* user, system, assistant, and any other role alike */
            TRY(content_of(c, msgs, i, CONTENT_CONCAT, &ct));
            T(c, "<|im_start|>");
            ROLE(c, role);
            T(c, "\n");
            D(c, ct);
            T(c, "<|im_end|>\n");
        }
    }
    if (f->add_generation_prompt) T(c, "<|im_start|>assistant\n");
    return FM_OK;
}

/* ================================ API ==================================== */

const char *fm_chat_template_name(fm_chat_template kind) {
    switch (kind) {
    case FM_CHAT_QWEN3: return "qwen3";
    case FM_CHAT_QWEN35: return "qwen3.5";
    case FM_CHAT_QWEN3_CODER: return "qwen3-coder";
    default: return "unknown";
    }
}

void fm_chat_prompt_free(fm_chat_prompt *p) {
    if (!p) return;
    free(p->text);
    free(p->segs);
    memset(p, 0, sizeof *p);
}

static void rctx_free_scratch(rctx *c) {
    for (size_t i = 0; i < c->n_owned; i++) free(c->owned[i]);
    free(c->owned);
    for (size_t i = 0; i < c->n_parsed; i++) json_decref(c->parsed[i]);
    free(c->parsed);
}

fm_status fm_chat_render(fm_chat_template kind, const json_t *messages, const json_t *tools,
                         const fm_chat_flags *flags, fm_chat_prompt *out) {
    if (!out) return fm_error_set(FM_ERR_ARG, "fm_chat_render: NULL output");
    memset(out, 0, sizeof *out);
    fm_chat_flags f = flags ? *flags : (fm_chat_flags){false, FM_CHAT_THINKING_UNSET};
    if (kind != FM_CHAT_QWEN3 && kind != FM_CHAT_QWEN35 && kind != FM_CHAT_QWEN3_CODER)
        return fm_error_set(FM_ERR_ARG, "fm_chat_render: unknown template kind %d", (int)kind);
    if (!json_is_array(messages)) return fm_error_set(FM_ERR_ARG, "messages: expected an array");
    if (json_array_size(messages) == 0) return fm_error_set(FM_ERR_ARG, "messages: no messages to render");
    if (tools && !json_is_null(tools) && !json_is_array(tools))
        return fm_error_set(FM_ERR_ARG, "tools: expected an array of tool definitions");
    if (json_is_null(tools)) tools = NULL;
    for (size_t i = 0; i < json_array_size(messages); i++) {
        const json_t *m = json_array_get(messages, i);
        if (!json_is_object(m)) return fm_error_set(FM_ERR_ARG, "messages[%zu]: expected an object", i);
        if (!json_is_string(json_object_get(m, "role")))
            return fm_error_set(FM_ERR_ARG, "messages[%zu]: no \"role\" string", i);
    }
    for (size_t k = 0; tools && k < json_array_size(tools); k++)
        if (!json_is_object(json_array_get(tools, k)))
            return fm_error_set(FM_ERR_ARG, "tools[%zu]: expected an object", k);

    rctx c = {0};
    fm_status st = kind == FM_CHAT_QWEN3    ? render_qwen3(&c, messages, tools, &f)
                   : kind == FM_CHAT_QWEN35 ? render_qwen35(&c, messages, tools, &f)
                                            : render_coder(&c, messages, tools, &f);
    rctx_free_scratch(&c);
    if (st == FM_OK && (c.oom || c.text.oom)) st = fm_error_set(FM_ERR_NOMEM, "out of memory rendering the chat prompt");
    if (st == FM_OK && !c.text.p) {
        c.text.p = calloc(1, 1);
        if (!c.text.p) st = fm_error_set(FM_ERR_NOMEM, "out of memory rendering the chat prompt");
    }
    if (st != FM_OK) {
        free(c.text.p);
        free(c.segs);
        return st;
    }
    out->text = c.text.p;
    out->len = c.text.n;
    out->segs = c.segs;
    out->n_segs = c.n_segs;
    return FM_OK;
}

fm_status fm_chat_tokenize(const fm_tokenizer *tok, const fm_chat_prompt *p, int32_t **ids, size_t *n) {
    if (!ids || !n) return fm_error_set(FM_ERR_ARG, "fm_chat_tokenize: NULL output");
    *ids = NULL;
    *n = 0;
    if (!tok || !p) return fm_error_set(FM_ERR_ARG, "fm_chat_tokenize: NULL tokenizer or prompt");
    int32_t *all = NULL;
    size_t len = 0, cap = 0;
    fm_status st = FM_OK;
    size_t i = 0;
    while (i < p->n_segs && st == FM_OK) {
        int32_t *part = NULL;
        size_t n_part = 0, j = i;
        if (p->segs[i].kind == FM_CHAT_SEG_SPECIAL) {
            char name[64];
            size_t l = p->segs[i].length;
            if (l >= sizeof name) {
                st = fm_error_set(FM_ERR_ARG, "fm_chat_tokenize: special segment of %zu bytes", l);
                break;
            }
            memcpy(name, p->text + p->segs[i].offset, l);
            name[l] = 0;
            int32_t id = fm_tokenizer_find(tok, name);
            size_t bl = 0;
            const char *bytes = id >= 0 ? fm_tokenizer_token_bytes(tok, id, &bl) : NULL;
            if (!bytes || bl != l || memcmp(bytes, name, l) != 0) {
                st = fm_error_set(FM_ERR_UNSUPPORTED, "the tokenizer has no %s token, which the chat template needs",
                                  name);
                break;
            }
            part = malloc(sizeof *part);
            if (!part) {
                st = fm_error_set(FM_ERR_NOMEM, "out of memory tokenizing the chat prompt");
                break;
            }
            part[0] = id;
            n_part = 1;
            j = i + 1;
        } else {
            while (j < p->n_segs && p->segs[j].kind != FM_CHAT_SEG_SPECIAL) j++;
            size_t off = p->segs[i].offset, end = p->segs[j - 1].offset + p->segs[j - 1].length;
            st = fm_tokenizer_encode(tok, p->text + off, end - off, false, &part, &n_part);
            if (st != FM_OK) {
                fm_error_wrap(st, "chat prompt bytes %zu..%zu", off, end);
                break;
            }
        }
        if (len + n_part > cap) {
            size_t nc = cap ? cap : 256;
            while (nc < len + n_part) nc *= 2;
            int32_t *na = realloc(all, nc * sizeof *na);
            if (!na) {
                free(part);
                st = fm_error_set(FM_ERR_NOMEM, "out of memory tokenizing the chat prompt");
                break;
            }
            all = na;
            cap = nc;
        }
        if (n_part) memcpy(all + len, part, n_part * sizeof *part);
        len += n_part;
        free(part);
        i = j;
    }
    if (st != FM_OK) {
        free(all);
        return st;
    }
    *ids = all;
    *n = len;
    return FM_OK;
}

/* ============================ detection ================================== */

typedef struct tmpl_sig {
    fm_chat_template kind;
    const char *const *must;    /* all must occur */
    size_t n_must;
    const char *const *mustnt;  /* none may occur */
    size_t n_mustnt;
} tmpl_sig;

/* Markers, as they are written in the Jinja source ("\\n" is the two characters \ n of a Jinja
 * string literal). Each pins a behaviour the renderer reproduces. */
static const char *const QWEN3_MUST[] = {
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags", /* JSON tool calls, Qwen3 tools block */
    "message.content.startswith('<tool_response>')", /* last-query rule */
    "reasoning_content",                                  /* reasoning handling */
    "'\\n<think>\\n' + reasoning_content.strip('\\n')",   /* <think> block after the last query */
    "enable_thinking is defined and enable_thinking is false",
    "'<think>\\n\\n</think>\\n\\n'", /* thinking on by default, empty think block when off */
};
static const char *const QWEN3_MUSTNT[] = {"<function=", "render_content"};

static const char *const QWEN35_MUST[] = {
    "You have access to the following functions:", /* Qwen3.5 tools block */
    "<function=example_function_name>",            /* XML tool calls */
    "render_content",
    "No user query found in messages.",
    "reasoning_content",
    "enable_thinking is defined and enable_thinking is false",
    "'<think>\\n\\n</think>\\n\\n'",
    "'<think>\\n'", /* generation prompt opens <think> unless thinking is off */
};
static const char *const QWEN35_MUSTNT[] = {"enable_thinking is defined and enable_thinking is true",
                                            "enable_thinking is true"};

static const char *const CODER_MUST[] = {
    "You have access to the following tools:",
    "<function=example_function_name>",
    "render_extra_keys",
    "You are Qwen, a helpful AI assistant that can interact with a computer to solve tasks.",
};
static const char *const CODER_MUSTNT[] = {"<think>", "enable_thinking", "reasoning_content"};

#define N(a) (sizeof(a) / sizeof *(a))
static const tmpl_sig SIGS[] = {
    {FM_CHAT_QWEN3, QWEN3_MUST, N(QWEN3_MUST), QWEN3_MUSTNT, N(QWEN3_MUSTNT)},
    {FM_CHAT_QWEN35, QWEN35_MUST, N(QWEN35_MUST), QWEN35_MUSTNT, N(QWEN35_MUSTNT)},
    {FM_CHAT_QWEN3_CODER, CODER_MUST, N(CODER_MUST), CODER_MUSTNT, N(CODER_MUSTNT)},
};

fm_status fm_chat_template_detect(const char *text, fm_chat_template *out) {
    if (out) *out = FM_CHAT_UNKNOWN;
    if (!text || !out) return fm_error_set(FM_ERR_ARG, "fm_chat_template_detect: NULL argument");
    int best = -1;
    size_t best_score = 0;
    const char *why = NULL;
    bool why_absent = true;
    for (size_t s = 0; s < N(SIGS); s++) {
        size_t score = 0;
        const char *miss = NULL, *extra = NULL;
        for (size_t k = 0; k < SIGS[s].n_must; k++) {
            if (strstr(text, SIGS[s].must[k]))
                score++;
            else if (!miss)
                miss = SIGS[s].must[k];
        }
        for (size_t k = 0; k < SIGS[s].n_mustnt; k++)
            if (strstr(text, SIGS[s].mustnt[k]) && !extra) extra = SIGS[s].mustnt[k];
        if (!miss && !extra) {
            *out = SIGS[s].kind;
            return FM_OK;
        }
        if (best < 0 || score > best_score) {
            best = (int)s;
            best_score = score;
            why = miss ? miss : extra;
            why_absent = miss != NULL;
        }
    }
    if (best_score == 0)
        return fm_error_set(FM_ERR_UNSUPPORTED, "unrecognised chat template: it matches none of the built-in "
                                                "templates (qwen3, qwen3.5, qwen3-coder); see docs/CHAT.md");
    return fm_error_set(FM_ERR_UNSUPPORTED,
                        "unrecognised chat template: closest built-in is %s, but the template %s \"%s\" (see "
                        "docs/CHAT.md)",
                        fm_chat_template_name(SIGS[best].kind), why_absent ? "lacks" : "contains", why);
}

static char *read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *b = NULL;
    size_t len = 0, cap = 0, r;
    do {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 65536;
            char *nb = realloc(b, cap);
            if (!nb) {
                free(b);
                fclose(f);
                return NULL;
            }
            b = nb;
        }
        r = fread(b + len, 1, cap - len - 1, f);
        len += r;
    } while (r > 0);
    fclose(f);
    b[len] = 0;
    *n = len;
    return b;
}

fm_status fm_chat_template_detect_dir(const char *dir, fm_chat_template *out) {
    if (out) *out = FM_CHAT_UNKNOWN;
    if (!dir || !out) return fm_error_set(FM_ERR_ARG, "fm_chat_template_detect_dir: NULL argument");
    char path[4096];
    size_t n;
    snprintf(path, sizeof path, "%s/chat_template.jinja", dir);
    char *text = read_file(path, &n);
    if (text) {
        fm_status st = fm_chat_template_detect(text, out);
        free(text);
        return st == FM_OK ? st : fm_error_wrap(st, "%s", path);
    }
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    text = read_file(path, &n);
    if (!text) return fm_error_set(FM_ERR_IO, "%s: no chat_template.jinja or readable tokenizer_config.json", dir);
    json_error_t err;
    json_t *cfg = json_loadb(text, n, 0, &err);
    free(text);
    if (!cfg) return fm_error_set(FM_ERR_FORMAT, "%s: invalid JSON at line %d: %s", path, err.line, err.text);
    const json_t *ct = json_object_get(cfg, "chat_template");
    const char *t = json_string_value(ct);
    if (json_is_array(ct)) {
        for (size_t i = 0; i < json_array_size(ct) && !t; i++) {
            const json_t *e = json_array_get(ct, i);
            const char *nm = json_string_value(json_object_get(e, "name"));
            if (nm && !strcmp(nm, "default")) t = json_string_value(json_object_get(e, "template"));
        }
    }
    fm_status st;
    if (!t)
        st = fm_error_set(ct ? FM_ERR_FORMAT : FM_ERR_IO, "%s: no usable \"chat_template\" (a string, or a list with "
                                                        "a \"default\" entry)", path);
    else if ((st = fm_chat_template_detect(t, out)) != FM_OK)
        fm_error_wrap(st, "%s", path);
    json_decref(cfg);
    return st;
}
