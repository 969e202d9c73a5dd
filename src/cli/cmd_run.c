/* flashmoe run: generate from a prompt (text or token ids), streaming the text as it comes. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "flashmoe.h"
#include "model/model.h"
#include "store/expert_store.h"
#include "text/tokenizer.h"
#include "util/progress.h"

static void help(void) {
    printf("usage: flashmoe run -m MODEL (-p TEXT | --prompt-ids 1,2,3) [-n N] [options]\n\n"
           "Evaluates the prompt and generates up to N tokens, printing the text as it is generated (whole\n"
           "UTF-8 characters only). Stops at N tokens or at an end-of-sequence token.\n\n"
           "options:\n"
           "  -m, --model DIR       packed model directory (from flashmoe convert); its tokenizer.json is used\n"
           "  -p, --prompt TEXT     prompt text, tokenized as is (special tokens such as <|im_start|> included)\n"
           "  -f, --file FILE       read the prompt text from FILE\n"
           "  --prompt-ids LIST     comma-separated prompt token ids instead of text\n"
           "  -n, --n-predict N     most tokens to generate (default 128)\n"
           "  --temp T              sampling temperature; only 0 (greedy) is available in this version\n"
           "  --print-ids           print the generated ids (comma-separated) instead of text\n"
           "  --ignore-eos          do not stop at end-of-sequence tokens\n"
           "  --timing              print prefill/decode speed and where the time went, on stderr\n"
           "  -c, --ctx N           context size (default: prompt + n)\n" FM_CLI_MODEL_HELP
           "\nexamples:\n"
           "  flashmoe run -m ~/models/q35 -p 'The capital of France is' -n 16\n"
           "  flashmoe run -m out/tiny-qwen35 --prompt-ids 1,2,3 -n 8 --print-ids\n");
}

static int32_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

static char *read_text_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    size_t r;
    while (b && (r = fread(b + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) {
                free(b);
                b = NULL;
            }
            b = nb;
        }
    }
    fclose(f);
    *len = n;
    return b;
}

/* End-of-sequence ids: <|im_end|> and <|endoftext|> when the tokenizer has them. */
static int eos_ids(const fm_tokenizer *tok, int32_t *out) {
    int n = 0;
    static const char *names[] = {"<|im_end|>", "<|endoftext|>"};
    for (int i = 0; i < 2; i++) {
        int32_t id = tok ? fm_tokenizer_find(tok, names[i]) : -1;
        if (id >= 0) out[n++] = id;
    }
    return n;
}

enum { OPT_IDS = 256, OPT_PRINT_IDS, OPT_TIMING, OPT_TEMP, OPT_IGNORE_EOS };

