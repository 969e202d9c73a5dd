/* flashmoe logits (logits of a token sequence to .npy) and flashmoe run (greedy/token generation).
 * Both evaluate token ids directly; text prompts come with the tokenizer. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "flashmoe.h"
#include "formats/npy.h"
#include "util/progress.h"

static void logits_help(void) {
    printf("usage: flashmoe logits -m MODEL --ids 1,2,3 --out FILE.npy [options]\n\n"
           "Evaluates the token ids and writes float32 logits [n_tokens, vocab] in NumPy .npy format.\n\n"
           "options:\n"
           "  -m, --model DIR       packed model directory (from flashmoe convert)\n"
           "  --ids LIST            comma-separated token ids\n"
           "  --out FILE            output .npy file\n"
           "  --incremental N       evaluate the first N ids as one batch, then the rest one at a time\n"
           "                        (checks that batched prefill and decode agree); default: one batch\n"
           FM_CLI_MODEL_HELP);
}

static void run_help(void) {
    printf("usage: flashmoe run -m MODEL --prompt-ids 1,2,3 [-n N] [options]\n\n"
           "Evaluates the prompt and generates N tokens greedily (argmax).\n\n"
           "options:\n"
           "  -m, --model DIR       packed model directory (from flashmoe convert)\n"
           "  --prompt-ids LIST     comma-separated prompt token ids\n"
           "  -n, --n-predict N     tokens to generate (default 16)\n"
           "  --temp T              sampling temperature; only 0 (greedy) is available in this version\n"
           "  --print-ids           print the generated ids as a comma-separated line (default)\n"
           "  --timing              print prefill and decode speed to stderr\n"
           "  -c, --ctx N           context size (default: prompt + n)\n" FM_CLI_MODEL_HELP
           "\nexample: flashmoe run -m out/model --prompt-ids 1,2,3 -n 8 --print-ids\n");
}

enum { OPT_IDS = 256, OPT_OUT, OPT_INCR, OPT_PRINT_IDS, OPT_TIMING, OPT_TEMP };

int fm_cli_logits(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},   {"ids", required_argument, 0, OPT_IDS},
        {"out", required_argument, 0, OPT_OUT}, {"incremental", required_argument, 0, OPT_INCR},
        FM_CLI_MODEL_OPTIONS,                   {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    fm_model_params p = fm_model_default_params();
    const char *model = NULL;
    const char *ids_s = NULL, *out_path = NULL;
    int64_t incr = -1;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("logits", c, optarg, &p);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (c) {
        case 'm': model = optarg; break;
        case OPT_IDS: ids_s = optarg; break;
        case OPT_OUT: out_path = optarg; break;
        case OPT_INCR:
            if (!fm_cli_parse_i64(optarg, 1, INT32_MAX, &incr))
                return fm_cli_usage_error("logits", "--incremental needs a positive integer");
            break;
        case 'h': logits_help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("logits", "bad option");
        }
    }
    if (!model || !ids_s || !out_path) return fm_cli_usage_error("logits", "-m, --ids and --out are required");
    if (optind != argc) return fm_cli_usage_error("logits", "unexpected argument \"%s\"", argv[optind]);
    int32_t *ids;
    int64_t n;
    if (!fm_cli_parse_ids("logits", ids_s, &ids, &n)) return FM_EXIT_USAGE;
    if (incr > n) {
        free(ids);
        return fm_cli_usage_error("logits", "--incremental %lld is more than the %lld ids", (long long)incr, (long long)n);
    }
    fm_model *m = NULL;
    fm_session *s = NULL;
    float *logits = NULL;
    int rc = FM_EXIT_OK;
    if (fm_model_open(model, &p, &m) != FM_OK) {
        rc = fm_cli_fail("logits");
        goto done;
    }
    if (p.n_experts_used)
        fprintf(stderr, "logits: using %d routed experts per token instead of the model's own (lower quality)\n",
                p.n_experts_used);
    int64_t V = fm_model_n_vocab(m);
    logits = malloc(sizeof(float) * (size_t)(n * V));
    if (!logits) {
        fprintf(stderr, "flashmoe logits: out of memory for %lld x %lld logits\n", (long long)n, (long long)V);
        rc = FM_EXIT_FAIL;
        goto done;
    }
    if (fm_session_init(m, n, &s) != FM_OK) {
        rc = fm_cli_fail("logits");
        goto done;
    }
    int64_t first = incr > 0 ? incr : n;
    if (fm_session_eval(s, ids, first, logits, true) != FM_OK) {
        rc = fm_cli_fail("logits");
        goto done;
    }
    for (int64_t i = first; i < n; i++)
        if (fm_session_eval(s, ids + i, 1, logits + i * V, true) != FM_OK) {
            rc = fm_cli_fail("logits");
            goto done;
        }
    int64_t shape[2] = {n, V};
    if (fm_npy_write_f32(out_path, logits, 2, shape) != FM_OK) rc = fm_cli_fail("logits");
done:
    fm_session_free(s);
    fm_model_free(m);
    free(logits);
    free(ids);
    return rc;
}

static int32_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

int fm_cli_run(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},       {"prompt-ids", required_argument, 0, OPT_IDS},
        {"n-predict", required_argument, 0, 'n'},   {"ctx", required_argument, 0, 'c'},
        FM_CLI_MODEL_OPTIONS,
        {"print-ids", no_argument, 0, OPT_PRINT_IDS}, {"timing", no_argument, 0, OPT_TIMING},
        {"temp", required_argument, 0, OPT_TEMP},   {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    fm_model_params p = fm_model_default_params();
    const char *model = NULL, *ids_s = NULL;
    int64_t n_predict = 16, n_ctx = 0;
    bool timing = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:n:c:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("run", c, optarg, &p);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (c) {
        case 'm': model = optarg; break;
        case OPT_IDS: ids_s = optarg; break;
        case 'n':
            if (!fm_cli_parse_i64(optarg, 0, INT32_MAX, &n_predict)) return fm_cli_usage_error("run", "-n needs a non-negative integer");
            break;
        case 'c':
            if (!fm_cli_parse_i64(optarg, 1, INT32_MAX, &n_ctx)) return fm_cli_usage_error("run", "--ctx needs a positive integer");
            break;
        case OPT_PRINT_IDS: break;
        case OPT_TIMING: timing = true; break;
        case OPT_TEMP:
            if (strtod(optarg, NULL) != 0.0 || strspn(optarg, "0.") != strlen(optarg))
                return fm_cli_usage_error("run", "only --temp 0 (greedy) is available in this version");
            break;
        case 'h': run_help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("run", "bad option");
        }
    }
    if (!model || !ids_s) return fm_cli_usage_error("run", "-m and --prompt-ids are required (text prompts come with the tokenizer)");
    if (optind != argc) return fm_cli_usage_error("run", "unexpected argument \"%s\"", argv[optind]);
    int32_t *ids;
    int64_t n;
    if (!fm_cli_parse_ids("run", ids_s, &ids, &n)) return FM_EXIT_USAGE;
    if (!n_ctx) n_ctx = n + n_predict;
    fm_model *m = NULL;
    fm_session *s = NULL;
    float *logits = NULL;
    int rc = FM_EXIT_OK;
    if (fm_model_open(model, &p, &m) != FM_OK) {
        rc = fm_cli_fail("run");
        goto done;
    }
    if (p.n_experts_used)
        fprintf(stderr, "run: using %d routed experts per token instead of the model's own (lower quality)\n",
                p.n_experts_used);
    int64_t V = fm_model_n_vocab(m);
    logits = malloc(sizeof(float) * (size_t)V);
    if (!logits || fm_session_init(m, n_ctx, &s) != FM_OK) {
        rc = logits ? fm_cli_fail("run") : FM_EXIT_FAIL;
        goto done;
    }
    double t0 = fm_time_now();
    if (fm_session_eval(s, ids, n, logits, false) != FM_OK) {
        rc = fm_cli_fail("run");
        goto done;
    }
    double t1 = fm_time_now();
    for (int64_t i = 0; i < n_predict; i++) {
        int32_t next = argmax(logits, V);
        printf("%s%d", i ? "," : "", next);
        fflush(stdout);
        if (i + 1 < n_predict && fm_session_eval(s, &next, 1, logits, false) != FM_OK) {
            printf("\n");
            rc = fm_cli_fail("run");
            goto done;
        }
    }
    printf("\n");
    double t2 = fm_time_now();
    if (timing) {
        fprintf(stderr, "prefill: %lld tokens in %.3f s (%.1f tok/s)\n", (long long)n, t1 - t0, (double)n / (t1 - t0));
        if (n_predict > 1)
            fprintf(stderr, "decode:  %lld tokens in %.3f s (%.1f tok/s)\n", (long long)(n_predict - 1), t2 - t1,
                    (double)(n_predict - 1) / (t2 - t1));
    }
done:
    fm_session_free(s);
    fm_model_free(m);
    free(logits);
    free(ids);
    return rc;
}
