/* Internals of the byte-level BPE tokenizer shared by src/text/tok_*.c and tokenizer.c.
 * Not part of the module's interface (tests may include it to reach the knobs below). */
#ifndef FM_TEXT_TOK_INTERNAL_H
#define FM_TEXT_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <string.h>

#include "text/tokenizer.h"

#define FM_TOK_MAX_SPLITS 4 /* regex Split stages in a pre-tokenizer Sequence (+ ByteLevel's own) */

/* Per-id flags. */
enum {
    FM_TOK_PRESENT = 1, /* the id names a token (vocab or added); ids may have holes */
    FM_TOK_ADDED = 2,   /* listed in added_tokens */
    FM_TOK_SPECIAL = 4, /* added token with special=true */
};

/* The merge table packs a pair and its rank into 64 bits: left id << 43 | right id << 22 | rank
 * (lower ranks merge first); UINT64_MAX marks an empty slot. Ids must stay below 2^21 - 1 and
 * ranks below 2^22 - 1; the merged token of rank r is merge_id[r]. */
#define FM_TOK_ID_BITS 21
#define FM_TOK_RANK_BITS 22
#define FM_TOK_RANK_MASK ((1ull << FM_TOK_RANK_BITS) - 1)
#define FM_TOK_NO_MERGE UINT32_MAX

/* A model.vocab entry: its text is text_arena[off..off+len). */
typedef struct fm_tok_vent {
    int32_t id;
    uint32_t off, len;
} fm_tok_vent;

/* A slot of the vocab hash table (id -1: empty). */
typedef struct fm_tok_vslot {
    uint32_t tag, len, off;
    int32_t id;
} fm_tok_vslot;

/* An added token, matched in the text before pre-tokenization. */
typedef struct fm_tok_added {
    int32_t id;
    uint32_t off, len;  /* content in the text arena (NFC'd if normalized and NFC is on) */
    bool special;       /* special=true in tokenizer.json */
    bool normalized;    /* matched in normalized text rather than in the raw input */
    bool lstrip, rstrip; /* absorbs white space on its left / right */
} fm_tok_added;

struct fm_tokenizer {
    int64_t n_vocab;          /* max id + 1 */
    uint8_t *flags;           /* [n_vocab] FM_TOK_* */
    uint32_t *text_off;       /* [n_vocab] token text (as written in tokenizer.json) in text_arena */
    uint32_t *text_len;       /* [n_vocab] */
    uint32_t *bytes_off;      /* [n_vocab] ByteLevel-decoded bytes in bytes_arena */
    uint32_t *bytes_len;      /* [n_vocab] */
    char *text_arena;         /* NUL after every text, so token texts are C strings too */
    size_t text_used, text_cap;
    char *bytes_arena;
    size_t bytes_used;

    fm_tok_vent *vents;       /* model.vocab entries in file order (while loading only) */
    size_t n_vents, cap_vents;
    fm_tok_vslot *vhash;      /* open-addressing table over the vocab keyed by text */
    uint32_t vmask;

    uint64_t *merges;         /* open-addressing merge table (packed pair | rank) */
    uint32_t mmask;
    int64_t n_merges;         /* distinct pairs */
    int32_t *merge_id;        /* [n_ranks] merged token of each rank */
    uint32_t n_ranks, cap_ranks;

    int32_t byte_id[256];     /* id of the single-byte token for each byte, -1 if none */
    uint32_t *byte_pair;      /* [65536] rank of the merge of byte tokens a << 8 | b, or FM_TOK_NO_MERGE */
    int32_t unk_id;           /* -1 if no unk_token */
    bool fuse_unk;
    bool ignore_merges;

    fm_tok_added *added;      /* sorted by length, longest first */
    size_t n_added;
    uint8_t added_first_raw[256];  /* 1 if some raw-matched added token starts with this byte */
    uint8_t added_first_norm[256]; /* same for normalized ones */
    bool any_added_raw, any_added_norm;
    int added_only_raw, added_only_norm; /* the one first byte all such tokens share, or -1 */

    bool nfc;                 /* normalizer NFC */
    pcre2_code *split[FM_TOK_MAX_SPLITS + 1]; /* Isolated regex splits applied in order */
    bool split_jit[FM_TOK_MAX_SPLITS + 1];  /* JIT-compiled: call pcre2_jit_match directly */
    bool split_qwen[FM_TOK_MAX_SPLITS + 1]; /* a Qwen pattern: ASCII runs take the hand-written matcher */
    pcre2_match_context *mctx;  /* no match limit: a 20 MB run of spaces is one piece, not an error */
    int n_split;
};

/* Pieces longer than this many bytes go through the heap-based BPE merge loop; shorter ones use a
 * linear scan. Both give identical results (tests lower it to cross-check). */
