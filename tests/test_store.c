/* The expert store under the model: every read engine (pread, direct, io_uring, mmap) and the RAM
 * cache give bit-identical results; prefill reads each expert once per chunk; faults stop with a
 * message naming the layer and the expert; io_uring falls back to pread where it is refused.
 * Models are made with flashmoe synth's tiny preset. */
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "formats/packed.h"
#include "model/model.h"
#include "model/synth.h"
#include "store/expert_store.h"
#include "test.h"
#include "util/progress.h"

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

/* Sets (or, with set false, unsets) the variables of "NAME=VALUE NAME=VALUE ..." (NULL: none). */
static void set_env_list(const char *list, bool set) {
    char buf[256];
    if (!list) return;
    snprintf(buf, sizeof buf, "%s", list);
    for (char *save = NULL, *kv = strtok_r(buf, " ", &save); kv; kv = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) continue;
        *eq = 0;
        if (set) setenv(kv, eq + 1, 1);
        else unsetenv(kv);
    }
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
        const char *env; /* io_uring variant: NAME=VALUE set for the run */
    } cases[] = {{FM_IO_PREAD, 0, false, "pread, every expert copied", "FLASHMOE_MAP_RESIDENT=0"},
                 {FM_IO_PREAD, 0, false, "pread, one expert at a time", "FLASHMOE_EXPERT_BATCH=0"},
                 {FM_IO_PREAD, 0, false, "pread, copied, one at a time", "FLASHMOE_MAP_RESIDENT=0 FLASHMOE_EXPERT_BATCH=0"},
                 {FM_IO_PREAD, 1 << 20, false, "pread+cache", NULL},
                 {FM_IO_DIRECT, 0, false, "direct", NULL},
                 {FM_IO_DIRECT, 1 << 20, false, "direct+cache", NULL},
                 {FM_IO_MMAP, 0, false, "mmap", NULL},
                 {FM_IO_PREAD, 20 * 16384, false, "pread+small cache", NULL},
                 {FM_IO_PREAD, 0, true, "pread+prefetch", NULL},
                 {FM_IO_URING, 0, false, "uring", NULL},
                 {FM_IO_URING, 1 << 20, false, "uring+cache", NULL},
                 {FM_IO_URING, 20 * 16384, false, "uring+small cache", NULL},
                 {FM_IO_URING, 0, true, "uring+prefetch", NULL},
                 {FM_IO_URING, 0, false, "uring, 4 KiB pieces", "FLASHMOE_URING_PIECE=4096"},
                 {FM_IO_URING, 1 << 20, false, "uring+cache, 8 KiB pieces", "FLASHMOE_URING_PIECE=8192"},
                 {FM_IO_URING, 0, false, "uring, 4 KiB pieces, 3 in flight", "FLASHMOE_URING_PIECE=4096 FLASHMOE_URING_DEPTH=3"},
                 {FM_IO_URING, 1 << 20, false, "uring+cache, 1 in flight", "FLASHMOE_URING_DEPTH=1"},
                 {FM_IO_URING, 0, false, "uring, all at once", "FLASHMOE_URING_PIECE=0 FLASHMOE_URING_DEPTH=0"},
                 {FM_IO_URING, 0, false, "uring buffered", "FLASHMOE_URING_BUFFERED=1"},
                 {FM_IO_URING, 20 * 16384, false, "uring buffered+small cache", "FLASHMOE_URING_BUFFERED=1"}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        p.io_engine = cases[i].e;
        p.cache_bytes = cases[i].cache;
        p.prefetch = cases[i].prefetch;
        p.io_threads = 1 + (int)i % 3;
        set_env_list(cases[i].env, true);
        fm_model *m = NULL;
        fm_status st = run_model(dir, &p, got, &m);
        set_env_list(cases[i].env, false);
        if (st != FM_OK && cases[i].e == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) {
            fprintf(stderr, "  %s: skipped, the file system refuses O_DIRECT: %s\n", cases[i].name, fm_last_error());
            continue;
        }
        CHECK_MSG(st == FM_OK, "%s: %s", cases[i].name, fm_last_error());
        if (st != FM_OK) continue;
        CHECK_MSG(memcmp(base, got, sizeof(float) * N_TOK * V) == 0, "%s: logits differ from pread", cases[i].name);
        if (cases[i].e == FM_IO_URING && fm_store_engine(m->store) != FM_IO_URING)
            fprintf(stderr, "  %s: io_uring refused here, ran on %s\n", cases[i].name, fm_io_engine_name(fm_store_engine(m->store)));
        fm_model_free(m);
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

/* With a RAM cache a request may hold as many experts as the cache has slots (up to a whole
 * layer): a prefill chunk asks for a layer's experts at once. Every block equals the file. */
FM_TEST(store_cache_request_holds_a_whole_layer) {
    char dir[512];
    if (!make_tiny(t, "store_cache_layer", dir, sizeof dir)) return;
    fm_packed_model *pm;
    CHECK_OK(fm_packed_open(dir, &pm));
    const int layer = 1, E = (int)pm->config.n_experts;
    uint64_t stride = pm->experts[layer].stride;
    size_t fsize = 0;
    uint8_t *file = (uint8_t *)fm_test_read_file(pm->experts[layer].file, &fsize);
    REQUIRE(file && E > 8 && E % 7 != 0);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)E);
    REQUIRE(ids);
    const fm_io_engine engines[] = {FM_IO_PREAD, FM_IO_DIRECT, FM_IO_URING};
    for (size_t e = 0; e < sizeof engines / sizeof *engines; e++)
        for (int half = 0; half < 2; half++) { /* slots for every expert (+2), or for half of them */
            int slots = half ? E / 2 : E + 2, want = slots < E ? slots : E;
            fm_store_options o = {.engine = engines[e], .io_threads = 3, .cache_bytes = (uint64_t)slots * stride};
            fm_expert_store *st;
            fm_status rc = fm_store_open(pm, 4, &o, &st);
            if (rc != FM_OK && engines[e] == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) continue;
            CHECK_OK(rc);
            const char *name = fm_io_engine_name(engines[e]);
            CHECK_MSG(fm_store_capacity(st) == want, "%s, %d slots: capacity %d, want %d", name, slots, fm_store_capacity(st), want);
            for (int i = 0; i < want; i++) ids[i] = (int32_t)((i * 7 + 3) % E); /* 7 is prime to E: distinct */
            CHECK_OK(fm_store_request(st, layer, ids, want));
            for (int i = want - 1; i >= 0; i--) { /* any order: no ring to stream through */
                const uint8_t *b;
                CHECK_OK(fm_store_wait(st, i, &b));
                CHECK_MSG(memcmp(b, file + (uint64_t)ids[i] * stride, stride) == 0, "%s, %d slots: expert %d differs", name,
                          slots, ids[i]);
            }
            fm_store_free(st);
        }
    free(ids);
    free(file);
    fm_packed_close(pm);
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
        /* fetched = read, or used in place from the page cache (the files were just written) */
        uint64_t fetched = st.bytes_read / m->packed->experts[l].stride + st.mapped;
        CHECK_MSG(fetched <= (uint64_t)m->cfg.n_experts && st.requested <= (uint64_t)m->cfg.n_experts,
                  "layer %d: %llu fetches for %d experts (512 token routings)", l, (unsigned long long)fetched,
                  m->cfg.n_experts);
        CHECK_MSG(fetched == st.requested, "layer %d: %llu fetches for %llu experts requested", l,
                  (unsigned long long)fetched, (unsigned long long)st.requested);
    }
    fm_session_free(s);
    fm_model_free(m);
}

