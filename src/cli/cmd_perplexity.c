/* flashmoe perplexity: how well a model predicts a token sequence, and how far its distributions are
 * from a reference run's (KL divergence, top-1 agreement, top-5 overlap), as llama.cpp's
 * --kl-divergence reports. The reference logits come from `flashmoe logits` on a higher-precision
 * conversion of the same checkpoint. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "flashmoe.h"
#include "formats/npy.h"
#include "model/model.h"
#include "text/tokenizer.h"

static void help(void) {
    printf("usage: flashmoe perplexity -m MODEL (-f TEXT_FILE | --ids-file FILE) [--kl-base BASE.npy] [options]\n\n"
           "Evaluates a text (tokenized with MODEL/tokenizer.json) or the token ids in FILE (comma/space\n"
           "separated, or a JSON array) as one sequence and prints the perplexity of each next token.\n"
           "With --kl-base, also compares every position's distribution\n"
           "with BASE.npy (float32 [n_tokens, vocab] from `flashmoe logits` on a reference model):\n"
           "mean KL(base || model), top-1 agreement and top-5 overlap.\n\n"
           "options:\n"
           "  -m, --model DIR      packed model\n"
           "  -f, --file FILE      a UTF-8 text, tokenized with the model's tokenizer\n"
           "  --ids-file FILE      token ids instead of a text\n"
           "  --kl-base FILE       reference logits (.npy)\n"
           "  --json               one JSON object instead of text\n" FM_CLI_MODEL_HELP "\n"
           "example:\n"
           "  flashmoe logits -m m-f32 --ids \"$(cat ids.txt)\" --out base.npy\n"
           "  flashmoe perplexity -m m-q4 --ids-file ids.txt --kl-base base.npy\n"
           "  flashmoe perplexity -m m-q4 -f wiki.txt\n");
}


/* log-softmax of x [n] into out; returns nothing (out may alias x). */
static void log_softmax(const float *x, int64_t n, double *out) {
    double mx = -INFINITY, sum = 0;
    for (int64_t i = 0; i < n; i++) mx = fmax(mx, x[i]);
    for (int64_t i = 0; i < n; i++) sum += exp(x[i] - mx);
    double lse = mx + log(sum);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] - lse;
}

static void top_k(const float *x, int64_t n, int k, int64_t *idx) {
    for (int i = 0; i < k; i++) idx[i] = -1;
    for (int64_t j = 0; j < n; j++) {
        for (int i = 0; i < k; i++) {
            if (idx[i] < 0 || x[j] > x[idx[i]]) {
                for (int s = k - 1; s > i; s--) idx[s] = idx[s - 1];
                idx[i] = j;
                break;
            }
        }
    }
}

enum { OPT_IDS_FILE = 256, OPT_KL, OPT_JSON };

/* The ids of the UTF-8 text in `path`, tokenized with MODEL/tokenizer.json (no special tokens).
 * False after printing why. */
static bool text_ids(const char *model_dir, const char *path, int32_t **ids, int64_t *n) {
    char tok_path[4096];
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", model_dir);
    if (access(tok_path, R_OK) != 0) {
        fprintf(stderr, "flashmoe perplexity: %s has no tokenizer.json: give --ids-file (or convert from a checkpoint "
                        "directory that has one)\n", model_dir);
        return false;
    }
    size_t len = 0, nn = 0;
    char *text = fm_cli_read_file(path, &len);
    if (!text) {
        fprintf(stderr, "flashmoe perplexity: %s: cannot read\n", path);
        return false;
    }
    fm_tokenizer *tok = NULL;
    fm_status st = fm_tokenizer_load(tok_path, &tok);
    if (st == FM_OK) st = fm_tokenizer_encode(tok, text, len, false, ids, &nn);
    fm_tokenizer_free(tok);
    free(text);
    if (st != FM_OK) {
        fprintf(stderr, "flashmoe perplexity: %s: %s\n", path, fm_last_error());
        return false;
    }
    *n = (int64_t)nn;
    return true;
}

