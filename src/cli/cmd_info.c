/* flashmoe info -m MODEL: what a packed model is and what it costs. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "formats/packed.h"
#include "quant/quant.h"
#include "util/progress.h"

enum { OPT_JSON = 256, OPT_TENSORS };

static void help(void) {
    printf("usage: flashmoe info -m MODEL [--json] [--tensors]\n\n"
           "Prints a packed model's architecture, shapes and sizes: dense bytes (resident), bytes per\n"
           "expert and per layer (streamed from disk), and the expert bytes one token touches.\n\n"
           "options:\n"
           "  -m, --model DIR   packed model (from flashmoe convert or flashmoe synth)\n"
           "  --tensors         also list every dense tensor and layer 0's expert parts: name, type,\n"
           "                    shape, bytes\n"
           "  --json            one JSON object on stdout instead (with --tensors: a \"tensors\" array)\n\n"
           "example:\n"
           "  flashmoe info -m /data/q397-8l --tensors\n");
}

/* What info prints, gathered once for both forms. */
typedef struct info_sums {
    int n_full;
    uint64_t dense, all_experts, token_bytes;
} info_sums;

static void shape_text(const fm_packed_tensor *t, char *buf, size_t n) {
    size_t at = 0;
    buf[0] = 0;
    for (int d = 0; d < t->n_dims && at < n; d++)
        at += (size_t)snprintf(buf + at, n - at, d ? " x %lld" : "%lld", (long long)t->shape[d]);
}

static void type_text(const fm_packed_tensor *t, char *buf, size_t n) {
    if (fm_dtype_is_quant(t->dtype))
        snprintf(buf, n, "%s g%d %s", fm_dtype_name(t->dtype), t->group_size, fm_dtype_name(t->scale_dtype));
    else snprintf(buf, n, "%s", fm_dtype_name(t->dtype));
}

static void print_tensors_text(const fm_packed_model *pm) {
    char shape[96], type[48], h[32];
    printf("\n%-48s %-16s %-20s %s\n", "tensor", "type", "shape", "bytes");
    for (size_t i = 0; i < pm->n_tensors; i++) {
        const fm_packed_tensor *t = &pm->tensors[i];
        shape_text(t, shape, sizeof shape), type_text(t, type, sizeof type);
        printf("%-48s %-16s %-20s %s\n", t->name, type, shape, fm_human_bytes((double)t->n_bytes, h, sizeof h));
    }
    static const char *const parts[FM_PART_COUNT] = {"gate", "up", "down"};
    for (int p = 0; p < FM_PART_COUNT; p++) {
        const fm_packed_tensor *t = &pm->experts[0].parts[p];
        char name[64];
        snprintf(name, sizeof name, "layer 0 expert %s (each expert)", parts[p]);
        shape_text(t, shape, sizeof shape), type_text(t, type, sizeof type);
        printf("%-48s %-16s %-20s %s\n", name, type, shape, fm_human_bytes((double)t->n_bytes, h, sizeof h));
    }
}

static void print_json(const char *dir, const fm_packed_model *pm, const info_sums *u, bool tensors) {
    const fm_config *cf = &pm->config;
    const fm_packed_tensor *g0 = &pm->experts[0].parts[FM_PART_GATE];
    printf("{\"model\": ");
    fm_cli_json_string(stdout, dir);
    printf(", \"architecture\": \"%s\", \"layers\": %d, \"deltanet_layers\": %d, \"attention_layers\": %d, "
           "\"hidden\": %lld, \"vocab\": %lld, \"heads\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"rot_dim\": %d, "
           "\"rope_theta\": %g, \"lin_k_heads\": %d, \"lin_k_dim\": %d, \"lin_v_heads\": %d, \"lin_v_dim\": %d, "
           "\"conv_kernel\": %d, \"experts\": %d, \"experts_used\": %d, \"ff_expert\": %lld, \"ff_shared\": %lld, "
           "\"norm_topk_prob\": %s, \"expert_dtype\": \"%s\", \"expert_group_size\": %d, \"expert_scale_dtype\": \"%s\", "
           "\"dense_bytes\": %llu, \"dense_tensors\": %zu, \"expert_bytes\": %llu, \"layer_expert_bytes\": %llu, "
           "\"all_expert_bytes\": %llu, \"token_expert_bytes\": %llu",
           fm_arch_name(cf->arch), cf->n_layers, cf->n_layers - u->n_full, u->n_full, (long long)cf->n_embd,
           (long long)cf->n_vocab, cf->n_head, cf->n_head_kv, cf->head_dim, cf->rot_dim, cf->rope_theta, cf->lin_n_k_heads,
           cf->lin_k_dim, cf->lin_n_v_heads, cf->lin_v_dim, cf->conv_kernel, cf->n_experts, cf->n_experts_used,
           (long long)cf->n_ff_expert, (long long)cf->n_ff_shared, cf->norm_topk_prob ? "true" : "false",
           fm_dtype_name(g0->dtype), g0->group_size,
           fm_dtype_is_quant(g0->dtype) ? fm_dtype_name(g0->scale_dtype) : "", (unsigned long long)u->dense,
           pm->n_tensors, (unsigned long long)pm->experts[0].stride,
           (unsigned long long)(u->all_experts / (uint64_t)cf->n_layers), (unsigned long long)u->all_experts,
           (unsigned long long)u->token_bytes);
    if (tensors) {
        printf(", \"tensors\": [");
        for (size_t i = 0; i < pm->n_tensors; i++) {
            const fm_packed_tensor *t = &pm->tensors[i];
            printf(i ? ", {\"name\": " : "{\"name\": ");
            fm_cli_json_string(stdout, t->name);
            printf(", \"dtype\": \"%s\", \"shape\": [", fm_dtype_name(t->dtype));
            for (int d = 0; d < t->n_dims; d++) printf(d ? ", %lld" : "%lld", (long long)t->shape[d]);
            printf("], \"bytes\": %llu}", (unsigned long long)t->n_bytes);
        }
        printf("]");
    }
    printf("}\n");
}

