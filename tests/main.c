/* Test runner: runs every registered test (or those whose name contains argv[1]) and prints
 * "N passed, N failed[, N skipped]" as its last line. Exit status 0 iff nothing failed. */
#include "test.h"

#include <jansson.h>

#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#define MAX_TESTS 1024

static struct {
    const char *name;
    fm_test_fn fn;
} tests[MAX_TESTS];
static int n_tests;

void fm_test_register(const char *name, fm_test_fn fn) {
    if (n_tests == MAX_TESTS) {
        fprintf(stderr, "too many tests\n");
        exit(2);
    }
    tests[n_tests].name = name;
    tests[n_tests].fn = fn;
    n_tests++;
}

int fm_test_run_cmd(const char *cmdline, char *out, size_t cap) {
    char full[8192];
    snprintf(full, sizeof full, "(%s) 2>&1", cmdline);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t n = 0;
    if (cap) out[0] = 0;
    char buf[4096];
    size_t r;
    while ((r = fread(buf, 1, sizeof buf, p)) > 0) {
        if (cap && n + 1 < cap) {
            size_t take = r < cap - 1 - n ? r : cap - 1 - n;
            memcpy(out + n, buf, take);
            n += take;
            out[n] = 0;
        }
    }
    int st = pclose(p);
    if (st == -1 || !WIFEXITED(st)) return -1;
    return WEXITSTATUS(st);
}

static const char *scratch_root(void) {
    const char *r = getenv("FM_TEST_TMP");
    return r ? r : "build/test-tmp";
}

const char *fm_test_tmpdir(const char *name, char *buf, size_t cap) {
    char cmd[4096];
    snprintf(buf, cap, "%s/%s", scratch_root(), name);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", buf, buf);
    if (system(cmd) != 0) fprintf(stderr, "cannot make %s\n", buf);
    return buf;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

uint64_t fm_test_rng_seed(const char *env) {
    const char *v = env ? getenv(env) : NULL;
    uint64_t seed = v ? (uint64_t)atoll(v) : (uint64_t)time(NULL);
    rng_state = seed * 0x9E3779B97F4A7C15ull | 1;
    return seed;
}

uint64_t fm_test_rand_u64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

double fm_test_rand(void) { return (double)(fm_test_rand_u64() >> 11) / (double)(1ull << 52) - 1.0; }

const char *fm_test_bin(void) {
    const char *b = getenv("FLASHMOE_BIN");
    return b ? b : "build/flashmoe";
}

char *fm_test_read_file(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, len = 0, r;
    char *b = malloc(cap + 1);
    while (b && (r = fread(b + len, 1, cap - len, f)) > 0) {
        len += r;
        if (len == cap) {
            char *nb = realloc(b, 2 * cap + 1);
            if (!nb) {
                free(b);
                b = NULL;
                break;
            }
            b = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (b) b[len] = 0;
    if (n) *n = len;
    return b;
}

json_t *fm_test_load_jsonl(const char *path) {
    size_t n;
    char *text = fm_test_read_file(path, &n);
    if (!text) return NULL;
    json_t *arr = json_array();
    char *line = text;
    while (*line) {
        char *nl = strchr(line, '\n');
        size_t ll = nl ? (size_t)(nl - line) : strlen(line);
        if (ll) {
            json_error_t err;
            json_t *v = json_loadb(line, ll, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
            if (!v) {
                fprintf(stderr, "  %s: bad line: %s\n", path, err.text);
                json_decref(arr);
                free(text);
                return NULL;
            }
            json_array_append_new(arr, v);
        }
        line = nl ? nl + 1 : line + ll;
    }
    free(text);
    return arr;
}

static int cmp_tests(const void *a, const void *b) {
    const char *na = *(const char *const *)a, *nb = *(const char *const *)b;
    return strcmp(na, nb);
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : NULL;
    qsort(tests, (size_t)n_tests, sizeof tests[0], cmp_tests);
    int passed = 0, failed = 0, skipped = 0;
    for (int i = 0; i < n_tests; i++) {
        if (filter && !strstr(tests[i].name, filter)) continue;
        fm_test_ctx ctx = {0};
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        tests[i].fn(&ctx);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
        if (ctx.failures) {
            failed++;
            printf("FAIL %s (%.0f ms)\n", tests[i].name, ms);
        } else if (ctx.skipped) {
            skipped++;
            printf("skip %s\n", tests[i].name);
        } else {
            passed++;
            printf("ok   %s (%.0f ms)\n", tests[i].name, ms);
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
