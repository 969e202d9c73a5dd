/* Encoding: added tokens -> NFC -> regex splits -> byte-level BPE, in HF tokenizers' order.
 *
 * HF works on the ByteLevel-mapped string ("Ġhello"); here BPE runs on the raw bytes and starts
 * from each byte's single-character token, which is the same thing without building the string. */
#include "text/tok_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "util/error.h"

size_t fm_tok_bpe_heap_min = 48;
size_t fm_tok_cache_min_input = 4096;
bool fm_tok_fast_split = true;

typedef struct heap_ent {
    uint32_t rank;
    int32_t pos;           /* index of the left symbol */
    int32_t left, right;   /* the pair's ids when pushed (stale if either changed) */
} heap_ent;

/* Encode's word cache: a piece's ids, for long inputs where pieces repeat ("the", " of", ...).
 * Direct-mapped with one cache line per slot: a new piece replaces whatever shared its slot, so the
 * cache follows the text. Per call, so a shared tokenizer stays read-only. */
#define WC_SLOTS 32768 /* power of two; 2 MiB */
#define WC_KEY 26      /* longest piece cached (bytes) */
#define WC_IDS 8       /* most ids cached per piece */

typedef struct wc_slot {
    uint32_t hash;     /* 0 = empty */
    uint8_t klen, n_ids;
    char key[WC_KEY];
    int32_t ids[WC_IDS];
} wc_slot;

typedef struct enc {
    const fm_tokenizer *tok;
    fm_status st;
    int32_t *ids;
    size_t n_ids, cap_ids;
    pcre2_match_data *md[FM_TOK_MAX_SPLITS + 1];
    /* BPE scratch, sized for the longest piece so far */
    size_t scap;
    int32_t *sym, *prev, *next;
    uint32_t *rank;
    heap_ent *heap;
    char *nfc_buf, *tmp;
    size_t nfc_cap, tmp_cap;
    void (*piece_fn)(void *, const char *, size_t); /* fm_tok_pretokenize: pieces go here, not to BPE */
    void *piece_ctx;
    wc_slot *wc;           /* NULL: no cache */
} enc;

static void emit(enc *e, int32_t id) {
    if (e->n_ids == e->cap_ids) {
        size_t nc = e->cap_ids ? e->cap_ids * 2 : 64;
        int32_t *n = realloc(e->ids, nc * sizeof *n);
        if (!n) {
            e->st = fm_error_set(FM_ERR_NOMEM, "out of memory for %zu token ids", nc);
            return;
        }
        e->ids = n;
        e->cap_ids = nc;
    }
    e->ids[e->n_ids++] = id;
}

static bool scratch_reserve(enc *e, size_t n) {
    if (n <= e->scap) return true;
    size_t nc = e->scap ? e->scap : 64;
    while (nc < n) nc *= 2;
    int32_t *sym = realloc(e->sym, nc * sizeof *sym);
    if (sym) e->sym = sym;
    int32_t *prev = realloc(e->prev, nc * sizeof *prev);
    if (prev) e->prev = prev;
    int32_t *next = realloc(e->next, nc * sizeof *next);
    if (next) e->next = next;
    uint32_t *rank = realloc(e->rank, nc * sizeof *rank);
    if (rank) e->rank = rank;
    heap_ent *heap = realloc(e->heap, 3 * nc * sizeof *heap);
    if (heap) e->heap = heap;
    if (!sym || !prev || !next || !rank || !heap) {
        e->st = fm_error_set(FM_ERR_NOMEM, "out of memory for a %zu-byte piece", n);
        return false;
    }
    e->scap = nc;
    return true;
}

/* ---------------------------------- BPE ----------------------------------- */

static inline bool heap_less(const heap_ent *a, const heap_ent *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(heap_ent *h, size_t *n, heap_ent x) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&x, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = x;
}

static heap_ent heap_pop(heap_ent *h, size_t *n) {
    heap_ent top = h[0], x = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && heap_less(&h[c + 1], &h[c])) c++;
        if (!heap_less(&h[c], &x)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = x;
    return top;
}

/* Merges sym[0..m) (linked by next/prev) lowest rank first, leftmost among equals, as HF's
 * Word::merge_all does: a heap of candidate pairs, stale ones skipped when popped. */
