/* tokenizer.json -> fm_tokenizer tables.
 *
 * jansson needs ~250 ms for the 11 MB Qwen tokenizer.json, almost all of it in model.vocab and
 * model.merges. So a small validating JSON scanner walks the file, parses those two straight into
 * the tokenizer's tables, and hands every other (small) section to jansson as a sub-document. */
#include "text/tok_internal.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"

/* =============================== JSON scanner =============================== */

typedef struct tj {
    const char *beg, *p, *end;
    char *sbuf[2]; /* scratch for strings that contain escapes */
    size_t scap[2];
} tj;

static fm_status tj_fail(const tj *j, const char *what) {
    return fm_error_set(FM_ERR_FORMAT, "invalid JSON at byte %td: %s", j->p - j->beg, what);
}

static void tj_ws(tj *j) {
    const char *p = j->p;
    for (;;) {
        /* pretty-printed files indent with long runs of spaces: skip them 8 at a time */
        while (j->end - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            if (w != 0x2020202020202020ull) break;
            p += 8;
        }
        if (p < j->end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
        else break;
    }
    j->p = p;
}

/* Skips white space; true if the next byte is c (not consumed). */
static bool tj_peek(tj *j, char c) {
    tj_ws(j);
    return j->p < j->end && *j->p == c;
}

static fm_status tj_expect(tj *j, char c) {
    if (!tj_peek(j, c)) {
        char msg[32];
        snprintf(msg, sizeof msg, "expected '%c'", c);
        return tj_fail(j, msg);
    }
    j->p++;
    return FM_OK;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool read_hex4(const char *p, const char *end, uint32_t *v) {
    if (end - p < 4) return false;
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0) return false;
        x = x << 4 | (uint32_t)h;
    }
    *v = x;
    return true;
}

/* Parses a string (after white space). The result points into the document when it has no
 * escapes, else into scratch slot `slot`; valid until that slot is used again. The document was
 * checked to be valid UTF-8 beforehand. */
static fm_status tj_string(tj *j, int slot, const char **s, size_t *n) {
    if (!tj_peek(j, '"')) return tj_fail(j, "expected a string");
    const char *a = ++j->p, *p = a;
    unsigned high = 0; /* any byte >= 0x80 seen */
    while (p < j->end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20) high |= (unsigned char)*p++;
    if ((high & 0x80) || (p < j->end && *p == '\\')) {
        /* strings are the only place where non-ASCII bytes may appear: check them here */
        const char *q = p;
        while (q < j->end && *q != '"') q += (*q == '\\' && q + 1 < j->end) ? 2 : 1;
        size_t bad = fm_tok_utf8_check(a, (size_t)(q - a));
        if (bad < (size_t)(q - a)) {
            j->p = a + bad;
            return tj_fail(j, "invalid UTF-8 in a string");
        }
    }
    if (p < j->end && *p == '"') {
        *s = a;
        *n = (size_t)(p - a);
        j->p = p + 1;
        return FM_OK;
    }
    /* slow path: escapes */
    size_t used = 0;
    const char *q = a;
    for (;;) {
        if (q >= j->end) {
            j->p = q;
            return tj_fail(j, "unterminated string");
        }
        if (used + 8 > j->scap[slot]) {
            size_t nc = j->scap[slot] ? j->scap[slot] * 2 : 256;
            char *nb = realloc(j->sbuf[slot], nc);
            if (!nb) return fm_error_set(FM_ERR_NOMEM, "out of memory reading a JSON string");
            j->sbuf[slot] = nb;
            j->scap[slot] = nc;
        }
        char c = *q;
        if (c == '"') break;
        if ((unsigned char)c < 0x20) {
            j->p = q;
            return tj_fail(j, "control character in string");
        }
        if (c != '\\') {
            j->sbuf[slot][used++] = c;
            q++;
            continue;
        }
        if (q + 1 >= j->end) {
            j->p = q;
            return tj_fail(j, "unterminated string");
        }
        char e = q[1];
        q += 2;
        switch (e) {
        case '"': j->sbuf[slot][used++] = '"'; break;
        case '\\': j->sbuf[slot][used++] = '\\'; break;
        case '/': j->sbuf[slot][used++] = '/'; break;
        case 'b': j->sbuf[slot][used++] = '\b'; break;
        case 'f': j->sbuf[slot][used++] = '\f'; break;
        case 'n': j->sbuf[slot][used++] = '\n'; break;
        case 'r': j->sbuf[slot][used++] = '\r'; break;
        case 't': j->sbuf[slot][used++] = '\t'; break;
        case 'u': {
            uint32_t cp;
            if (!read_hex4(q, j->end, &cp)) {
                j->p = q;
                return tj_fail(j, "bad \\u escape");
            }
            q += 4;
            if (cp >= 0xDC00 && cp <= 0xDFFF) {
                j->p = q;
                return tj_fail(j, "lone low surrogate in \\u escape");
            }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t lo;
                if (j->end - q < 6 || q[0] != '\\' || q[1] != 'u' || !read_hex4(q + 2, j->end, &lo) ||
                    lo < 0xDC00 || lo > 0xDFFF) {
                    j->p = q;
                    return tj_fail(j, "lone high surrogate in \\u escape");
                }
                q += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            used += fm_tok_utf8_encode(cp, j->sbuf[slot] + used);
            break;
        }
        default:
            j->p = q - 1;
            return tj_fail(j, "bad escape in string");
        }
    }
    j->p = q + 1;
    *s = j->sbuf[slot];
    *n = used;
    return FM_OK;
}

static fm_status tj_number(tj *j) {
    const char *p = j->p;
    if (p < j->end && *p == '-') p++;
    if (p >= j->end || *p < '0' || *p > '9') return tj_fail(j, "expected a value");
    if (*p == '0') p++;
    else
        while (p < j->end && *p >= '0' && *p <= '9') p++;
    if (p < j->end && *p == '.') {
        p++;
        if (p >= j->end || *p < '0' || *p > '9') return tj_fail(j, "bad number");
        while (p < j->end && *p >= '0' && *p <= '9') p++;
    }
    if (p < j->end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < j->end && (*p == '+' || *p == '-')) p++;
        if (p >= j->end || *p < '0' || *p > '9') return tj_fail(j, "bad number");
        while (p < j->end && *p >= '0' && *p <= '9') p++;
    }
    j->p = p;
    return FM_OK;
}

