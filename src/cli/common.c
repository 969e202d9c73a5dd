#include "cli/cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

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

void fm_cli_json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
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
        else if (!strcmp(arg, "uring")) p->io_engine = FM_IO_URING;
        else return fm_cli_usage_error(cmd, "--io must be pread, direct, uring or mmap"), -1;
        return 1;
    case FM_OPT_IO_THREADS:
        if (!fm_cli_parse_i64(arg, 1, 256, &v)) return fm_cli_usage_error(cmd, "--io-threads needs 1..256"), -1;
        p->io_threads = (int)v;
        return 1;
    case FM_OPT_CACHE:
        if (!fm_cli_parse_size(arg, &u)) return fm_cli_usage_error(cmd, "--cache needs a size such as 512M or 8G"), -1;
        p->cache_bytes = u;
        return 1;
    case FM_OPT_PREFETCH:
        if (!arg) p->prefetch = FM_PREFETCH_DEFAULT;
        else if (!fm_cli_parse_i64(arg, 0, 64, &v)) return fm_cli_usage_error(cmd, "--prefetch=N needs N in 0..64"), -1;
        else p->prefetch = (int)v;
        return 1;
    case FM_OPT_BUDGET:
        if (!fm_cli_parse_size(arg, &u) || u == 0)
            return fm_cli_usage_error(cmd, "--mem-budget needs a size such as 16G"), -1;
        p->mem_budget = u;
        return 1;
    case FM_OPT_BACKEND:
        if (!strcmp(arg, "cpu")) p->backend = FM_BACKEND_CPU;
        else if (!strcmp(arg, "cuda")) p->backend = FM_BACKEND_CUDA;
        else return fm_cli_usage_error(cmd, "--backend must be cpu or cuda"), -1;
        return 1;
    case FM_OPT_VRAM_BUDGET:
        if (!fm_cli_parse_size(arg, &u) || u == 0)
            return fm_cli_usage_error(cmd, "--vram-budget needs a size such as 24G"), -1;
        p->vram_budget = u;
        return 1;
    case FM_OPT_VRAM_POLICY:
        if (!strcmp(arg, "lru")) p->vram_policy = FM_VRAM_LRU;
        else if (!strcmp(arg, "flru")) p->vram_policy = FM_VRAM_FLRU;
        else return fm_cli_usage_error(cmd, "--vram-policy must be lru or flru"), -1;
        return 1;
    }
    return 0;
}

void fm_cli_sampling_init(fm_cli_sampling *o) {
    memset(o, 0, sizeof *o);
    o->p = fm_sampler_default_params();
}

int fm_cli_sampling_option(const char *cmd, int c, const char *arg, fm_cli_sampling *o) {
    if (c < FM_OPT_TEMP || c > FM_OPT_STOP) return 0;
    char *end;
    errno = 0;
    double d = strtod(arg, &end);
    bool num_ok = !errno && end != arg && !*end;
    int64_t v;
    switch (c) {
    case FM_OPT_TEMP:
        if (!num_ok || d < 0) return fm_cli_usage_error(cmd, "--temp needs a number >= 0"), -1;
        o->p.temperature = (float)d;
        break;
    case FM_OPT_TOP_K:
        if (!fm_cli_parse_i64(arg, 0, INT32_MAX, &v)) return fm_cli_usage_error(cmd, "--top-k needs an integer >= 0"), -1;
        o->p.top_k = (int32_t)v;
        break;
    case FM_OPT_TOP_P:
        if (!num_ok || d <= 0 || d > 1) return fm_cli_usage_error(cmd, "--top-p needs a number in (0, 1]"), -1;
        o->p.top_p = (float)d;
        break;
    case FM_OPT_MIN_P:
        if (!num_ok || d < 0 || d > 1) return fm_cli_usage_error(cmd, "--min-p needs a number in [0, 1]"), -1;
        o->p.min_p = (float)d;
        break;
    case FM_OPT_REPEAT:
        if (!num_ok || d <= 0) return fm_cli_usage_error(cmd, "--repeat-penalty needs a number > 0"), -1;
        o->p.repetition_penalty = (float)d;
        break;
    case FM_OPT_PRESENCE:
        if (!num_ok) return fm_cli_usage_error(cmd, "--presence-penalty needs a number"), -1;
        o->p.presence_penalty = (float)d;
        break;
    case FM_OPT_FREQUENCY:
        if (!num_ok) return fm_cli_usage_error(cmd, "--frequency-penalty needs a number"), -1;
        o->p.frequency_penalty = (float)d;
        break;
    case FM_OPT_SEED:
        if (!fm_cli_parse_i64(arg, 0, INT64_MAX, &v)) return fm_cli_usage_error(cmd, "--seed needs an integer >= 0"), -1;
        o->p.seed = (uint64_t)v;
        break;
    case FM_OPT_STOP:
        if (!*arg) return fm_cli_usage_error(cmd, "--stop needs non-empty text"), -1;
        if (o->n_stops == FM_CLI_MAX_STOPS) return fm_cli_usage_error(cmd, "at most %d --stop options", FM_CLI_MAX_STOPS), -1;
        o->stops[o->n_stops++] = arg;
        return 1;
    }
    o->set |= 1u << (c - FM_OPT_TEMP);
    return 1;
}