static void merge_heap(enc *e, const unsigned char *p, int32_t m) {
    const fm_tokenizer *tok = e->tok;
    int32_t *sym = e->sym, *prev = e->prev, *next = e->next;
    heap_ent *h = e->heap;
    size_t hn = 0;
    for (int32_t k = 0; k + 1 < m; k++) {
        uint32_t r = p ? tok->byte_pair[p[k] << 8 | p[k + 1]] : fm_tok_merge_rank(tok, sym[k], sym[k + 1]);
        if (r != FM_TOK_NO_MERGE) heap_push(h, &hn, (heap_ent){r, k, sym[k], sym[k + 1]});
    }
    while (hn) {
        heap_ent top = heap_pop(h, &hn);
        int32_t k = top.pos, j = next[k];
        if (sym[k] != top.left || j < 0 || sym[j] != top.right) continue; /* stale */
        sym[k] = tok->merge_id[top.rank];
        sym[j] = -1;
        next[k] = next[j];
        if (next[j] >= 0) prev[next[j]] = k;
        uint32_t r;
        if (prev[k] >= 0 && (r = fm_tok_merge_rank(tok, sym[prev[k]], sym[k])) != FM_TOK_NO_MERGE)
            heap_push(h, &hn, (heap_ent){r, prev[k], sym[prev[k]], sym[k]});
        if (next[k] >= 0 && (r = fm_tok_merge_rank(tok, sym[k], sym[next[k]])) != FM_TOK_NO_MERGE)
            heap_push(h, &hn, (heap_ent){r, k, sym[k], sym[next[k]]});
    }
}

/* Same result for short pieces: compact arrays, the pair ranks kept and scanned for the minimum
 * (the first one wins ties: leftmost). The symbols end in sym[0..*m). */
static void merge_scan(enc *e, const unsigned char *p, int32_t *m_io) {
    const fm_tokenizer *tok = e->tok;
    int32_t *sym = e->sym, m = *m_io;
    uint32_t *rank = e->rank;
    if (p) /* sym[k] is the token of byte p[k]: the byte-pair table has the pairs */
        for (int32_t k = 0; k + 1 < m; k++) rank[k] = tok->byte_pair[p[k] << 8 | p[k + 1]];
    else
        for (int32_t k = 0; k + 1 < m; k++) rank[k] = fm_tok_merge_rank(tok, sym[k], sym[k + 1]);
    while (m > 1) {
        uint32_t best = rank[0];
        int32_t bk = 0;
        for (int32_t k = 1; k + 1 < m; k++)
            if (rank[k] < best) {
                best = rank[k];
                bk = k;
            }
        if (best == FM_TOK_NO_MERGE) break;
        sym[bk] = tok->merge_id[best];
        m--;
        for (int32_t k = bk + 1; k < m; k++) sym[k] = sym[k + 1];
        for (int32_t k = bk + 1; k + 1 < m; k++) rank[k] = rank[k + 1];
        if (bk + 1 < m) rank[bk] = fm_tok_merge_rank(tok, sym[bk], sym[bk + 1]);
        if (bk > 0) rank[bk - 1] = fm_tok_merge_rank(tok, sym[bk - 1], sym[bk]);
    }
    *m_io = m;
}

static void bpe_uncached(enc *e, const unsigned char *p, size_t n);

/* BPE-encodes one pre-tokenized piece (raw bytes), through the word cache when there is one. */
static void bpe(enc *e, const unsigned char *p, size_t n) {
    if (!e->wc || n < 2 || n > WC_KEY || e->st != FM_OK) {
        bpe_uncached(e, p, n);
        return;
    }
    uint64_t hv = fm_tok_hash((const char *)p, n);
    uint32_t hash = (uint32_t)hv | 1;
    wc_slot *w = &e->wc[(hv >> 40) & (WC_SLOTS - 1)];
    if (w->hash == hash && w->klen == n && memcmp(w->key, p, n) == 0) {
        for (uint32_t i = 0; i < w->n_ids; i++) emit(e, w->ids[i]);
        return;
    }
    size_t before = e->n_ids;
    bpe_uncached(e, p, n);
    size_t k = e->n_ids - before;
    if (e->st != FM_OK || k > WC_IDS) return;
    w->hash = hash;
    w->klen = (uint8_t)n;
    w->n_ids = (uint8_t)k;
    memcpy(w->key, p, n);
    memcpy(w->ids, e->ids + before, k * sizeof *w->ids);
}