FM_TEST(store_short_read_names_layer_and_expert) {
    static const struct {
        fm_io_engine e;
        uint64_t cache;
        const char *env;
    } cases[] = {{FM_IO_PREAD, 0, NULL},  {FM_IO_DIRECT, 0, NULL},
                 {FM_IO_URING, 0, NULL},  {FM_IO_URING, 1 << 20, NULL},
                 {FM_IO_URING, 0, "4096"}, {FM_IO_URING, 0, NULL}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char dir[512], path[600], name[64];
        snprintf(name, sizeof name, "store_short_%zu", c);
        if (!make_tiny(t, name, dir, sizeof dir)) return;
        fm_model_params p = fm_model_default_params();
        p.io_engine = cases[c].e;
        p.cache_bytes = cases[c].cache;
        bool buffered = c == 5; /* io_uring without O_DIRECT */
        if (cases[c].env) setenv("FLASHMOE_URING_PIECE", cases[c].env, 1);
        if (buffered) setenv("FLASHMOE_URING_BUFFERED", "1", 1);
        fm_model *m;
        fm_session *s;
        fm_status st = fm_model_open(dir, &p, &m);
        unsetenv("FLASHMOE_URING_PIECE");
        unsetenv("FLASHMOE_URING_BUFFERED");
        if (st != FM_OK && cases[c].e == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) continue;
        CHECK_OK(st);
        snprintf(path, sizeof path, "%s/experts/L001.bin", dir);
        REQUIRE(truncate(path, 16384 * 3) == 0); /* after open: only experts 0..2 of layer 1 remain */
        int32_t ids[64];
        ids_of(ids, 64);
        CHECK_OK(fm_session_init(m, 64, &s));
        st = fm_session_eval(s, ids, 64, NULL, false);
        CHECK_MSG(st == FM_ERR_IO, "%s: eval over a truncated expert file returned %d", fm_io_engine_name(cases[c].e), st);
        CHECK_MSG(strstr(fm_last_error(), "short read of expert") && strstr(fm_last_error(), "of layer 1") &&
                      strstr(fm_last_error(), "L001.bin"),
                  "%s: message: %s", fm_io_engine_name(cases[c].e), fm_last_error());
        fm_session_free(s);
        fm_model_free(m);
    }
}

