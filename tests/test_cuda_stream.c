/* Streaming experts to the GPU (--backend cuda with a VRAM budget smaller than the experts):
 * the backend's copy stream, the overlapped miss path of src/model/forward_cuda.c, and the
 * once-per-chunk bound on host-to-device bytes in prefill (docs/CUDA.md "Streaming misses").
 *
 * - cuda_copy_stream: random host buffers (page-locked with fm_cuda_host_register, and pageable)
 *   copied on the copy stream into one device buffer that the compute stream first filled with a
 *   pattern and then copies on (fm_cuda_copies_wait_compute / fm_cuda_compute_wait_copies order
 *   them): the bytes that come back are exactly the host's, the pattern stays where nothing was
 *   copied; the totals count every copy; the pinned bandwidth probe gives a positive rate; NULLs
 *   are refused.
 * - cuda_forward_overlap_matches_cpu: qwen35_moe_q64_bf16 converted to Q4 with a VRAM cache of
 *   top-k + 1 slots (every layer evicts), read by each store engine (pread, direct, uring, mmap;
 *   with and without a RAM cache), overlapped (the default) and synchronous
 *   (FLASHMOE_CUDA_OVERLAP=0): batch and token-by-token logits against the CPU (one token at a
 *   time, the float kernels) within test_cuda_forward.c's bound (max |gpu - cpu| / max |cpu| <=
 *   2e-3, the same argmax in every row), and the two GPU paths against each other (<= 1e-4).
 * - cuda_forward_prefill_h2d_once_per_chunk: synth's tiny preset (16 experts, top-4) with 5 slots:
 *   two chunks of 40 tokens; per chunk, host-to-device bytes <= (distinct experts per layer,
 *   summed over layers) x slot bytes, and misses <= that count.
 * - cuda_forward_hints_keep_the_logits: --prefetch on the GPU path (next-layer guesses hinted to
 *   the store, docs/CUDA.md "Next-layer hints"): the Q4 fixture through top-k + 1 VRAM slots and a
 *   small RAM cache (n_experts + 4 blocks), every engine (pread, direct, uring: speculative reads;
 *   mmap: hints ignored), a prefill then token by token, prefetch 0 / 2 late (the default) / 2
 *   early (FLASHMOE_CUDA_HINT=early) / top-k late: logits identical to prefetch 0 (memcmp), within
 *   the bound of the CPU (the oracle), guesses counted, speculative reads started (none with
 *   prefetch 0).
 * - cuda_forward_cli_prefetch: --backend cuda with a bad --prefetch value is a usage error; a good
 *   one runs (or fails with the no-CUDA / no-device line). Runs in every build.
 * Without CUDA in the build or without a GPU the others SKIP. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "formats/npy.h"
#include "model/convert.h"
#include "model/forward_cuda.h"
#include "model/model.h"
#include "model/synth.h"
#include "test.h"
#ifdef FM_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

FM_TEST(cuda_forward_cli_prefetch) {
    char dir[600], cmd[2048], out[4096];
    const char *bad[] = {"--prefetch=-1", "--prefetch=65", "--prefetch=two", "--prefetch="};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(cmd, sizeof cmd, "%s run -m x --prompt-ids 1 --backend cuda %s", fm_test_bin(), bad[i]);
        int rc = fm_test_run_cmd(cmd, out, sizeof out);
        CHECK_MSG(rc == 2 && strstr(out, "--prefetch=N needs N in 0..64"), "%s: rc %d: %s", bad[i], rc, out);
    }
    fm_test_tmpdir("cuda_cli_prefetch", dir, sizeof dir);
    snprintf(cmd, sizeof cmd, "%s synth --preset tiny --layers 2 '%s/m' >/dev/null 2>&1", fm_test_bin(), dir);
    REQUIRE(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    snprintf(cmd, sizeof cmd, "%s run -m '%s/m' --prompt-ids 1,2 -n 4 --print-ids --ignore-eos --backend cuda --cache 16M "
             "--prefetch=3", fm_test_bin(), dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
#ifdef FM_HAVE_CUDA
    int n = 0;
    if (fm_cuda_device_count(&n) != FM_OK || n == 0)
        CHECK_MSG(rc == 1 && strstr(out, "--backend cuda: no usable CUDA device"), "rc %d: %s", rc, out);
    else
        CHECK_MSG(rc == 0, "rc %d: %s", rc, out);
#else
    CHECK_MSG(rc == 1 && strstr(out, "--backend cuda: this flashmoe was built without CUDA"), "rc %d: %s", rc, out);
#endif
}

#ifndef FM_HAVE_CUDA

FM_TEST(cuda_copy_stream) { SKIP("built without CUDA (make CUDA=1)"); }
FM_TEST(cuda_forward_overlap_matches_cpu) { SKIP("built without CUDA (make CUDA=1)"); }
FM_TEST(cuda_forward_prefill_h2d_once_per_chunk) { SKIP("built without CUDA (make CUDA=1)"); }
FM_TEST(cuda_forward_hints_keep_the_logits) { SKIP("built without CUDA (make CUDA=1)"); }

#else

#include "test_cuda_ctx.h"

FM_TEST(cuda_copy_stream) {
    CUDA_OR_SKIP(c);
    fm_test_rng_seed("CUDA_SEED");
    enum { N = 12 };
    const size_t total = 24u << 20;
    uint8_t *pinned = NULL, *pageable = malloc(total), *back = malloc(total), *want = malloc(total);
    REQUIRE(pageable && back && want && posix_memalign((void **)&pinned, 4096, total) == 0);
    for (size_t i = 0; i < total; i++) pinned[i] = (uint8_t)fm_test_rand_u64(), pageable[i] = (uint8_t)fm_test_rand_u64();
    CHECK_OK(fm_cuda_host_register(c, pinned, total));
    void *dev = NULL, *dev2 = NULL;
    REQUIRE(fm_cuda_buf_alloc(c, total, &dev) == FM_OK && fm_cuda_buf_alloc(c, total, &dev2) == FM_OK);
    CHECK_OK(fm_cuda_copy_stats_reset(c));
    for (int round = 0; round < 3; round++) { /* 3 rounds: the timing events' ring wraps (64 pairs) */
        memset(want, 0xa5, total);
        CHECK_OK(fm_cuda_buf_fill(c, dev, 0xa5, total)); /* compute stream */
        CHECK_OK(fm_cuda_copies_wait_compute(c));        /* the copies land after the fill */
        size_t at = 0;
        uint64_t bytes = 0;
        for (int i = 0; i < 2 * N && at < total; i++) {
            size_t n = 1 + (size_t)(fm_test_rand_u64() % (512u << 10)), gap = (size_t)(fm_test_rand_u64() % 4096);
            if (at + gap + n > total) break;
            const uint8_t *src = (i % 3 ? pinned : pageable) + at + gap; /* any offset, both kinds of memory */
            CHECK_OK(fm_cuda_copy_upload(c, (uint8_t *)dev + at + gap, src, n));
            memcpy(want + at + gap, src, n);
            at += gap + n;
            bytes += n;
        }
        CHECK_OK(fm_cuda_compute_wait_copies(c));
        CHECK_OK(fm_cuda_buf_copy(c, dev2, dev, total)); /* compute stream, after the copies */
        CHECK_OK(fm_cuda_buf_download(c, back, dev2, total));
        CHECK_MSG(memcmp(back, want, total) == 0, "round %d: the device bytes differ from the host's", round);
        (void)bytes;
    }
    fm_cuda_copy_totals ct;
    CHECK_OK(fm_cuda_copy_stats(c, &ct));
    fprintf(stderr, "  %llu copies, %llu bytes, copy engine busy %.3f ms\n", (unsigned long long)ct.copies,
            (unsigned long long)ct.bytes, ct.busy_ms);
    CHECK(ct.copies >= 3 && ct.bytes > 0 && ct.busy_ms > 0);
    CHECK_OK(fm_cuda_copy_sync(c));
    double gbs = 0;
    CHECK_OK(fm_cuda_h2d_gbs(c, 16u << 20, 3, &gbs));
    fprintf(stderr, "  pinned host-to-device: %.1f GB/s (16 MiB copies)\n", gbs);
    CHECK(gbs > 0);
    CHECK(fm_cuda_copy_upload(c, NULL, pinned, 16) == FM_ERR_ARG);
    CHECK(fm_cuda_copy_upload(c, dev, NULL, 16) == FM_ERR_ARG);
    CHECK(fm_cuda_host_register(c, NULL, 16) == FM_ERR_ARG);
    CHECK(fm_cuda_h2d_gbs(c, 1 << 20, 0, &gbs) == FM_ERR_ARG);
    fm_cuda_host_unregister(c, pinned);
    fm_cuda_buf_free(c, dev);
    fm_cuda_buf_free(c, dev2);
    free(pinned), free(pageable), free(back), free(want);
}