int fm_cli_info(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'},
                                         {"json", no_argument, 0, OPT_JSON},
                                         {"tensors", no_argument, 0, OPT_TENSORS},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *dir = NULL;
    bool json = false, tensors = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        if (c == 'm') dir = optarg;
        else if (c == OPT_JSON) json = true;
        else if (c == OPT_TENSORS) tensors = true;
        else if (c == 'h') {
            help();
            return FM_EXIT_OK;
        } else return fm_cli_usage_error("info", "bad option (see flashmoe info --help)");
    }
    if (!dir) return fm_cli_usage_error("info", "missing -m MODEL");
    if (optind != argc) return fm_cli_usage_error("info", "unexpected argument \"%s\"", argv[optind]);
    fm_packed_model *pm;
    if (fm_packed_open(dir, &pm) != FM_OK) return fm_cli_fail("info");
    const fm_config *cf = &pm->config;
    info_sums u = {0};
    for (int l = 0; l < cf->n_layers; l++) u.n_full += cf->layer_kind[l] == FM_LAYER_FULL;
    for (size_t i = 0; i < pm->n_tensors; i++) u.dense += pm->tensors[i].n_bytes;
    for (int l = 0; l < cf->n_layers; l++) {
        u.all_experts += pm->experts[l].stride * (uint64_t)cf->n_experts;
        u.token_bytes += pm->experts[l].stride * (uint64_t)cf->n_experts_used;
    }
    if (json) {
        print_json(dir, pm, &u, tensors);
        fm_packed_close(pm);
        return FM_EXIT_OK;
    }
    printf("model          %s\n", dir);
    printf("architecture   %s\n", fm_arch_name(cf->arch));
    printf("layers         %d (%d Gated DeltaNet, %d gated attention)\n", cf->n_layers, cf->n_layers - u.n_full, u.n_full);
    printf("hidden         %lld, vocab %lld\n", (long long)cf->n_embd, (long long)cf->n_vocab);
    printf("attention      %d heads, %d kv heads, head dim %d, rotary dims %d, theta %g\n", cf->n_head, cf->n_head_kv,
           cf->head_dim, cf->rot_dim, cf->rope_theta);
    printf("deltanet       %d key heads x %d, %d value heads x %d, conv kernel %d\n", cf->lin_n_k_heads, cf->lin_k_dim,
           cf->lin_n_v_heads, cf->lin_v_dim, cf->conv_kernel);
    printf("moe            %d experts per layer, top-%d, intermediate %lld, shared expert %lld%s\n", cf->n_experts,
           cf->n_experts_used, (long long)cf->n_ff_expert, (long long)cf->n_ff_shared,
           cf->norm_topk_prob ? "" : ", top-k weights not renormalised");
    const fm_packed_tensor *g0 = &pm->experts[0].parts[FM_PART_GATE];
    char type[48];
    type_text(g0, type, sizeof type);
    printf("expert dtype   %s (layer 0)\n", type);
    char h1[32], h2[32], h3[32];
    printf("dense          %s in %zu tensors (resident)\n", fm_human_bytes((double)u.dense, h1, sizeof h1), pm->n_tensors);
    printf("experts        %llu bytes per expert (layer 0), %s per layer, %s in all (streamed)\n",
           (unsigned long long)pm->experts[0].stride, fm_human_bytes((double)u.all_experts / cf->n_layers, h2, sizeof h2),
           fm_human_bytes((double)u.all_experts, h3, sizeof h3));
    printf("per token      %s of experts (%d layers x %d experts)\n", fm_human_bytes((double)u.token_bytes, h1, sizeof h1),
           cf->n_layers, cf->n_experts_used);
    if (tensors) print_tensors_text(pm);
    fm_packed_close(pm);
    return FM_EXIT_OK;
}
