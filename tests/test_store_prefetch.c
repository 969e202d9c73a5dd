/* Speculative reads (fm_store_hint with a RAM cache): for each engine, experts hinted after a
 * request are read behind it into cache slots; the next request finds those read (spec_hits; all
 * of them with io_uring, which sends them all as soon as the request's own reads are in), reads the
 * others, and every block equals the file; a hint never evicts a block the current request uses;
 * a hinted expert not asked for costs nothing later (the next request's own reads are correct).
 * The model with --prefetch gives the same logits as without. */
#include <stdlib.h>
#include <string.h>

#include "formats/packed.h"
#include "model/model.h"
#include "model/synth.h"
#include "store/expert_store.h"
#include "test.h"

static bool tiny_model(fm_test_ctx *t, const char *name, char *dir, size_t cap) {
    fm_test_tmpdir(name, dir, cap);
    strcat(dir, "/m");
    fm_synth_options o = {.preset = "tiny", .expert_dtype = FM_DTYPE_Q4, .dense_dtype = FM_DTYPE_Q8, .seed = 11};
    fm_status st = fm_synth_write(dir, &o);
    CHECK_MSG(st == FM_OK, "synth: %s", fm_last_error());
    return st == FM_OK;
}

FM_TEST(store_hint_reads_ahead_into_the_cache) {
    char dir[512];
    if (!tiny_model(t, "store_hint", dir, sizeof dir)) return;
    fm_packed_model *pm;
    CHECK_OK(fm_packed_open(dir, &pm));
    uint64_t stride = pm->experts[1].stride;
    size_t n0 = 0, n1 = 0;
    uint8_t *f0 = (uint8_t *)fm_test_read_file(pm->experts[0].file, &n0);
    uint8_t *f1 = (uint8_t *)fm_test_read_file(pm->experts[1].file, &n1);
    REQUIRE(f0 && f1);
    const fm_io_engine engines[] = {FM_IO_PREAD, FM_IO_DIRECT, FM_IO_URING};
    for (size_t e = 0; e < sizeof engines / sizeof *engines; e++) {
        const char *name = fm_io_engine_name(engines[e]);
        fm_store_options o = {.engine = engines[e], .io_threads = 2, .cache_bytes = 64 * stride};
        fm_expert_store *st;
        fm_status rc = fm_store_open(pm, 8, &o, &st);
        if (rc != FM_OK && engines[e] == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) continue;
        CHECK_OK(rc);
        /* layer 0 asks for 3 experts; layer 1's 5, 6, 7 and 9 are hinted */
        int32_t a[3] = {1, 2, 3}, hint[4] = {5, 6, 7, 9}, b[3] = {6, 4, 9};
        CHECK_OK(fm_store_request(st, 0, a, 3));
        fm_store_hint(st, 1, hint, 4);
        for (int i = 0; i < 3; i++) {
            const uint8_t *blk;
            CHECK_OK(fm_store_wait(st, i, &blk));
            CHECK_MSG(memcmp(blk, f0 + (uint64_t)a[i] * stride, stride) == 0, "%s: layer 0 expert %d differs", name, a[i]);
        }
        /* layer 1 asks for 6 and 9 (hinted) and 4 (not): two speculative hits, one read */
        CHECK_OK(fm_store_request(st, 1, b, 3));
        for (int i = 2; i >= 0; i--) {
            const uint8_t *blk;
            CHECK_OK(fm_store_wait(st, i, &blk));
            CHECK_MSG(memcmp(blk, f1 + (uint64_t)b[i] * stride, stride) == 0, "%s: layer 1 expert %d differs", name, b[i]);
        }
        /* io_uring sends the speculative reads when the request's own are in, and the next request
         * waits for reads under way: both hits are certain. The reader threads may not have started
         * them yet when the next request drops what is not started: at most 2. */
        fm_store_layer_stats s1 = fm_store_layer_stats_get(st, 1);
        uint64_t want_hits = fm_store_engine(st) == FM_IO_URING ? 2 : s1.spec_hits;
        CHECK_MSG(s1.spec_reads == 4 && s1.spec_hits == want_hits && s1.spec_hits <= 2 && s1.hits == 0 && s1.requested == 3,
                  "%s: spec_reads %llu spec_hits %llu hits %llu", name, (unsigned long long)s1.spec_reads,
                  (unsigned long long)s1.spec_hits, (unsigned long long)s1.hits);
        /* spec_done: the speculative reads that finished (io_uring sends all four at once, and the next
         * request waits for them; reader threads may have been stopped before some) */
        uint64_t want_done = fm_store_engine(st) == FM_IO_URING ? 4 : s1.spec_done;
        CHECK_MSG(s1.spec_done == want_done && s1.spec_done >= s1.spec_hits && s1.spec_done <= 4, "%s: spec_done %llu", name,
                  (unsigned long long)s1.spec_done);
        /* the hinted-but-unused 5 and 7 stay usable (hits, same bytes), or are read again if dropped */
        int32_t c2[2] = {5, 7};
        CHECK_OK(fm_store_request(st, 1, c2, 2));
        for (int i = 0; i < 2; i++) {
            const uint8_t *blk;
            CHECK_OK(fm_store_wait(st, i, &blk));
            CHECK_MSG(memcmp(blk, f1 + (uint64_t)c2[i] * stride, stride) == 0, "%s: layer 1 expert %d differs", name, c2[i]);
        }
        /* a hint while a request's blocks are in use never evicts them: a tiny cache (8 slots) */
        fm_store_free(st);
        o.cache_bytes = 8 * stride;
        CHECK_OK(fm_store_open(pm, 8, &o, &st));
        int32_t r8[8] = {0, 1, 2, 3, 4, 5, 6, 7}, h8[8] = {8, 9, 10, 11, 12, 13, 14, 15};
        CHECK_OK(fm_store_request(st, 0, r8, 8));
        fm_store_hint(st, 0, h8, 8); /* no free slot: nothing is read */
        for (int i = 0; i < 8; i++) {
            const uint8_t *blk;
            CHECK_OK(fm_store_wait(st, i, &blk));
            CHECK_MSG(memcmp(blk, f0 + (uint64_t)r8[i] * stride, stride) == 0, "%s: tiny cache: expert %d differs", name, r8[i]);
        }
        CHECK_MSG(fm_store_layer_stats_get(st, 0).spec_reads == 0, "%s: a hint evicted a block in use", name);
        fm_store_free(st);
    }
    free(f0);
    free(f1);
    fm_packed_close(pm);
}