static void bpe_uncached(enc *e, const unsigned char *p, size_t n) {
    const fm_tokenizer *tok = e->tok;
    if (n == 0 || e->st != FM_OK) return;
    if (n == 1 && tok->byte_id[p[0]] >= 0) {
        emit(e, tok->byte_id[p[0]]);
        return;
    }
    if (tok->ignore_merges) { /* a piece that is a whole vocab token is taken as is */
        if (e->tmp_cap < 2 * n) {
            char *t = realloc(e->tmp, 2 * n);
            if (!t) {
                e->st = fm_error_set(FM_ERR_NOMEM, "out of memory for a %zu-byte piece", n);
                return;
            }
            e->tmp = t;
            e->tmp_cap = 2 * n;
        }
        size_t tl = 0;
        for (size_t i = 0; i < n; i++) tl += fm_tok_utf8_encode(fm_tok_byte_to_cp(p[i]), e->tmp + tl);
        int32_t id = fm_tok_vocab_get(tok, e->tmp, tl);
        if (id >= 0) {
            emit(e, id);
            return;
        }
    }
    if (!scratch_reserve(e, n)) return;
    int32_t m = 0;
    bool last_unk = false, all_bytes = true; /* every byte has its own token: sym[k] is p[k]'s */
    for (size_t i = 0; i < n; i++) {
        int32_t id = tok->byte_id[p[i]];
        if (id < 0) { /* a byte without a token: unk (fused if asked), else dropped, as HF does */
            all_bytes = false;
            if (tok->unk_id < 0 || (tok->fuse_unk && last_unk)) continue;
            id = tok->unk_id;
            last_unk = true;
        } else last_unk = false;
        e->sym[m++] = id;
    }
    if ((size_t)m < fm_tok_bpe_heap_min) {
        merge_scan(e, all_bytes ? p : NULL, &m);
        for (int32_t k = 0; k < m; k++) emit(e, e->sym[k]);
        return;
    }
    for (int32_t k = 0; k < m; k++) {
        e->prev[k] = k - 1;
        e->next[k] = k + 1 < m ? k + 1 : -1;
    }
    merge_heap(e, all_bytes ? p : NULL, m);
    for (int32_t k = 0; k >= 0; k = e->next[k]) emit(e, e->sym[k]);
}

/* ------------------------------ regex splits ------------------------------ */

/* The Qwen split patterns on ASCII text, by hand:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * (Qwen3.5's adds \p{M}, which no ASCII character is.) Returns the end of the match that starts at
 * i, trying the alternatives in order as the regex engine does, or 0 when deciding would need a
 * non-ASCII character: the caller then asks PCRE2 for this one match. */
enum { C_L = 1, C_N = 2, C_S = 4, C_P = 8, C_X = 16 }; /* letter, digit, white space, other, non-ASCII */
static uint8_t ascii_class[256];
static void ascii_class_init(void) {
    for (int b = 0; b < 256; b++)
        ascii_class[b] = b >= 0x80 ? C_X
                         : ((b | 0x20) >= 'a' && (b | 0x20) <= 'z') ? C_L
                         : (b >= '0' && b <= '9')                   ? C_N
                         : (b == ' ' || (b >= 0x09 && b <= 0x0D))   ? C_S
                                                                    : C_P;
}
static pthread_once_t ascii_once = PTHREAD_ONCE_INIT;

static size_t run_of(const unsigned char *p, size_t n, size_t j, int cls) {
    while (j < n && (ascii_class[p[j]] & cls)) j++;
    return j;
}

static size_t qwen_ascii(const unsigned char *p, size_t n, size_t i) {
    const uint8_t *cl = ascii_class;
    unsigned b = p[i];
    int c = cl[b], c1 = i + 1 < n ? cl[p[i + 1]] : 0;
    if (c == C_X) return 0;
    if (b == '\'' && c1) { /* 's 't 're 've 'm 'll 'd, any case ('ſ is non-ASCII: bail) */
        if (c1 == C_X) return 0;
        unsigned l1 = p[i + 1] | 0x20;
        if (c1 == C_L && (l1 == 's' || l1 == 't' || l1 == 'm' || l1 == 'd')) return i + 2;
        if (c1 == C_L && (l1 == 'r' || l1 == 'v' || l1 == 'l') && i + 2 < n) {
            if (cl[p[i + 2]] == C_X) return 0;
            unsigned l2 = p[i + 2] | 0x20;
            if (cl[p[i + 2]] == C_L && l2 == (l1 == 'l' ? 'l' : 'e')) return i + 3;
        }
    }
    if (c == C_L || (c1 == C_L && b != '\r' && b != '\n' && c != C_N)) { /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        size_t j = run_of(p, n, c == C_L ? i + 1 : i + 2, C_L);
        return j < n && cl[p[j]] == C_X ? 0 : j;
    }
    if (c1 == C_X && b != '\r' && b != '\n' && c != C_N) return 0; /* might be " é..." */
    if (c == C_N) return i + 1;                                     /* \p{N} */
    size_t k = b == ' ' && c1 == C_P ? i + 1 : i;                    /* ' ?[^\s\p{L}\p{N}]+[\r\n]*' */
    if (cl[p[k]] == C_P) {
        size_t j = run_of(p, n, k + 1, C_P);
        if (j < n && cl[p[j]] == C_X) return 0;
        while (j < n && (p[j] == '\r' || p[j] == '\n')) j++;
        return j;
    }
    /* b is white space: \s*[\r\n]+ | \s+(?!\S) | \s+ */
    size_t j = run_of(p, n, i, C_S);
    if (j < n && cl[p[j]] == C_X) return 0;
    for (size_t k2 = j; k2 > i; k2--)
        if (p[k2 - 1] == '\r' || p[k2 - 1] == '\n') return k2;
    if (j == n || j - i < 2) return j;
    return j - 1;
}