/* The store alone: every engine hands out exactly the bytes of the file, whatever the order of the
 * waits (with a cache: in reverse; streaming: in order, as the contract says); a file ending in the
 * middle of an expert gives a short read that says how many bytes were there. */
FM_TEST(store_blocks_match_the_file) {
    char dir[512], path[600];
    if (!make_tiny(t, "store_blocks", dir, sizeof dir)) return;
    fm_packed_model *pm;
    CHECK_OK(fm_packed_open(dir, &pm));
    const int layer = 2, n = 12;
    uint64_t stride = pm->experts[layer].stride;
    size_t fsize = 0;
    uint8_t *file = (uint8_t *)fm_test_read_file(pm->experts[layer].file, &fsize);
    REQUIRE(file && fsize == stride * (uint64_t)pm->config.n_experts);
    int32_t ids[12];
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((i * 97 + 3) % pm->config.n_experts);
    static const struct {
        fm_io_engine e;
        uint64_t cache;
        const char *env;
        bool buffered;
    } cases[] = {{FM_IO_PREAD, 0, NULL, false},
                 {FM_IO_PREAD, 1 << 20, NULL, false},
                 {FM_IO_DIRECT, 1 << 20, NULL, false},
                 {FM_IO_MMAP, 0, NULL, false},
                 {FM_IO_URING, 0, NULL, false},
                 {FM_IO_URING, 1 << 20, NULL, false},
                 {FM_IO_URING, 1 << 20, "FLASHMOE_URING_PIECE=4096", false},
                 {FM_IO_URING, 1 << 20, "FLASHMOE_URING_PIECE=4096 FLASHMOE_URING_DEPTH=3", false},
                 {FM_IO_URING, 0, "FLASHMOE_URING_PIECE=8192 FLASHMOE_URING_DEPTH=1", false},
                 {FM_IO_URING, 1 << 20, "FLASHMOE_URING_PIECE=0 FLASHMOE_URING_DEPTH=0", false},
                 {FM_IO_URING, 0, "FLASHMOE_URING_PIECE=8192", true},
                 {FM_IO_URING, 1 << 20, NULL, true}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        set_env_list(cases[c].env, true);
        if (cases[c].buffered) setenv("FLASHMOE_URING_BUFFERED", "1", 1);
        fm_store_options o = {.engine = cases[c].e, .io_threads = 3, .cache_bytes = cases[c].cache};
        fm_expert_store *st;
        fm_status rc = fm_store_open(pm, 4, &o, &st);
        set_env_list(cases[c].env, false);
        unsetenv("FLASHMOE_URING_BUFFERED");
        if (rc != FM_OK && cases[c].e == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) continue;
        CHECK_OK(rc);
        const char *name = fm_io_engine_name(cases[c].e);
        if (cases[c].e == FM_IO_URING && !cases[c].buffered && fm_store_engine(st) == FM_IO_URING && !fm_store_direct(st))
            fprintf(stderr, "  uring: the file system refuses O_DIRECT here, buffered reads\n");
        int cap = fm_store_capacity(st), per = n < cap ? n : cap;
        void *mem; /* every block lies in the store's one buffer block (none for mmap) */
        uint64_t mem_bytes;
        fm_store_buffer_memory(st, &mem, &mem_bytes);
        CHECK_MSG(cases[c].e == FM_IO_MMAP ? !mem && !mem_bytes
                                           : mem && (uintptr_t)mem % 4096 == 0 && mem_bytes >= 4 * stride &&
                                                 mem_bytes == fm_store_memory_bytes(st),
                  "%s (case %zu): buffer memory %p, %llu bytes", name, c, mem, (unsigned long long)mem_bytes);
        for (int round = 0; round < 2; round++) /* the second round hits the cache where there is one */
            for (int g0 = 0; g0 < n; g0 += per) {
                int m = n - g0 < per ? n - g0 : per;
                CHECK_OK(fm_store_request(st, layer, ids + g0, m));
                bool reverse = cases[c].cache || cases[c].e == FM_IO_MMAP; /* not streaming: any order */
                for (int k = 0; k < m; k++) {
                    int i = reverse ? m - 1 - k : k;
                    const uint8_t *b;
                    CHECK_OK(fm_store_wait(st, i, &b));
                    CHECK_MSG(memcmp(b, file + (uint64_t)ids[g0 + i] * stride, stride) == 0,
                              "%s (case %zu): expert %d differs from the file", name, c, ids[g0 + i]);
                    if (mem)
                        CHECK_MSG(b >= (const uint8_t *)mem && b + stride <= (const uint8_t *)mem + mem_bytes,
                                  "%s (case %zu): a block outside the buffer memory", name, c);
                }
            }
        fm_store_layer_stats ls = fm_store_layer_stats_get(st, layer);
        CHECK_MSG(ls.requested == 2 * (uint64_t)n && ls.bytes_read + ls.hits * stride == (cases[c].e == FM_IO_MMAP ? 0 : 2 * n * stride),
                  "%s (case %zu): %llu requested, %llu bytes read, %llu hits", name, c, (unsigned long long)ls.requested,
                  (unsigned long long)ls.bytes_read, (unsigned long long)ls.hits);
        fm_store_free(st);
    }
    /* a file that ends 1000 bytes into expert 3 (not on a page: O_DIRECT reads stop there) */
    snprintf(path, sizeof path, "%s", pm->experts[layer].file);
    REQUIRE(truncate(path, (off_t)(stride * 3 + 1000)) == 0);
    static const struct {
        fm_io_engine e;
        const char *piece;
        bool buffered;
    } shorts[] = {{FM_IO_PREAD, NULL, false},  {FM_IO_DIRECT, NULL, false}, {FM_IO_URING, NULL, false},
                  {FM_IO_URING, "4096", false}, {FM_IO_URING, "0", false},   {FM_IO_URING, NULL, true}};
    for (size_t c = 0; c < sizeof shorts / sizeof *shorts; c++) {
        if (shorts[c].piece) setenv("FLASHMOE_URING_PIECE", shorts[c].piece, 1);
        if (shorts[c].piece) setenv("FLASHMOE_URING_DEPTH", "2", 1); /* fewer in flight than the request */
        if (shorts[c].buffered) setenv("FLASHMOE_URING_BUFFERED", "1", 1);
        fm_store_options o = {.engine = shorts[c].e, .io_threads = 2, .cache_bytes = 1 << 20};
        fm_expert_store *st;
        fm_status rc = fm_store_open(pm, 4, &o, &st);
        unsetenv("FLASHMOE_URING_PIECE");
        unsetenv("FLASHMOE_URING_DEPTH");
        unsetenv("FLASHMOE_URING_BUFFERED");
        if (rc != FM_OK && shorts[c].e == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) continue;
        CHECK_OK(rc);
        const char *name = fm_io_engine_name(shorts[c].e);
        int32_t want[3] = {1, 3, 5};
        CHECK_OK(fm_store_request(st, layer, want, 3));
        const uint8_t *b;
        CHECK_MSG(fm_store_wait(st, 2, &b) == FM_ERR_IO && strstr(fm_last_error(), "short read of expert 5 of layer 2") &&
                      strstr(fm_last_error(), "(0 of"),
                  "%s (case %zu): expert 5: %s", name, c, fm_last_error());
        CHECK_MSG(fm_store_wait(st, 1, &b) == FM_ERR_IO && strstr(fm_last_error(), "short read of expert 3 of layer 2") &&
                      strstr(fm_last_error(), "(1000 of 16384 bytes"),
                  "%s (case %zu): expert 3: %s", name, c, fm_last_error());
        CHECK_OK(fm_store_wait(st, 0, &b));
        CHECK_MSG(memcmp(b, file + stride, stride) == 0, "%s (case %zu): expert 1 differs from the file", name, c);
        /* failed reads are not cached: asking again fails again, the good one is a hit */
        CHECK_OK(fm_store_request(st, layer, want, 3));
        CHECK(fm_store_wait(st, 1, &b) == FM_ERR_IO);
        CHECK_OK(fm_store_wait(st, 0, &b));
        CHECK(fm_store_layer_stats_get(st, layer).hits == 1);
        fm_store_free(st);
    }
    free(file);
    fm_packed_close(pm);
}

