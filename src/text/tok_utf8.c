/* UTF-8 helpers for the tokenizer: strict validation, the GPT-2 byte <-> unicode map, white space,
 * and NFC with a quick check that skips utf8proc for text that is already normalized. */
#include "text/tok_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "util/error.h"

size_t fm_tok_utf8_check(const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < n) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
        if (c >= 0xC2 && c <= 0xDF) need = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 3;
            if (c == 0xE0) lo = 0xA0;      /* no overlongs */
            else if (c == 0xED) hi = 0x9F; /* no surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 4;
            if (c == 0xF0) lo = 0x90;
            else if (c == 0xF4) hi = 0x8F; /* <= U+10FFFF */
        } else return i;
        if (i + need > n) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (size_t k = 2; k < need; k++)
            if ((s[i + k] & 0xC0) != 0x80) return i;
        i += need;
    }
    return n;
}

uint32_t fm_tok_utf8_decode(const unsigned char *s, size_t n, size_t *len) {
    unsigned c = s[0];
    if (c < 0x80 || n < 2) {
        *len = 1;
        return c;
    }
    if (c < 0xE0) {
        *len = 2;
        return (uint32_t)(c & 0x1F) << 6 | (s[1] & 0x3F);
    }
    if (c < 0xF0 || n < 4) {
        *len = 3;
        return (uint32_t)(c & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
    }
    *len = 4;
    return (uint32_t)(c & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 | (uint32_t)(s[2] & 0x3F) << 6 |
           (s[3] & 0x3F);
}

size_t fm_tok_utf8_encode(uint32_t cp, char *out) {
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | cp >> 6);
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | cp >> 12);
        o[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | cp >> 18);
    o[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- GPT-2 byte <-> unicode map ----
 * Bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF stand for themselves; the other 68 bytes map, in byte
 * order, to U+0100..U+0143. */
static bool byte_is_printable(unsigned b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t fm_tok_byte_to_cp(uint8_t b) {
    if (byte_is_printable(b)) return b;
    if (b <= 0x20) return 256u + b;                /* 33 control bytes and space */
    if (b >= 0x7F && b <= 0xA0) return 256u + 33 + (b - 0x7Fu); /* 34 */
    return 256u + 67;                              /* 0xAD, soft hyphen */
}

int fm_tok_cp_to_byte(uint32_t cp) {
    if (cp < 256) return byte_is_printable(cp) ? (int)cp : -1;
    if (cp >= 256 + 68) return -1;
    uint32_t k = cp - 256;
    if (k < 33) return (int)k;
    if (k < 67) return (int)(0x7F + k - 33);
    return 0xAD;
}

bool fm_tok_is_space(uint32_t cp) {
    switch (cp) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0:
    case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
        return true;
    default:
        return cp >= 0x2000 && cp <= 0x200A;
    }
}

/* ---- NFC ----
 * A code point is "inert" when it has canonical combining class 0, NFC leaves it as it is and it
 * never composes with a preceding character. Such a code point starts an NFC boundary: NFC(a + b) =
 * NFC(a) + NFC(b) when b starts with one. Text made only of inert code points is already NFC, so
 * only the stretches around non-inert ones (combining marks, precomposed letters above U+02FF,
 * jamo, ...) go through utf8proc. The test is conservative: a code point reported non-inert just
 * costs a utf8proc call. */

#define SECOND_LIMIT 0x30000u /* composition seconds all lie below this */
static uint8_t second_bits[SECOND_LIMIT / 8];
static uint8_t inert_bmp[0x10000 / 8]; /* cp_is_inert for the BMP, precomputed */
static pthread_once_t nfc_once = PTHREAD_ONCE_INIT;

static bool has_canonical_decomposition(uint32_t c) {
    const utf8proc_property_t *p = utf8proc_get_property((utf8proc_int32_t)c);
    if (p->decomp_seqindex == UINT16_MAX) return false; /* no decomposition at all (cheap test first) */
    utf8proc_int32_t dst[8];
    int last = 0;
    utf8proc_ssize_t n = utf8proc_decompose_char((utf8proc_int32_t)c, dst, 8, UTF8PROC_DECOMPOSE, &last);
    return !(n == 1 && dst[0] == (utf8proc_int32_t)c);
}

static bool cp_is_inert_slow(uint32_t c) {
    if (c < 0x300) return true;
    if (c >= 0xAC00 && c <= 0xD7A3) return true; /* Hangul syllables: NFC, starters, never seconds */
    if (c < SECOND_LIMIT && (second_bits[c >> 3] >> (c & 7) & 1)) return false;
    if (utf8proc_get_property((utf8proc_int32_t)c)->combining_class != 0) return false;
    return !has_canonical_decomposition(c);
}

/* Marks every non-first code point of every canonical decomposition (a superset of the
 * characters that can compose with what precedes them), then tabulates the BMP. */
static void nfc_init(void) {
    for (uint32_t c = 0xC0; c < SECOND_LIMIT; c++) {
        if (utf8proc_get_property((utf8proc_int32_t)c)->decomp_seqindex == UINT16_MAX) continue;
        utf8proc_int32_t dst[8];
        int last = 0;
        utf8proc_ssize_t n = utf8proc_decompose_char((utf8proc_int32_t)c, dst, 8, UTF8PROC_DECOMPOSE, &last);
        if (n < 2 || n > 8) continue;
        for (utf8proc_ssize_t k = 1; k < n; k++)
            if ((uint32_t)dst[k] < SECOND_LIMIT) second_bits[dst[k] >> 3] |= (uint8_t)(1u << (dst[k] & 7));
    }
    /* Hangul vowel and trailing jamo compose algorithmically with what precedes them */
    for (uint32_t c = 0x1161; c <= 0x1175; c++) second_bits[c >> 3] |= (uint8_t)(1u << (c & 7));
    for (uint32_t c = 0x11A8; c <= 0x11C2; c++) second_bits[c >> 3] |= (uint8_t)(1u << (c & 7));
    for (uint32_t c = 0; c < 0x10000; c++)
        if (cp_is_inert_slow(c)) inert_bmp[c >> 3] |= (uint8_t)(1u << (c & 7));
}

static inline bool cp_is_inert(uint32_t c) {
    if (c < 0x10000) return inert_bmp[c >> 3] >> (c & 7) & 1;
    return cp_is_inert_slow(c);
}

static fm_status buf_reserve(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return FM_OK;
    size_t nc = *cap ? *cap : 256;
    while (nc < need) nc *= 2;
    char *nb = realloc(*buf, nc);
    if (!nb) return fm_error_set(FM_ERR_NOMEM, "out of memory normalizing %zu bytes of text", need);
    *buf = nb;
    *cap = nc;
    return FM_OK;
}

fm_status fm_tok_nfc(const char *s, size_t n, char **buf, size_t *cap, const char **out, size_t *out_len) {
    const unsigned char *u = (const unsigned char *)s;
    /* quick scan: all bytes below 0xCC means every code point is below U+0300 */
    size_t i = 0;
    while (i < n && u[i] < 0xCC) i++;
    if (i == n) {
        *out = s;
        *out_len = n;
        return FM_OK;
    }
    pthread_once(&nfc_once, nfc_init);
    size_t used = 0;     /* bytes of *buf filled */
    size_t copied = 0;   /* s[0..copied) has been emitted */
    size_t last_inert = 0; /* start of the last inert code point seen (a boundary) */
    bool changed = false;
    i = 0;
    while (i < n) {
        unsigned b0 = u[i];
        if (b0 < 0x80) { /* an ASCII run: all inert */
            size_t j = i + 1;
            for (uint64_t w; j + 8 <= n && (memcpy(&w, u + j, 8), !(w & 0x8080808080808080ull));) j += 8;
            while (j < n && u[j] < 0x80) j++;
            last_inert = j - 1;
            i = j;
            continue;
        }
        if (b0 < 0xCC) { /* two bytes, below U+0300: inert */
            last_inert = i;
            i += 2;
            continue;
        }
        size_t cl;
        uint32_t c = fm_tok_utf8_decode(u + i, n - i, &cl);
        if (cp_is_inert(c)) {
            last_inert = i;
            i += cl;
            continue;
        }
        /* a non-inert stretch: from the last boundary to the next inert code point */
        size_t a = last_inert > copied ? last_inert : copied;
        size_t b = i + cl;
        while (b < n) {
            size_t bl;
            uint32_t d = fm_tok_utf8_decode(u + b, n - b, &bl);
            if (cp_is_inert(d)) break;
            b += bl;
        }
        utf8proc_uint8_t *norm = NULL;
        utf8proc_ssize_t nn = utf8proc_map(u + a, (utf8proc_ssize_t)(b - a), &norm,
                                           UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        if (nn < 0) {
            free(norm);
            return fm_error_set(FM_ERR_ARG, "NFC normalization failed at byte %zu: %s", a,
                                utf8proc_errmsg(nn));
        }
        if ((size_t)nn != b - a || memcmp(norm, u + a, b - a) != 0) {
            fm_status st = buf_reserve(buf, cap, used + (a - copied) + (size_t)nn + (n - b));
            if (st != FM_OK) {
                free(norm);
                return st;
            }
            memcpy(*buf + used, s + copied, a - copied);
            used += a - copied;
            memcpy(*buf + used, norm, (size_t)nn);
            used += (size_t)nn;
            copied = b;
            changed = true;
        }
        free(norm);
        i = b;
        last_inert = b;
    }
    if (!changed) {
        *out = s;
        *out_len = n;
        return FM_OK;
    }
    fm_status st = buf_reserve(buf, cap, used + (n - copied) + 1);
    if (st != FM_OK) return st;
    memcpy(*buf + used, s + copied, n - copied);
    used += n - copied;
    *out = *buf;
    *out_len = used;
    return FM_OK;
}