/* A non-negative integer that fits int32 (a token id). */
static fm_status tj_id(tj *j, int32_t *v) {
    tj_ws(j);
    const char *p = j->p;
    int64_t x = 0;
    if (p >= j->end || *p < '0' || *p > '9') return tj_fail(j, "expected a non-negative integer id");
    while (p < j->end && *p >= '0' && *p <= '9') {
        x = x * 10 + (*p - '0');
        if (x > INT32_MAX) return tj_fail(j, "id out of range");
        p++;
    }
    if (p < j->end && (*p == '.' || *p == 'e' || *p == 'E')) return tj_fail(j, "expected an integer id");
    j->p = p;
    *v = (int32_t)x;
    return FM_OK;
}

/* Skips one value of any kind, checking its syntax. */
static fm_status tj_skip(tj *j, int depth) {
    if (depth > 64) return tj_fail(j, "nesting too deep");
    tj_ws(j);
    if (j->p >= j->end) return tj_fail(j, "unexpected end of document");
    const char *s;
    size_t n;
    fm_status st;
    switch (*j->p) {
    case '"': return tj_string(j, 0, &s, &n);
    case '{':
        j->p++;
        if (tj_peek(j, '}')) {
            j->p++;
            return FM_OK;
        }
        for (;;) {
            if ((st = tj_string(j, 0, &s, &n)) != FM_OK) return st;
            if ((st = tj_expect(j, ':')) != FM_OK) return st;
            if ((st = tj_skip(j, depth + 1)) != FM_OK) return st;
            if (tj_peek(j, ',')) {
                j->p++;
                continue;
            }
            return tj_expect(j, '}');
        }
    case '[':
        j->p++;
        if (tj_peek(j, ']')) {
            j->p++;
            return FM_OK;
        }
        for (;;) {
            if ((st = tj_skip(j, depth + 1)) != FM_OK) return st;
            if (tj_peek(j, ',')) {
                j->p++;
                continue;
            }
            return tj_expect(j, ']');
        }
    case 't':
    case 'f':
    case 'n': {
        const char *lit = *j->p == 't' ? "true" : *j->p == 'f' ? "false" : "null";
        size_t l = strlen(lit);
        if ((size_t)(j->end - j->p) < l || memcmp(j->p, lit, l) != 0) return tj_fail(j, "expected a value");
        j->p += l;
        return FM_OK;
    }
    default: return tj_number(j);
    }
}

/* Iterates an object's members: call with *first = true right after the '{' was consumed.
 * Returns 1 with the key in *k (scratch slot 1) and the ':' consumed, 0 at the closing '}',
 * or a negative fm_status. */
static int tj_member(tj *j, bool *first, const char **k, size_t *kn) {
    if (*first) {
        *first = false;
        if (tj_peek(j, '}')) {
            j->p++;
            return 0;
        }
    } else {
        if (tj_peek(j, '}')) {
            j->p++;
            return 0;
        }
        fm_status st = tj_expect(j, ',');
        if (st != FM_OK) return st;
    }
    fm_status st = tj_string(j, 1, k, kn);
    if (st != FM_OK) return st;
    st = tj_expect(j, ':');
    return st != FM_OK ? st : 1;
}

/* Same for an array's elements: returns 1 if an element follows (not consumed), 0 at ']'. */
static int tj_element(tj *j, bool *first) {
    if (tj_peek(j, ']')) {
        j->p++;
        return 0;
    }
    if (*first) {
        *first = false;
        return 1;
    }
    fm_status st = tj_expect(j, ',');
    return st != FM_OK ? st : 1;
}

static bool key_is(const char *k, size_t kn, const char *name) {
    return kn == strlen(name) && memcmp(k, name, kn) == 0;
}