FM_TEST(store_injected_read_error_stops_the_eval) {
    char dir[512], cmd[1200], out[2048];
    if (!make_tiny(t, "store_eio", dir, sizeof dir)) return;
    static const char *engines[] = {"pread", "direct", "uring"};
    for (size_t e = 0; e < sizeof engines / sizeof *engines; e++) {
        snprintf(cmd, sizeof cmd, "FLASHMOE_FAIL_READ_AT=5 %s run -m '%s' --io %s --prompt-ids 1,2,3,4,5,6,7,8 -n 4",
                 fm_test_bin(), dir, engines[e]);
        int rc = fm_test_run_cmd(cmd, out, sizeof out);
        CHECK_MSG(rc == 1 && strstr(out, "Input/output error") && strstr(out, "of layer") && strstr(out, "reading expert"),
                  "%s: rc %d: %s", engines[e], rc, out);
    }
}

/* Where io_uring is refused (here: FLASHMOE_URING_DISABLE=1 makes the probe fail), the store reads
 * with pread, says so once on stderr, and gives the same results. */
FM_TEST(store_uring_falls_back_to_pread) {
    char dir[512], cmd[1200], out[4096], base_out[4096];
    if (!make_tiny(t, "store_uring_fallback", dir, sizeof dir)) return;
    const int64_t V = 512;
    float *base = malloc(sizeof(float) * N_TOK * V), *got = malloc(sizeof(float) * N_TOK * V);
    REQUIRE(base && got);
    fm_model_params p = fm_model_default_params();
    CHECK_OK(run_model(dir, &p, base, NULL));
    p.io_engine = FM_IO_URING;
    setenv("FLASHMOE_URING_DISABLE", "1", 1);
    fm_model *m = NULL;
    fm_status st = run_model(dir, &p, got, &m);
    unsetenv("FLASHMOE_URING_DISABLE");
    CHECK_MSG(st == FM_OK, "%s", fm_last_error());
    if (st == FM_OK) {
        CHECK_MSG(fm_store_engine(m->store) == FM_IO_PREAD, "engine %s", fm_io_engine_name(fm_store_engine(m->store)));
        CHECK(memcmp(base, got, sizeof(float) * N_TOK * V) == 0);
        fm_model_free(m);
    }
    snprintf(cmd, sizeof cmd, "%s run -m '%s' --io pread --prompt-ids 1,2,3,4,5,6,7,8 -n 6 2>/dev/null", fm_test_bin(), dir);
    CHECK(fm_test_run_cmd(cmd, base_out, sizeof base_out) == 0);
    snprintf(cmd, sizeof cmd, "FLASHMOE_URING_DISABLE=1 %s run -m '%s' --io uring --prompt-ids 1,2,3,4,5,6,7,8 -n 6 2>&1",
             fm_test_bin(), dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    const char *line = strstr(out, "io_uring is not available (disabled by FLASHMOE_URING_DISABLE)");
    CHECK_MSG(rc == 0 && line && strstr(line, "pread engine"), "rc %d: %s", rc, out);
    const char *nl = line ? strchr(line, '\n') : NULL;
    CHECK_MSG(nl && strstr(nl, base_out) && strlen(base_out) > 0, "output differs from pread: %s vs %s", out, base_out);
    free(base);
    free(got);
}

/* fm_store_poll takes io_uring's finished reads and sends the next ones without blocking: after
 * polling, the request's experts are in (bytes counted) and fm_store_wait does not wait; with
 * FLASHMOE_URING_POLL=0 a poll leaves them to fm_store_wait, which then reads the same bytes. */
FM_TEST(store_uring_poll_advances_reads) {
    char dir[512];
    if (!make_tiny(t, "store_poll", dir, sizeof dir)) return;
    fm_packed_model *pm;
    REQUIRE(fm_packed_open(dir, &pm) == FM_OK);
    uint64_t stride = pm->experts[0].stride;
    size_t n0 = 0;
    uint8_t *f0 = (uint8_t *)fm_test_read_file(pm->experts[0].file, &n0);
    REQUIRE(f0);
    for (int off = 0; off < 2; off++) {
        if (off) setenv("FLASHMOE_URING_POLL", "0", 1);
        fm_store_options o = {.engine = FM_IO_URING, .io_threads = 1};
        fm_expert_store *st = NULL;
        fm_status rc = fm_store_open(pm, 8, &o, &st);
        unsetenv("FLASHMOE_URING_POLL");
        CHECK_OK(rc);
        if (rc != FM_OK) break;
        if (fm_store_engine(st) != FM_IO_URING) {
            fm_store_free(st);
            SKIP("io_uring is not available here");
        }
        int32_t E = pm->config.n_experts, ids[3] = {1, E / 2, E - 1};
        CHECK_OK(fm_store_request(st, 0, ids, 3));
        uint64_t want = 3 * stride;
        double t0 = fm_time_now(); /* polling only: 10 s is far beyond three tiny reads */
        while (fm_store_layer_stats_get(st, 0).bytes_read < want && fm_time_now() - t0 < (off ? 0.05 : 10)) {
            fm_store_poll(st);
            usleep(500);
        }
        uint64_t polled = fm_store_layer_stats_get(st, 0).bytes_read;
        CHECK_MSG(polled == (off ? 0 : want), "poll %s: %llu of %llu bytes in", off ? "off" : "on",
                  (unsigned long long)polled, (unsigned long long)want);
        for (int i = 0; i < 3; i++) {
            const uint8_t *blk;
            CHECK_OK(fm_store_wait(st, i, &blk));
            CHECK_MSG(memcmp(blk, f0 + (uint64_t)ids[i] * stride, stride) == 0, "expert %d differs", ids[i]);
        }
        fm_store_layer_stats s0 = fm_store_layer_stats_get(st, 0);
        CHECK_MSG(s0.bytes_read == want, "%llu bytes", (unsigned long long)s0.bytes_read);
        if (!off) CHECK_MSG(s0.wait_seconds == 0, "waited %g s after polling", s0.wait_seconds);
        fm_store_free(st);
    }
    free(f0);
    fm_packed_close(pm);
}

/* flashmoe bench --engines --json: one object per engine, in the order asked, each with the keys of
 * the single-engine run; --io-bench --json: the sequential rate, then every engine x depth row. */
FM_TEST(store_bench_rows_per_engine) {
    char dir[512], cmd[1200];
    if (!make_tiny(t, "store_bench", dir, sizeof dir)) return;
    static char out[1 << 16];
    snprintf(cmd, sizeof cmd, "%s bench -m '%s' --prompt 4 --gen 2 --engines --json 2>/dev/null", fm_test_bin(), dir);
    CHECK_MSG(fm_test_run_cmd(cmd, out, sizeof out) == 0, "%s", out);
    json_error_t je;
    json_t *a = json_loads(out, 0, &je);
    CHECK_MSG(json_is_array(a) && json_array_size(a) == 3, "not an array of 3: %s", out);
    static const char *names[] = {"pread", "direct", "uring"};
    for (size_t i = 0; json_is_array(a) && i < json_array_size(a) && i < 3; i++) {
        json_t *o = json_array_get(a, i);
        const char *asked = json_string_value(json_object_get(o, "io_asked"));
        CHECK_MSG(asked && !strcmp(asked, names[i]), "row %zu: %s", i, asked ? asked : "(none)");
        static const char *keys[] = {"decode_tok_s", "layer_ms", "floor_ms", "floor_ratio", "wait_ms", "disk_gbs", "ram_gbs"};
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
            CHECK_MSG(json_number_value(json_object_get(o, keys[k])) > 0, "row %s: %s missing or not positive", names[i], keys[k]);
    }
    json_decref(a);
    snprintf(cmd, sizeof cmd, "%s bench -m '%s' --prompt 4 --gen 2 --io uring --json 2>/dev/null", fm_test_bin(), dir);
    CHECK_MSG(fm_test_run_cmd(cmd, out, sizeof out) == 0, "%s", out);
    json_t *o = json_loads(out, 0, &je);
    CHECK_MSG(json_is_object(o) && json_number_value(json_object_get(o, "floor_ratio")) > 0 &&
                  json_object_get(o, "prefill_wait_s") && json_object_get(o, "peak_rss"),
              "single run: %s", out);
    { /* the disk floor's rate is the faster of the probes before and after decoding */
        double d = json_number_value(json_object_get(o, "disk_gbs")), d0 = json_number_value(json_object_get(o, "disk_gbs_before")),
               d1 = json_number_value(json_object_get(o, "disk_gbs_after"));
        CHECK_MSG(d0 > 0 && d1 > 0 && d == (d0 > d1 ? d0 : d1), "disk_gbs %g, before %g, after %g", d, d0, d1);
    }
    for (int k = 0; k < 2; k++) { /* shares of the machine's CPU time during decode */
        json_t *v = json_object_get(o, k ? "cpu_steal" : "cpu_other");
        CHECK_MSG(json_is_number(v) && json_number_value(v) >= 0 && json_number_value(v) <= 1, "%s: %s", k ? "cpu_steal" : "cpu_other", out);
    }
    { /* the disk's busy share and queue during decode: both known (>= 0) or both unknown (-1, no block device) */
        json_t *bz = json_object_get(o, "disk_busy"), *q = json_object_get(o, "disk_queue");
        double b = json_number_value(bz), qd = json_number_value(q);
        CHECK_MSG(json_is_number(bz) && json_is_number(q) && ((b == -1 && qd == -1) || (b >= 0 && qd >= 0)),
                  "disk_busy %g, disk_queue %g: %s", b, qd, out);
    }
    json_decref(o);
    snprintf(cmd, sizeof cmd, "%s bench -m '%s' --io-bench --json 2>/dev/null", fm_test_bin(), dir);
    CHECK_MSG(fm_test_run_cmd(cmd, out, sizeof out) == 0, "%s", out);
    a = json_loads(out, 0, &je);
    CHECK_MSG(json_is_array(a) && json_array_size(a) == 29, "io-bench: %s", out);
    int uring_rows = 0;
    for (size_t i = 0; json_is_array(a) && i < json_array_size(a); i++) {
        const char *e = json_string_value(json_object_get(json_array_get(a, i), "engine"));
        if (e && !strcmp(e, "uring")) uring_rows++;
    }
    CHECK_MSG(uring_rows == 5, "io-bench: %d uring rows (depths 1..16)", uring_rows);
    json_decref(a);
}

/* Whether the first page of `len` bytes at `off` of `path` is in the page cache (a test's own
 * mapping, so that the store's is not touched). */
static bool page_resident(const char *path, uint64_t off) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    unsigned char v = 0;
    void *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, (off_t)off);
    close(fd);
    if (p == MAP_FAILED) return false;
    bool in = mincore(p, 4096, &v) == 0 && (v & 1);
    munmap(p, 4096);
    return in;
}

