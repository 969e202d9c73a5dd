/* flashmoe synth --preset NAME [--layers N] [--quant q4] OUT: a random-weight model at a real geometry. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "model/synth.h"
#include "quant/quant.h"

static void help(void) {
    printf("usage: flashmoe synth --preset NAME [options] OUT_DIR\n\n"
           "Writes a packed model with random weights at a real model's exact geometry, so the per-layer\n"
           "work of a model far larger than this machine can be measured (flashmoe bench). The weights are\n"
           "noise: the output text is meaningless.\n\n"
           "presets: %s\n\n"
           "options:\n"
           "  --preset NAME         the geometry (required)\n"
           "  --layers N            only the first N layers (default: all)\n"
           "  --vocab N             vocabulary size (default: the preset's; to pair a tokenizer with a small preset)\n"
           "  --quant TYPE          routed experts: f32, bf16, f16, q8, q4 (default), q2\n"
           "  --dense-quant TYPE    everything else (default q8; router gates never below q8)\n"
           "  --seed N              random seed (default 1)\n"
           "  --force               replace OUT_DIR if it exists\n"
           "  --no-progress         no progress line\n\n"
           "example (about 29 GB: an 8-layer slice of Qwen3.5-397B-A17B at q4):\n"
           "  flashmoe synth --preset qwen3.5-397b-a17b --layers 8 --quant q4 /data/q35-397b-8l\n",
           fm_synth_preset_names());
}

static bool parse_type(const char *s, fm_dtype *t) {
    static const struct {
        const char *n;
        fm_dtype t;
    } map[] = {{"f32", FM_DTYPE_F32}, {"bf16", FM_DTYPE_BF16}, {"f16", FM_DTYPE_F16},
               {"q8", FM_DTYPE_Q8},   {"q4", FM_DTYPE_Q4},     {"q2", FM_DTYPE_Q2}};
    for (size_t i = 0; i < sizeof map / sizeof *map; i++)
        if (!strcmp(s, map[i].n)) {
            *t = map[i].t;
            return true;
        }
    return false;
}

enum { OPT_PRESET = 256, OPT_LAYERS, OPT_VOCAB, OPT_QUANT, OPT_DENSE, OPT_SEED, OPT_FORCE, OPT_NOPROG };

int fm_cli_synth(int argc, char **argv) {
    static const struct option opts[] = {
        {"preset", required_argument, 0, OPT_PRESET}, {"layers", required_argument, 0, OPT_LAYERS},
        {"vocab", required_argument, 0, OPT_VOCAB},
        {"quant", required_argument, 0, OPT_QUANT},   {"dense-quant", required_argument, 0, OPT_DENSE},
        {"seed", required_argument, 0, OPT_SEED},     {"force", no_argument, 0, OPT_FORCE},
        {"no-progress", no_argument, 0, OPT_NOPROG},  {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    fm_synth_options o = {.expert_dtype = FM_DTYPE_Q4, .dense_dtype = FM_DTYPE_Q8, .seed = 1, .progress = true};
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_PRESET: o.preset = optarg; break;
        case OPT_LAYERS:
            if (!fm_cli_parse_i64(optarg, 1, 1024, &v)) return fm_cli_usage_error("synth", "--layers needs a positive integer");
            o.n_layers = (int)v;
            break;
        case OPT_VOCAB:
            if (!fm_cli_parse_i64(optarg, 1, (int64_t)1 << 31, &v)) return fm_cli_usage_error("synth", "--vocab needs a positive integer");
            o.n_vocab = v;
            break;
        case OPT_QUANT:
            if (!parse_type(optarg, &o.expert_dtype)) return fm_cli_usage_error("synth", "unknown type \"%s\"", optarg);
            break;
        case OPT_DENSE:
            if (!parse_type(optarg, &o.dense_dtype)) return fm_cli_usage_error("synth", "unknown type \"%s\"", optarg);
            break;
        case OPT_SEED:
            if (!fm_cli_parse_i64(optarg, 1, INT64_MAX, &v)) return fm_cli_usage_error("synth", "--seed needs a positive integer");
            o.seed = (uint64_t)v;
            break;
        case OPT_FORCE: o.force = true; break;
        case OPT_NOPROG: o.progress = false; break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("synth", "bad option");
        }
    }
    if (!o.preset) return fm_cli_usage_error("synth", "--preset is required (%s)", fm_synth_preset_names());
    if (argc - optind != 1) return fm_cli_usage_error("synth", "expected one OUT_DIR");
    if (fm_synth_write(argv[optind], &o) != FM_OK) return fm_cli_fail("synth");
    fprintf(stderr, "synth: wrote %s\n", argv[optind]);
    return FM_EXIT_OK;
}