/* Skips a value and returns it parsed by jansson (it is small). */
static fm_status tj_capture(tj *j, json_t **out) {
    tj_ws(j);
    const char *a = j->p;
    fm_status st = tj_skip(j, 0);
    if (st != FM_OK) return st;
    json_error_t err;
    json_t *v = json_loadb(a, (size_t)(j->p - a), JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
    if (!v) return fm_error_set(FM_ERR_FORMAT, "invalid JSON at byte %td: %s", a - j->beg, err.text);
    json_decref(*out);
    *out = v;
    return FM_OK;
}

/* ============================ tokenizer tables ============================== */

#define hash_bytes fm_tok_hash

/* vhash: open addressing over the vocab, slot = {tag (upper hash bits), len, off, id}; len = 0 and
 * id = -1 mark an empty slot (an empty token text is stored with tag | 1 so it is never "empty"). */
static inline int32_t vocab_probe(const fm_tokenizer *tok, uint64_t hv, const char *s, size_t n) {
    uint32_t h = (uint32_t)hv & tok->vmask, tag = (uint32_t)(hv >> 32) | 1;
    for (;;) {
        const fm_tok_vslot *e = &tok->vhash[h];
        if (e->id < 0) return -1;
        if (e->tag == tag && e->len == n && memcmp(tok->text_arena + e->off, s, n) == 0) return e->id;
        h = (h + 1) & tok->vmask;
    }
}

int32_t fm_tok_vocab_get(const fm_tokenizer *tok, const char *s, size_t n) {
    if (!tok->vhash) return -1;
    return vocab_probe(tok, hash_bytes(s, n), s, n);
}

/* Appends vocab entry text -> id (the hash table is built once the vocab is complete). */
static fm_status vocab_add(fm_tokenizer *tok, const char *text, size_t n, int32_t id) {
    if (n > UINT32_MAX / 2) return fm_error_set(FM_ERR_FORMAT, "model.vocab has a token of %zu bytes", n);
    if (tok->n_vents == tok->cap_vents) {
        size_t nc = tok->cap_vents ? tok->cap_vents * 2 : 4096;
        fm_tok_vent *ne = realloc(tok->vents, nc * sizeof *ne);
        if (!ne) return fm_error_set(FM_ERR_NOMEM, "out of memory reading model.vocab");
        tok->vents = ne;
        tok->cap_vents = nc;
    }
    fm_tok_vent *e = &tok->vents[tok->n_vents];
    e->id = id;
    e->len = (uint32_t)n;
    fm_status st = fm_tok_arena_add(tok, text, n, &e->off);
    if (st != FM_OK) return st;
    tok->n_vents++;
    return FM_OK;
}

/* Builds the vocab hash table (about 1.5 slots per entry); fails on a repeated text. */
static fm_status vocab_index(fm_tokenizer *tok) {
    size_t n = tok->n_vents, sz = 1024;
    while (sz < n + n / 2) sz *= 2;
    if (sz > ((size_t)1 << 31)) return fm_error_set(FM_ERR_FORMAT, "model.vocab is too large");
    uint64_t *hv = malloc((n ? n : 1) * sizeof *hv);
    tok->vhash = malloc(sz * sizeof *tok->vhash);
    if (!hv || !tok->vhash) {
        free(hv);
        return fm_error_set(FM_ERR_NOMEM, "out of memory for a vocab of %zu tokens", n);
    }
    memset(tok->vhash, 0xFF, sz * sizeof *tok->vhash);
    tok->vmask = (uint32_t)(sz - 1);
    for (size_t i = 0; i < n; i++) hv[i] = hash_bytes(tok->text_arena + tok->vents[i].off, tok->vents[i].len);
    fm_status st = FM_OK;
    for (size_t i = 0; i < n; i++) {
        if (i + 16 < n) __builtin_prefetch(&tok->vhash[(uint32_t)hv[i + 16] & tok->vmask], 1);
        const fm_tok_vent *e = &tok->vents[i];
        const char *text = tok->text_arena + e->off;
        uint32_t h = (uint32_t)hv[i] & tok->vmask, tag = (uint32_t)(hv[i] >> 32) | 1;
        for (; tok->vhash[h].id >= 0; h = (h + 1) & tok->vmask) {
            const fm_tok_vslot *o = &tok->vhash[h];
            if (o->tag == tag && o->len == e->len && memcmp(tok->text_arena + o->off, text, e->len) == 0) {
                st = fm_error_set(FM_ERR_FORMAT, "model.vocab lists \"%.*s\" twice", (int)e->len, text);
                goto done;
            }
        }
        tok->vhash[h] = (fm_tok_vslot){tag, e->len, e->off, e->id};
    }
done:
    free(hv);
    return st;
}

/* Parses model.vocab ({"text": id, ...}). */
static fm_status parse_vocab(fm_tokenizer *tok, tj *j) {
    fm_status st = tj_expect(j, '{');
    if (st != FM_OK) return fm_error_wrap(st, "model.vocab must be an object");
    bool first = true;
    for (;;) {
        const char *k;
        size_t kn;
        int r = tj_member(j, &first, &k, &kn);
        if (r < 0) return (fm_status)r;
        if (r == 0) break;
        int32_t id = 0;
        if ((st = tj_id(j, &id)) != FM_OK) return st;
        if ((st = vocab_add(tok, k, kn, id)) != FM_OK) return st;
    }
    return vocab_index(tok);
}

static void merge_slot_put(uint64_t *tab, uint32_t mask, uint64_t slot, int64_t *count) {
    uint64_t key = slot & ~FM_TOK_RANK_MASK;
    uint32_t h = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;
    while (tab[h] != UINT64_MAX && (tab[h] & ~FM_TOK_RANK_MASK) != key) h = (h + 1) & mask;
    /* a repeated pair keeps the later rank, as HF's HashMap collect does */
    if (tab[h] == UINT64_MAX) (*count)++;
    tab[h] = slot;
}

static fm_status merge_put(fm_tokenizer *tok, int32_t a, int32_t b, int32_t id, uint32_t rank) {
    if (a >= (1 << FM_TOK_ID_BITS) - 1 || b >= (1 << FM_TOK_ID_BITS) - 1 || id >= (1 << FM_TOK_ID_BITS) - 1)
        return fm_error_set(FM_ERR_UNSUPPORTED, "token ids of %d or more are not supported", (1 << FM_TOK_ID_BITS) - 1);
    if (rank >= FM_TOK_RANK_MASK)
        return fm_error_set(FM_ERR_UNSUPPORTED, "more than %llu merges are not supported", (unsigned long long)FM_TOK_RANK_MASK);
    if (rank >= tok->cap_ranks) {
        uint32_t nc = tok->cap_ranks ? tok->cap_ranks * 2 : 65536;
        int32_t *ni = realloc(tok->merge_id, (size_t)nc * sizeof *ni);
        if (!ni) return fm_error_set(FM_ERR_NOMEM, "out of memory for %u merges", nc);
        tok->merge_id = ni;
        tok->cap_ranks = nc;
    }
    tok->merge_id[rank] = id;
    tok->n_ranks = rank + 1;
    if ((uint64_t)(tok->n_merges + 1) * 3 > ((uint64_t)tok->mmask + 1) * 2) { /* keep the load under 2/3 */
        size_t nsz = ((size_t)tok->mmask + 1) * 2;
        if (nsz > ((size_t)1 << 31)) return fm_error_set(FM_ERR_FORMAT, "model.merges is too large");
        uint64_t *nt = malloc(nsz * sizeof *nt);
        if (!nt) return fm_error_set(FM_ERR_NOMEM, "out of memory for %lld merges", (long long)tok->n_merges);
        memset(nt, 0xFF, nsz * sizeof *nt);
        int64_t cnt = 0;
        for (size_t i = 0; i <= tok->mmask; i++)
            if (tok->merges[i] != UINT64_MAX) merge_slot_put(nt, (uint32_t)(nsz - 1), tok->merges[i], &cnt);
        free(tok->merges);
        tok->merges = nt;
        tok->mmask = (uint32_t)(nsz - 1);
    }
    uint64_t slot = (uint64_t)(uint32_t)a << (64 - FM_TOK_ID_BITS) | (uint64_t)(uint32_t)b << FM_TOK_RANK_BITS | rank;
    merge_slot_put(tok->merges, tok->mmask, slot, &tok->n_merges);
    return FM_OK;
}

/* Merges are resolved in batches: hashing a batch and prefetching its hash slots first hides most
 * of the cache misses of ~450k random lookups (3 per merge) in a multi-MB table. */
#define MERGE_BATCH 32

typedef struct merge_item {
    const char *a, *b;
    uint32_t an, bn;
    uint64_t ha, hb;
} merge_item;

typedef struct merge_batch {
    merge_item it[MERGE_BATCH];
    int n;
    uint32_t rank0;     /* rank of it[0] */
    char *own;          /* copies of strings that had escapes (scratch is reused) */
    size_t own_used, own_cap;
    int64_t guess;      /* vents index - rank of the last merged token: vocabs list merges in order */
    char *cat;
    size_t cat_cap;
} merge_batch;

static fm_status merge_batch_flush(fm_tokenizer *tok, merge_batch *mb) {
    for (int i = 0; i < mb->n; i++) {
        merge_item *m = &mb->it[i];
        m->ha = hash_bytes(m->a, m->an);
        m->hb = hash_bytes(m->b, m->bn);
        __builtin_prefetch(&tok->vhash[(uint32_t)m->ha & tok->vmask]);
        __builtin_prefetch(&tok->vhash[(uint32_t)m->hb & tok->vmask]);
    }
    for (int i = 0; i < mb->n; i++) {
        const merge_item *m = &mb->it[i];
        uint32_t rank = mb->rank0 + (uint32_t)i;
        int32_t ia = vocab_probe(tok, m->ha, m->a, m->an);
        int32_t ib = vocab_probe(tok, m->hb, m->b, m->bn);
        if (ia < 0 || ib < 0) {
            const char *bad = ia < 0 ? m->a : m->b;
            int bl = (int)(ia < 0 ? m->an : m->bn);
            return fm_error_set(FM_ERR_FORMAT, "model.merges[%u] (\"%.*s\" \"%.*s\") names unknown token \"%.*s\"",
                                rank, (int)m->an, m->a, (int)m->bn, m->b, bl, bad);
        }
        /* the merged token: first where the vocab's order suggests, else through the hash */
        size_t mn = (size_t)m->an + m->bn;
        int32_t im = -1;
        int64_t g = (int64_t)rank + mb->guess;
        if (g >= 0 && (size_t)g < tok->n_vents) {
            const fm_tok_vent *v = &tok->vents[g];
            const char *t = tok->text_arena + v->off;
            if (v->len == mn && memcmp(t, m->a, m->an) == 0 && memcmp(t + m->an, m->b, m->bn) == 0) im = v->id;
        }
        if (im < 0) {
            if (mn > mb->cat_cap) {
                char *nb = realloc(mb->cat, mn * 2);
                if (!nb) return fm_error_set(FM_ERR_NOMEM, "out of memory reading model.merges");
                mb->cat = nb;
                mb->cat_cap = mn * 2;
            }
            memcpy(mb->cat, m->a, m->an);
            memcpy(mb->cat + m->an, m->b, m->bn);
            uint64_t hm = hash_bytes(mb->cat, mn);
            im = vocab_probe(tok, hm, mb->cat, mn);
            if (im < 0)
                return fm_error_set(FM_ERR_FORMAT, "model.merges[%u] (\"%.*s\" \"%.*s\"): \"%.*s%.*s\" is not in the vocab",
                                    rank, (int)m->an, m->a, (int)m->bn, m->b, (int)m->an, m->a, (int)m->bn, m->b);
            /* re-aim the guess where ids follow file order (the usual case) */
            if ((size_t)im < tok->n_vents && tok->vents[im].id == im) mb->guess = (int64_t)im - rank;
        }
        fm_status st = merge_put(tok, ia, ib, im, rank);
        if (st != FM_OK) return st;
    }
    mb->rank0 += (uint32_t)mb->n;
    mb->n = 0;
    mb->own_used = 0;
    return FM_OK;
}

/* Copies a string that lives in the scratch into the batch (room was made by the caller). */
static void merge_keep(merge_batch *mb, const char **s, size_t n) {
    memcpy(mb->own + mb->own_used, *s, n);
    *s = mb->own + mb->own_used;
    mb->own_used += n;
}

/* Parses model.merges (["a b", ...] or [["a", "b"], ...]) into the merge table. */
static fm_status parse_merges(fm_tokenizer *tok, tj *j) {
    merge_batch mb = {.guess = 256};
    fm_status st = tj_expect(j, '[');
    if (st != FM_OK) {
        st = fm_error_wrap(st, "model.merges must be an array");
        goto fail;
    }
    /* a byte-level BPE has about one merge per vocab entry: size for that, grow if there are more */
    size_t msz = 1024;
    while (msz < tok->n_vents + tok->n_vents / 2) msz *= 2;
    tok->merges = malloc(msz * sizeof *tok->merges);
    if (!tok->merges) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory for merges");
        goto fail;
    }
    memset(tok->merges, 0xFF, msz * sizeof *tok->merges);
    tok->mmask = (uint32_t)(msz - 1);
    bool first = true;
    for (uint32_t rank = 0;; rank++) {
        int r = tj_element(j, &first);
        if (r < 0) {
            st = (fm_status)r;
            goto fail;
        }
        if (r == 0) break;
        const char *a, *b;
        size_t an, bn;
        if (tj_peek(j, '"')) {
            const char *s;
            size_t n;
            if ((st = tj_string(j, 0, &s, &n)) != FM_OK) goto fail;
            const char *sp = memchr(s, ' ', n);
            if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp + 1 - s))) {
                st = fm_error_set(FM_ERR_FORMAT, "model.merges[%u] \"%.*s\" is not two tokens separated by one space",
                                  rank, (int)n, s);
                goto fail;
            }
            a = s;
            an = (size_t)(sp - s);
            b = sp + 1;
            bn = n - an - 1;
        } else if (tj_peek(j, '[')) {
            j->p++;
            if ((st = tj_string(j, 0, &a, &an)) != FM_OK) goto fail;
            if ((st = tj_expect(j, ',')) != FM_OK) goto fail;
            if ((st = tj_string(j, 1, &b, &bn)) != FM_OK) goto fail;
            if (!tj_peek(j, ']')) {
                st = fm_error_set(FM_ERR_FORMAT, "model.merges[%u] is not a pair of two strings", rank);
                goto fail;
            }
            j->p++;
        } else {
            st = fm_error_set(FM_ERR_FORMAT, "model.merges[%u] is neither a string nor a pair", rank);
            goto fail;
        }
        if (an > UINT32_MAX / 4 || bn > UINT32_MAX / 4) {
            st = fm_error_set(FM_ERR_FORMAT, "model.merges[%u] is too long", rank);
            goto fail;
        }
        /* strings from the scratch must be copied: make room, flushing the batch first if needed */
        bool a_own = !(a >= j->beg && a < j->end), b_own = !(b >= j->beg && b < j->end);
        size_t need = (a_own ? an : 0) + (b_own ? bn : 0);
        if (need && mb.own_used + need > mb.own_cap) {
            if (mb.n) {
                /* a and b still point into the scratch, which the flush does not touch */
                if ((st = merge_batch_flush(tok, &mb)) != FM_OK) goto fail;
            }
            if (need > mb.own_cap) {
                char *no = realloc(mb.own, need * 2 + 256);
                if (!no) {
                    st = fm_error_set(FM_ERR_NOMEM, "out of memory reading model.merges");
                    goto fail;
                }
                mb.own = no;
                mb.own_cap = need * 2 + 256;
            }
        }
        if (a_own) merge_keep(&mb, &a, an);
        if (b_own) merge_keep(&mb, &b, bn);
        mb.it[mb.n++] = (merge_item){a, b, (uint32_t)an, (uint32_t)bn, 0, 0};
        if (mb.n == MERGE_BATCH && (st = merge_batch_flush(tok, &mb)) != FM_OK) goto fail;
    }
    if (mb.n && (st = merge_batch_flush(tok, &mb)) != FM_OK) goto fail;
    free(mb.own);
    free(mb.cat);
    return FM_OK;