int fm_cli_run(int argc, char **argv) {
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},         {"prompt", required_argument, 0, 'p'},
        {"file", required_argument, 0, 'f'},          {"prompt-ids", required_argument, 0, OPT_IDS},
        {"n-predict", required_argument, 0, 'n'},     {"ctx", required_argument, 0, 'c'},
        {"print-ids", no_argument, 0, OPT_PRINT_IDS}, {"timing", no_argument, 0, OPT_TIMING},
        {"temp", required_argument, 0, OPT_TEMP},     {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
        FM_CLI_MODEL_OPTIONS,                         {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    fm_model_params p = fm_model_default_params();
    const char *model = NULL, *ids_s = NULL, *text = NULL, *file = NULL;
    int64_t n_predict = 128, n_ctx = 0;
    bool timing = false, print_ids = false, ignore_eos = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:f:n:c:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("run", c, optarg, &p);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (c) {
        case 'm': model = optarg; break;
        case 'p': text = optarg; break;
        case 'f': file = optarg; break;
        case OPT_IDS: ids_s = optarg; break;
        case 'n':
            if (!fm_cli_parse_i64(optarg, 0, INT32_MAX, &n_predict)) return fm_cli_usage_error("run", "-n needs a non-negative integer");
            break;
        case 'c':
            if (!fm_cli_parse_i64(optarg, 1, INT32_MAX, &n_ctx)) return fm_cli_usage_error("run", "--ctx needs a positive integer");
            break;
        case OPT_PRINT_IDS: print_ids = true; break;
        case OPT_TIMING: timing = true; break;
        case OPT_IGNORE_EOS: ignore_eos = true; break;
        case OPT_TEMP:
            if (strtod(optarg, NULL) != 0.0 || strspn(optarg, "0.") != strlen(optarg))
                return fm_cli_usage_error("run", "only --temp 0 (greedy) is available in this version");
            break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("run", "bad option");
        }
    }
    if (!model) return fm_cli_usage_error("run", "-m MODEL is required");
    if (!!ids_s + !!text + !!file != 1) return fm_cli_usage_error("run", "give exactly one of -p TEXT, -f FILE, --prompt-ids");
    if (optind != argc) return fm_cli_usage_error("run", "unexpected argument \"%s\"", argv[optind]);

    int rc = FM_EXIT_OK;
    fm_model *m = NULL;
    fm_session *s = NULL;
    fm_tokenizer *tok = NULL;
    float *logits = NULL;
    int32_t *ids = NULL;
    int64_t n = 0;
    char path[4096], *file_text = NULL;
    struct stat sb;
    snprintf(path, sizeof path, "%s/tokenizer.json", model);
    bool have_tok = stat(path, &sb) == 0;
    if ((text || file) && !have_tok) {
        fprintf(stderr, "flashmoe run: %s has no tokenizer.json: give --prompt-ids (or convert from a checkpoint "
                        "directory that has one)\n", model);
        return FM_EXIT_FAIL;
    }
    if (have_tok && fm_tokenizer_load(path, &tok) != FM_OK) return fm_cli_fail("run");
    if (ids_s) {
        if (!fm_cli_parse_ids("run", ids_s, &ids, &n)) {
            fm_tokenizer_free(tok);
            return FM_EXIT_USAGE;
        }
    } else {
        size_t len = 0;
        if (file) {
            file_text = read_text_file(file, &len);
            if (!file_text) {
                fprintf(stderr, "flashmoe run: %s: cannot read\n", file);
                rc = FM_EXIT_FAIL;
                goto done;
            }
        }
        size_t nn;
        if (fm_tokenizer_encode(tok, file ? file_text : text, file ? len : strlen(text), true, &ids, &nn) != FM_OK) {
            rc = fm_cli_fail("run");
            goto done;
        }
        n = (int64_t)nn;
        if (n == 0) {
            fprintf(stderr, "flashmoe run: the prompt is empty\n");
            rc = FM_EXIT_USAGE;
            goto done;
        }
    }
    if (!n_ctx) n_ctx = n + n_predict;
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
    int32_t eos[2];
    int n_eos = ignore_eos ? 0 : eos_ids(tok, eos);
    fm_detok dt;
    if (tok) fm_detok_init(&dt, tok);
    char out[4096];
    double t0 = fm_time_now();
    if (fm_session_eval(s, ids, n, logits, false) != FM_OK) {
        rc = fm_cli_fail("run");
        goto done;
    }
    double t1 = fm_time_now();
    fm_session_reset_timing(s);
    int64_t generated = 0;
    for (int64_t i = 0; i < n_predict; i++) {
        int32_t next = argmax(logits, V);
        bool stop = false;
        for (int k = 0; k < n_eos; k++) stop |= next == eos[k];
        if (stop) break;
        generated++;
        if (print_ids || !tok) {
            printf("%s%d", i ? "," : "", next);
        } else {
            size_t w = fm_detok_push(&dt, next, out, sizeof out);
            fwrite(out, 1, w, stdout);
        }
        fflush(stdout);
        if (i + 1 < n_predict && fm_session_eval(s, &next, 1, logits, false) != FM_OK) {
            printf("\n");
            rc = fm_cli_fail("run");
            goto done;
        }
    }
    if (tok && !print_ids) fwrite(out, 1, fm_detok_flush(&dt, out, sizeof out), stdout);
    printf("\n");
    double t2 = fm_time_now();
    if (timing) {
        fprintf(stderr, "prefill: %lld tokens in %.3f s (%.2f tok/s)\n", (long long)n, t1 - t0, (double)n / (t1 - t0));
        if (generated > 1) {
            double mixer = 0, route = 0, shared = 0, wait = 0, comp = 0;
            uint64_t bytes = 0;
            for (int l = 0; l < m->cfg.n_layers; l++) {
                const fm_layer_timing *lt = fm_session_layer_timing(s, l);
                mixer += lt->mixer, route += lt->route, shared += lt->shared, wait += lt->expert_wait, comp += lt->expert_compute;
                bytes += fm_store_layer_stats_get(m->store, l).bytes_read;
            }
            double steps = (double)(generated - 1), dec = t2 - t1;
            fprintf(stderr, "decode:  %lld tokens in %.3f s (%.2f tok/s)\n", (long long)(generated - 1), dec, steps / dec);
            fprintf(stderr, "per token: mixer %.1f ms, routing %.1f, shared expert %.1f, expert I/O wait %.1f, "
                            "expert compute %.1f, lm_head %.1f; experts read %.1f MB in all\n",
                    mixer * 1e3 / steps, route * 1e3 / steps, shared * 1e3 / steps, wait * 1e3 / steps, comp * 1e3 / steps,
                    fm_session_head_seconds(s) * 1e3 / steps, (double)bytes / 1e6);
        }
    }
done:
    fm_session_free(s);
    fm_model_free(m);
    fm_tokenizer_free(tok);
    free(logits);
    free(ids);
    free(file_text);
    return rc;
}
