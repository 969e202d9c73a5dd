/* Tokenizer object: loading, token lookups and the streaming UTF-8 decoder.
 * Parsing lives in tok_load.c, encoding in tok_encode.c, UTF-8 / NFC helpers in tok_utf8.c. */
#include "text/tok_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/error.h"

fm_status fm_tok_arena_add(fm_tokenizer *tok, const char *text, size_t n, uint32_t *off) {
    if (tok->text_used + n + 1 > tok->text_cap) {
        size_t nc = tok->text_cap ? tok->text_cap : 1 << 20;
        while (nc < tok->text_used + n + 1) nc *= 2;
        if (nc > UINT32_MAX) return fm_error_set(FM_ERR_FORMAT, "token texts exceed 4 GiB");
        char *na = realloc(tok->text_arena, nc);
        if (!na) return fm_error_set(FM_ERR_NOMEM, "out of memory for token texts");
        tok->text_arena = na;
        tok->text_cap = nc;
    }
    memcpy(tok->text_arena + tok->text_used, text, n);
    tok->text_arena[tok->text_used + n] = 0;
    *off = (uint32_t)tok->text_used;
    tok->text_used += n + 1;
    return FM_OK;
}

/* Maps a whole file read-only (populated up front; *n_out may be 0 with *out = NULL). */
static fm_status map_file(const char *path, char **out, size_t *n_out) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fm_error_set(FM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    fm_status st = FM_OK;
    *out = NULL;
    *n_out = 0;
    if (fstat(fd, &sb) != 0) st = fm_error_set(FM_ERR_IO, "cannot stat %s: %s", path, strerror(errno));
    else if (!S_ISREG(sb.st_mode)) st = fm_error_set(FM_ERR_IO, "%s is not a regular file", path);
    else if (sb.st_size > 0) {
        void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
        if (m == MAP_FAILED) st = fm_error_set(FM_ERR_IO, "cannot map %s: %s", path, strerror(errno));
        else {
            *out = m;
            *n_out = (size_t)sb.st_size;
        }
    }
    close(fd);
    return st;
}

/* HF's ByteLevel decoder on one token: the bytes its characters stand for, or (if any character is
 * outside the GPT-2 map) the token's own UTF-8. */
static void byte_level_decode(const char *t, size_t n, char *out, size_t *out_len) {
    size_t i = 0, o = 0;
    while (i < n) {
        size_t cl;
        uint32_t cp = fm_tok_utf8_decode((const unsigned char *)t + i, n - i, &cl);
        int b = fm_tok_cp_to_byte(cp);
        if (b < 0) {
            memcpy(out, t, n);
            *out_len = n;
            return;
        }
        out[o++] = (char)b;
        i += cl;
    }
    *out_len = o;
}

fm_status fm_tokenizer_load(const char *path, fm_tokenizer **out) {
    *out = NULL;
    char *json = NULL;
    size_t n = 0;
    fm_tokenizer *tok = calloc(1, sizeof *tok);
    fm_status st;
    if (!tok) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    tok->unk_id = -1;
    tok->mctx = pcre2_match_context_create(NULL);
    if (!tok->mctx) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory");
        goto fail;
    }
    pcre2_set_match_limit(tok->mctx, UINT32_MAX);
    pcre2_set_depth_limit(tok->mctx, UINT32_MAX);
    if ((st = map_file(path, &json, &n)) != FM_OK) goto fail;
    if ((st = fm_tok_parse_json(tok, json ? json : "", n)) != FM_OK) {
        st = fm_error_wrap(st, "%s", path);
        goto fail;
    }
    if (json) munmap(json, n);
    json = NULL;

    /* decoded bytes of every token: never longer than its text */
    tok->bytes_arena = malloc(tok->text_used ? tok->text_used : 1);
    if (!tok->bytes_arena) {
        st = fm_error_set(FM_ERR_NOMEM, "out of memory for token bytes");
        goto fail;
    }
    for (int64_t id = 0; id < tok->n_vocab; id++) {
        if (!(tok->flags[id] & FM_TOK_PRESENT)) continue;
        size_t bl;
        byte_level_decode(tok->text_arena + tok->text_off[id], tok->text_len[id], tok->bytes_arena + tok->bytes_used, &bl);
        tok->bytes_off[id] = (uint32_t)tok->bytes_used;
        tok->bytes_len[id] = (uint32_t)bl;
        tok->bytes_used += bl;
    }
    tok->added_only_raw = tok->added_only_norm = -1;
    int n_first_raw = 0, n_first_norm = 0;
    for (size_t i = 0; i < tok->n_added; i++) {
        const fm_tok_added *a = &tok->added[i];
        uint8_t first = (uint8_t)tok->text_arena[a->off];
        if (a->normalized && tok->nfc) {
            n_first_norm += !tok->added_first_norm[first];
            tok->added_first_norm[first] = 1;
            tok->any_added_norm = true;
        } else {
            n_first_raw += !tok->added_first_raw[first];
            tok->added_first_raw[first] = 1;
            tok->any_added_raw = true;
        }
    }
    for (int b = 0; b < 256; b++) {
        if (n_first_raw == 1 && tok->added_first_raw[b]) tok->added_only_raw = b;
        if (n_first_norm == 1 && tok->added_first_norm[b]) tok->added_only_norm = b;
    }
    *out = tok;
    return FM_OK;
