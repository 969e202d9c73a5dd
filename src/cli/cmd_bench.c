/* flashmoe bench: decode and prefill speed of a packed model, where each layer's time goes, and
 * the floors measured in the same run — the disk's bandwidth for expert-sized random reads and the
 * RAM's read bandwidth — so that time per layer can be read against what the hardware allows. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/cpu/membw.h"
#include "cli/cli.h"
#include "flashmoe.h"
#include "model/model.h"
#include "store/expert_store.h"
#include "util/progress.h"

static void help(void) {
    printf("usage: flashmoe bench -m MODEL [options]\n\n"
           "Measures prefill and decode speed, the time per layer split into dense compute (mixer), routing,\n"
           "shared expert, waiting for expert bytes and routed-expert compute, the bytes read and cache hits,\n"
           "and, in the same run, the floors: the disk's rate for expert-sized random reads (O_DIRECT) and the\n"
           "RAM's read rate. floor per layer = max(bytes read from disk / disk rate, bytes touched / RAM rate).\n\n"
           "options:\n"
           "  -m, --model DIR       packed model (e.g. from flashmoe synth)\n"
           "  --prompt N            prefill tokens (default 64)\n"
           "  --gen N               decode tokens (default 16)\n"
           "  --cold                drop the expert files from the page cache before decoding\n"
           "  --io-bench            measure the read engines alone (threads x engine), then stop\n"
           "  --json                one JSON object on stdout\n" FM_CLI_MODEL_HELP
           "\nexample:\n"
           "  flashmoe synth --preset qwen3.5-397b-a17b --layers 8 /data/slice\n"
           "  flashmoe bench -m /data/slice --gen 8 --mem-budget 16G --cold\n");
}

/* Bytes this process has made the storage layer fetch (/proc/self/io read_bytes). */
static uint64_t storage_read_bytes(void) {
    FILE *f = fopen("/proc/self/io", "r");
    if (!f) return 0;
    char line[256];
    uint64_t v = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "read_bytes:", 11)) v = strtoull(line + 11, NULL, 10);
    fclose(f);
    return v;
}

/* Peak resident set of this process (/proc/self/status VmHWM), bytes; 0 if unknown. */
static uint64_t peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    uint64_t kb = 0;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = strtoull(line + 6, NULL, 10);
    fclose(f);
    return kb * 1024;
}