/* Applies Split stage lvl (Isolated: matches and the gaps between them are both pieces) and sends
 * each piece to the next stage; the last stage is BPE. */
static void split(enc *e, int lvl, const char *p, size_t n) {
    if (n == 0 || e->st != FM_OK) return;
    const fm_tokenizer *tok = e->tok;
    if (lvl == tok->n_split) {
        if (e->piece_fn) e->piece_fn(e->piece_ctx, p, n);
        else bpe(e, (const unsigned char *)p, n);
        return;
    }
    pcre2_code *re = tok->split[lvl];
    pcre2_match_data *md = e->md[lvl];
    bool fast = tok->split_qwen[lvl] && fm_tok_fast_split, jit = tok->split_jit[lvl];
    size_t off = 0, last = 0;
    while (off <= n) {
        size_t fe;
        if (fast && off < n && (fe = qwen_ascii((const unsigned char *)p, n, off)) > 0) {
            split(e, lvl + 1, p + off, fe - off); /* matches are contiguous: no gap before it */
            last = off = fe;
            continue;
        }
        int rc = jit ? pcre2_jit_match(re, (PCRE2_SPTR)p, n, off, 0, md, tok->mctx)
                     : pcre2_match(re, (PCRE2_SPTR)p, n, off, PCRE2_NO_UTF_CHECK, md, tok->mctx);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            e->st = fm_error_set(FM_ERR_UNSUPPORTED, "pre-tokenizer regex failed on a %zu-byte piece: %s", n,
                                 (const char *)msg);
            return;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t s = ov[0], t = ov[1];
        if (s > last) split(e, lvl + 1, p + last, s - last);
        if (t > s) split(e, lvl + 1, p + s, t - s);
        last = t;
        if (t > s) off = t;
        else { /* an empty match: step over one character */
            if (t >= n) break;
            size_t cl;
            fm_tok_utf8_decode((const unsigned char *)p + t, n - t, &cl);
            off = t + cl;
        }
    }
    if (last < n) split(e, lvl + 1, p + last, n - last);
}

/* ------------------------------ added tokens ------------------------------ */

/* Finds the leftmost (then longest) added token of the given kind in p[from..n). Returns its index
 * in tok->added and the match span [*ms, *me) (widened by lstrip / rstrip), or -1. */
static int64_t find_added(const fm_tokenizer *tok, const char *p, size_t n, size_t from, size_t floor_,
                          bool normalized, size_t *ms, size_t *me) {
    const uint8_t *first = normalized ? tok->added_first_norm : tok->added_first_raw;
    int only = normalized ? tok->added_only_norm : tok->added_only_raw;
    for (size_t i = from; i < n; i++) {
        if (only >= 0) { /* all start with the same byte (Qwen: '<'): let memchr find it */
            const char *q = memchr(p + i, only, n - i);
            if (!q) break;
            i = (size_t)(q - p);
        } else if (!first[(uint8_t)p[i]]) continue;
        for (size_t k = 0; k < tok->n_added; k++) {
            const fm_tok_added *a = &tok->added[k];
            if ((a->normalized && tok->nfc) != normalized || a->len > n - i) continue;
            if (memcmp(p + i, tok->text_arena + a->off, a->len) != 0) continue;
            size_t s = i, t = i + a->len;
            if (a->lstrip) /* white space before it, back to the end of the previous match */
                while (s > floor_) {
                    size_t b = s - 1;
                    while (b > floor_ && ((unsigned char)p[b] & 0xC0) == 0x80) b--;
                    size_t cl;
                    if (!fm_tok_is_space(fm_tok_utf8_decode((const unsigned char *)p + b, n - b, &cl))) break;
                    s = b;
                }
            if (a->rstrip)
                while (t < n) {
                    size_t cl;
                    if (!fm_tok_is_space(fm_tok_utf8_decode((const unsigned char *)p + t, n - t, &cl))) break;
                    t += cl;
                }
            *ms = s;
            *me = t;
            return (int64_t)k;
        }
    }
    return -1;
}