/* Drops the clean, unmapped pages of path from the page cache. */
static void evict(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

/* map_resident (the pread engine without a cache): experts in the page cache are handed out in
 * place, from the file's mapping, and counted as mapped; evicted ones are read into the store's
 * buffers; a request mixing both streams through the ring in order. Every block equals the file. */
FM_TEST(store_map_resident_uses_the_page_cache_in_place) {
    char dir[512];
    if (!make_tiny(t, "store_map_resident", dir, sizeof dir)) return;
    fm_packed_model *pm;
    CHECK_OK(fm_packed_open(dir, &pm));
    const int layer = 1, n = 4;
    const char *path = pm->experts[layer].file;
    uint64_t stride = pm->experts[layer].stride;
    size_t fsize = 0;
    uint8_t *file = (uint8_t *)fm_test_read_file(path, &fsize); /* also brings it into the page cache */
    REQUIRE(file && fsize == stride * (uint64_t)pm->config.n_experts);
    fm_store_options o = {.engine = FM_IO_PREAD, .io_threads = 2, .map_resident = true};
    fm_expert_store *st;
    CHECK_OK(fm_store_open(pm, 2, &o, &st)); /* a ring of 2 buffers: 4 experts stream through it */
    void *mem;
    uint64_t mem_bytes;
    fm_store_buffer_memory(st, &mem, &mem_bytes);
    REQUIRE(mem && mem_bytes);
    const uint8_t *lo = (const uint8_t *)mem, *hi = lo + mem_bytes;
    const int E = pm->config.n_experts;
    REQUIRE(E >= 4 * n);
    /* far apart: a page fault maps the resident pages around it too (fault-around, large folios),
     * and mapped pages stay in the page cache */
    int32_t warm[4] = {0, 1, 2, 3}, cold[4] = {E - 4, E - 3, E - 2, E - 1};
    int32_t mix[4] = {cold[0], warm[1], warm[2], cold[3]};
    /* 1: all in the page cache: in place, nothing read, all ready at once */
    CHECK_OK(fm_store_request(st, layer, warm, n));
    const uint8_t *ready[4];
    CHECK(fm_store_ready_run(st, 0, n, ready) == n && fm_store_ready_run(st, 1, 2, ready + 1) == 2);
    for (int i = 0; i < n; i++)
        CHECK_MSG(memcmp(ready[i], file + (uint64_t)warm[i] * stride, stride) == 0, "ready expert %d differs", warm[i]);
    for (int i = 0; i < n; i++) {
        const uint8_t *b;
        CHECK_OK(fm_store_wait(st, i, &b));
        CHECK_MSG(memcmp(b, file + (uint64_t)warm[i] * stride, stride) == 0, "warm expert %d differs", warm[i]);
        CHECK_MSG(b < lo || b >= hi, "warm expert %d was copied into the buffers", warm[i]);
    }
    fm_store_layer_stats ls = fm_store_layer_stats_get(st, layer);
    CHECK_MSG(ls.mapped == (uint64_t)n && ls.bytes_read == 0, "warm: %llu mapped, %llu bytes read",
              (unsigned long long)ls.mapped, (unsigned long long)ls.bytes_read);
    /* 2: evicted: read into the buffers (pages the store has touched stay: they are mapped) */
    evict(path);
    if (page_resident(path, (uint64_t)cold[0] * stride)) {
        fprintf(stderr, "  eviction: the file system keeps the pages (posix_fadvise DONTNEED), rest skipped\n");
    } else {
        for (int round = 0; round < 2; round++) {
            const int32_t *ids = round ? mix : cold;
            int want_mapped = round ? 2 : 0;
            if (round) evict(path);
            fm_store_layer_stats before = fm_store_layer_stats_get(st, layer);
            CHECK_OK(fm_store_request(st, layer, ids, n)); /* waited for in order, as streaming needs */
            for (int i = 0; i < n; i++) {
                const uint8_t *b;
                CHECK_OK(fm_store_wait(st, i, &b));
                CHECK_MSG(memcmp(b, file + (uint64_t)ids[i] * stride, stride) == 0, "round %d: expert %d differs", round,
                          ids[i]);
                /* a streaming buffer is not "ready": only the wait hands it out (a mapped one is) */
                CHECK_MSG(fm_store_ready_run(st, i, 1, ready) == (round && (i == 1 || i == 2)), "round %d: expert %d ready",
                          round, ids[i]);
            }
            ls = fm_store_layer_stats_get(st, layer);
            CHECK_MSG(ls.mapped - before.mapped == (uint64_t)want_mapped &&
                          ls.bytes_read - before.bytes_read == (uint64_t)(n - want_mapped) * stride,
                      "round %d: %llu mapped, %llu bytes read (want %d mapped)", round,
                      (unsigned long long)(ls.mapped - before.mapped),
                      (unsigned long long)(ls.bytes_read - before.bytes_read), want_mapped);
        }
    }
    fm_store_free(st);
    /* without the option, or with a cache, nothing is served in place */
    for (int c = 0; c < 2; c++) {
        fm_store_options oc = {.engine = FM_IO_PREAD, .io_threads = 2, .map_resident = c == 1,
                               .cache_bytes = c == 1 ? 1 << 20 : 0};
        CHECK_OK(fm_store_open(pm, 4, &oc, &st));
        CHECK_OK(fm_store_request(st, layer, warm, 4));
        for (int i = 0; i < 4; i++) {
            const uint8_t *b;
            CHECK_OK(fm_store_wait(st, i, &b));
            CHECK(memcmp(b, file + (uint64_t)warm[i] * stride, stride) == 0);
        }
        /* with a cache every finished read stays until the next request: ready */
        CHECK_MSG(fm_store_ready_run(st, 0, 4, ready) == (c == 1 ? 4 : 0), "case %d: ready run", c);
        CHECK_MSG(fm_store_layer_stats_get(st, layer).mapped == 0, "case %d served in place", c);
        fm_store_free(st);
    }
    free(file);
    fm_packed_close(pm);
}

/* Runs child() in a forked process with stderr into a buffer; returns its wait status. */
static int run_child(void (*child)(fm_packed_model *), fm_packed_model *pm, char *err, size_t cap) {
    int fds[2];
    err[0] = 0;
    if (pipe(fds) != 0) return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], STDERR_FILENO);
        child(pm);
        _exit(7); /* child() ends the process itself */
    }
    close(fds[1]);
    size_t n = 0;
    ssize_t r;
    while (pid > 0 && n + 1 < cap && (r = read(fds[0], err + n, cap - 1 - n)) > 0) n += (size_t)r;
    err[n] = 0;
    close(fds[0]);
    int status = -1;
    if (pid > 0) waitpid(pid, &status, 0);
    return status;
}