extern size_t fm_tok_bpe_heap_min;

/* Inputs of at least this many bytes use a per-call cache of piece -> ids (tests raise it to
 * check that the cache changes nothing). */
extern size_t fm_tok_cache_min_input;

/* Whether Qwen split patterns use the hand-written ASCII matcher (tests turn it off to compare). */
extern bool fm_tok_fast_split;

/* ---- tok_encode.c ---- */

/* Test hook: runs the normalizer and the pre-tokenizer (no added tokens, no BPE) over valid UTF-8
 * text and calls fn for every piece in order. */
fm_status fm_tok_pretokenize(const fm_tokenizer *tok, const char *text, size_t len,
                             void (*fn)(void *ctx, const char *piece, size_t n), void *ctx);

/* ---- tok_utf8.c ---- */

/* Offset of the first byte of the first invalid UTF-8 sequence in s[0..n), or n if s is valid
 * (strict: no overlongs, no surrogates, nothing above U+10FFFF). */
size_t fm_tok_utf8_check(const char *s, size_t n);

/* Decodes one code point at s (valid UTF-8 assumed, n > 0); stores its length in *len. */
uint32_t fm_tok_utf8_decode(const unsigned char *s, size_t n, size_t *len);

/* Writes the UTF-8 encoding of cp (<= U+10FFFF) to out (4 bytes room); returns its length. */
size_t fm_tok_utf8_encode(uint32_t cp, char *out);

/* GPT-2 byte <-> unicode map: the code point standing for byte b, and the byte a code point
 * stands for (-1 if none). */
uint32_t fm_tok_byte_to_cp(uint8_t b);
int fm_tok_cp_to_byte(uint32_t cp);

/* NFC-normalizes s[0..n) (valid UTF-8). If s is already NFC (fast check), sets *out = s and
 * *out_len = n without allocating; otherwise *out points into *buf (grown with realloc, owned by the
 * caller, *cap its size). */
fm_status fm_tok_nfc(const char *s, size_t n, char **buf, size_t *cap, const char **out,
                     size_t *out_len);

/* Is cp Unicode White_Space (what Rust's char::is_whitespace tests)? */
bool fm_tok_is_space(uint32_t cp);

/* ---- tok_json.c ---- */

/* Parses tokenizer.json bytes into tok (whose tables are empty). Messages are prefixed by the caller. */
fm_status fm_tok_parse_json(fm_tokenizer *tok, const char *json, size_t n);

/* ---- tokenizer.c ---- */

/* Adds `text` (n bytes) to the text arena (with a NUL after it); returns its offset via *off. */
fm_status fm_tok_arena_add(fm_tokenizer *tok, const char *text, size_t n, uint32_t *off);

/* Id of the vocab token whose tokenizer.json text is s[0..n), or -1. */
int32_t fm_tok_vocab_get(const fm_tokenizer *tok, const char *s, size_t n);

/* Hash of a byte string (vocab table, encode's word cache). Reads whole words only (the tail
 * overlaps the last full word) to avoid byte loops and store-forwarding stalls on short keys. */
static inline uint64_t fm_tok_hash(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    uint64_t h = 0xcbf29ce484222325ull ^ (n * 0x9E3779B97F4A7C15ull), a;
    if (n >= 8) {
        for (size_t i = 0; i + 8 < n; i += 8) {
            memcpy(&a, p + i, 8);
            h = (h ^ a) * 0x100000001b3ull;
            h ^= h >> 29;
        }
        memcpy(&a, p + n - 8, 8);
        h ^= a;
    } else if (n >= 4) {
        uint32_t x, y;
        memcpy(&x, p, 4);
        memcpy(&y, p + n - 4, 4);
        h ^= (uint64_t)x << 32 | y;
    } else if (n > 0) {
        h ^= (uint64_t)p[0] << 16 | (uint64_t)p[n >> 1] << 8 | p[n - 1];
    }
    h *= 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}

/* The rank of the merge of (left, right), or FM_TOK_NO_MERGE. */
static inline uint32_t fm_tok_merge_rank(const fm_tokenizer *tok, int32_t left, int32_t right) {
    uint64_t key = (uint64_t)(uint32_t)left << (64 - FM_TOK_ID_BITS) | (uint64_t)(uint32_t)right << FM_TOK_RANK_BITS;
    uint32_t h = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & tok->mmask;
    for (;;) {
        uint64_t m = tok->merges[h];
        if ((m & ~FM_TOK_RANK_MASK) == key) return m == UINT64_MAX ? FM_TOK_NO_MERGE : (uint32_t)(m & FM_TOK_RANK_MASK);
        if (m == UINT64_MAX) return FM_TOK_NO_MERGE;
        h = (h + 1) & tok->mmask;
    }
}

#endif
