/* flashmoe tokenize / detokenize: text <-> token ids with a model's tokenizer.json, plus a
 * benchmark of the tokenizer (tokenize --bench FILE). */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "util/progress.h"
#include "text/tokenizer.h"

int fm_cli_tokenize(int argc, char **argv);
int fm_cli_detokenize(int argc, char **argv);

static void tokenize_help(void) {
    printf("usage: flashmoe tokenize (--tokenizer FILE | -m MODEL_DIR) [--text TEXT] [--no-special]\n"
           "       flashmoe tokenize (--tokenizer FILE | -m MODEL_DIR) --bench TEXT_FILE\n\n"
           "Encodes UTF-8 text (--text, or all of standard input) with a Hugging Face tokenizer.json and\n"
           "prints the token ids as a JSON array, e.g. [9707, 11, 1879].\n\n"
           "  --tokenizer FILE   the tokenizer.json to use\n"
           "  -m, --model DIR    use DIR/tokenizer.json (a Hugging Face or packed model directory)\n"
           "  --text TEXT        the text to encode (default: read standard input to its end)\n"
           "  --no-special       treat added tokens such as <|im_start|> as plain text, as for a user's\n"
           "                     message (default: they become their single ids)\n"
           "  --bench FILE       time loading the tokenizer and encoding FILE; prints MB/s\n\n"
           "example:\n"
           "  flashmoe tokenize -m ~/models/Qwen3.5-35B-A3B --text 'Hello, world'\n"
           "  echo -n '<|im_start|>user' | flashmoe tokenize --tokenizer tokenizer.json --no-special\n");
}

static void detokenize_help(void) {
    printf("usage: flashmoe detokenize (--tokenizer FILE | -m MODEL_DIR) [--ids 1,2,3]\n\n"
           "Decodes token ids (--ids, or a JSON array such as [9707, 11, 1879] on standard input) and\n"
           "prints the text exactly, with no newline added. Bytes that do not form valid UTF-8 print as\n"
           "U+FFFD, as Hugging Face's decode does.\n\n"
           "  --tokenizer FILE   the tokenizer.json to use\n"
           "  -m, --model DIR    use DIR/tokenizer.json\n"
           "  --ids LIST         comma-separated token ids (default: read a JSON array from standard input)\n\n"
           "example:\n"
           "  flashmoe detokenize -m ~/models/Qwen3.5-35B-A3B --ids 9707,11,1879\n");
}



/* Resolves --tokenizer / -m into a path (buf holds MODEL_DIR/tokenizer.json). Returns an exit code
 * or -1 to go on. */
static int tokenizer_path(const char *cmd, const char *file, const char *dir, char *buf, size_t cap,
                          const char **path) {
    if (file && dir) return fm_cli_usage_error(cmd, "give either --tokenizer or -m, not both");
    if (!file && !dir) return fm_cli_usage_error(cmd, "missing --tokenizer FILE or -m MODEL_DIR");
    if (file) *path = file;
    else {
        snprintf(buf, cap, "%s/tokenizer.json", dir);
        *path = buf;
    }
    return -1;
}

