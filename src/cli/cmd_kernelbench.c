/* flashmoe kernelbench: the CPU matmul kernels' throughput on expert-sized matrices streamed from
 * RAM, next to this machine's RAM read bandwidth measured in the same run, at every SIMD level.
 *
 * RAM bandwidth: a buffer of --mib MiB (default 1024, >> any L3) written once, then read with the
 * widest loads of the best level (fm_cpu_read_sum) on all threads and on one; median of --repeats.
 *
 * Kernels: for each type and shape (default the 397B expert geometry, gate/up [1024, 4096] and down
 * [4096, 1024]; --shapes for others, e.g. the dense projections), a ring of distinct matrices
 * filling --mib MiB, each at a 4096-aligned offset like the expert blocks. Levels: the float
 * kernels (scalar, avx2, avx512: fm_cpu_matmul_at) and the int8-activation paths for quantized
 * types (vnni, amx, avx2i8, avxvnni: fm_cpu_matmul_int8). A measurement calls fm_cpu_matmul_at on
 * successive matrices of the ring (continuing where the last stopped) for at least --min-time
 * seconds; every matrix has been evicted from the caches by the ones after it. Reported: GB/s of
 * weight bytes, the ratio to the all-thread RAM bandwidth, GFLOP/s (2 rows cols tokens / time) and
 * microseconds per call; median of --repeats. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/membw.h"
#include "backend/cpu/ops.h"
#include "cli/cli.h"
#include "quant/quant.h"
#include "util/half.h"
#include "util/progress.h"

#define MAX_REPEATS 64

static void help(void) {
    printf("usage: flashmoe kernelbench [options]\n\n"
           "Measures the RAM read bandwidth and the CPU matmul kernels' throughput on expert-sized matrices\n"
           "(the 397B geometry: gate/up [1024, 4096], down [4096, 1024]) streamed from RAM, at each SIMD level\n"
           "and, for quantized types, each int8-activation path (vnni, amx, avx2i8, avxvnni; one token has no AMX row:\n"
           "the int8 path runs the one-token VNNI kernel there).\n\n"
           "options:\n"
           "  --threads N       compute threads (default: online CPUs)\n"
           "  --mib N           RAM buffer and matrix ring size in MiB (default 1024; keep it >> L3)\n"
           "  --repeats N       measurements per figure, the median is reported (default 5)\n"
           "  --min-time S      seconds per measurement, at least (default 0.25)\n"
           "  --levels LIST     comma-separated: scalar,avx2,avx512 (float kernels), vnni,amx,avx2i8,avxvnni\n"
           "                    (int8 paths, two activation levels; avx2i8: the AVX2-only one,\n"
           "                    FLASHMOE_CPU_INT8=avx2; avxvnni: the same with AVX-VNNI), vnni1,amx1,avx2i81,\n"
           "                    avxvnni1 (one level) (default: scalar,avx2,avx512,vnni,amx)\n"
           "  --types LIST      comma-separated: q4,q8,q2,bf16,f16,f32 (default q4,q8,q2,bf16)\n"
           "  --group N         quantized group size (default 64; scales BF16)\n"
           "  --tokens LIST     comma-separated token counts (default 1,32)\n"
           "  --shapes LIST     comma-separated ROWSxCOLS (default 1024x4096,4096x1024)\n"
           "  --json            one JSON object on stdout\n");
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t rng = 0x243F6A8885A308D3ull;
static uint64_t rnd_u64(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
static float rnd_unit(void) { return (float)((double)(rnd_u64() >> 11) / (double)(1ull << 53)); } /* [0, 1) */

/* ---- matrices ---- */

typedef struct ring {
    unsigned char *buf;
    size_t stride;  /* bytes between matrices, a multiple of 4096 */
    int64_t count;
    uint64_t bytes; /* bytes of one matrix */
} ring;