fail:
    free(mb.own);
    free(mb.cat);
    return st;
}

/* ========================= pipeline configuration ========================== */

static const char *type_of(const json_t *o) {
    const char *t = json_string_value(json_object_get(o, "type"));
    return t ? t : "(no type)";
}

static fm_status setup_normalizer(fm_tokenizer *tok, const json_t *n) {
    if (!n || json_is_null(n)) return FM_OK;
    if (!json_is_object(n)) return fm_error_set(FM_ERR_FORMAT, "normalizer is not an object");
    const char *t = type_of(n);
    if (strcmp(t, "NFC") == 0) {
        tok->nfc = true;
        return FM_OK;
    }
    if (strcmp(t, "Sequence") == 0) {
        const json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list)) return fm_error_set(FM_ERR_FORMAT, "normalizer Sequence has no \"normalizers\" array");
        size_t i;
        const json_t *e;
        json_array_foreach(list, i, e) {
            fm_status st = setup_normalizer(tok, e);
            if (st != FM_OK) return st;
        }
        return FM_OK;
    }
    return fm_error_set(FM_ERR_UNSUPPORTED, "normalizer \"%s\" is not supported (only NFC or none)", t);
}

/* The pattern HF's ByteLevel pre-tokenizer uses when use_regex is true. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* The Qwen2 / Qwen3 / Qwen3-Next and the Qwen3.5 split patterns. On ASCII text they split alike,
 * and encode has a hand-written matcher for that case (tok_encode.c, qwen_ascii). */