static int run_bench(const char *path, const char *text_file) {
    FILE *f = fopen(text_file, "rb");
    if (!f) {
        fprintf(stderr, "flashmoe tokenize: cannot open %s\n", text_file);
        return FM_EXIT_FAIL;
    }
    size_t n;
    char *text = fm_cli_read_stream(f, &n);
    fclose(f);
    if (!text) {
        fprintf(stderr, "flashmoe tokenize: cannot read %s\n", text_file);
        return FM_EXIT_FAIL;
    }
    fm_tokenizer *tok = NULL;
    double load_first = 0, load_best = 1e9;
    for (int i = 0; i < 5; i++) {
        double t0 = fm_time_now();
        if (fm_tokenizer_load(path, &tok) != FM_OK) {
            free(text);
            return fm_cli_fail("tokenize");
        }
        double dt = fm_time_now() - t0;
        if (i == 0) load_first = dt;
        if (dt < load_best) load_best = dt;
        if (i < 4) fm_tokenizer_free(tok);
    }
    double best = 1e9, total = 0;
    size_t n_ids = 0;
    int reps = 0;
    while (reps < 3 || total < 2.0) {
        int32_t *ids;
        double t0 = fm_time_now();
        if (fm_tokenizer_encode(tok, text, n, true, &ids, &n_ids) != FM_OK) {
            free(text);
            fm_tokenizer_free(tok);
            return fm_cli_fail("tokenize");
        }
        double dt = fm_time_now() - t0;
        free(ids);
        total += dt;
        if (dt < best) best = dt;
        reps++;
    }
    /* the same text as separate lines, as short chat-sized inputs */
    double line_best = 1e9;
    size_t n_lines = 0;
    for (int r = 0; r < 3; r++) {
        double t0 = fm_time_now();
        n_lines = 0;
        for (size_t a = 0; a < n;) {
            const char *nl = memchr(text + a, '\n', n - a);
            size_t b = nl ? (size_t)(nl - text) + 1 : n;
            int32_t *ids;
            size_t k;
            if (fm_tokenizer_encode(tok, text + a, b - a, true, &ids, &k) != FM_OK) {
                free(text);
                fm_tokenizer_free(tok);
                return fm_cli_fail("tokenize");
            }
            free(ids);
            n_lines++;
            a = b;
        }
        double dt = fm_time_now() - t0;
        if (dt < line_best) line_best = dt;
    }
    printf("tokenizer  %s (%lld ids)\n", path, (long long)fm_tokenizer_n_vocab(tok));
    printf("load       %.1f ms first, %.1f ms best of 5\n", load_first * 1e3, load_best * 1e3);
    printf("encode     %zu bytes -> %zu tokens (%.2f bytes/token), %.1f MB/s, %.2f M tokens/s (best of %d)\n", n,
           n_ids, n_ids ? (double)n / (double)n_ids : 0.0, (double)n / best / 1e6, (double)n_ids / best / 1e6, reps);
    printf("by line    %zu calls of %.0f bytes on average, %.1f MB/s (best of 3)\n", n_lines,
           n_lines ? (double)n / (double)n_lines : 0.0, (double)n / line_best / 1e6);
    free(text);
    fm_tokenizer_free(tok);
    return FM_EXIT_OK;
}

int fm_cli_tokenize(int argc, char **argv) {
    enum { OPT_TOKENIZER = 256, OPT_TEXT, OPT_NO_SPECIAL, OPT_BENCH };
    static const struct option opts[] = {{"tokenizer", required_argument, 0, OPT_TOKENIZER},
                                         {"model", required_argument, 0, 'm'},
                                         {"text", required_argument, 0, OPT_TEXT},
                                         {"no-special", no_argument, 0, OPT_NO_SPECIAL},
                                         {"bench", required_argument, 0, OPT_BENCH},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *file = NULL, *dir = NULL, *text = NULL, *bench = NULL;
    bool allow_special = true;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_TOKENIZER: file = optarg; break;
        case 'm': dir = optarg; break;
        case OPT_TEXT: text = optarg; break;
        case OPT_NO_SPECIAL: allow_special = false; break;
        case OPT_BENCH: bench = optarg; break;
        case 'h': tokenize_help(); return FM_EXIT_OK;
        default:
            return fm_cli_usage_error("tokenize", "bad option \"%s\"", argv[optind - 1]);
        }
    }
    if (optind != argc) return fm_cli_usage_error("tokenize", "unexpected argument \"%s\"", argv[optind]);
    char buf[4096];
    const char *path = NULL;
    int rc = tokenizer_path("tokenize", file, dir, buf, sizeof buf, &path);
    if (rc >= 0) return rc;
    if (bench) {
        if (text) return fm_cli_usage_error("tokenize", "--bench reads its text from FILE; drop --text");
        return run_bench(path, bench);
    }

    char *owned = NULL;
    size_t n;
    if (text) n = strlen(text);
    else {
        owned = fm_cli_read_stream(stdin, &n);
        if (!owned) {
            fprintf(stderr, "flashmoe tokenize: cannot read standard input\n");
            return FM_EXIT_FAIL;
        }
        text = owned;
    }
    fm_tokenizer *tok;
    if (fm_tokenizer_load(path, &tok) != FM_OK) {
        free(owned);
        return fm_cli_fail("tokenize");
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    fm_status st = fm_tokenizer_encode(tok, text, n, allow_special, &ids, &n_ids);
    free(owned);
    fm_tokenizer_free(tok);
    if (st != FM_OK) return fm_cli_fail("tokenize");
    putchar('[');
    for (size_t i = 0; i < n_ids; i++) printf(i ? ", %d" : "%d", ids[i]);
    printf("]\n");
    free(ids);
    return fflush(stdout) == 0 ? FM_EXIT_OK : FM_EXIT_FAIL;
}