fail:
    if (json) munmap(json, n);
    fm_tokenizer_free(tok);
    return st;
}

void fm_tokenizer_free(fm_tokenizer *tok) {
    if (!tok) return;
    for (int i = 0; i < tok->n_split; i++) pcre2_code_free(tok->split[i]);
    pcre2_match_context_free(tok->mctx);
    free(tok->flags);
    free(tok->text_off);
    free(tok->text_len);
    free(tok->bytes_off);
    free(tok->bytes_len);
    free(tok->text_arena);
    free(tok->bytes_arena);
    free(tok->vhash);
    free(tok->vents);
    free(tok->merges);
    free(tok->merge_id);
    free(tok->byte_pair);
    free(tok->added);
    free(tok);
}

int64_t fm_tokenizer_n_vocab(const fm_tokenizer *tok) { return tok->n_vocab; }

const char *fm_tokenizer_token_bytes(const fm_tokenizer *tok, int32_t id, size_t *len) {
    if (id < 0 || id >= tok->n_vocab || !(tok->flags[id] & FM_TOK_PRESENT)) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = tok->bytes_len[id];
    return tok->bytes_arena + tok->bytes_off[id];
}

int32_t fm_tokenizer_find(const fm_tokenizer *tok, const char *token_text) {
    size_t n = strlen(token_text);
    for (size_t i = 0; i < tok->n_added; i++) {
        const fm_tok_added *a = &tok->added[i];
        if (a->len == n && memcmp(tok->text_arena + a->off, token_text, n) == 0) return a->id;
    }
    return fm_tok_vocab_get(tok, token_text, n);
}

/* ============================ streaming decoder ============================= */

void fm_detok_init(fm_detok *d, const fm_tokenizer *tok) {
    memset(d, 0, sizeof *d);
    d->tok = tok;
}

static const char replacement[3] = {(char)0xEF, (char)0xBF, (char)0xBD}; /* U+FFFD */

static void put(char *out, size_t cap, size_t *o, const void *s, size_t n) {
    if (*o + n > cap) return; /* the contract asks for enough room; never split a character */
    memcpy(out + *o, s, n);
    *o += n;
}

size_t fm_detok_push(fm_detok *d, int32_t id, char *out, size_t cap) {
    size_t n, o = 0;
    const unsigned char *s = (const unsigned char *)fm_tokenizer_token_bytes(d->tok, id, &n);
    if (!s) return 0;
    size_t run = 0; /* s[run..i) holds complete valid characters not yet written */
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (d->n_pend == 0) {
            if (c < 0x80) {
                i++;
                continue;
            }
            uint32_t need = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
            if (need && i + need <= n && fm_tok_utf8_check((const char *)s + i, need) == need) {
                i += need; /* a whole valid character inside this token */
                continue;
            }
            put(out, cap, &o, s + run, i - run);
            i++;
            run = i;
            if (!need) put(out, cap, &o, replacement, 3); /* a byte that cannot start a character */
            else {
                d->pend[0] = (unsigned char)c;
                d->n_pend = 1;
                d->need = need;
            }
            continue;
        }
        /* continuing a held-back character: check the next byte against UTF-8's ranges */
        unsigned lo = 0x80, hi = 0xBF;
        if (d->n_pend == 1) {
            if (d->pend[0] == 0xE0) lo = 0xA0;      /* no overlongs */
            else if (d->pend[0] == 0xED) hi = 0x9F; /* no surrogates */
            else if (d->pend[0] == 0xF0) lo = 0x90;
            else if (d->pend[0] == 0xF4) hi = 0x8F; /* <= U+10FFFF */
        }
        if (c < lo || c > hi) {
            /* the held-back bytes are a maximal invalid subpart; c is looked at again as a fresh byte */
            put(out, cap, &o, replacement, 3);
            d->n_pend = 0;
            continue;
        }
        d->pend[d->n_pend++] = (unsigned char)c;
        i++;
        run = i;
        if (d->n_pend == d->need) {
            put(out, cap, &o, d->pend, d->n_pend);
            d->n_pend = 0;
        }
    }
    put(out, cap, &o, s + run, n - run); /* empty when a character is held back */
    return o;
}

size_t fm_detok_flush(fm_detok *d, char *out, size_t cap) {
    size_t o = 0;
    if (d->n_pend) put(out, cap, &o, replacement, 3);
    d->n_pend = 0;
    d->need = 0;
    return o;
}