static const char qwen3_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char qwen35_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Unicode White_Space, which is what \s means to Oniguruma (the regex engine HF tokenizers uses).
 * PCRE2's \s also matches U+180E, so \s and \S are spelled out before compiling. */
static const char ws_list[] =
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

/* Rewrites \s and \S (outside classes) and \s (inside classes) as explicit White_Space lists. */
static char *rewrite_spaces(const char *pat, size_t n) {
    size_t wl = strlen(ws_list), cap = n * (wl + 4) + 1;
    char *o = malloc(cap), *w = o;
    if (!o) return NULL;
    bool in_class = false;
    for (size_t i = 0; i < n; i++) {
        char c = pat[i];
        if (c == '\\' && i + 1 < n) {
            char e = pat[i + 1];
            i++;
            if (e == 's') {
                if (!in_class) *w++ = '[';
                memcpy(w, ws_list, wl);
                w += wl;
                if (!in_class) *w++ = ']';
            } else if (e == 'S' && !in_class) {
                *w++ = '[';
                *w++ = '^';
                memcpy(w, ws_list, wl);
                w += wl;
                *w++ = ']';
            } else {
                *w++ = '\\';
                *w++ = e;
            }
            continue;
        }
        if (!in_class && c == '[') {
            in_class = true;
            *w++ = c;
            /* a ']' right after '[' or '[^' is a literal */
            if (i + 1 < n && pat[i + 1] == '^') *w++ = pat[++i];
            if (i + 1 < n && pat[i + 1] == ']') *w++ = pat[++i];
            continue;
        }
        if (in_class && c == '[' && i + 1 < n && pat[i + 1] == ':') { /* [:posix:] */
            const char *e = strstr(pat + i + 2, ":]");
            if (e && (size_t)(e - pat) < n) {
                size_t l = (size_t)(e + 2 - (pat + i));
                memcpy(w, pat + i, l);
                w += l;
                i += l - 1;
                continue;
            }
        }
        if (in_class && c == ']') in_class = false;
        *w++ = c;
    }
    *w = 0;
    return o;
}

