/* The answer splitter behind output.h. */
#include "server/output.h"

#include <stdlib.h>
#include <string.h>

#include "util/error.h"

enum { MODE_DETECT = 0, MODE_REASONING, MODE_CONTENT };

static const char OPEN[] = "<think>", CLOSE[] = "</think>";
#define OPEN_LEN (sizeof OPEN - 1)
#define CLOSE_LEN (sizeof CLOSE - 1)

typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

struct fm_out {
    int mode;
    buf pend; /* text not yet classified */
    bool reasoning_started, content_started, after_think;
    buf reasoning, content; /* ready to take */
    bool clear;             /* the previous take's text is to be dropped */
    fm_toolcall_parser *tp;
    size_t n_seen;          /* parser calls looked at */
    size_t *valid;          /* parser indices of valid calls */
    size_t n_valid, cap_valid, n_taken;
    bool oom;
};

static bool buf_add(buf *b, const char *p, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = (b->n + n + 1) * 2;
        char *q = realloc(b->p, cap);
        if (!q) return false;
        b->p = q;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, p, n);
    b->n += n;
    b->p[b->n] = 0;
    return true;
}

static void buf_drop_front(buf *b, size_t n) {
    if (!n) return;
    memmove(b->p, b->p + n, b->n - n);
    b->n -= n;
    if (b->p) b->p[b->n] = 0;
}

fm_status fm_out_new(bool thinking_open, const json_t *tools, fm_toolcall_format fmt, fm_out **out) {
    *out = NULL;
    fm_out *o = calloc(1, sizeof *o);
    if (!o) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    o->mode = thinking_open ? MODE_REASONING : MODE_DETECT;
    if (tools) {
        fm_status st = fm_toolcall_parser_new(fmt, tools, &o->tp);
        if (st != FM_OK) {
            free(o);
            return st;
        }
    }
    *out = o;
    return FM_OK;
}

void fm_out_free(fm_out *o) {
    if (!o) return;
    fm_toolcall_parser_free(o->tp);
    free(o->pend.p);
    free(o->reasoning.p);
    free(o->content.p);
    free(o->valid);
    free(o);
}

static void clear_taken(fm_out *o) {
    if (!o->clear) return;
    o->reasoning.n = o->content.n = 0;
    if (o->reasoning.p) o->reasoning.p[0] = 0;
    if (o->content.p) o->content.p[0] = 0;
    o->clear = false;
}

static void add_reasoning(fm_out *o, const char *p, size_t n) {
    if (!o->reasoning_started) {
        while (n && *p == '\n') p++, n--;
        if (!n) return;
        o->reasoning_started = true;
    }
    if (!buf_add(&o->reasoning, p, n)) o->oom = true;
}

/* Pulls what the tool-call parser has ready: content, then calls (malformed ones as content). */
static void collect(fm_out *o) {
    size_t n;
    const char *c = fm_toolcall_take_content(o->tp, &n);
    if (n && !buf_add(&o->content, c, n)) o->oom = true;
    size_t total = fm_toolcall_count(o->tp);
    for (; o->n_seen < total; o->n_seen++) {
        const fm_toolcall *tc = fm_toolcall_get(o->tp, o->n_seen);
        if (!tc->ok) {
            if (!buf_add(&o->content, tc->raw, tc->raw_len)) o->oom = true;
            continue;
        }
        if (o->n_valid == o->cap_valid) {
            size_t cap = o->cap_valid ? o->cap_valid * 2 : 4;
            size_t *v = realloc(o->valid, cap * sizeof *v);
            if (!v) {
                o->oom = true;
                continue;
            }
            o->valid = v;
            o->cap_valid = cap;
        }
        o->valid[o->n_valid++] = o->n_seen;
    }
}