static void drop_expert_pages(const fm_packed_model *pm) {
    for (int l = 0; l < pm->config.n_layers; l++) {
        int fd = open(pm->experts[l].file, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        fdatasync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

/* ---- disk floor: expert-sized random reads ---- */

typedef struct disk_job {
    const fm_packed_model *pm;
    int direct;
    int n_reads;
    int next; /* shared cursor */
    uint64_t seed;
    pthread_mutex_t mu;
    uint64_t bytes;
    int failed;
} disk_job;

static void *disk_reader(void *arg) {
    disk_job *j = arg;
    const fm_packed_model *pm = j->pm;
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, pm->max_expert_stride) != 0) return NULL;
    int *fds = calloc((size_t)pm->config.n_layers, sizeof(int));
    for (int l = 0; fds && l < pm->config.n_layers; l++)
        fds[l] = open(pm->experts[l].file, O_RDONLY | O_CLOEXEC | (j->direct ? O_DIRECT : 0));
    for (;;) {
        pthread_mutex_lock(&j->mu);
        int i = j->next++;
        pthread_mutex_unlock(&j->mu);
        if (i >= j->n_reads || !fds) break;
        uint64_t h = (j->seed + (uint64_t)i) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
        int l = (int)(h % (uint64_t)pm->config.n_layers);
        uint64_t e = (h >> 17) % (uint64_t)pm->config.n_experts, stride = pm->experts[l].stride;
        ssize_t r = fds[l] >= 0 ? pread(fds[l], buf, stride, (off_t)(e * stride)) : -1;
        pthread_mutex_lock(&j->mu);
        if (r == (ssize_t)stride) j->bytes += stride;
        else j->failed++;
        pthread_mutex_unlock(&j->mu);
    }
    for (int l = 0; fds && l < pm->config.n_layers; l++)
        if (fds[l] >= 0) close(fds[l]);
    free(fds);
    free(buf);
    return NULL;
}

/* GB/s of n_reads random expert reads on `threads` threads; page cache dropped first unless direct. */
static double disk_rate(const fm_packed_model *pm, int threads, int direct, int n_reads, uint64_t seed) {
    if (!direct) drop_expert_pages(pm);
    disk_job j = {.pm = pm, .direct = direct, .n_reads = n_reads, .seed = seed};
    pthread_mutex_init(&j.mu, NULL);
    pthread_t th[64];
    if (threads > 64) threads = 64;
    double t0 = fm_time_now();
    int started = 0;
    for (int i = 0; i < threads; i++)
        if (pthread_create(&th[i], NULL, disk_reader, &j) == 0) started++;
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    double dt = fm_time_now() - t0;
    pthread_mutex_destroy(&j.mu);
    if (j.failed || !j.bytes) return 0;
    return (double)j.bytes / dt / 1e9;
}

/* ---- the benchmark ---- */

enum { OPT_PROMPT = 256, OPT_GEN, OPT_COLD, OPT_IO_ONLY, OPT_JSON };

static int32_t argmax(const float *x, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return (int32_t)b;
}

int fm_cli_bench(int argc, char **argv) {
    static const struct option opts[] = {{"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, OPT_PROMPT},
                                         {"gen", required_argument, 0, OPT_GEN},    {"cold", no_argument, 0, OPT_COLD},
                                         {"io-bench", no_argument, 0, OPT_IO_ONLY}, {"json", no_argument, 0, OPT_JSON},
                                         FM_CLI_MODEL_OPTIONS,                      {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *model = NULL;
    int64_t n_prompt = 64, n_gen = 16;
    bool cold = false, json = false, io_only = false;
    fm_model_params p = fm_model_default_params();
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:t:h", opts, NULL)) != -1) {
        int mo = fm_cli_model_option("bench", c, optarg, &p);
        if (mo < 0) return FM_EXIT_USAGE;
        if (mo) continue;
        switch (c) {
        case 'm': model = optarg; break;
        case OPT_PROMPT:
            if (!fm_cli_parse_i64(optarg, 1, 1 << 20, &n_prompt)) return fm_cli_usage_error("bench", "--prompt needs a positive integer");
            break;
        case OPT_GEN:
            if (!fm_cli_parse_i64(optarg, 1, 1 << 20, &n_gen)) return fm_cli_usage_error("bench", "--gen needs a positive integer");
            break;
        case OPT_COLD: cold = true; break;
        case OPT_IO_ONLY: io_only = true; break;
        case OPT_JSON: json = true; break;
        case 'h': help(); return FM_EXIT_OK;
        default: return fm_cli_usage_error("bench", "bad option");
        }
    }
    if (!model) return fm_cli_usage_error("bench", "-m MODEL is required");
    if (optind != argc) return fm_cli_usage_error("bench", "unexpected argument \"%s\"", argv[optind]);
    fm_model *m = NULL;
    fm_session *s = NULL;
    float *logits = NULL;
    int32_t *ids = NULL;
    int rc = FM_EXIT_OK;
    if (fm_model_open(model, &p, &m) != FM_OK) return fm_cli_fail("bench");
    const fm_config *cf = &m->cfg;
    const fm_packed_model *pm = m->packed;
    int io_threads = p.io_threads ? p.io_threads : 4;
    int n_probe = (int)(2e9 / (double)pm->max_expert_stride); /* ~2 GB of reads, 16..512 of them */
    if (n_probe < 16) n_probe = 16;
    if (n_probe > 512) n_probe = 512;

    if (io_only) {
        printf("%-8s %8s %10s\n", "engine", "threads", "GB/s");
        for (int direct = 0; direct < 2; direct++)
            for (int th = 1; th <= 16; th *= 2) {
                double r = disk_rate(pm, th, direct, n_probe, 1000u + (unsigned)th * 7 + (unsigned)direct);
                printf("%-8s %8d %10.2f\n", direct ? "direct" : "pread", th, r);
            }
        goto done;
    }

    if (!json) fprintf(stderr, "bench: measuring the floors (disk: %d random expert reads; RAM: 1 GiB)...\n", n_probe);
    double disk_gbs = disk_rate(pm, io_threads, 1, n_probe, 12345);
    if (disk_gbs == 0) disk_gbs = disk_rate(pm, io_threads, 0, n_probe, 12345); /* no O_DIRECT here */

    int64_t V = cf->n_vocab;
    logits = malloc(sizeof(float) * (size_t)V);
    ids = malloc(sizeof(int32_t) * (size_t)n_prompt);
    if (!logits || !ids || fm_session_init(m, n_prompt + n_gen, &s) != FM_OK) {
        rc = logits && ids ? fm_cli_fail("bench") : FM_EXIT_FAIL;
        goto done;
    }
    for (int64_t i = 0; i < n_prompt; i++) ids[i] = (int32_t)((i * 2654435761u + 17) % (uint64_t)V);

    /* prefill */
    fm_store_reset_stats(m->store);
    double t0 = fm_time_now();
    if (fm_session_eval(s, ids, n_prompt, logits, false) != FM_OK) {
        rc = fm_cli_fail("bench");
        goto done;
    }
    double prefill_s = fm_time_now() - t0;
    uint64_t prefill_reads = 0, prefill_max_layer_reads = 0;
    for (int l = 0; l < cf->n_layers; l++) {
        uint64_t r = fm_store_layer_stats_get(m->store, l).requested;
        prefill_reads += r;
        if (r > prefill_max_layer_reads) prefill_max_layer_reads = r;
    }

    /* where the prefill's time went, summed over its layers (seconds) */
    double pf[5] = {0};
    for (int l = 0; l < cf->n_layers; l++) {
        const fm_layer_timing *lt = fm_session_layer_timing(s, l);
        pf[0] += lt->mixer, pf[1] += lt->route, pf[2] += lt->shared, pf[3] += lt->expert_wait, pf[4] += lt->expert_compute;
    }

    /* decode */
    if (cold) drop_expert_pages(pm);
    fm_store_reset_stats(m->store);
    fm_session_reset_timing(s);
    uint64_t disk0 = storage_read_bytes();
    int32_t next = argmax(logits, V);
    t0 = fm_time_now();
    for (int64_t i = 0; i < n_gen; i++) {
        if (fm_session_eval(s, &next, 1, logits, false) != FM_OK) {
            rc = fm_cli_fail("bench");
            goto done;
        }
        next = argmax(logits, V);
    }
    double decode_s = fm_time_now() - t0;
    uint64_t disk_bytes = storage_read_bytes() - disk0;
    uint64_t rss = peak_rss(); /* before the RAM probe's 1 GiB buffer */
    double ram_gbs = fm_ram_read_gbs(m->pool, (size_t)1 << 30, 3);

    /* where the time went, per layer and token */
    double mixer = 0, route = 0, shared = 0, wait = 0, compute = 0;
    uint64_t store_bytes = 0, requested = 0, hits = 0, guessed = 0, guessed_right = 0;
    for (int l = 0; l < cf->n_layers; l++) {
        const fm_layer_timing *lt = fm_session_layer_timing(s, l);
        mixer += lt->mixer;
        route += lt->route;
        shared += lt->shared;
        wait += lt->expert_wait;
        compute += lt->expert_compute;
        guessed += lt->guessed;
        guessed_right += lt->guessed_right;
        fm_store_layer_stats st = fm_store_layer_stats_get(m->store, l);
        store_bytes += st.bytes_read;
        requested += st.requested;
        hits += st.hits;
    }
    double per = 1e3 / (double)n_gen / cf->n_layers; /* seconds summed over tokens and layers -> ms per layer */
    double layer_ms = (mixer + route + shared + wait + compute) * per;
    uint64_t expert_bytes_token = 0, embed_bytes = 0;
    for (int l = 0; l < cf->n_layers; l++) expert_bytes_token += pm->experts[l].stride * (uint64_t)m->n_experts_used;
    const fm_packed_tensor *emb = fm_packed_find(pm, "embed_tokens"), *head = fm_packed_find(pm, "lm_head");
    if (emb) embed_bytes = emb->n_bytes;
    uint64_t layer_dense = m->dense_bytes - embed_bytes - (head ? head->n_bytes : 0);
    double touched_layer = (double)(layer_dense + expert_bytes_token) / cf->n_layers; /* bytes per layer per token */
    double missed_layer = (double)disk_bytes / (double)n_gen / cf->n_layers;
    double floor_ram_ms = touched_layer / (ram_gbs * 1e9) * 1e3, floor_disk_ms = missed_layer / (disk_gbs * 1e9) * 1e3;
    double floor_ms = floor_ram_ms > floor_disk_ms ? floor_ram_ms : floor_disk_ms;
    double hit_rate = requested ? (double)hits / (double)requested : 0;
    double decode_tok_s = (double)n_gen / decode_s, prefill_tok_s = (double)n_prompt / prefill_s;

    if (json) {
        printf("{\"model\": \"%s\", \"layers\": %d, \"io\": \"%s\", \"threads\": %d, \"prompt\": %lld, \"gen\": %lld, "
               "\"decode_tok_s\": %.4f, \"prefill_tok_s\": %.4f, \"layer_ms\": %.4f, \"floor_ms\": %.4f, "
               "\"floor_ratio\": %.4f, \"floor_disk_ms\": %.4f, \"floor_ram_ms\": %.4f, \"disk_gbs\": %.3f, "
               "\"ram_gbs\": %.3f, \"bytes_read\": %llu, \"disk_bytes\": %llu, \"hit_rate\": %.4f, "
               "\"mixer_ms\": %.4f, \"route_ms\": %.4f, \"shared_ms\": %.4f, \"wait_ms\": %.4f, \"expert_ms\": %.4f, "
               "\"head_ms\": %.4f, \"prefill_expert_reads\": %llu, \"prefill_max_layer_reads\": %llu, \"peak_rss\": %llu, "
               "\"mem_budget\": %llu, \"prefetch_accuracy\": %.4f, \"prefill_mixer_s\": %.4f, \"prefill_route_s\": %.4f, "
               "\"prefill_shared_s\": %.4f, \"prefill_wait_s\": %.4f, \"prefill_expert_s\": %.4f}\n",
               model, cf->n_layers, fm_io_engine_name(p.io_engine), fm_pool_size(m->pool), (long long)n_prompt,
               (long long)n_gen, decode_tok_s, prefill_tok_s, layer_ms, floor_ms, layer_ms / floor_ms, floor_disk_ms,
               floor_ram_ms, disk_gbs, ram_gbs, (unsigned long long)store_bytes, (unsigned long long)disk_bytes, hit_rate,
               mixer * per, route * per, shared * per, wait * per, compute * per,
               fm_session_head_seconds(s) * 1e3 / (double)n_gen, (unsigned long long)prefill_reads,
               (unsigned long long)prefill_max_layer_reads, (unsigned long long)rss,
               (unsigned long long)p.mem_budget, guessed ? (double)guessed_right / (double)guessed : 0.0, pf[0], pf[1], pf[2], pf[3], pf[4]);
    } else {
        char b1[32], b2[32], b3[32];
        printf("model        %s (%d layers, %d experts per token)\n", model, cf->n_layers, m->n_experts_used);
        printf("io           %s, %d reader threads, expert buffers+cache %s; %d compute threads\n", fm_io_engine_name(p.io_engine),
               io_threads, fm_human_bytes((double)fm_store_memory_bytes(m->store), b1, sizeof b1), fm_pool_size(m->pool));
        printf("floors       disk %.2f GB/s (random expert reads, O_DIRECT), RAM %.2f GB/s\n", disk_gbs, ram_gbs);
        printf("prefill      %lld tokens in %.2f s: %.2f tok/s; %llu expert reads over %d layers (at most %llu in one layer)\n",
               (long long)n_prompt, prefill_s, prefill_tok_s, (unsigned long long)prefill_reads, cf->n_layers,
               (unsigned long long)prefill_max_layer_reads);
        printf("prefill time %.2f s = mixer %.2f + route %.2f + shared %.2f + expert wait %.2f + expert compute %.2f"
               " (+ %.2f embedding and lm_head)\n", pf[0] + pf[1] + pf[2] + pf[3] + pf[4], pf[0], pf[1], pf[2], pf[3], pf[4],
               prefill_s - (pf[0] + pf[1] + pf[2] + pf[3] + pf[4]));
        printf("decode       %lld tokens in %.2f s: %.3f tok/s%s\n", (long long)n_gen, decode_s, decode_tok_s,
               cold ? " (expert pages dropped first)" : "");
        printf("per layer    %.2f ms = mixer %.2f + route %.2f + shared %.2f + expert wait %.2f + expert compute %.2f\n",
               layer_ms, mixer * per, route * per, shared * per, wait * per, compute * per);
        printf("lm_head      %.2f ms per token\n", fm_session_head_seconds(s) * 1e3 / (double)n_gen);
        printf("bytes        %s from expert files (%s from the disk), hit rate %.1f%%, %s touched per token\n",
               fm_human_bytes((double)store_bytes, b1, sizeof b1), fm_human_bytes((double)disk_bytes, b2, sizeof b2),
               100 * hit_rate, fm_human_bytes((double)(layer_dense + expert_bytes_token), b3, sizeof b3));
        printf("floor        %.2f ms per layer (disk %.2f, RAM %.2f): time / floor = %.2f\n", floor_ms, floor_disk_ms,
               floor_ram_ms, layer_ms / floor_ms);
        if (guessed)
            printf("prefetch     %.1f%% of the guessed next-layer experts were used\n",
                   100.0 * (double)guessed_right / (double)guessed);
        printf("memory       peak RSS %s%s%s (before the RAM probe)\n", fm_human_bytes((double)rss, b1, sizeof b1),
               p.mem_budget ? " within a budget of " : "", p.mem_budget ? fm_human_bytes((double)p.mem_budget, b2, sizeof b2) : "");
    }
done:
    fm_session_free(s);
    fm_model_free(m);
    free(logits);
    free(ids);
    return rc;
}