static fm_status add_split(fm_tokenizer *tok, const char *pat, size_t n, bool literal, const char *what) {
    if (tok->n_split == FM_TOK_MAX_SPLITS + 1)
        return fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer has more than %d Split steps", FM_TOK_MAX_SPLITS);
    char *rw = literal ? NULL : rewrite_spaces(pat, n);
    if (!literal && !rw) return fm_error_set(FM_ERR_NOMEM, "out of memory compiling a regex");
    int err = 0;
    PCRE2_SIZE erroff = 0;
    pcre2_code *re = literal ? pcre2_compile((PCRE2_SPTR)pat, n, PCRE2_UTF | PCRE2_LITERAL, &err, &erroff, NULL)
                             : pcre2_compile((PCRE2_SPTR)rw, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err,
                                             &erroff, NULL);
    free(rw);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return fm_error_set(FM_ERR_FORMAT, "%s pattern does not compile: %s", what, (const char *)msg);
    }
    /* without JIT it still works, only slower */
    tok->split_jit[tok->n_split] = pcre2_jit_compile(re, PCRE2_JIT_COMPLETE) == 0;
    tok->split_qwen[tok->n_split] = !literal && ((n == strlen(qwen3_pattern) && memcmp(pat, qwen3_pattern, n) == 0) ||
                                                 (n == strlen(qwen35_pattern) && memcmp(pat, qwen35_pattern, n) == 0));
    tok->split[tok->n_split++] = re;
    return FM_OK;
}

static fm_status setup_byte_level(fm_tokenizer *tok, const json_t *p, const char *what) {
    if (json_is_true(json_object_get(p, "add_prefix_space")))
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s ByteLevel with add_prefix_space=true is not supported", what);
    const json_t *ur = json_object_get(p, "use_regex");
    bool use_regex = !ur || json_is_true(ur);
    if (use_regex) return add_split(tok, gpt2_pattern, strlen(gpt2_pattern), false, "ByteLevel (GPT-2)");
    return FM_OK;
}

static fm_status setup_split(fm_tokenizer *tok, const json_t *p) {
    const char *beh = json_string_value(json_object_get(p, "behavior"));
    if (!beh || strcmp(beh, "Isolated") != 0)
        return fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer Split with behavior \"%s\" is not supported (only Isolated)",
                            beh ? beh : "(none)");
    if (json_is_true(json_object_get(p, "invert")))
        return fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer Split with invert=true is not supported");
    const json_t *pat = json_object_get(p, "pattern");
    const json_t *rx = json_object_get(pat, "Regex"), *lit = json_object_get(pat, "String");
    if (json_is_string(rx)) return add_split(tok, json_string_value(rx), json_string_length(rx), false, "pre_tokenizer Split");
    if (json_is_string(lit)) return add_split(tok, json_string_value(lit), json_string_length(lit), true, "pre_tokenizer Split");
    return fm_error_set(FM_ERR_FORMAT, "pre_tokenizer Split has no pattern {\"Regex\": ...} or {\"String\": ...}");
}

static fm_status setup_pre_tokenizer(fm_tokenizer *tok, const json_t *p) {
    if (!p || json_is_null(p))
        return fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer is null; a byte-level BPE needs a ByteLevel pre-tokenizer");
    if (!json_is_object(p)) return fm_error_set(FM_ERR_FORMAT, "pre_tokenizer is not an object");
    const char *t = type_of(p);
    if (strcmp(t, "ByteLevel") == 0) return setup_byte_level(tok, p, "pre_tokenizer");
    if (strcmp(t, "Sequence") != 0)
        return fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer \"%s\" is not supported (only ByteLevel or "
                            "Sequence[Split..., ByteLevel])", t);
    const json_t *list = json_object_get(p, "pretokenizers");
    if (!json_is_array(list)) return fm_error_set(FM_ERR_FORMAT, "pre_tokenizer Sequence has no \"pretokenizers\" array");
    size_t n = json_array_size(list);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(list, i);
        const char *et = type_of(e);
        fm_status st;
        if (strcmp(et, "Split") == 0 && i + 1 < n) st = setup_split(tok, e);
        else if (strcmp(et, "ByteLevel") == 0 && i + 1 == n) st = setup_byte_level(tok, e, "pre_tokenizer");
        else if (strcmp(et, "ByteLevel") == 0 || strcmp(et, "Split") == 0)
            st = fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer Sequence must be Split steps followed by one ByteLevel");
        else st = fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer step \"%s\" is not supported", et);
        if (st != FM_OK) return st;
    }
    if (n == 0 || strcmp(type_of(json_array_get(list, n - 1)), "ByteLevel") != 0)
        return fm_error_set(FM_ERR_UNSUPPORTED, "pre_tokenizer Sequence does not end with ByteLevel");
    return FM_OK;
}

static fm_status check_byte_level_only(const json_t *d, const char *what, bool null_ok) {
    if (!d || json_is_null(d)) {
        if (null_ok) return FM_OK;
        return fm_error_set(FM_ERR_UNSUPPORTED, "%s is null; only ByteLevel is supported", what);
    }
    const char *t = type_of(d);
    if (strcmp(t, "ByteLevel") == 0) return FM_OK;
    if (strcmp(t, "Sequence") == 0) {
        const json_t *list = json_object_get(d, strcmp(what, "decoder") == 0 ? "decoders" : "processors");
        size_t i;
        const json_t *e;
        json_array_foreach(list, i, e) {
            fm_status st = check_byte_level_only(e, what, false);
            if (st != FM_OK) return st;
        }
        return FM_OK;
    }
    return fm_error_set(FM_ERR_UNSUPPORTED, "%s \"%s\" is not supported (only ByteLevel)", what, t);
}