void fm_cli_sampling_finish(const char *model_dir, fm_cli_sampling *o, int32_t *stop_ids, size_t *n_stop_ids) {
    char path[4096];
    snprintf(path, sizeof path, "%s/generation_config.json", model_dir);
    json_t *g = json_load_file(path, 0, NULL);
    bool sample = g && json_is_true(json_object_get(g, "do_sample"));
    /* greedy unless the model's generation config samples; command-line values always win */
#define FROM_CONFIG(bit, key, field, type)                                                         \
    do {                                                                                           \
        json_t *j_ = json_object_get(g, key);                                                      \
        if (!(o->set & (1u << (bit))) && json_is_number(j_)) o->p.field = (type)json_number_value(j_); \
    } while (0)
    if (g && sample) {
        FROM_CONFIG(FM_OPT_TEMP - FM_OPT_TEMP, "temperature", temperature, float);
        FROM_CONFIG(FM_OPT_TOP_K - FM_OPT_TEMP, "top_k", top_k, int32_t);
        FROM_CONFIG(FM_OPT_TOP_P - FM_OPT_TEMP, "top_p", top_p, float);
        FROM_CONFIG(FM_OPT_MIN_P - FM_OPT_TEMP, "min_p", min_p, float);
        FROM_CONFIG(FM_OPT_REPEAT - FM_OPT_TEMP, "repetition_penalty", repetition_penalty, float);
    } else if (!(o->set & 1u)) {
        o->p.temperature = 0; /* greedy */
    }
#undef FROM_CONFIG
    json_t *eos = json_object_get(g, "eos_token_id");
    for (size_t i = 0; eos && i < (json_is_array(eos) ? json_array_size(eos) : 1) && *n_stop_ids < 8; i++) {
        json_t *e = json_is_array(eos) ? json_array_get(eos, i) : eos;
        if (!json_is_integer(e)) continue;
        int32_t id = (int32_t)json_integer_value(e);
        bool dup = false;
        for (size_t k = 0; k < *n_stop_ids; k++) dup |= stop_ids[k] == id;
        if (!dup) stop_ids[(*n_stop_ids)++] = id;
    }
    json_decref(g);
}

char *fm_cli_read_stream(FILE *f, size_t *n) {
    size_t cap = 1 << 16, len = 0, r;
    char *b = malloc(cap + 1);
    while (b && (r = fread(b + len, 1, cap - len, f)) > 0) {
        len += r;
        if (len == cap) {
            char *nb = realloc(b, 2 * cap + 1);
            if (!nb) {
                free(b);
                return NULL;
            }
            b = nb;
            cap *= 2;
        }
    }
    if (b && ferror(f)) {
        free(b);
        return NULL;
    }
    if (b) b[len] = 0;
    if (b && n) *n = len;
    return b;
}

char *fm_cli_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *b = fm_cli_read_stream(f, n);
    fclose(f);
    return b;
}