/* Parses a JSON array of ids from standard input. Returns an exit code or -1 to go on. */
static int ids_from_stdin(int32_t **ids, int64_t *n) {
    json_error_t err;
    json_t *arr = json_loadf(stdin, 0, &err);
    if (!arr) {
        fprintf(stderr, "flashmoe detokenize: standard input is not a JSON array of ids: %s (line %d)\n", err.text,
                err.line);
        return FM_EXIT_FAIL;
    }
    if (!json_is_array(arr)) {
        json_decref(arr);
        fprintf(stderr, "flashmoe detokenize: standard input is not a JSON array of ids\n");
        return FM_EXIT_FAIL;
    }
    size_t len = json_array_size(arr);
    int32_t *a = malloc((len ? len : 1) * sizeof *a);
    if (!a) {
        json_decref(arr);
        fprintf(stderr, "flashmoe detokenize: out of memory\n");
        return FM_EXIT_FAIL;
    }
    for (size_t i = 0; i < len; i++) {
        const json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX) {
            fprintf(stderr, "flashmoe detokenize: element %zu of the input array is not a token id\n", i);
            free(a);
            json_decref(arr);
            return FM_EXIT_FAIL;
        }
        a[i] = (int32_t)json_integer_value(v);
    }
    json_decref(arr);
    *ids = a;
    *n = (int64_t)len;
    return -1;
}

int fm_cli_detokenize(int argc, char **argv) {
    enum { OPT_TOKENIZER = 256, OPT_IDS };
    static const struct option opts[] = {{"tokenizer", required_argument, 0, OPT_TOKENIZER},
                                         {"model", required_argument, 0, 'm'},
                                         {"ids", required_argument, 0, OPT_IDS},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *file = NULL, *dir = NULL, *ids_arg = NULL;
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_TOKENIZER: file = optarg; break;
        case 'm': dir = optarg; break;
        case OPT_IDS: ids_arg = optarg; break;
        case 'h': detokenize_help(); return FM_EXIT_OK;
        default:
            return fm_cli_usage_error("detokenize", "bad option \"%s\"", argv[optind - 1]);
        }
    }
    if (optind != argc) return fm_cli_usage_error("detokenize", "unexpected argument \"%s\"", argv[optind]);
    char buf[4096];
    const char *path = NULL;
    int rc = tokenizer_path("detokenize", file, dir, buf, sizeof buf, &path);
    if (rc >= 0) return rc;
    int32_t *ids = NULL;
    int64_t n = 0;
    if (ids_arg) {
        if (!fm_cli_parse_ids("detokenize", ids_arg, &ids, &n)) return FM_EXIT_USAGE;
    } else if ((rc = ids_from_stdin(&ids, &n)) >= 0) return rc;
    fm_tokenizer *tok;
    if (fm_tokenizer_load(path, &tok) != FM_OK) {
        free(ids);
        return fm_cli_fail("detokenize");
    }
    int64_t nv = fm_tokenizer_n_vocab(tok);
    for (int64_t i = 0; i < n; i++)
        if (ids[i] >= nv || !fm_tokenizer_token_bytes(tok, ids[i], NULL)) {
            fprintf(stderr, "flashmoe detokenize: id %d is not a token of %s (n_vocab %lld)\n", ids[i], path,
                    (long long)nv);
            free(ids);
            fm_tokenizer_free(tok);
            return FM_EXIT_FAIL;
        }
    size_t longest = 0;
    for (int64_t i = 0; i < n; i++) {
        size_t len;
        fm_tokenizer_token_bytes(tok, ids[i], &len);
        if (len > longest) longest = len;
    }
    size_t cap = FM_DETOK_CAP(longest);
    char *out = malloc(cap);
    if (!out) {
        free(ids);
        fm_tokenizer_free(tok);
        fprintf(stderr, "flashmoe detokenize: out of memory\n");
        return FM_EXIT_FAIL;
    }
    fm_detok d;
    fm_detok_init(&d, tok);
    for (int64_t i = 0; i < n; i++) fwrite(out, 1, fm_detok_push(&d, ids[i], out, cap), stdout);
    fwrite(out, 1, fm_detok_flush(&d, out, cap), stdout);
    free(out);
    free(ids);
    fm_tokenizer_free(tok);
    return fflush(stdout) == 0 ? FM_EXIT_OK : FM_EXIT_FAIL;
}
