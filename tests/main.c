/* Test runner: runs every registered test (or those whose name contains argv[1]) and prints
 * "N passed, N failed[, N skipped]" as its last line. Exit status 0 iff nothing failed. */
#include "test.h"

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

const char *fm_test_bin(void) {
    const char *b = getenv("FLASHMOE_BIN");
    return b ? b : "build/flashmoe";
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
