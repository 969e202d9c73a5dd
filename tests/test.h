/* A small test harness. Each test file defines tests with FM_TEST(name) { ... }; they register
 * themselves at start-up and tests/main.c runs them (all, or those whose name contains argv[1])
 * and closes with the line "N passed, N failed" that CI recognises.
 *
 * Checks: CHECK(cond) / CHECK_MSG(cond, fmt, ...) record a failure and continue;
 * REQUIRE(cond) records it and leaves the test. CHECK_OK(status_expr) requires FM_OK and prints
 * fm_last_error() otherwise. SKIP(fmt, ...) ends the test as skipped with a reason. */
#ifndef FM_TEST_H
#define FM_TEST_H

#include <stdio.h>
#include <stdbool.h>

#include "flashmoe.h"

typedef struct fm_test_ctx {
    int failures;
    bool skipped;
} fm_test_ctx;

typedef void (*fm_test_fn)(fm_test_ctx *t);
void fm_test_register(const char *name, fm_test_fn fn);

#define FM_TEST(name)                                                                              \
    static void test_##name(fm_test_ctx *t);                                                       \
    __attribute__((constructor)) static void register_##name(void) {                               \
        fm_test_register(#name, test_##name);                                                      \
    }                                                                                              \
    static void test_##name(fm_test_ctx *t)

#define CHECK_MSG(cond, ...)                                                                       \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            t->failures++;                                                                         \
            fprintf(stderr, "  %s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);             \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)
#define CHECK(cond) CHECK_MSG(cond, "%s", "")
#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            t->failures++;                                                                         \
            fprintf(stderr, "  %s:%d: requirement failed: %s\n", __FILE__, __LINE__, #cond);       \
            return;                                                                                \
        }                                                                                          \
    } while (0)
#define CHECK_OK(expr)                                                                             \
    do {                                                                                           \
        fm_status st_ = (expr);                                                                    \
        if (st_ != FM_OK) {                                                                        \
            t->failures++;                                                                         \
            fprintf(stderr, "  %s:%d: %s -> %d: %s\n", __FILE__, __LINE__, #expr, (int)st_,       \
                    fm_last_error());                                                              \
            return;                                                                                \
        }                                                                                          \
    } while (0)
#define SKIP(...)                                                                                  \
    do {                                                                                           \
        t->skipped = true;                                                                         \
        fprintf(stderr, "  skipped: ");                                                            \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fputc('\n', stderr);                                                                       \
        return;                                                                                    \
    } while (0)

/* Runs a shell command line, captures its combined stdout+stderr into out (NUL-terminated,
 * truncated to cap) and returns its exit status (or -1 if it could not run / was killed). */
int fm_test_run_cmd(const char *cmdline, char *out, size_t cap);

/* A fresh empty directory under the test scratch root (FM_TEST_TMP, default build/test-tmp), path written to buf. */
const char *fm_test_tmpdir(const char *name, char *buf, size_t cap);

/* The whole file at `path`, NUL-terminated, malloc'd (caller frees); *n = its length (n may be
 * NULL). NULL if it cannot be read. */
char *fm_test_read_file(const char *path, size_t *n);

/* The JSON values of a .jsonl file, one per non-empty line, as a new array (NULL if the file is
 * absent or a line is not JSON — said on stderr). */
struct json_t;
struct json_t *fm_test_load_jsonl(const char *path);

/* Path of the flashmoe binary under test (set by tests/main.c from FLASHMOE_BIN or default). */
const char *fm_test_bin(void);

/* The tests' random numbers (xorshift64), for fresh inputs on every run: fm_test_rng_seed seeds
 * from the environment variable `env` when it is set (to repeat a run) and from the clock
 * otherwise, and returns the seed (print it with a failure). */
uint64_t fm_test_rng_seed(const char *env);
uint64_t fm_test_rand_u64(void);
double fm_test_rand(void); /* uniform in [-1, 1) */

#endif
