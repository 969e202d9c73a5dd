/* flashmoe convert HF_DIR OUT_DIR [--quant TYPE] [--expert-quant TYPE] [--dense-quant TYPE] [--force] */
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "model/convert.h"

static void help(void) {
    printf("usage: flashmoe convert HF_DIR OUT_DIR [options]\n\n"
           "Converts a Hugging Face checkpoint (config.json + *.safetensors: one file, shards with an index,\n"
           "or a directory of files) of a Qwen3.5-MoE or Qwen3-Next model into flashmoe's packed format:\n"
           "OUT_DIR/model.json, dense.bin (resident weights) and experts/L###.bin (one file per layer,\n"
           "each expert one contiguous 4 KiB-aligned block). See docs/FORMAT.md.\n\n"
           "options:\n"
           "  --quant TYPE          weight type for everything: source | f32 | bf16 | f16  (default source)\n"
           "  --expert-quant TYPE   weight type of the routed experts (overrides --quant)\n"
           "  --dense-quant TYPE    weight type of the dense weights (overrides --quant)\n"
           "                        norms, conv, A_log and dt_bias are always stored as f32\n"
           "  --force               replace OUT_DIR if it exists\n"
           "  --no-progress         no progress line on stderr\n"
           "  -h, --help            this text\n\n"
           "'source' keeps each tensor's dtype from the checkpoint (F32, BF16 or F16). The output is written\n"
           "to OUT_DIR.partial and renamed when complete, so an interrupted run never leaves a model behind.\n"
           "Quantized types (q8, q4, q2) come in a later version.\n\n"
           "example: flashmoe convert ~/hf/Qwen3.5-397B-A17B ~/models/q35-397b --quant bf16\n");
}

static bool parse_type(const char *s, fm_dtype *out) {
    if (!strcmp(s, "source")) *out = FM_DTYPE_UNKNOWN;
    else if (!strcmp(s, "f32")) *out = FM_DTYPE_F32;
    else if (!strcmp(s, "bf16")) *out = FM_DTYPE_BF16;
    else if (!strcmp(s, "f16")) *out = FM_DTYPE_F16;
    else return false;
    return true;
}

int fm_cli_convert(int argc, char **argv) {
    static const struct option opts[] = {
        {"quant", required_argument, 0, 'q'},  {"expert-quant", required_argument, 0, 'e'},
        {"dense-quant", required_argument, 0, 'd'}, {"force", no_argument, 0, 'f'},
        {"no-progress", no_argument, 0, 'P'},  {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    fm_dtype all = FM_DTYPE_UNKNOWN, ex = FM_DTYPE_COUNT, de = FM_DTYPE_COUNT;
    fm_convert_options o = {.progress = true};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        fm_dtype *dst = c == 'q' ? &all : c == 'e' ? &ex : &de;
        switch (c) {
        case 'q':
        case 'e':
        case 'd':
            if (!parse_type(optarg, dst))
                return fm_cli_usage_error("convert", "unknown weight type \"%s\" (source, f32, bf16, f16; "
                                                     "quantized types are not available yet)", optarg);
            break;
        case 'f': o.force = true; break;
        case 'P': o.progress = false; break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("convert", "bad option");
        }
    }
    if (argc - optind != 2) return fm_cli_usage_error("convert", "expected HF_DIR and OUT_DIR");
    o.dense_dtype = de != FM_DTYPE_COUNT ? de : all;
    o.expert_dtype = ex != FM_DTYPE_COUNT ? ex : all;
    if (fm_convert_hf(argv[optind], argv[optind + 1], &o) != FM_OK) return fm_cli_fail("convert");
    fprintf(stderr, "convert: wrote %s\n", argv[optind + 1]);
    return FM_EXIT_OK;
}