static fm_status add_content(fm_out *o, const char *p, size_t n) {
    if (o->after_think && !o->content_started) {
        while (n && *p == '\n') p++, n--;
        if (!n) return FM_OK;
    }
    o->content_started = true;
    if (!o->tp) {
        if (!buf_add(&o->content, p, n)) o->oom = true;
        return FM_OK;
    }
    fm_status st = fm_toolcall_feed(o->tp, p, n);
    if (st == FM_OK) collect(o);
    return st;
}

/* The longest suffix of p[0..n) that is a proper prefix of CLOSE. */
static size_t partial_close(const char *p, size_t n) {
    for (size_t k = CLOSE_LEN - 1; k > 0; k--)
        if (k <= n && !memcmp(p + n - k, CLOSE, k)) return k;
    return 0;
}

static fm_status process(fm_out *o, bool final) {
    for (;;) {
        buf *b = &o->pend;
        if (o->mode == MODE_DETECT) {
            if (!b->n) {
                if (!final) return FM_OK;
                o->mode = MODE_CONTENT;
                continue;
            }
            if (b->n < OPEN_LEN && !memcmp(b->p, OPEN, b->n) && !final) return FM_OK; /* may still be <think> */
            if (b->n >= OPEN_LEN && !memcmp(b->p, OPEN, OPEN_LEN)) {
                buf_drop_front(b, OPEN_LEN);
                o->mode = MODE_REASONING;
            } else {
                o->mode = MODE_CONTENT;
            }
            continue;
        }
        if (o->mode == MODE_REASONING) {
            char *at = b->n >= CLOSE_LEN ? memmem(b->p, b->n, CLOSE, CLOSE_LEN) : NULL;
            if (at) {
                size_t k = (size_t)(at - b->p);
                while (k && b->p[k - 1] == '\n') k--; /* the newline before </think> */
                add_reasoning(o, b->p, k);
                buf_drop_front(b, (size_t)(at - b->p) + CLOSE_LEN);
                o->mode = MODE_CONTENT;
                o->after_think = true;
                continue;
            }
            size_t hold = final ? 0 : partial_close(b->p, b->n);
            size_t k = b->n - hold;
            size_t keep = k;
            while (keep && b->p[keep - 1] == '\n') keep--; /* newlines that may precede </think> */
            if (final) k = keep;
            add_reasoning(o, b->p, keep);
            buf_drop_front(b, final ? b->n : keep);
            return FM_OK;
        }
        /* content */
        fm_status st = FM_OK;
        if (b->n) st = add_content(o, b->p, b->n);
        b->n = 0;
        return st;
    }
}

fm_status fm_out_feed(fm_out *o, const char *text, size_t len) {
    clear_taken(o);
    if (!buf_add(&o->pend, text, len)) return fm_error_set(FM_ERR_NOMEM, "out of memory");
    fm_status st = process(o, false);
    if (st == FM_OK && o->oom) st = fm_error_set(FM_ERR_NOMEM, "out of memory");
    return st;
}

fm_status fm_out_finish(fm_out *o) {
    clear_taken(o);
    fm_status st = process(o, true);
    if (st == FM_OK && o->tp) {
        st = fm_toolcall_finish(o->tp);
        if (st == FM_OK) collect(o);
    }
    if (st == FM_OK && o->oom) st = fm_error_set(FM_ERR_NOMEM, "out of memory");
    return st;
}

void fm_out_take(fm_out *o, const char **reasoning, size_t *reasoning_len, const char **content,
                 size_t *content_len, size_t *first_call, size_t *end_call) {
    clear_taken(o);
    *reasoning = o->reasoning.p ? o->reasoning.p : "";
    *reasoning_len = o->reasoning.n;
    *content = o->content.p ? o->content.p : "";
    *content_len = o->content.n;
    *first_call = o->n_taken;
    *end_call = o->n_valid;
    o->n_taken = o->n_valid;
    o->clear = true;
}

const fm_toolcall *fm_out_call(const fm_out *o, size_t i) {
    return i < o->n_valid ? fm_toolcall_get(o->tp, o->valid[i]) : NULL;
}

size_t fm_out_n_calls(const fm_out *o) { return o->n_valid; }