/* ------------------------------------------------------------------------ whole models */

static int32_t argmax(const float *x, int64_t n) {
    int64_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return (int32_t)b;
}

/* max |got - ref| / max |ref| over n rows of V, and the rows whose argmax differs. */
static double compare(const float *ref, const float *got, int64_t n, int64_t V, int64_t *bad) {
    double mx = 0, worst = 0;
    *bad = 0;
    for (int64_t i = 0; i < n * V; i++) mx = fmax(mx, fabs(ref[i]));
    for (int64_t i = 0; i < n * V; i++) worst = fmax(worst, isnan(got[i]) ? INFINITY : fabs((double)ref[i] - got[i]) / mx);
    for (int64_t r = 0; r < n; r++) *bad += argmax(ref + r * V, V) != argmax(got + r * V, V);
    return worst;
}

/* All logits of ids[0..n): split = 0 one token at a time; else a prefill of `split`, then one at a time. */
static fm_status run_logits(fm_model *m, const int32_t *ids, int64_t n, int64_t split, float *out) {
    fm_session *s = NULL;
    int64_t V = fm_model_n_vocab(m);
    fm_status st = fm_session_init(m, n, &s);
    if (st == FM_OK && split) st = fm_session_eval(s, ids, split, out, true);
    for (int64_t i = split; st == FM_OK && i < n; i++) st = fm_session_eval(s, ids + i, 1, out + i * V, true);
    fm_session_free(s);
    return st;
}

