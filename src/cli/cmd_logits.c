/* flashmoe logits: the logits of a token sequence, to a .npy file (batch, or prefill + decode). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "flashmoe.h"
#include "formats/npy.h"

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

enum { OPT_IDS = 256, OPT_OUT, OPT_INCR };

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
