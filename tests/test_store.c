/* The expert store under the model: every read engine and the RAM cache give bit-identical
 * results; prefill reads each expert once per chunk; faults stop with a message naming the layer
 * and the expert. Models are made with flashmoe synth's tiny preset. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"
#include "model/synth.h"
#include "store/expert_store.h"
#include "test.h"

#define N_TOK 24

static bool make_tiny(fm_test_ctx *t, const char *name, char *dir, size_t cap) {
    fm_test_tmpdir(name, dir, cap);
    strcat(dir, "/m");
    fm_synth_options o = {.preset = "tiny", .expert_dtype = FM_DTYPE_Q4, .dense_dtype = FM_DTYPE_Q8, .seed = 7};
    fm_status st = fm_synth_write(dir, &o);
    CHECK_MSG(st == FM_OK, "synth: %s", fm_last_error());
    return st == FM_OK;
}

static void ids_of(int32_t *ids, int n) {
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((i * 37 + 11) % 512);
}

/* Runs N_TOK tokens (a prefill of 8, then one at a time) and returns the logits of each step. */
static fm_status run_model(const char *dir, const fm_model_params *p, float *logits, fm_model **keep) {
    fm_model *m;
    fm_session *s;
    int32_t ids[N_TOK];
    ids_of(ids, N_TOK);
    fm_status st = fm_model_open(dir, p, &m);
    if (st != FM_OK) return st;
    int64_t V = fm_model_n_vocab(m);
    st = fm_session_init(m, N_TOK, &s);
    if (st == FM_OK) st = fm_session_eval(s, ids, 8, logits, true);
    for (int i = 8; i < N_TOK && st == FM_OK; i++) st = fm_session_eval(s, ids + i, 1, logits + i * V, true);
    fm_session_free(s);
    if (keep && st == FM_OK) *keep = m;
    else fm_model_free(m);
    return st;
}

FM_TEST(store_engines_and_cache_agree) {
    char dir[512];
    if (!make_tiny(t, "store_engines", dir, sizeof dir)) return;
    const int64_t V = 512;
    float *base = malloc(sizeof(float) * N_TOK * V), *got = malloc(sizeof(float) * N_TOK * V);
    REQUIRE(base && got);
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    CHECK_OK(run_model(dir, &p, base, NULL));
    static const struct {
        fm_io_engine e;
        uint64_t cache;
        bool prefetch;
        const char *name;
    } cases[] = {{FM_IO_PREAD, 1 << 20, false, "pread+cache"},   {FM_IO_DIRECT, 0, false, "direct"},
                 {FM_IO_DIRECT, 1 << 20, false, "direct+cache"}, {FM_IO_MMAP, 0, false, "mmap"},
                 {FM_IO_PREAD, 20 * 16384, false, "pread+small cache"}, {FM_IO_PREAD, 0, true, "pread+prefetch"}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        p.io_engine = cases[i].e;
        p.cache_bytes = cases[i].cache;
        p.prefetch = cases[i].prefetch;
        p.io_threads = 1 + (int)i % 3;
        fm_status st = run_model(dir, &p, got, NULL);
        if (st != FM_OK && cases[i].e == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) {
            fprintf(stderr, "  %s: skipped, the file system refuses O_DIRECT: %s\n", cases[i].name, fm_last_error());
            continue;
        }
        CHECK_MSG(st == FM_OK, "%s: %s", cases[i].name, fm_last_error());
        CHECK_MSG(st != FM_OK || memcmp(base, got, sizeof(float) * N_TOK * V) == 0, "%s: logits differ from pread",
                  cases[i].name);
    }
    free(base);
    free(got);
}