static bool ring_init(ring *rg, fm_dtype dt, int64_t rows, int64_t cols, int gs, size_t total) {
    memset(rg, 0, sizeof *rg);
    rg->bytes = fm_dtype_is_quant(dt) ? fm_quant_nbytes(dt, rows, cols, gs, FM_DTYPE_BF16)
                                      : (uint64_t)(rows * cols) * fm_dtype_size(dt);
    if (!rg->bytes) return false;
    rg->stride = ((size_t)rg->bytes + 4095) & ~(size_t)4095;
    rg->count = (int64_t)((total + rg->stride - 1) / rg->stride);
    if (rg->count < 2) rg->count = 2;
    rg->buf = aligned_alloc(4096, rg->stride * (size_t)rg->count);
    if (!rg->buf) return false;
    for (int64_t m = 0; m < rg->count; m++) {
        unsigned char *p = rg->buf + rg->stride * (size_t)m;
        if (fm_dtype_is_quant(dt)) {
            const int bits = fm_quant_bits(dt);
            const uint64_t qbytes = (uint64_t)(rows * cols * bits / 8), groups = (uint64_t)(rows * (cols / gs));
            for (uint64_t i = 0; i < qbytes; i += 8) {
                uint64_t v = rnd_u64();
                memcpy(p + i, &v, 8);
            }
            uint16_t *sb = (uint16_t *)(void *)(p + qbytes); /* 2-byte aligned: qbytes is even */
            for (uint64_t g = 0; g < groups; g++) {
                sb[g] = fm_f32_to_bf16((0.5f + rnd_unit()) * 0.02f / (float)((1 << bits) - 1));
                sb[groups + g] = fm_f32_to_bf16(-0.01f * (0.5f + rnd_unit()));
            }
        } else {
            for (int64_t i = 0; i < rows * cols; i++) {
                float v = (rnd_unit() - 0.5f) * 0.04f;
                if (dt == FM_DTYPE_F32) memcpy(p + 4 * i, &v, 4);
                else {
                    uint16_t h = dt == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                    memcpy(p + 2 * i, &h, 2);
                }
            }
        }
    }
    return true;
}

/* levels 0..2: fm_cpu_level (float kernels); 3, 4: the int8 paths vnni, amx with two activation
 * levels; 5, 6: the same with one; 7, 8: the AVX2 int8 path with two, one; 9, 10: its AVX-VNNI form */
#define N_LEVELS 11
static const char *const level_names[N_LEVELS] = {"scalar", "avx2",    "avx512",  "vnni",     "amx",     "vnni1",
                                                  "amx1",   "avx2i8",  "avx2i81", "avxvnni", "avxvnni1"};
static fm_cpu_int8 level_int8(int lv) {
    static const fm_cpu_int8 k[N_LEVELS] = {FM_CPU_INT8_OFF,  FM_CPU_INT8_OFF,  FM_CPU_INT8_OFF,    FM_CPU_INT8_VNNI,
                                            FM_CPU_INT8_AMX,  FM_CPU_INT8_VNNI, FM_CPU_INT8_AMX,    FM_CPU_INT8_AVX2,
                                            FM_CPU_INT8_AVX2, FM_CPU_INT8_AVXVNNI, FM_CPU_INT8_AVXVNNI};
    return k[lv];
}
/* activation levels of an int8 level */
static int level_acts(int lv) { return lv == 5 || lv == 6 || lv == 8 || lv == 10 ? 1 : 2; }
static bool level_supported(int lv) {
    return lv < 3 ? fm_cpu_level_supported((fm_cpu_level)lv) : fm_cpu_int8_supported(level_int8(lv));
}

typedef struct result {
    const char *type;
    int64_t rows, cols, tokens;
    int level;
    double gbs, gflops, us;
} result;

/* median throughput of `tokens`-token matmuls over the ring, from where *next points */
static result run_kernel(fm_pool *pool, int level, const ring *rg, fm_dtype dt, int gs, int64_t rows,
                         int64_t cols, int64_t tokens, const float *x, float *out, int repeats, double min_time,
                         int64_t *next) {
    double gbs[MAX_REPEATS], us[MAX_REPEATS];
    fm_weight w = {.dtype = dt, .rows = rows, .cols = cols, .group_size = gs, .scale_dtype = FM_DTYPE_BF16};
    for (int k = 0; k < repeats; k++) {
        int64_t calls = 0;
        double t0 = fm_time_now(), dt_s;
        do {
            w.data = rg->buf + rg->stride * (size_t)*next;
            *next = (*next + 1) % rg->count;
            if (level < 3) fm_cpu_matmul_at((fm_cpu_level)level, pool, out, x, tokens, &w);
            else fm_cpu_matmul_int8(level_int8(level), level_acts(level), pool, out, x, tokens, &w);
            calls++;
        } while ((dt_s = fm_time_now() - t0) < min_time);
        gbs[k] = (double)rg->bytes * (double)calls / dt_s / 1e9;
        us[k] = dt_s / (double)calls * 1e6;
    }
    result r = {.rows = rows, .cols = cols, .tokens = tokens, .level = level};
    r.gbs = median(gbs, repeats);
    r.us = median(us, repeats);
    r.gflops = 2.0 * (double)rows * (double)cols * (double)tokens / (r.us * 1e-6) / 1e9;
    return r;
}