static int cmp_added(const void *a, const void *b) {
    const fm_tok_added *x = a, *y = b;
    if (x->len != y->len) return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static fm_status setup_added(fm_tokenizer *tok, const json_t *list) {
    if (!list || json_is_null(list)) return FM_OK;
    if (!json_is_array(list)) return fm_error_set(FM_ERR_FORMAT, "added_tokens is not an array");
    size_t n = json_array_size(list);
    if (n == 0) return FM_OK;
    tok->added = calloc(n, sizeof *tok->added);
    if (!tok->added) return fm_error_set(FM_ERR_NOMEM, "out of memory for %zu added tokens", n);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(list, i);
        const json_t *id = json_object_get(e, "id"), *content = json_object_get(e, "content");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) > INT32_MAX)
            return fm_error_set(FM_ERR_FORMAT, "added_tokens[%zu] has no valid \"id\"", i);
        if (!json_is_string(content) || json_string_length(content) == 0)
            return fm_error_set(FM_ERR_FORMAT, "added_tokens[%zu] has no \"content\" string", i);
        if (json_is_true(json_object_get(e, "single_word")))
            return fm_error_set(FM_ERR_UNSUPPORTED, "added token \"%s\" has single_word=true, which is not supported",
                                json_string_value(content));
        fm_tok_added *a = &tok->added[tok->n_added++];
        a->id = (int32_t)json_integer_value(id);
        a->special = json_is_true(json_object_get(e, "special"));
        const json_t *nz = json_object_get(e, "normalized");
        a->normalized = nz ? json_is_true(nz) : !a->special; /* HF's default */
        a->lstrip = json_is_true(json_object_get(e, "lstrip"));
        a->rstrip = json_is_true(json_object_get(e, "rstrip"));
        const char *txt = json_string_value(content);
        size_t tl = json_string_length(content);
        /* a normalized token is looked for in normalized text, so normalize it the same way */
        char *nbuf = NULL;
        size_t ncap = 0;
        if (a->normalized && tok->nfc) {
            size_t ol;
            const char *o;
            fm_status st = fm_tok_nfc(txt, tl, &nbuf, &ncap, &o, &ol);
            if (st != FM_OK) {
                free(nbuf);
                return st;
            }
            txt = o;
            tl = ol;
        }
        uint32_t off;
        fm_status st = fm_tok_arena_add(tok, txt, tl, &off);
        free(nbuf);
        if (st != FM_OK) return st;
        a->off = off;
        a->len = (uint32_t)tl;
    }
    qsort(tok->added, tok->n_added, sizeof *tok->added, cmp_added);
    return FM_OK;
}

/* ================================ top level ================================= */

/* Builds the per-id tables once the vocab and the added tokens are known. */
static fm_status build_id_tables(fm_tokenizer *tok) {
    int64_t max_id = -1;
    for (size_t i = 0; i < tok->n_vents; i++)
        if (tok->vents[i].id > max_id) max_id = tok->vents[i].id;
    for (size_t i = 0; i < tok->n_added; i++)
        if (tok->added[i].id > max_id) max_id = tok->added[i].id;
    if (max_id < 0) return fm_error_set(FM_ERR_FORMAT, "model.vocab is empty");
    if (max_id >= (1 << 24)) /* sanity: no real vocabulary has 16M ids, and holes cost memory */
        return fm_error_set(FM_ERR_FORMAT, "token id %lld is implausibly large (limit %d)", (long long)max_id, 1 << 24);
    tok->n_vocab = max_id + 1;
    size_t nv = (size_t)tok->n_vocab;
    tok->flags = calloc(nv, 1);
    tok->text_off = calloc(nv, sizeof *tok->text_off);
    tok->text_len = calloc(nv, sizeof *tok->text_len);
    tok->bytes_off = calloc(nv, sizeof *tok->bytes_off);
    tok->bytes_len = calloc(nv, sizeof *tok->bytes_len);
    if (!tok->flags || !tok->text_off || !tok->text_len || !tok->bytes_off || !tok->bytes_len)
        return fm_error_set(FM_ERR_NOMEM, "out of memory for a vocab of %zu ids", nv);
    for (size_t i = 0; i < tok->n_vents; i++) {
        const fm_tok_vent *e = &tok->vents[i];
        if (tok->flags[e->id])
            return fm_error_set(FM_ERR_FORMAT, "model.vocab gives id %d to both \"%s\" and \"%.*s\"", e->id,
                                tok->text_arena + tok->text_off[e->id], (int)e->len, tok->text_arena + e->off);
        tok->flags[e->id] = FM_TOK_PRESENT;
        tok->text_off[e->id] = e->off;
        tok->text_len[e->id] = e->len;
    }
    for (size_t i = 0; i < tok->n_added; i++) { /* an added token's content names its id (as HF's id_to_token) */
        const fm_tok_added *a = &tok->added[i];
        tok->flags[a->id] |= FM_TOK_PRESENT | FM_TOK_ADDED | (a->special ? FM_TOK_SPECIAL : 0);
        tok->text_off[a->id] = a->off;
        tok->text_len[a->id] = a->len;
    }
    return FM_OK;
}