static void touch_truncated_expert(fm_packed_model *pm) {
    fm_store_options o = {.engine = FM_IO_PREAD, .io_threads = 1, .map_resident = true};
    fm_expert_store *st;
    int32_t id = 5;
    const uint8_t *b;
    size_t n;
    free(fm_test_read_file(pm->experts[2].file, &n)); /* in the page cache: served in place */
    if (fm_store_open(pm, 4, &o, &st) != FM_OK || fm_store_request(st, 2, &id, 1) != FM_OK ||
        fm_store_wait(st, 0, &b) != FM_OK)
        _exit(3);
    if (fm_store_layer_stats_get(st, 2).mapped != 1) _exit(4);
    if (truncate(pm->experts[2].file, 0) != 0) _exit(5);
    volatile uint8_t v = b[100];
    (void)v;
    _exit(6);
}

static void touch_truncated_dense(fm_packed_model *pm) {
    char path[600];
    snprintf(path, sizeof path, "%s/dense.bin", pm->dir);
    if (truncate(path, 0) != 0) _exit(5);
    volatile char v = ((const volatile char *)pm->tensors[0].data)[0];
    (void)v;
    _exit(6);
}

/* A mapped model file truncated while in use: SIGBUS becomes a message naming the file and the
 * expert and layer (or the offset in dense.bin) and exit status 1, not a silent crash. */
FM_TEST(store_truncated_while_mapped_names_the_file) {
    char dir[512], err[2048];
    if (!make_tiny(t, "store_sigbus", dir, sizeof dir)) return;
    fm_packed_model *pm;
    CHECK_OK(fm_packed_open(dir, &pm));
    int status = run_child(touch_truncated_expert, pm, err, sizeof err);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 1 && strstr(err, "L002.bin: expert 5 of layer 2") &&
                  strstr(err, "truncated"),
              "expert: status %#x, stderr: %s", status, err);
    status = run_child(touch_truncated_dense, pm, err, sizeof err);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 1 && strstr(err, "dense.bin: offset ") &&
                  strstr(err, "truncated"),
              "dense: status %#x, stderr: %s", status, err);
    fm_packed_close(pm);
}