FM_TEST(store_cache_serves_repeats) {
    char dir[512];
    if (!make_tiny(t, "store_cache", dir, sizeof dir)) return;
    fm_model_params p = fm_model_default_params();
    p.cache_bytes = 64 << 20; /* holds every expert of the tiny model */
    fm_model *m = NULL;
    float *logits = malloc(sizeof(float) * N_TOK * 512);
    REQUIRE(logits);
    CHECK_OK(run_model(dir, &p, logits, &m));
    uint64_t bytes1 = 0, hits1 = 0;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        fm_store_layer_stats st = fm_store_layer_stats_get(m->store, l);
        bytes1 += st.bytes_read;
        hits1 += st.hits;
    }
    fm_session *s;
    int32_t ids[N_TOK];
    ids_of(ids, N_TOK);
    CHECK_OK(fm_session_init(m, N_TOK, &s));
    CHECK_OK(fm_session_eval(s, ids, N_TOK, logits, true)); /* the same tokens again: all cached */
    uint64_t bytes2 = 0, hits2 = 0;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        fm_store_layer_stats st = fm_store_layer_stats_get(m->store, l);
        bytes2 += st.bytes_read;
        hits2 += st.hits;
    }
    fprintf(stderr, "  first pass: %llu bytes read, %llu hits; second pass: +%llu bytes, +%llu hits\n",
            (unsigned long long)bytes1, (unsigned long long)hits1, (unsigned long long)(bytes2 - bytes1),
            (unsigned long long)(hits2 - hits1));
    CHECK(bytes1 > 0);
    CHECK_MSG(bytes2 == bytes1, "the second pass read %llu bytes: the cache missed", (unsigned long long)(bytes2 - bytes1));
    CHECK(hits2 > hits1);
    fm_session_free(s);
    fm_model_free(m);
    free(logits);
}

FM_TEST(store_prefill_reads_each_expert_once_per_chunk) {
    char dir[512];
    if (!make_tiny(t, "store_prefill", dir, sizeof dir)) return;
    fm_model_params p = fm_model_default_params();
    fm_model *m;
    fm_session *s;
    CHECK_OK(fm_model_open(dir, &p, &m));
    int32_t ids[128];
    for (int i = 0; i < 128; i++) ids[i] = (int32_t)((i * 131 + 5) % 512);
    CHECK_OK(fm_session_init(m, 128, &s));
    CHECK_OK(fm_session_eval(s, ids, 128, NULL, false)); /* one chunk: 128 tokens x top-4 = 512 routings */
    for (int l = 0; l < m->cfg.n_layers; l++) {
        fm_store_layer_stats st = fm_store_layer_stats_get(m->store, l);
        uint64_t reads = st.bytes_read / m->packed->experts[l].stride;
        CHECK_MSG(reads <= (uint64_t)m->cfg.n_experts && st.requested <= (uint64_t)m->cfg.n_experts,
                  "layer %d: %llu reads for %d experts (512 token routings)", l, (unsigned long long)reads, m->cfg.n_experts);
        CHECK_MSG(reads == st.requested, "layer %d: %llu reads for %llu experts requested", l, (unsigned long long)reads,
                  (unsigned long long)st.requested);
    }
    fm_session_free(s);
    fm_model_free(m);
}

FM_TEST(store_short_read_names_layer_and_expert) {
    char dir[512], path[600];
    if (!make_tiny(t, "store_short", dir, sizeof dir)) return;
    fm_model_params p = fm_model_default_params();
    fm_model *m;
    fm_session *s;
    CHECK_OK(fm_model_open(dir, &p, &m));
    snprintf(path, sizeof path, "%s/experts/L001.bin", dir);
    REQUIRE(truncate(path, 16384 * 3) == 0); /* after open: only experts 0..2 of layer 1 remain */
    int32_t ids[64];
    ids_of(ids, 64);
    CHECK_OK(fm_session_init(m, 64, &s));
    fm_status st = fm_session_eval(s, ids, 64, NULL, false);
    CHECK_MSG(st == FM_ERR_IO, "eval over a truncated expert file returned %d", st);
    CHECK_MSG(strstr(fm_last_error(), "short read of expert") && strstr(fm_last_error(), "of layer 1") &&
                  strstr(fm_last_error(), "L001.bin"),
              "message: %s", fm_last_error());
    fm_session_free(s);
    fm_model_free(m);
}

FM_TEST(store_injected_read_error_stops_the_eval) {
    char dir[512], cmd[1200], out[2048];
    if (!make_tiny(t, "store_eio", dir, sizeof dir)) return;
    snprintf(cmd, sizeof cmd, "FLASHMOE_FAIL_READ_AT=5 %s run -m '%s' --prompt-ids 1,2,3,4,5,6,7,8 -n 4", fm_test_bin(), dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 1 && strstr(out, "Input/output error") && strstr(out, "of layer") && strstr(out, "reading expert"),
              "rc %d: %s", rc, out);
}