fm_status fm_tok_parse_json(fm_tokenizer *tok, const char *json, size_t n) {
    tj j = {.beg = json, .p = json, .end = json + n};
    json_t *model = json_object(), *normalizer = NULL, *pre = NULL, *decoder = NULL, *post = NULL, *added = NULL;
    const char *vocab_at = NULL, *merges_at = NULL; /* spans parsed after the scan (if out of order) */
    bool have_model = false, have_decoder = false, have_vocab = false, have_merges = false;
    fm_status st = FM_OK;
    if (!model) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (!tj_peek(&j, '{')) {
        st = fm_error_set(FM_ERR_FORMAT, "not a JSON object (expected '{' at byte %td)", j.p - j.beg);
        goto done;
    }
    j.p++;
    bool first = true;
    for (;;) {
        const char *k;
        size_t kn;
        int r = tj_member(&j, &first, &k, &kn);
        if (r < 0) {
            st = (fm_status)r;
            goto done;
        }
        if (r == 0) break;
        if (key_is(k, kn, "model")) {
            have_model = true;
            if ((st = tj_expect(&j, '{')) != FM_OK) {
                st = fm_error_wrap(st, "\"model\" must be an object");
                goto done;
            }
            bool mfirst = true;
            for (;;) {
                r = tj_member(&j, &mfirst, &k, &kn);
                if (r < 0) {
                    st = (fm_status)r;
                    goto done;
                }
                if (r == 0) break;
                bool is_vocab = key_is(k, kn, "vocab"), is_merges = key_is(k, kn, "merges");
                if (is_vocab && !have_vocab && tj_peek(&j, '{')) { /* the usual order: straight in */
                    if ((st = parse_vocab(tok, &j)) != FM_OK) goto done;
                    have_vocab = true;
                } else if (is_merges && have_vocab && !have_merges) {
                    if ((st = parse_merges(tok, &j)) != FM_OK) goto done;
                    have_merges = true;
                } else if (is_vocab || is_merges) { /* later (or an error message) */
                    tj_ws(&j);
                    if (is_vocab) vocab_at = j.p;
                    else merges_at = j.p;
                    if ((st = tj_skip(&j, 0)) != FM_OK) goto done;
                } else {
                    char key[64];
                    snprintf(key, sizeof key, "%.*s", (int)(kn < 63 ? kn : 63), k);
                    json_t *v = NULL;
                    if ((st = tj_capture(&j, &v)) != FM_OK) goto done;
                    json_object_set_new(model, key, v);
                    const char *mt = json_string_value(json_object_get(model, "type"));
                    if (mt && strcmp(mt, "BPE") != 0) { /* say so before reading a vocab of another kind */
                        st = fm_error_set(FM_ERR_UNSUPPORTED, "tokenizer model type \"%s\" is not supported (only BPE)", mt);
                        goto done;
                    }
                }
            }
        } else if (key_is(k, kn, "normalizer")) st = tj_capture(&j, &normalizer);
        else if (key_is(k, kn, "pre_tokenizer")) st = tj_capture(&j, &pre);
        else if (key_is(k, kn, "decoder")) {
            have_decoder = true;
            st = tj_capture(&j, &decoder);
        } else if (key_is(k, kn, "post_processor")) st = tj_capture(&j, &post);
        else if (key_is(k, kn, "added_tokens")) st = tj_capture(&j, &added);
        else st = tj_skip(&j, 0);
        if (st != FM_OK) goto done;
    }
    tj_ws(&j);
    if (j.p != j.end) {
        st = tj_fail(&j, "trailing data after the top-level object");
        goto done;
    }

    /* ---- model ---- */
    if (!have_model) {
        st = fm_error_set(FM_ERR_FORMAT, "no \"model\" object");
        goto done;
    }
    if (!have_vocab && !vocab_at) {
        st = fm_error_set(FM_ERR_FORMAT, "model has no \"vocab\"");
        goto done;
    }
    if (!have_merges && !merges_at) {
        st = fm_error_set(FM_ERR_FORMAT, "model has no \"merges\"");
        goto done;
    }
    const json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout) && !(json_is_number(dropout) && json_number_value(dropout) == 0.0)) {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "BPE dropout is not supported");
        goto done;
    }
    if (json_is_true(json_object_get(model, "byte_fallback"))) {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "BPE byte_fallback is not supported");
        goto done;
    }
    const char *csp = json_string_value(json_object_get(model, "continuing_subword_prefix"));
    const char *eows = json_string_value(json_object_get(model, "end_of_word_suffix"));
    if ((csp && *csp) || (eows && *eows)) {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "BPE continuing_subword_prefix / end_of_word_suffix are not supported");
        goto done;
    }
    tok->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    tok->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));

    /* ---- pipeline ---- */
    if ((st = setup_normalizer(tok, normalizer)) != FM_OK) goto done;
    if ((st = setup_pre_tokenizer(tok, pre)) != FM_OK) goto done;
    if (!have_decoder) {
        st = fm_error_set(FM_ERR_UNSUPPORTED, "no \"decoder\"; only ByteLevel is supported");
        goto done;
    }
    if ((st = check_byte_level_only(decoder, "decoder", false)) != FM_OK) goto done;
    if ((st = check_byte_level_only(post, "post_processor", true)) != FM_OK) goto done;

    /* ---- vocab and merges given out of the usual order ---- */
    if (!have_vocab) {
        j.p = vocab_at;
        if ((st = parse_vocab(tok, &j)) != FM_OK) goto done;
    }
    if (!have_merges) {
        j.p = merges_at;
        if ((st = parse_merges(tok, &j)) != FM_OK) goto done;
    }
    if ((st = setup_added(tok, added)) != FM_OK) goto done;
    if ((st = build_id_tables(tok)) != FM_OK) goto done;
    free(tok->vents); /* the hash table and the per-id tables hold all of it now */
    tok->vents = NULL;
    tok->n_vents = tok->cap_vents = 0;
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    tok->unk_id = -1;
    if (unk) {
        tok->unk_id = fm_tok_vocab_get(tok, unk, strlen(unk));
        if (tok->unk_id < 0) {
            st = fm_error_set(FM_ERR_FORMAT, "model.unk_token \"%s\" is not in the vocab", unk);
            goto done;
        }
    }
    for (int b = 0; b < 256; b++) {
        char u[4];
        size_t ul = fm_tok_utf8_encode(fm_tok_byte_to_cp((uint8_t)b), u);
        tok->byte_id[b] = fm_tok_vocab_get(tok, u, ul);
    }

    /* the first round of every piece's merges is between byte tokens: a direct table for those */
    tok->byte_pair = malloc(65536 * sizeof *tok->byte_pair);
    if (!tok->byte_pair) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            tok->byte_pair[a << 8 | b] = tok->byte_id[a] >= 0 && tok->byte_id[b] >= 0
                                             ? fm_tok_merge_rank(tok, tok->byte_id[a], tok->byte_id[b])
                                             : FM_TOK_NO_MERGE;

done:
    free(j.sbuf[0]);
    free(j.sbuf[1]);
    json_decref(model);
    json_decref(normalizer);
    json_decref(pre);
    json_decref(decoder);
    json_decref(post);
    json_decref(added);
    return st;
}