/* ---- options ---- */

static bool parse_list(const char *s, const char *const *names, int n, bool *on) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (int i = 0; i < n; i++) on[i] = false;
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        int i = 0;
        while (i < n && strcmp(tok, names[i])) i++;
        if (i == n) return false;
        on[i] = true;
    }
    return true;
}

static const char *const type_names[] = {"q4", "q8", "q2", "bf16", "f16", "f32"};
static const fm_dtype type_dtypes[] = {FM_DTYPE_Q4, FM_DTYPE_Q8, FM_DTYPE_Q2, FM_DTYPE_BF16, FM_DTYPE_F16, FM_DTYPE_F32};
#define N_TYPES 6
#define MAX_SHAPES 8

static void cpu_model(char *buf, size_t cap) {
    snprintf(buf, cap, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) {
            char *c = strchr(line, ':');
            if (c) {
                c += 1 + (c[1] == ' ');
                c[strcspn(c, "\n")] = 0;
                snprintf(buf, cap, "%s", c);
            }
            break;
        }
    fclose(f);
}

int fm_cli_kernelbench(int argc, char **argv) {
    enum { OPT_THREADS = 256, OPT_MIB, OPT_REPEATS, OPT_MIN_TIME, OPT_LEVELS, OPT_TYPES, OPT_GROUP, OPT_TOKENS, OPT_SHAPES,
           OPT_JSON };
    static const struct option opts[] = {{"threads", required_argument, 0, OPT_THREADS},
                                         {"mib", required_argument, 0, OPT_MIB},
                                         {"repeats", required_argument, 0, OPT_REPEATS},
                                         {"min-time", required_argument, 0, OPT_MIN_TIME},
                                         {"levels", required_argument, 0, OPT_LEVELS},
                                         {"types", required_argument, 0, OPT_TYPES},
                                         {"group", required_argument, 0, OPT_GROUP},
                                         {"tokens", required_argument, 0, OPT_TOKENS},
                                         {"shapes", required_argument, 0, OPT_SHAPES},
                                         {"json", no_argument, 0, OPT_JSON},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int64_t threads = 0, mib = 1024, repeats = 5, group = 64, tokens[16] = {1, 32};
    int n_tokens = 2, n_shapes = 2;
    int64_t shapes[MAX_SHAPES][2] = {{1024, 4096}, {4096, 1024}};
    double min_time = 0.25;
    bool json = false, level_on[N_LEVELS] = {true, true, true, true, true, false, false, false, false, false, false}, type_on[N_TYPES] = {true, true, true, true, false, false};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_THREADS:
            if (!fm_cli_parse_i64(optarg, 1, 1024, &threads)) return fm_cli_usage_error("kernelbench", "bad --threads");
            break;
        case OPT_MIB:
            if (!fm_cli_parse_i64(optarg, 16, 1 << 20, &mib)) return fm_cli_usage_error("kernelbench", "bad --mib");
            break;
        case OPT_REPEATS:
            if (!fm_cli_parse_i64(optarg, 1, MAX_REPEATS, &repeats))
                return fm_cli_usage_error("kernelbench", "bad --repeats (1..%d)", MAX_REPEATS);
            break;
        case OPT_MIN_TIME: {
            char *end;
            min_time = strtod(optarg, &end);
            if (*end || !(min_time >= 0 && min_time <= 60)) return fm_cli_usage_error("kernelbench", "bad --min-time");
            break;
        }
        case OPT_LEVELS:
            if (!parse_list(optarg, level_names, N_LEVELS, level_on))
                return fm_cli_usage_error("kernelbench", "bad --levels");
            break;
        case OPT_TYPES:
            if (!parse_list(optarg, type_names, N_TYPES, type_on)) return fm_cli_usage_error("kernelbench", "bad --types");
            break;
        case OPT_GROUP:
            if (!fm_cli_parse_i64(optarg, 32, 128, &group) || (group != 32 && group != 64 && group != 128))
                return fm_cli_usage_error("kernelbench", "bad --group (32, 64 or 128)");
            break;
        case OPT_TOKENS: {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", optarg);
            n_tokens = 0;
            for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ","))
                if (n_tokens == 16 || !fm_cli_parse_i64(tok, 1, 4096, &tokens[n_tokens++]))
                    return fm_cli_usage_error("kernelbench", "bad --tokens");
            if (!n_tokens) return fm_cli_usage_error("kernelbench", "bad --tokens");
            break;
        }
        case OPT_SHAPES: {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", optarg);
            n_shapes = 0;
            for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
                char *xp = strchr(tok, 'x');
                if (n_shapes == MAX_SHAPES || !xp) return fm_cli_usage_error("kernelbench", "bad --shapes");
                *xp = 0;
                if (!fm_cli_parse_i64(tok, 1, 1 << 20, &shapes[n_shapes][0]) ||
                    !fm_cli_parse_i64(xp + 1, 128, 1 << 16, &shapes[n_shapes][1]) || shapes[n_shapes][1] % 128)
                    return fm_cli_usage_error("kernelbench", "bad --shapes (ROWSxCOLS, COLS a multiple of 128)");
                n_shapes++;
            }
            if (!n_shapes) return fm_cli_usage_error("kernelbench", "bad --shapes");
            break;
        }
        case OPT_JSON: json = true; break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("kernelbench", "bad option");
        }
    }
    if (optind != argc) return fm_cli_usage_error("kernelbench", "unexpected argument \"%s\"", argv[optind]);
    for (int l = 0; l < N_LEVELS; l++)
        if (level_on[l] && !level_supported(l)) {
            if (!json) fprintf(stderr, "kernelbench: this CPU lacks %s; skipped\n", level_names[l]);
            level_on[l] = false;
        }

    int rc = FM_EXIT_FAIL;
    const size_t total = (size_t)mib << 20;
    fm_pool *pool = fm_pool_init((int)threads);
    unsigned char *buf = NULL;
    float *x = NULL, *out = NULL;
    result *res = NULL;
    int n_res = 0;
    if (!pool) {
        fprintf(stderr, "flashmoe kernelbench: cannot start threads\n");
        goto done;
    }
    const int nth = fm_pool_size(pool);
    char cpu[256];
    cpu_model(cpu, sizeof cpu);

    /* RAM read bandwidth */
    const fm_cpu_level best = fm_cpu_level_best();
    buf = aligned_alloc(4096, total);
    if (!buf) {
        fprintf(stderr, "flashmoe kernelbench: cannot allocate %lld MiB\n", (long long)mib);
        goto done;
    }
    for (size_t i = 0; i < total; i += 8) {
        uint64_t v = i * 0x9E3779B97F4A7C15ull; /* real pages, not the shared zero page */
        memcpy(buf + i, &v, 8);
    }
    if (!json) fprintf(stderr, "kernelbench: RAM read bandwidth (%lld MiB, %s loads)...\n", (long long)mib, level_names[best]);
    const double ram_all = fm_ram_read_gbs_buf(pool, best, buf, total, (int)repeats);
    const double ram_one = fm_ram_read_gbs_buf(NULL, best, buf, total, (int)repeats);
    free(buf);
    buf = NULL;

    int64_t max_t = 1, max_dim = 1;
    for (int i = 0; i < n_tokens; i++)
        if (tokens[i] > max_t) max_t = tokens[i];
    for (int i = 0; i < n_shapes; i++)
        for (int k = 0; k < 2; k++)
            if (shapes[i][k] > max_dim) max_dim = shapes[i][k];
    x = malloc(sizeof(float) * (size_t)(max_t * max_dim));
    out = malloc(sizeof(float) * (size_t)(max_t * max_dim));
    res = calloc((size_t)(N_TYPES * n_shapes * N_LEVELS * n_tokens), sizeof *res);
    if (!x || !out || !res) {
        fprintf(stderr, "flashmoe kernelbench: out of memory\n");
        goto done;
    }
    for (int64_t i = 0; i < max_t * max_dim; i++) x[i] = rnd_unit() * 2 - 1;

    if (!json) {
        printf("cpu          %s, %d threads; matmul level %s (FLASHMOE_CPU / best), int8 path %s (FLASHMOE_CPU_INT8 / "
               "best; prefill of quantized weights)\n",
               cpu, nth, fm_cpu_level_name(fm_cpu_matmul_level()), fm_cpu_int8_name(fm_cpu_matmul_int8_mode()));
        printf("RAM read     %.2f GB/s on %d threads, %.2f GB/s on 1 (%lld MiB, %s loads, median of %lld)\n", ram_all,
               nth, ram_one, (long long)mib, level_names[best], (long long)repeats);
        printf("%-6s %-12s %-7s %6s %9s %8s %9s %10s\n", "type", "shape", "level", "tokens", "GB/s", "vs RAM",
               "GFLOP/s", "us/call");
    }
    for (int ti = 0; ti < N_TYPES; ti++) {
        if (!type_on[ti]) continue;
        const fm_dtype dt = type_dtypes[ti];
        for (int sh = 0; sh < n_shapes; sh++) {
            /* one ring for shapes of the same size (the default two share one) */
            ring rg;
            if (!ring_init(&rg, dt, shapes[sh][0], shapes[sh][1], (int)group, total)) {
                free(rg.buf);
                fprintf(stderr, "flashmoe kernelbench: cannot allocate the %s matrices\n", type_names[ti]);
                goto done;
            }
            int64_t next = 0;
            for (int s = sh; s < n_shapes; s++) {
                if (shapes[s][0] * shapes[s][1] != shapes[sh][0] * shapes[sh][1]) break;
                if (s > sh) sh = s;
                for (int lv = 0; lv < N_LEVELS; lv++) {
                    if (!level_on[lv] || (lv >= 3 && !fm_dtype_is_quant(dt))) continue;
                    for (int k = 0; k < n_tokens; k++) {
                        /* one token always takes the VNNI one-token kernel (ops.h): its row is vnni's */
                        if (tokens[k] == 1 && level_int8(lv) == FM_CPU_INT8_AMX) continue;
                        result r = run_kernel(pool, lv, &rg, dt, (int)group, shapes[s][0], shapes[s][1], tokens[k], x,
                                              out, (int)repeats, min_time, &next);
                        r.type = type_names[ti];
                        res[n_res++] = r;
                        if (!json) {
                            char shape[32];
                            snprintf(shape, sizeof shape, "%lldx%lld", (long long)r.rows, (long long)r.cols);
                            printf("%-6s %-12s %-7s %6lld %9.2f %7.0f%% %9.1f %10.1f\n", r.type, shape,
                                   level_names[lv], (long long)r.tokens, r.gbs, 100 * r.gbs / ram_all, r.gflops, r.us);
                            fflush(stdout);
                        }
                    }
                }
            }
            free(rg.buf);
        }
    }
    if (json) {
        printf("{\"cpu\": ");
        fm_cli_json_string(stdout, cpu);
        printf(", \"threads\": %d, \"mib\": %lld, \"repeats\": %lld, \"group_size\": %lld, "
               "\"matmul_level\": \"%s\", \"ram_gbs\": %.3f, \"ram_gbs_1thread\": %.3f, \"results\": [",
               nth, (long long)mib, (long long)repeats, (long long)group, fm_cpu_level_name(fm_cpu_matmul_level()),
               ram_all, ram_one);
        for (int i = 0; i < n_res; i++)
            printf("%s\n  {\"type\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"level\": \"%s\", \"tokens\": %lld, "
                   "\"gbs\": %.3f, \"ratio\": %.4f, \"gflops\": %.2f, \"us_per_call\": %.2f}",
                   i ? "," : "", res[i].type, (long long)res[i].rows, (long long)res[i].cols,
                   level_names[res[i].level], (long long)res[i].tokens, res[i].gbs, res[i].gbs / ram_all,
                   res[i].gflops, res[i].us);
        printf("]}\n");
    }
    rc = FM_EXIT_OK;
done:
    free(buf);
    free(x);
    free(out);
    free(res);
    fm_pool_free(pool);
    return rc;
}