FM_TEST(cuda_forward_overlap_matches_cpu) {
    CUDA_OR_SKIP(c);
    (void)c;
    char dir[600];
    fm_npy ids = {0};
    REQUIRE(fm_npy_read("tests/fixtures/qwen35_moe_q64_bf16/ids.npy", &ids) == FM_OK);
    fm_test_tmpdir("cuda_stream_q4", dir, sizeof dir);
    strcat(dir, "/packed");
    fm_convert_options o = {.dense_dtype = FM_DTYPE_Q4, .expert_dtype = FM_DTYPE_Q4};
    REQUIRE(fm_convert_hf("tests/fixtures/qwen35_moe_q64_bf16/model", dir, &o) == FM_OK);
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    fm_model *cpu = NULL, *gpu = NULL;
    REQUIRE(fm_model_open(dir, &p, &cpu) == FM_OK);
    int64_t n = ids.n_elements, V = fm_model_n_vocab(cpu), split = n / 2;
    float *ref = malloc(sizeof(float) * (size_t)(n * V)), *got = malloc(sizeof(float) * (size_t)(n * V)),
          *prev = malloc(sizeof(float) * (size_t)(n * V));
    REQUIRE(ref && got && prev);
    REQUIRE(run_logits(cpu, ids.data, n, 0, ref) == FM_OK);
    /* the budget: dense + one session + top-k + 1 slots */
    p.backend = FM_BACKEND_CUDA;
    fm_session *s = NULL;
    uint64_t budget = 0;
    if (fm_model_open(dir, &p, &gpu) == FM_OK && fm_session_init(gpu, n, &s) == FM_OK) {
        fm_cuda_stats st = fm_forward_cuda_stats(gpu);
        budget = st.dense_bytes + st.state_bytes + (uint64_t)(gpu->n_experts_used + 1) * st.slot_bytes;
    }
    fm_session_free(s);
    fm_model_free(gpu);
    gpu = NULL;
    REQUIRE(budget > 0);
    static const struct {
        fm_io_engine e;
        uint64_t cache;
    } engines[] = {{FM_IO_PREAD, 0}, {FM_IO_DIRECT, 0}, {FM_IO_URING, 0}, {FM_IO_MMAP, 0}, {FM_IO_PREAD, 64u << 20}};
    for (size_t ei = 0; ei < sizeof engines / sizeof *engines; ei++) {
        bool refused = false;
        for (int split_i = 0; split_i < 2 && !refused; split_i++)
            for (int overlap = 1; overlap >= 0 && !refused; overlap--) { /* overlapped first: prev */
                setenv("FLASHMOE_CUDA_OVERLAP", overlap ? "1" : "0", 1);
                p.io_engine = engines[ei].e;
                p.cache_bytes = engines[ei].cache;
                p.vram_budget = budget;
                p.vram_policy = split_i ? FM_VRAM_FLRU : FM_VRAM_LRU;
                fm_status rc = fm_model_open(dir, &p, &gpu);
                unsetenv("FLASHMOE_CUDA_OVERLAP");
                if (rc != FM_OK && engines[ei].e == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) {
                    fprintf(stderr, "  direct: refused here (%s)\n", fm_last_error());
                    refused = true;
                    continue;
                }
                if (rc != FM_OK) {
                    CHECK_MSG(false, "%s: %s", fm_io_engine_name(engines[ei].e), fm_last_error());
                    continue;
                }
                for (int64_t i = 0; i < n * V; i++) got[i] = NAN;
                fm_status st = run_logits(gpu, ids.data, n, split_i ? split : n, got);
                CHECK_MSG(st == FM_OK, "%s", fm_last_error());
                fm_cuda_stats cs = fm_forward_cuda_stats(gpu);
                int64_t bad = 0;
                double err = compare(ref, got, n, V, &bad);
                char what[160];
                snprintf(what, sizeof what, "%s%s, %s, %s, %s", fm_io_engine_name(engines[ei].e),
                         engines[ei].cache ? " + RAM cache" : "", overlap ? "overlapped" : "synchronous",
                         split_i ? "prefill + token by token, FLRU" : "batch, LRU", cs.pinned_bytes ? "pinned" : "pageable");
                fprintf(stderr, "  %s: gpu vs cpu %.2e, %lld argmax differences; %d slots, %llu misses, %llu evictions, "
                                "%llu copies on the copy stream\n",
                        what, err, (long long)bad, cs.slots, (unsigned long long)cs.misses,
                        (unsigned long long)cs.evictions, (unsigned long long)cs.copies);
                CHECK_MSG(err <= 2e-3 && bad == 0, "%s: error %.3e, %lld argmax differences", what, err, (long long)bad);
                CHECK_MSG(cs.evictions > 0 && cs.overlap == (bool)overlap, "%s: %llu evictions, overlap %d", what,
                          (unsigned long long)cs.evictions, cs.overlap);
                CHECK_MSG(overlap ? cs.copies == cs.misses : cs.copies == 0, "%s: %llu copies for %llu misses", what,
                          (unsigned long long)cs.copies, (unsigned long long)cs.misses);
                CHECK_MSG(cs.pinned_bytes > 0 || !overlap || engines[ei].e == FM_IO_MMAP,
                          "%s: the store's buffers are not pinned", what);
                if (!overlap) { /* against the overlapped run of the same case, just before */
                    double d = compare(prev, got, n, V, &bad);
                    fprintf(stderr, "  %s: against the overlapped run %.2e\n", what, d);
                    CHECK_MSG(d <= 1e-4 && bad == 0, "%s: overlapped and synchronous differ by %.3e", what, d);
                } else {
                    memcpy(prev, got, sizeof(float) * (size_t)(n * V));
                }
                fm_model_free(gpu);
                gpu = NULL;
            }
    }
    fm_model_free(cpu);
    fm_npy_free(&ids);
    free(ref), free(got), free(prev);
}