/* The model with --prefetch (speculative reads) computes exactly what it computes without. */
FM_TEST(store_prefetch_keeps_the_logits) {
    char dir[512];
    if (!tiny_model(t, "store_prefetch_model", dir, sizeof dir)) return;
    const int n = 16;
    int32_t ids[16];
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((i * 53 + 5) % 512);
    float *ref = NULL;
    const int n_ahead[] = {0, 1, 3, 64}; /* 64: more than the model's top-k, which caps it */
    for (int pi = 0; pi < 4; pi++)
        for (int eng = 0; eng < 3; eng++) {
            int pf = n_ahead[pi];
            fm_model_params p = fm_model_default_params();
            p.io_engine = eng == 0 ? FM_IO_PREAD : eng == 1 ? FM_IO_DIRECT : FM_IO_URING;
            p.cache_bytes = 4u << 20;
            p.prefetch = pf;
            p.n_threads = 2;
            fm_model *m;
            fm_session *s;
            fm_status rc = fm_model_open(dir, &p, &m);
            if (rc != FM_OK && eng == 1 && strstr(fm_last_error(), "O_DIRECT")) continue;
            CHECK_OK(rc);
            int64_t V = fm_model_n_vocab(m);
            float *lg = malloc(sizeof(float) * (size_t)(n * V));
            REQUIRE(lg);
            CHECK_OK(fm_session_init(m, n, &s));
            CHECK_OK(fm_session_eval(s, ids, 4, lg, true));
            for (int i = 4; i < n; i++) CHECK_OK(fm_session_eval(s, ids + i, 1, lg + i * V, true));
            uint64_t spec = 0, spec_hits = 0, spec_done = 0;
            for (int l = 0; l < m->cfg.n_layers; l++) {
                fm_store_layer_stats ls = fm_store_layer_stats_get(m->store, l);
                spec += ls.spec_reads;
                spec_hits += ls.spec_hits;
                spec_done += ls.spec_done;
                CHECK_MSG(ls.spec_hits <= ls.spec_done && ls.spec_done <= ls.spec_reads,
                          "%s prefetch %d layer %d: %llu hits, %llu done, %llu started", fm_io_engine_name(p.io_engine), pf, l,
                          (unsigned long long)ls.spec_hits, (unsigned long long)ls.spec_done, (unsigned long long)ls.spec_reads);
                /* at most n a layer and token: the 12 one-token steps guess layers 1.. (none for layer 0) */
                CHECK(ls.spec_reads <= (uint64_t)(12 * (pf < m->n_experts_used ? pf : m->n_experts_used)));
            }
            if (pf) fprintf(stderr, "  %s: %llu speculative reads, %llu used\n", fm_io_engine_name(p.io_engine),
                            (unsigned long long)spec, (unsigned long long)spec_hits);
            CHECK_MSG(pf ? spec > 0 : spec == 0, "%s prefetch %d: %llu speculative reads", fm_io_engine_name(p.io_engine), pf,
                      (unsigned long long)spec);
            if (!ref) ref = lg, lg = NULL;
            else CHECK_MSG(memcmp(ref, lg, sizeof(float) * (size_t)(n * V)) == 0, "%s prefetch %d: logits differ",
                           fm_io_engine_name(p.io_engine), pf);
            free(lg);
            fm_session_free(s);
            fm_model_free(m);
        }
    free(ref);
}

/* fm_model_default_params asks for FM_PREFETCH_AUTO: FM_PREFETCH_DEFAULT experts read ahead when the
 * store has a RAM cache (the speculative reads land in its slots), none without one; an explicit
 * value, 0 included, is kept. */
FM_TEST(store_prefetch_auto_follows_the_cache) {
    char dir[512];
    if (!tiny_model(t, "store_prefetch_auto", dir, sizeof dir)) return;
    static const struct {
        int asked;
        uint64_t cache;
        int want;
    } cases[] = {{FM_PREFETCH_AUTO, 4u << 20, FM_PREFETCH_DEFAULT}, {FM_PREFETCH_AUTO, 0, 0}, {0, 4u << 20, 0}, {3, 0, 3}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        fm_model_params p = fm_model_default_params();
        CHECK(p.prefetch == FM_PREFETCH_AUTO);
        p.prefetch = cases[i].asked;
        p.cache_bytes = cases[i].cache;
        p.n_threads = 1;
        fm_model *m;
        CHECK_OK(fm_model_open(dir, &p, &m));
        CHECK_MSG(m->prefetch == cases[i].want && fm_store_cached(m->store) == (cases[i].cache > 0),
                  "case %zu: prefetch %d (want %d), cached %d", i, m->prefetch, cases[i].want, fm_store_cached(m->store));
        fm_model_free(m);
    }
}
