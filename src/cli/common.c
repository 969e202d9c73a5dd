#include "cli/cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flashmoe.h"

int fm_cli_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "flashmoe %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (see flashmoe %s --help)\n", cmd);
    return FM_EXIT_USAGE;
}

int fm_cli_fail(const char *cmd) {
    fprintf(stderr, "flashmoe %s: %s\n", cmd, fm_last_error());
    return FM_EXIT_FAIL;
}

bool fm_cli_parse_i64(const char *s, int64_t lo, int64_t hi, int64_t *out) {
    if (!s || !*s) return false;
    errno = 0;
    char *end;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

bool fm_cli_parse_ids(const char *cmd, const char *s, int32_t **ids, int64_t *n) {
    size_t cap = 16, len = 0;
    int32_t *a = malloc(cap * sizeof *a);
    if (!a) {
        fprintf(stderr, "flashmoe %s: out of memory\n", cmd);
        return false;
    }
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n') p++;
        if (!*p) break;
        errno = 0;
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "flashmoe %s: bad token id list at \"%.20s\" (expected non-negative integers separated by commas)\n",
                    cmd, p);
            free(a);
            return false;
        }
        if (len == cap) {
            int32_t *b = realloc(a, 2 * cap * sizeof *a);
            if (!b) {
                free(a);
                fprintf(stderr, "flashmoe %s: out of memory\n", cmd);
                return false;
            }
            a = b;
            cap *= 2;
        }
        a[len++] = (int32_t)v;
        p = end;
        while (*p == ' ' || *p == '\t' || *p == '\n') p++;
        if (*p == ',') p++;
        else if (*p) {
            fprintf(stderr, "flashmoe %s: bad token id list at \"%.20s\"\n", cmd, p);
            free(a);
            return false;
        }
    }
    if (len == 0) {
        fprintf(stderr, "flashmoe %s: the token id list is empty\n", cmd);
        free(a);
        return false;
    }
    *ids = a;
    *n = (int64_t)len;
    return true;
}