FM_TEST(cuda_forward_prefill_h2d_once_per_chunk) {
    CUDA_OR_SKIP(c);
    (void)c;
    char dir[600];
    fm_test_tmpdir("cuda_stream_chunk", dir, sizeof dir);
    strcat(dir, "/m");
    fm_synth_options so = {.preset = "tiny", .expert_dtype = FM_DTYPE_Q4, .dense_dtype = FM_DTYPE_Q8, .seed = 3};
    REQUIRE(fm_synth_write(dir, &so) == FM_OK);
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    p.backend = FM_BACKEND_CUDA;
    enum { T = 40, CHUNKS = 2 };
    fm_model *m = NULL;
    fm_session *s = NULL;
    REQUIRE(fm_model_open(dir, &p, &m) == FM_OK);
    REQUIRE(fm_session_init(m, T * CHUNKS, &s) == FM_OK);
    fm_cuda_stats st = fm_forward_cuda_stats(m);
    p.vram_budget = st.dense_bytes + st.state_bytes + (uint64_t)(m->n_experts_used + 1) * st.slot_bytes;
    fm_session_free(s);
    fm_model_free(m);
    s = NULL;
    m = NULL;
    REQUIRE(fm_model_open(dir, &p, &m) == FM_OK);
    REQUIRE(fm_session_init(m, T * CHUNKS, &s) == FM_OK);
    int L = m->cfg.n_layers;
    int32_t ids[T];
    for (int ch = 0; ch < CHUNKS; ch++) {
        for (int i = 0; i < T; i++) ids[i] = (int32_t)((i * 131 + ch * 17 + 5) % fm_model_n_vocab(m));
        uint64_t used0 = 0, used1 = 0;
        for (int l = 0; l < L; l++) used0 += fm_session_layer_timing(s, l)->experts_used;
        fm_forward_cuda_reset_stats(m);
        CHECK_OK(fm_session_eval(s, ids, T, NULL, false));
        for (int l = 0; l < L; l++) used1 += fm_session_layer_timing(s, l)->experts_used;
        st = fm_forward_cuda_stats(m);
        uint64_t distinct = used1 - used0; /* distinct experts per layer in this chunk, summed over layers */
        fprintf(stderr, "  chunk %d of %d tokens: %llu distinct experts (per layer, summed), %llu requested, %llu misses, "
                        "%llu bytes up (bound %llu), %d slots\n",
                ch, T, (unsigned long long)distinct, (unsigned long long)st.requested, (unsigned long long)st.misses,
                (unsigned long long)st.h2d_bytes, (unsigned long long)(distinct * st.slot_bytes), st.slots);
        CHECK(st.slots == m->n_experts_used + 1);
        CHECK(distinct > 0 && distinct < (uint64_t)(T * m->n_experts_used * L)); /* experts are shared by tokens */
        CHECK(st.requested == distinct);
        CHECK(st.misses <= distinct && st.misses > 0);
        CHECK_MSG(st.h2d_bytes <= distinct * st.slot_bytes, "%llu bytes up for %llu experts of %llu bytes",
                  (unsigned long long)st.h2d_bytes, (unsigned long long)distinct, (unsigned long long)st.slot_bytes);
    }
    fm_session_free(s);
    fm_model_free(m);
}

