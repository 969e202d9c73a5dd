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

bool fm_cli_parse_size(const char *s, uint64_t *out) {
    if (!s || !*s) return false;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0) return false;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (*end == 'B' || *end == 'b') end++;
    if (*end) return false;
    *out = (uint64_t)(v * mul);
    return true;
}

int fm_cli_model_option(const char *cmd, int c, const char *arg, fm_model_params *p) {
    int64_t v;
    uint64_t u;
    switch (c) {
    case 't':
        if (!fm_cli_parse_i64(arg, 1, 4096, &v)) return fm_cli_usage_error(cmd, "--threads needs 1..4096"), -1;
        p->n_threads = (int)v;
        return 1;
    case FM_OPT_EXPERTS:
        if (!fm_cli_parse_i64(arg, 1, 65536, &v)) return fm_cli_usage_error(cmd, "--experts needs a positive integer"), -1;
        p->n_experts_used = (int)v;
        return 1;
    case FM_OPT_IO:
        if (!strcmp(arg, "pread")) p->io_engine = FM_IO_PREAD;
        else if (!strcmp(arg, "direct")) p->io_engine = FM_IO_DIRECT;
        else if (!strcmp(arg, "mmap")) p->io_engine = FM_IO_MMAP;
        else return fm_cli_usage_error(cmd, "--io must be pread, direct or mmap"), -1;
        return 1;
    case FM_OPT_IO_THREADS:
        if (!fm_cli_parse_i64(arg, 1, 256, &v)) return fm_cli_usage_error(cmd, "--io-threads needs 1..256"), -1;
        p->io_threads = (int)v;
        return 1;
    case FM_OPT_CACHE:
        if (!fm_cli_parse_size(arg, &u)) return fm_cli_usage_error(cmd, "--cache needs a size such as 512M or 8G"), -1;
        p->cache_bytes = u;
        return 1;
    case FM_OPT_BUDGET:
        if (!fm_cli_parse_size(arg, &u) || u == 0)
            return fm_cli_usage_error(cmd, "--mem-budget needs a size such as 16G"), -1;
        p->mem_budget = u;
        return 1;
    }
    return 0;
}
