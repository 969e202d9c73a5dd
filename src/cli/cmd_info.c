/* flashmoe info -m MODEL: what a packed model is and what it costs. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "formats/packed.h"
#include "quant/quant.h"
#include "util/progress.h"

static void help(void) {
    printf("usage: flashmoe info -m MODEL [--json]\n\n"
           "Prints a packed model's architecture, shapes and sizes: dense bytes (resident), bytes per\n"
           "expert and per layer (streamed from disk), and the expert bytes one token touches.\n");
}

int fm_cli_info(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    const char *dir = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h", opts, NULL)) != -1) {
        if (c == 'm') dir = optarg;
        else if (c == 'h') {
            help();
            return FM_EXIT_OK;
        } else return fm_cli_usage_error("info", "bad option");
    }
    if (!dir) return fm_cli_usage_error("info", "missing -m MODEL");
    if (optind != argc) return fm_cli_usage_error("info", "unexpected argument \"%s\"", argv[optind]);
    fm_packed_model *pm;
    if (fm_packed_open(dir, &pm) != FM_OK) return fm_cli_fail("info");
    const fm_config *cf = &pm->config;
    int n_full = 0;
    for (int l = 0; l < cf->n_layers; l++) n_full += cf->layer_kind[l] == FM_LAYER_FULL;
    uint64_t dense = 0;
    for (size_t i = 0; i < pm->n_tensors; i++) dense += pm->tensors[i].n_bytes;
    uint64_t all_experts = 0, token_bytes = 0;
    for (int l = 0; l < cf->n_layers; l++) {
        all_experts += pm->experts[l].stride * (uint64_t)cf->n_experts;
        token_bytes += pm->experts[l].stride * (uint64_t)cf->n_experts_used;
    }
    printf("model          %s\n", dir);
    printf("architecture   %s\n", fm_arch_name(cf->arch));
    printf("layers         %d (%d Gated DeltaNet, %d gated attention)\n", cf->n_layers, cf->n_layers - n_full, n_full);
    printf("hidden         %lld, vocab %lld\n", (long long)cf->n_embd, (long long)cf->n_vocab);
    printf("attention      %d heads, %d kv heads, head dim %d, rotary dims %d, theta %g\n", cf->n_head, cf->n_head_kv,
           cf->head_dim, cf->rot_dim, cf->rope_theta);
    printf("deltanet       %d key heads x %d, %d value heads x %d, conv kernel %d\n", cf->lin_n_k_heads, cf->lin_k_dim,
           cf->lin_n_v_heads, cf->lin_v_dim, cf->conv_kernel);
    printf("moe            %d experts per layer, top-%d, intermediate %lld, shared expert %lld%s\n", cf->n_experts,
           cf->n_experts_used, (long long)cf->n_ff_expert, (long long)cf->n_ff_shared,
           cf->norm_topk_prob ? "" : ", top-k weights not renormalised");
    const fm_packed_tensor *g0 = &pm->experts[0].parts[FM_PART_GATE];
    if (fm_dtype_is_quant(g0->dtype))
        printf("expert dtype   %s, group %d, %s scales (layer 0)\n", fm_dtype_name(g0->dtype), g0->group_size,
               fm_dtype_name(g0->scale_dtype));
    else
        printf("expert dtype   %s (layer 0)\n", fm_dtype_name(g0->dtype));
    char h1[32], h2[32], h3[32];
    printf("dense          %s in %zu tensors (resident)\n", fm_human_bytes((double)dense, h1, sizeof h1), pm->n_tensors);
    printf("experts        %llu bytes per expert (layer 0), %s per layer, %s in all (streamed)\n",
           (unsigned long long)pm->experts[0].stride, fm_human_bytes((double)all_experts / cf->n_layers, h2, sizeof h2),
           fm_human_bytes((double)all_experts, h3, sizeof h3));
    printf("per token      %s of experts (%d layers x %d experts)\n", fm_human_bytes((double)token_bytes, h1, sizeof h1),
           cf->n_layers, cf->n_experts_used);
    fm_packed_close(pm);
    return FM_EXIT_OK;
}