/* Converts the qwen35_moe_q64_bf16 fixture to Q4 into the test's directory `name`. */
static bool q4_fixture(fm_test_ctx *t, const char *name, char *dir, size_t cap) {
    fm_test_tmpdir(name, dir, cap);
    strcat(dir, "/packed");
    fm_convert_options o = {.dense_dtype = FM_DTYPE_Q4, .expert_dtype = FM_DTYPE_Q4};
    fm_status st = fm_convert_hf("tests/fixtures/qwen35_moe_q64_bf16/model", dir, &o);
    CHECK_MSG(st == FM_OK, "%s", fm_last_error());
    return st == FM_OK;
}

FM_TEST(cuda_forward_hints_keep_the_logits) {
    CUDA_OR_SKIP(c);
    (void)c;
    char dir[600];
    fm_npy ids = {0};
    REQUIRE(fm_npy_read("tests/fixtures/qwen35_moe_q64_bf16/ids.npy", &ids) == FM_OK);
    if (!q4_fixture(t, "cuda_stream_hints", dir, sizeof dir)) return;
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    p.prefetch = 0;
    fm_model *cpu = NULL, *gpu = NULL;
    REQUIRE(fm_model_open(dir, &p, &cpu) == FM_OK);
    int64_t n = ids.n_elements, V = fm_model_n_vocab(cpu), split = 4;
    float *ref = malloc(sizeof(float) * (size_t)(n * V)), *got = malloc(sizeof(float) * (size_t)(n * V)),
          *off = malloc(sizeof(float) * (size_t)(n * V));
    REQUIRE(ref && got && off);
    REQUIRE(run_logits(cpu, ids.data, n, 0, ref) == FM_OK);
    p.backend = FM_BACKEND_CUDA;
    fm_session *s = NULL;
    uint64_t budget = 0;
    if (fm_model_open(dir, &p, &gpu) == FM_OK && fm_session_init(gpu, n, &s) == FM_OK) {
        fm_cuda_stats st = fm_forward_cuda_stats(gpu);
        budget = st.dense_bytes + st.state_bytes + (uint64_t)(gpu->n_experts_used + 1) * st.slot_bytes;
    }
    fm_session_free(s);
    fm_model_free(gpu);
    gpu = NULL;
    REQUIRE(budget > 0);
    int k = cpu->n_experts_used;
    static const fm_io_engine engines[] = {FM_IO_PREAD, FM_IO_DIRECT, FM_IO_URING, FM_IO_MMAP};
    const struct {
        int prefetch;
        const char *mode;
    } cases[] = {{0, "late"}, {2, "late"}, {2, "early"}, {k, "late"}};
    for (size_t ei = 0; ei < sizeof engines / sizeof *engines; ei++) {
        for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
            setenv("FLASHMOE_CUDA_HINT", cases[ci].mode, 1);
            p.io_engine = engines[ei];
            /* a RAM cache of n_experts + 4 blocks: above one request's room, below the model's experts, so
             * hinted experts are mostly not cached yet (speculative reads) and evict others */
            p.cache_bytes = cpu->packed->max_expert_stride * (uint64_t)(cpu->cfg.n_experts + 4);
            p.vram_budget = budget;
            p.prefetch = cases[ci].prefetch;
            fm_status rc = fm_model_open(dir, &p, &gpu);
            unsetenv("FLASHMOE_CUDA_HINT");
            if (rc != FM_OK && engines[ei] == FM_IO_DIRECT && strstr(fm_last_error(), "O_DIRECT")) {
                fprintf(stderr, "  direct: refused here (%s)\n", fm_last_error());
                break;
            }
            if (rc != FM_OK) {
                CHECK_MSG(false, "%s: %s", fm_io_engine_name(engines[ei]), fm_last_error());
                continue;
            }
            for (int64_t i = 0; i < n * V; i++) got[i] = NAN;
            fm_session *ss = NULL;
            fm_status st = fm_session_init(gpu, n, &ss);
            const int32_t *tok = ids.data;
            if (st == FM_OK) st = fm_session_eval(ss, tok, split, got, true);
            for (int64_t i = split; st == FM_OK && i < n; i++) st = fm_session_eval(ss, tok + i, 1, got + i * V, true);
            CHECK_MSG(st == FM_OK, "%s", fm_last_error());
            uint64_t guessed = 0, right = 0, spec = 0, spec_hits = 0;
            for (int l = 0; ss && l < gpu->cfg.n_layers; l++) {
                const fm_layer_timing *lt = fm_session_layer_timing(ss, l);
                fm_store_layer_stats ls = fm_store_layer_stats_get(gpu->store, l);
                guessed += lt->guessed, right += lt->guessed_right, spec += ls.spec_reads, spec_hits += ls.spec_hits;
            }
            fm_session_free(ss);
            fm_cuda_stats cs = fm_forward_cuda_stats(gpu);
            int64_t bad = 0;
            double err = compare(ref, got, n, V, &bad);
            char what[160];
            snprintf(what, sizeof what, "%s + RAM cache, --prefetch=%d %s", fm_io_engine_name(engines[ei]),
                     cases[ci].prefetch, cases[ci].mode);
            fprintf(stderr, "  %s: gpu vs cpu %.2e, %lld argmax differences; %llu of %llu guesses right, %llu speculative "
                            "reads, %llu used; %llu VRAM misses\n",
                    what, err, (long long)bad, (unsigned long long)right, (unsigned long long)guessed,
                    (unsigned long long)spec, (unsigned long long)spec_hits, (unsigned long long)cs.misses);
            CHECK_MSG(err <= 2e-3 && bad == 0, "%s: error %.3e, %lld argmax differences", what, err, (long long)bad);
            CHECK_MSG(cs.evictions > 0, "%s: no evictions", what);
            /* one-token steps from the second on are guessed for by layers 0..L-2 */
            uint64_t want_guessed = cases[ci].prefetch ? (uint64_t)((n - split) * (gpu->cfg.n_layers - 1) *
                                                                    (cases[ci].prefetch < k ? cases[ci].prefetch : k))
                                                       : 0;
            CHECK_MSG(guessed == want_guessed && right <= guessed, "%s: %llu guesses (want %llu), %llu right", what,
                      (unsigned long long)guessed, (unsigned long long)want_guessed, (unsigned long long)right);
            if (engines[ei] == FM_IO_MMAP || !cases[ci].prefetch)
                CHECK_MSG(spec == 0, "%s: %llu speculative reads", what, (unsigned long long)spec);
            else
                CHECK_MSG(spec > 0, "%s: no speculative reads", what);
            if (ci == 0) memcpy(off, got, sizeof(float) * (size_t)(n * V));
            else CHECK_MSG(memcmp(off, got, sizeof(float) * (size_t)(n * V)) == 0, "%s: logits differ from --prefetch=0", what);
            fm_model_free(gpu);
            gpu = NULL;
        }
    }
    fm_model_free(cpu);
    fm_npy_free(&ids);
    free(ref), free(got), free(off);
}

#endif /* FM_HAVE_CUDA */