/* Text between raw-matched added tokens: normalize, then look for normalized added tokens. */
static void segment(enc *e, const char *p, size_t n, bool allow_special) {
    if (n == 0 || e->st != FM_OK) return;
    const fm_tokenizer *tok = e->tok;
    const char *q = p;
    size_t qn = n;
    if (tok->nfc) {
        fm_status st = fm_tok_nfc(p, n, &e->nfc_buf, &e->nfc_cap, &q, &qn);
        if (st != FM_OK) {
            e->st = st;
            return;
        }
    }
    if (!allow_special || !tok->any_added_norm) {
        split(e, 0, q, qn);
        return;
    }
    size_t last = 0, ms, me;
    int64_t k;
    while ((k = find_added(tok, q, qn, last, last, true, &ms, &me)) >= 0) {
        split(e, 0, q + last, ms - last);
        emit(e, tok->added[k].id);
        last = me;
    }
    split(e, 0, q + last, qn - last);
}

static void enc_init(enc *e, const fm_tokenizer *tok, size_t len) {
    pthread_once(&ascii_once, ascii_class_init);
    memset(e, 0, sizeof *e);
    e->tok = tok;
    if (len >= fm_tok_cache_min_input) e->wc = calloc(WC_SLOTS, sizeof *e->wc); /* no cache if this fails */
    _Static_assert(sizeof(wc_slot) == 64, "one cache line per word-cache slot");
    for (int i = 0; i < tok->n_split; i++) {
        e->md[i] = pcre2_match_data_create_from_pattern(tok->split[i], NULL);
        if (!e->md[i]) e->st = fm_error_set(FM_ERR_NOMEM, "out of memory for regex match data");
    }
}

static void enc_free(enc *e) {
    for (int i = 0; i < e->tok->n_split; i++) pcre2_match_data_free(e->md[i]);
    free(e->sym);
    free(e->prev);
    free(e->next);
    free(e->rank);
    free(e->heap);
    free(e->nfc_buf);
    free(e->tmp);
    free(e->wc);
}

fm_status fm_tok_pretokenize(const fm_tokenizer *tok, const char *text, size_t len,
                             void (*fn)(void *ctx, const char *piece, size_t n), void *ctx) {
    size_t bad = fm_tok_utf8_check(text, len);
    if (bad < len) return fm_error_set(FM_ERR_ARG, "pretokenize: invalid UTF-8 at byte %zu", bad);
    enc e;
    enc_init(&e, tok, 0);
    e.piece_fn = fn;
    e.piece_ctx = ctx;
    if (e.st == FM_OK) segment(&e, text, len, false);
    fm_status st = e.st;
    enc_free(&e);
    return st;
}

fm_status fm_tokenizer_encode(const fm_tokenizer *tok, const char *text, size_t len, bool allow_special,
                              int32_t **ids, size_t *n_ids) {
    *ids = NULL;
    *n_ids = 0;
    if (!text && len) return fm_error_set(FM_ERR_ARG, "encode: text is NULL");
    size_t bad = fm_tok_utf8_check(text, len);
    if (bad < len)
        return fm_error_set(FM_ERR_ARG, "encode: invalid UTF-8 at byte %zu (0x%02X)", bad, (unsigned char)text[bad]);
    enc e;
    enc_init(&e, tok, len);
    if (e.st == FM_OK) {
        if (allow_special && tok->any_added_raw) {
            size_t last = 0, ms, me;
            int64_t k;
            while (e.st == FM_OK && (k = find_added(tok, text, len, last, last, false, &ms, &me)) >= 0) {
                segment(&e, text + last, ms - last, allow_special);
                emit(&e, tok->added[k].id);
                last = me;
            }
            segment(&e, text + last, len - last, allow_special);
        } else segment(&e, text, len, allow_special);
    }
    int32_t *out = e.ids;
    size_t n_out = e.n_ids;
    fm_status st = e.st;
    enc_free(&e);
    if (st != FM_OK) {
        free(out);
        return st;
    }
    *ids = out;
    *n_ids = n_out;
    return FM_OK;
}