int fm_cli_perplexity(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},      {"ids-file", required_argument, 0, OPT_IDS_FILE},
                                         {"file", required_argument, 0, 'f'},
                                         {"kl-base", required_argument, 0, OPT_KL},  FM_CLI_MODEL_OPTIONS,
                                         {"json", no_argument, 0, OPT_JSON},
                                         {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    const char *model_dir = NULL, *ids_path = NULL, *kl_path = NULL, *text_path = NULL;
    int c;
    bool json = false;
    fm_model_params p = fm_model_default_params();
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:t:f:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("perplexity", c, optarg, &p);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (c) {
        case 'm': model_dir = optarg; break;
        case OPT_IDS_FILE: ids_path = optarg; break;
        case 'f': text_path = optarg; break;
        case OPT_KL: kl_path = optarg; break;
        case OPT_JSON: json = true; break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("perplexity", "bad option");
        }
    }
    if (!model_dir || !(ids_path || text_path))
        return fm_cli_usage_error("perplexity", "-m and one of -f TEXT_FILE / --ids-file FILE are required");
    if (ids_path && text_path) return fm_cli_usage_error("perplexity", "give either -f or --ids-file, not both");
    if (optind != argc) return fm_cli_usage_error("perplexity", "unexpected argument \"%s\"", argv[optind]);
    int32_t *ids = NULL;
    int64_t n = 0;
    if (text_path && !text_ids(model_dir, text_path, &ids, &n)) return FM_EXIT_FAIL;
    if (ids_path) {
        char *text = fm_cli_read_file(ids_path, NULL);
        if (!text) {
            fprintf(stderr, "flashmoe perplexity: %s: cannot read\n", ids_path);
            return FM_EXIT_FAIL;
        }
        for (char *q = text; *q; q++) /* accept a JSON array too */
            if (*q == '[' || *q == ']') *q = ' ';
        bool ok = fm_cli_parse_ids("perplexity", text, &ids, &n);
        free(text);
        if (!ok) return FM_EXIT_USAGE;
    }
    if (n < 2) {
        free(ids);
        fprintf(stderr, "flashmoe perplexity: need at least 2 tokens\n");
        return FM_EXIT_USAGE;
    }
    fm_model *m = NULL;
    fm_session *s = NULL;
    float *logits = NULL;
    double *lp = NULL, *lq = NULL;
    fm_npy base = {0};
    int rc = FM_EXIT_OK;
    if (fm_model_open(model_dir, &p, &m) != FM_OK) {
        rc = fm_cli_fail("perplexity");
        goto done;
    }
    if (p.n_experts_used && p.n_experts_used != m->cfg.n_experts_used)
        fprintf(stderr, "perplexity: using %d routed experts per token instead of the model's %d (lower quality)\n",
                p.n_experts_used, m->cfg.n_experts_used);
    int64_t V = fm_model_n_vocab(m);
    if (kl_path) {
        if (fm_npy_read(kl_path, &base) != FM_OK) {
            rc = fm_cli_fail("perplexity");
            goto done;
        }
        if (strcmp(base.descr, "<f4") != 0 || base.n_dims != 2 || base.shape[0] != n || base.shape[1] != V) {
            fprintf(stderr, "flashmoe perplexity: %s: expected float32 [%lld, %lld] logits for these ids\n", kl_path,
                    (long long)n, (long long)V);
            rc = FM_EXIT_FAIL;
            goto done;
        }
    }
    logits = malloc(sizeof(float) * (size_t)(n * V));
    lp = malloc(sizeof(double) * (size_t)V);
    lq = malloc(sizeof(double) * (size_t)V);
    if (!logits || !lp || !lq) {
        fprintf(stderr, "flashmoe perplexity: out of memory\n");
        rc = FM_EXIT_FAIL;
        goto done;
    }
    if (fm_session_init(m, n, &s) != FM_OK || fm_session_eval(s, ids, n, logits, true) != FM_OK) {
        rc = fm_cli_fail("perplexity");
        goto done;
    }
    double nll = 0, kl = 0, top1 = 0, top5 = 0;
    for (int64_t i = 0; i < n; i++) {
        log_softmax(logits + i * V, V, lq);
        if (i + 1 < n) nll -= lq[ids[i + 1]];
        if (!kl_path) continue;
        const float *b = (const float *)base.data + i * V;
        log_softmax(b, V, lp);
        double k = 0;
        for (int64_t j = 0; j < V; j++) k += exp(lp[j]) * (lp[j] - lq[j]);
        kl += k;
        int64_t tb[5], tm[5];
        int kk = V < 5 ? (int)V : 5;
        top_k(b, V, kk, tb);
        top_k(logits + i * V, V, kk, tm);
        top1 += tb[0] == tm[0];
        int common = 0;
        for (int a = 0; a < kk; a++)
            for (int q = 0; q < kk; q++) common += tb[a] == tm[q];
        top5 += (double)common / kk;
    }
    double ppl = exp(nll / (double)(n - 1));
    uint64_t token_bytes = 0;
    for (int l = 0; l < m->cfg.n_layers; l++) token_bytes += m->packed->experts[l].stride * (uint64_t)m->n_experts_used;
    if (json) {
        printf("{\"tokens\": %lld, \"perplexity\": %.6f, \"expert_bytes_per_token\": %llu", (long long)n, ppl,
               (unsigned long long)token_bytes);
        if (kl_path)
            printf(", \"kl_mean\": %.8f, \"top1_agreement\": %.6f, \"top5_overlap\": %.6f", kl / n, top1 / n, top5 / n);
        printf("}\n");
    } else {
        printf("tokens              %lld\n", (long long)n);
        printf("perplexity          %.4f\n", ppl);
        if (kl_path) {
            printf("KL(base || model)   %.6f (mean over positions)\n", kl / n);
            printf("top-1 agreement     %.2f%%\n", 100 * top1 / n);
            printf("top-5 overlap       %.2f%%\n", 100 * top5 / n);
        }
        printf("expert bytes/token  %llu\n", (unsigned long long)token_bytes);
    }
done:
    fm_session_free(s);
    fm_model_free(m);
    fm_npy_free(&base);
    free(logits);
    free(lp);
    free(lq);
    free(ids);
    return rc;
}
