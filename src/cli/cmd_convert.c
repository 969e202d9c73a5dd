/* flashmoe convert HF_DIR OUT_DIR [--quant TYPE] [--expert-quant TYPE] [--dense-quant TYPE] ... */
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "model/convert.h"

static void help(void) {
    printf("usage: flashmoe convert HF_DIR OUT_DIR [options]\n\n"
           "Converts a Hugging Face or MLX checkpoint (config.json + *.safetensors: one file, shards with an\n"
           "index, or a directory of files) of a Qwen3.5-MoE or Qwen3-Next model into flashmoe's packed format:\n"
           "OUT_DIR/model.json, dense.bin (resident weights) and experts/L###.bin (one file per layer, each\n"
           "expert one contiguous 4 KiB-aligned block). See docs/FORMAT.md and docs/QUANT.md.\n\n"
           "weight types: source | f32 | bf16 | f16 | q8 | q4 | q2\n"
           "  q8/q4/q2 are affine group quantization in the MLX layout (w = q*scale + bias per group);\n"
           "  'source' keeps each tensor as the checkpoint stores it.\n\n"
           "options:\n"
           "  --expert-quant TYPE      routed experts (default q4)\n"
           "  --dense-quant TYPE       everything else (default q8)\n"
           "  --quant TYPE             both of the above\n"
           "  --quant-override RE=TYPE tensors whose packed name matches the extended regex RE get TYPE;\n"
           "                           repeatable, the last match wins. Expert parts are named\n"
           "                           layers.L.experts.gate|up|down; e.g. --quant-override 'lm_head=bf16'\n"
           "  --group-size N           values per scale/bias pair: 32, 64 (default) or 128\n"
           "  --quant-method M         rtn (round to nearest, default) or mse (searches each group's clipping\n"
           "                           range for the least squared error; slower, never worse)\n"
           "  -t, --threads N          threads for quantization (default: all CPUs)\n"
           "  --force                  replace OUT_DIR if it exists\n"
           "  --no-progress            no progress line on stderr\n"
           "  -h, --help               this text\n\n"
           "Always: norms, conv, A_log and dt_bias stay f32; the router and the shared-expert gate are never\n"
           "stored below q8; a tensor whose columns are not a multiple of the group size stays bf16.\n"
           "Tensors already quantized in the checkpoint (MLX exports) are copied bit for bit unless a type\n"
           "option names them. The output is written to OUT_DIR.partial and renamed when complete.\n\n"
           "examples:\n"
           "  flashmoe convert ~/hf/Qwen3.5-397B-A17B ~/models/q35-397b                 # q4 experts, q8 dense\n"
           "  flashmoe convert ~/hf/Qwen3.5-35B-A3B ~/models/q35-35b --quant source     # full precision\n"
           "  flashmoe convert ~/hf/Qwen3.5-397B-A17B-4bit ~/models/q35-mlx             # MLX import, no requantizing\n");
}

static bool parse_type(const char *s, fm_dtype *out) {
    static const struct {
        const char *name;
        fm_dtype t;
    } types[] = {{"source", FM_DTYPE_UNKNOWN}, {"f32", FM_DTYPE_F32}, {"bf16", FM_DTYPE_BF16}, {"f16", FM_DTYPE_F16},
                 {"q8", FM_DTYPE_Q8},          {"q4", FM_DTYPE_Q4},   {"q2", FM_DTYPE_Q2}};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (!strcmp(s, types[i].name)) {
            *out = types[i].t;
            return true;
        }
    return false;
}

enum { OPT_QUANT = 256, OPT_EXPERT, OPT_DENSE, OPT_OVERRIDE, OPT_GROUP, OPT_METHOD, OPT_FORCE, OPT_NOPROG };

int fm_cli_convert(int argc, char **argv) {
    static const struct option opts[] = {
        {"quant", required_argument, 0, OPT_QUANT},       {"expert-quant", required_argument, 0, OPT_EXPERT},
        {"dense-quant", required_argument, 0, OPT_DENSE}, {"quant-override", required_argument, 0, OPT_OVERRIDE},
        {"group-size", required_argument, 0, OPT_GROUP},  {"quant-method", required_argument, 0, OPT_METHOD},
        {"threads", required_argument, 0, 't'},           {"force", no_argument, 0, OPT_FORCE},
        {"no-progress", no_argument, 0, OPT_NOPROG},      {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    fm_convert_options o = fm_convert_default_options();
    fm_dtype all = FM_DTYPE_COUNT, ex = FM_DTYPE_COUNT, de = FM_DTYPE_COUNT;
    int64_t v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "t:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_QUANT:
        case OPT_EXPERT:
        case OPT_DENSE: {
            fm_dtype *dst = c == OPT_QUANT ? &all : c == OPT_EXPERT ? &ex : &de;
            if (!parse_type(optarg, dst))
                return fm_cli_usage_error("convert", "unknown weight type \"%s\" (source, f32, bf16, f16, q8, q4, q2)", optarg);
            break;
        }
        case OPT_OVERRIDE: {
            char *eq = strrchr(optarg, '=');
            fm_dtype t;
            if (!eq || eq == optarg || !parse_type(eq + 1, &t) || t == FM_DTYPE_UNKNOWN)
                return fm_cli_usage_error("convert", "--quant-override needs REGEX=TYPE with TYPE f32, bf16, f16, q8, q4 or q2 (got \"%s\")",
                                          optarg);
            if (o.n_overrides == FM_CONVERT_MAX_OVERRIDES)
                return fm_cli_usage_error("convert", "at most %d --quant-override options", FM_CONVERT_MAX_OVERRIDES);
            *eq = 0;
            o.overrides[o.n_overrides].pattern = optarg;
            o.overrides[o.n_overrides].dtype = t;
            o.n_overrides++;
            break;
        }
        case OPT_GROUP:
            if (!fm_cli_parse_i64(optarg, 1, 1 << 20, &v) || (v != 32 && v != 64 && v != 128))
                return fm_cli_usage_error("convert", "--group-size must be 32, 64 or 128");
            o.group_size = (int)v;
            break;
        case OPT_METHOD:
            if (!strcmp(optarg, "rtn")) o.method = FM_QUANT_RTN;
            else if (!strcmp(optarg, "mse")) o.method = FM_QUANT_MSE;
            else return fm_cli_usage_error("convert", "--quant-method must be rtn or mse");
            break;
        case 't':
            if (!fm_cli_parse_i64(optarg, 1, 4096, &v)) return fm_cli_usage_error("convert", "--threads needs 1..4096");
            o.n_threads = (int)v;
            break;
        case OPT_FORCE: o.force = true; break;
        case OPT_NOPROG: o.progress = false; break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("convert", "bad option");
        }
    }
    if (argc - optind != 2) return fm_cli_usage_error("convert", "expected HF_DIR and OUT_DIR");
    if (all != FM_DTYPE_COUNT) o.dense_dtype = o.expert_dtype = all;
    if (de != FM_DTYPE_COUNT) o.dense_dtype = de;
    if (ex != FM_DTYPE_COUNT) o.expert_dtype = ex;
    o.keep_quantized = all == FM_DTYPE_COUNT && de == FM_DTYPE_COUNT && ex == FM_DTYPE_COUNT;
    if (fm_convert_hf(argv[optind], argv[optind + 1], &o) != FM_OK) return fm_cli_fail("convert");
    fprintf(stderr, "convert: wrote %s\n", argv[optind + 1]);
    return FM_EXIT_OK;
}
