/* Sampler and stop-condition tests (sample_*): the filters against a plain reference
 * implementation of HF's semantics, distributions checked with many seeded draws, penalties,
 * reproducibility, and stop strings across token boundaries. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "test.h"
#include "text/sampler.h"

static uint64_t rs;
static double urand(void) {
    rs = rs * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(rs >> 11) * 0x1.0p-53;
}

static void random_logits(float *l, int n, double scale) {
    for (int i = 0; i < n; i++) l[i] = (float)((urand() * 2 - 1) * scale);
}

/* Reference: HF's warpers applied one after the other on a full copy, by sorting everything. */
typedef struct rc {
    double l;
    int id;
} rc;
static int rc_cmp(const void *x, const void *y) {
    const rc *a = x, *b = y;
    if (a->l != b->l) return a->l > b->l ? -1 : 1;
    return a->id - b->id;
}
static void reference_probs(const float *logits, int n, const fm_sampler_params *p, double *out) {
    rc *c = malloc((size_t)n * sizeof *c);
    int nc = 0;
    for (int i = 0; i < n; i++)
        if (logits[i] != -INFINITY) c[nc++] = (rc){(double)(logits[i] * (1.0f / p->temperature)), i};
    qsort(c, (size_t)nc, sizeof *c, rc_cmp);
    if (p->top_k > 0 && p->top_k < nc) nc = p->top_k;
    double m = c[0].l;
    if (p->top_p < 1) {
        double z = 0, cum = 0;
        for (int i = 0; i < nc; i++) z += exp(c[i].l - m);
        int keep = 0;
        while (keep < nc && (keep == 0 || cum / z < p->top_p)) cum += exp(c[keep++].l - m);
        nc = keep;
    }
    if (p->min_p > 0) {
        int w = 0;
        for (int i = 0; i < nc; i++)
            if (exp(c[i].l - m) >= p->min_p) c[w++] = c[i];
        nc = w;
    }
    double z = 0;
    for (int i = 0; i < nc; i++) z += exp(c[i].l - m);
    for (int i = 0; i < n; i++) out[i] = 0;
    for (int i = 0; i < nc; i++) out[c[i].id] = exp(c[i].l - m) / z;
    free(c);
}

/* The sampler's distribution equals the reference's: same support, probabilities within tol. */
static bool same_distribution(fm_test_ctx *t, fm_sampler *s, const float *l, int n, const fm_sampler_params *p,
                              double tol) {
    float *got = malloc((size_t)n * sizeof *got);
    double *want = malloc((size_t)n * sizeof *want);
    bool ok = fm_sampler_probs(s, l, got) == FM_OK;
    reference_probs(l, n, p, want);
    for (int i = 0; ok && i < n; i++) {
        if ((got[i] > 0) != (want[i] > 0) || fabs(got[i] - want[i]) > tol) {
            fprintf(stderr, "  token %d: got %.9g want %.9g (T=%g k=%d p=%g min_p=%g)\n", i, got[i], want[i],
                    (double)p->temperature, p->top_k, (double)p->top_p, (double)p->min_p);
            ok = false;
        }
    }
    free(got);
    free(want);
    CHECK(ok);
    return ok;
}

FM_TEST(sample_greedy_and_top_k_1) {
    enum { N = 1000 };
    float l[N];
    rs = 1;
    fm_sampler_params p = fm_sampler_default_params();
    p.temperature = 0;
    fm_sampler *g, *k1;
    CHECK_OK(fm_sampler_new(&p, N, &g));
    p.temperature = 0.8f;
    p.top_k = 1;
    p.seed = 77;
    CHECK_OK(fm_sampler_new(&p, N, &k1));
    for (int it = 0; it < 200; it++) {
        random_logits(l, N, 10);
        int best = 0;
        for (int i = 1; i < N; i++)
            if (l[i] > l[best]) best = i;
        int32_t a, b;
        CHECK_OK(fm_sampler_sample(g, l, &a));
        CHECK_OK(fm_sampler_sample(k1, l, &b));
        CHECK(a == best && b == best);
    }
    /* ties go to the lowest id */
    for (int i = 0; i < N; i++) l[i] = i % 7 == 3 ? 5.0f : 1.0f;
    int32_t a;
    CHECK_OK(fm_sampler_sample(g, l, &a));
    CHECK(a == 3);
    float probs[N];
    CHECK_OK(fm_sampler_probs(k1, l, probs));
    CHECK(probs[3] == 1.0f && probs[10] == 0.0f);
    fm_sampler_free(g);
    fm_sampler_free(k1);
}

/* Draw frequencies match the distribution (4.5 sigma per token, 200k draws). */
static void check_draws(fm_test_ctx *t, fm_sampler *s, const float *l, int n, int draws) {
    float *pr = malloc((size_t)n * sizeof *pr);
    int *hits = calloc((size_t)n, sizeof *hits);
    CHECK_OK(fm_sampler_probs(s, l, pr));
    for (int d = 0; d < draws; d++) {
        int32_t id;
        CHECK_OK(fm_sampler_sample(s, l, &id));
        hits[id]++;
    }
    for (int i = 0; i < n; i++) {
        double e = pr[i] * draws, sd = sqrt(draws * pr[i] * (1 - pr[i])) + 1e-9;
        if (pr[i] == 0)
            CHECK_MSG(hits[i] == 0, "token %d drawn %d times but filtered out", i, hits[i]);
        else
            CHECK_MSG(fabs(hits[i] - e) <= 4.5 * sd + 1, "token %d: %d draws, expected %.1f", i, hits[i], e);
    }
    free(pr);
    free(hits);
}

FM_TEST(sample_temperature_distribution) {
    const float l[6] = {0.0f, 1.0f, 2.0f, -1.0f, -INFINITY, 0.5f};
    fm_sampler_params p = fm_sampler_default_params();
    p.temperature = 0.7f;
    p.seed = 5;
    fm_sampler *s;
    CHECK_OK(fm_sampler_new(&p, 6, &s));
    same_distribution(t, s, l, 6, &p, 1e-6);
    float pr[6];
    CHECK_OK(fm_sampler_probs(s, l, pr));
    double z = 0;
    for (int i = 0; i < 6; i++) z += i == 4 ? 0 : exp(l[i] / 0.7);
    CHECK(fabs(pr[2] - exp(2 / 0.7) / z) < 1e-6 && pr[4] == 0);
    check_draws(t, s, l, 6, 200000);
    fm_sampler_free(s);
    /* a high temperature flattens, a low one sharpens */
    p.temperature = 100;
    CHECK_OK(fm_sampler_new(&p, 6, &s));
    CHECK_OK(fm_sampler_probs(s, l, pr));
    CHECK(pr[2] < 0.21f && pr[3] > 0.19f);
    fm_sampler_free(s);
    p.temperature = 0.01f;
    CHECK_OK(fm_sampler_new(&p, 6, &s));
    CHECK_OK(fm_sampler_probs(s, l, pr));
    CHECK(pr[2] > 0.999f);
    fm_sampler_free(s);
}

FM_TEST(sample_top_p_smallest_set) {
    /* probabilities 0.5, 0.2, 0.15, 0.1, 0.05 */
    const float l[5] = {logf(0.05f), logf(0.2f), logf(0.5f), logf(0.1f), logf(0.15f)};
    const struct {
        float top_p;
        int kept;
    } cases[] = {{0.4f, 1}, {0.6f, 2}, {0.75f, 3}, {0.9f, 4}, {0.99f, 5}};
    for (size_t c = 0; c < 5; c++) {
        fm_sampler_params p = fm_sampler_default_params();
        p.top_p = cases[c].top_p;
        fm_sampler *s;
        CHECK_OK(fm_sampler_new(&p, 5, &s));
        float pr[5];
        CHECK_OK(fm_sampler_probs(s, l, pr));
        int kept = 0;
        for (int i = 0; i < 5; i++) kept += pr[i] > 0;
        CHECK_MSG(kept == cases[c].kept, "top_p %g kept %d, want %d", (double)cases[c].top_p, kept, cases[c].kept);
        /* the kept ones are the most likely, renormalised */
        if (kept == 2) CHECK(fabs(pr[2] - 0.5 / 0.7) < 1e-5 && fabs(pr[1] - 0.2 / 0.7) < 1e-5);
        same_distribution(t, s, l, 5, &p, 1e-5);
        fm_sampler_free(s);
    }
    /* against the full-sort reference on random logits, small and Qwen-sized vocabularies */
    rs = 42;
    const int sizes[] = {50, 1000, 248320};
    for (size_t z = 0; z < 3; z++) {
        int n = sizes[z];
        float *lg = malloc((size_t)n * sizeof *lg);
        for (int it = 0; it < (n > 10000 ? 4 : 100); it++) {
            random_logits(lg, n, it % 2 ? 3 : 15);
            fm_sampler_params p = fm_sampler_default_params();
            p.top_p = (float)(0.05 + 0.94 * urand());
            p.temperature = (float)(0.3 + urand());
            fm_sampler *s;
            CHECK_OK(fm_sampler_new(&p, n, &s));
            bool ok = same_distribution(t, s, lg, n, &p, 1e-5);
            fm_sampler_free(s);
            if (!ok) break;
        }
        free(lg);
    }
}

FM_TEST(sample_top_k_and_min_p) {
    rs = 7;
    enum { N = 300 };
    float l[N];
    for (int it = 0; it < 200; it++) {
        random_logits(l, N, 8);
        if (it % 5 == 0) l[it % N] = -INFINITY;
        if (it % 7 == 0) l[3] = l[4]; /* ties */
        fm_sampler_params p = fm_sampler_default_params();
        p.temperature = (float)(0.2 + 1.5 * urand());
        p.top_k = it % 3 ? 1 + (int)(urand() * 40) : 0;
        p.top_p = it % 4 == 0 ? (float)(0.3 + 0.69 * urand()) : 1.0f;
        p.min_p = it % 2 ? (float)(urand() * 0.3) : 0.0f;
        fm_sampler *s;
        CHECK_OK(fm_sampler_new(&p, N, &s));
        bool ok = same_distribution(t, s, l, N, &p, 1e-5);
        fm_sampler_free(s);
        if (!ok) break;
    }
    /* min-p threshold: p >= min_p * p_max */
    const float l2[4] = {logf(0.6f), logf(0.3f), logf(0.06f), logf(0.04f)};
    fm_sampler_params p = fm_sampler_default_params();
    p.min_p = 0.09f; /* keeps 0.6, 0.3, 0.06 (>= 0.054), drops 0.04 */
    p.seed = 3;
    fm_sampler *s;
    CHECK_OK(fm_sampler_new(&p, 4, &s));
    float pr[4];
    CHECK_OK(fm_sampler_probs(s, l2, pr));
    CHECK(pr[0] > 0 && pr[1] > 0 && pr[2] > 0 && pr[3] == 0);
    CHECK(fabs(pr[2] - 0.06 / 0.96) < 1e-5);
    check_draws(t, s, l2, 4, 100000);
    fm_sampler_free(s);
    /* top-k = 2 draws only the two best */
    p = fm_sampler_default_params();
    p.top_k = 2;
    p.seed = 11;
    CHECK_OK(fm_sampler_new(&p, 4, &s));
    check_draws(t, s, l2, 4, 100000);
    CHECK_OK(fm_sampler_probs(s, l2, pr));
    CHECK(fabs(pr[0] - 2.0 / 3) < 1e-5 && pr[2] == 0);
    fm_sampler_free(s);
}

FM_TEST(sample_penalties) {
    const float l[6] = {2.0f, -1.0f, 0.5f, 3.0f, 0.0f, 1.0f};
    fm_sampler_params p = fm_sampler_default_params();
    p.repetition_penalty = 1.25f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    fm_sampler *s;
    CHECK_OK(fm_sampler_new(&p, 6, &s));
    CHECK_OK(fm_sampler_accept(s, 0));
    CHECK_OK(fm_sampler_accept(s, 1));
    CHECK_OK(fm_sampler_accept(s, 3));
    CHECK_OK(fm_sampler_accept(s, 3));
    CHECK_OK(fm_sampler_accept(s, 4));
    /* expected penalised logits: positive / 1.25, negative * 1.25, then - 0.5 - 0.25 * count */
    const double want[6] = {2.0 / 1.25 - 0.75, -1.25 - 0.75, 0.5, 3.0 / 1.25 - 1.0, 0.0 - 0.75, 1.0};
    double z = 0;
    for (int i = 0; i < 6; i++) z += exp(want[i]);
    float pr[6];
    CHECK_OK(fm_sampler_probs(s, l, pr));
    for (int i = 0; i < 6; i++) CHECK_MSG(fabs(pr[i] - exp(want[i]) / z) < 1e-6, "token %d: %g", i, (double)pr[i]);
    fm_sampler_free(s);

    /* the repetition penalty alone can change the greedy choice; unseen tokens are untouched */
    p = fm_sampler_default_params();
    p.temperature = 0;
    p.repetition_penalty = 2.0f;
    CHECK_OK(fm_sampler_new(&p, 6, &s));
    int32_t id;
    CHECK_OK(fm_sampler_sample(s, l, &id));
    CHECK(id == 3);
    CHECK_OK(fm_sampler_accept(s, 3)); /* 3.0 -> 1.5 < 2.0 */
    CHECK_OK(fm_sampler_sample(s, l, &id));
    CHECK(id == 0);
    CHECK_OK(fm_sampler_accept(s, 0)); /* 2.0 -> 1.0; 3 is at 1.5 */
    CHECK_OK(fm_sampler_sample(s, l, &id));
    CHECK(id == 3);
    fm_sampler_reset(s, 0);
    CHECK_OK(fm_sampler_sample(s, l, &id));
    CHECK(id == 3);
    fm_sampler_free(s);

    /* a window: only the last 2 accepted tokens count */
    p = fm_sampler_default_params();
    p.presence_penalty = 1.0f;
    p.penalty_last_n = 2;
    CHECK_OK(fm_sampler_new(&p, 6, &s));
    const int32_t hist[] = {5, 5, 2, 0, 2};
    for (int i = 0; i < 5; i++) CHECK_OK(fm_sampler_accept(s, hist[i]));
    /* window = {0, 2}: 5 is no longer penalised */
    const double w2[6] = {1.0, -1.0, -0.5, 3.0, 0.0, 1.0};
    z = 0;
    for (int i = 0; i < 6; i++) z += exp(w2[i]);
    CHECK_OK(fm_sampler_probs(s, l, pr));
    for (int i = 0; i < 6; i++) CHECK_MSG(fabs(pr[i] - exp(w2[i]) / z) < 1e-6, "window token %d", i);
    fm_sampler_free(s);
}

FM_TEST(sample_reproducible) {
    enum { N = 5000, STEPS = 300 };
    float *l = malloc(N * sizeof *l);
    rs = 9;
    random_logits(l, N, 4);
    fm_sampler_params p = fm_sampler_default_params();
    p.temperature = 0.9f;
    p.top_p = 0.95f;
    p.top_k = 50;
    p.min_p = 0.01f;
    p.repetition_penalty = 1.1f;
    p.seed = 1234;
    int32_t a[STEPS], b[STEPS], c[STEPS];
    fm_sampler *s1, *s2, *s3;
    CHECK_OK(fm_sampler_new(&p, N, &s1));
    CHECK_OK(fm_sampler_new(&p, N, &s2));
    p.seed = 1235;
    CHECK_OK(fm_sampler_new(&p, N, &s3));
    for (int i = 0; i < STEPS; i++) {
        CHECK_OK(fm_sampler_sample(s1, l, &a[i]));
        CHECK_OK(fm_sampler_sample(s2, l, &b[i]));
        CHECK_OK(fm_sampler_sample(s3, l, &c[i]));
        fm_sampler_accept(s1, a[i]);
        fm_sampler_accept(s2, b[i]);
        fm_sampler_accept(s3, c[i]);
    }
    CHECK(!memcmp(a, b, sizeof a));
    CHECK(memcmp(a, c, sizeof a) != 0);
    /* reset restarts both the history and the generator */
    fm_sampler_reset(s2, 1234);
    int32_t x;
    for (int i = 0; i < STEPS; i++) {
        CHECK_OK(fm_sampler_sample(s2, l, &x));
        CHECK(x == a[i]);
        fm_sampler_accept(s2, x);
    }
    /* fixed sequence for this seed: guards the generator against accidental changes */
    fm_sampler_params q = fm_sampler_default_params();
    q.seed = 42;
    fm_sampler *s4;
    CHECK_OK(fm_sampler_new(&q, 10, &s4));
    float flat[10] = {0};
    int32_t seq[8];
    for (int i = 0; i < 8; i++) CHECK_OK(fm_sampler_sample(s4, flat, &seq[i]));
    const int32_t want[8] = {0, 3, 6, 9, 9, 7, 7, 8};
    CHECK_MSG(!memcmp(seq, want, sizeof want), "seed 42 gave %d %d %d %d %d %d %d %d", seq[0], seq[1], seq[2], seq[3],
              seq[4], seq[5], seq[6], seq[7]);
    fm_sampler_free(s1);
    fm_sampler_free(s2);
    fm_sampler_free(s3);
    fm_sampler_free(s4);
    free(l);
}

FM_TEST(sample_rejects_bad_input) {
    fm_sampler *s;
    fm_sampler_params p = fm_sampler_default_params();
    CHECK(fm_sampler_new(&p, 0, &s) == FM_ERR_ARG);
    p.top_p = 0;
    CHECK(fm_sampler_new(&p, 10, &s) == FM_ERR_ARG && strstr(fm_last_error(), "top_p"));
    p = fm_sampler_default_params();
    p.min_p = 1.5f;
    CHECK(fm_sampler_new(&p, 10, &s) == FM_ERR_ARG && strstr(fm_last_error(), "min_p"));
    p = fm_sampler_default_params();
    p.repetition_penalty = 0;
    CHECK(fm_sampler_new(&p, 10, &s) == FM_ERR_ARG && strstr(fm_last_error(), "repetition_penalty"));
    p = fm_sampler_default_params();
    p.temperature = NAN;
    CHECK(fm_sampler_new(&p, 10, &s) == FM_ERR_ARG);
    CHECK_OK(fm_sampler_new(NULL, 4, &s));
    float l[4] = {0, NAN, 1, 2};
    int32_t id;
    CHECK(fm_sampler_sample(s, l, &id) == FM_ERR_ARG && strstr(fm_last_error(), "logit 1 is NaN"));
    float inf[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    CHECK(fm_sampler_sample(s, inf, &id) == FM_ERR_ARG && strstr(fm_last_error(), "-inf"));
    inf[2] = INFINITY;
    CHECK(fm_sampler_sample(s, inf, &id) == FM_ERR_ARG && strstr(fm_last_error(), "+inf"));
    CHECK(fm_sampler_accept(s, 4) == FM_ERR_ARG && fm_sampler_accept(s, -1) == FM_ERR_ARG);
    /* masked tokens are never drawn */
    float m[4] = {-INFINITY, 0, -INFINITY, 0};
    for (int i = 0; i < 1000; i++) {
        CHECK_OK(fm_sampler_sample(s, m, &id));
        CHECK(id == 1 || id == 3);
    }
    fm_sampler_free(s);
    fm_sampler_free(NULL);
}

/* ================================ stopping ================================ */

static void collect(char *out, size_t *n, const char *s, size_t len) {
    memcpy(out + *n, s, len);
    *n += len;
    out[*n] = 0;
}

FM_TEST(sample_stop_strings_across_tokens) {
    const char *stops[] = {"\n\nUser:", "</answer>", "é!"};
    fm_stop *st;
    CHECK_OK(fm_stop_new(NULL, 0, stops, 3, &st));
    const char *toks[] = {"Hello", "\n", "\nUs", "er", ":", " never shown"};
    char out[256];
    size_t n = 0;
    fm_stop_reason why = FM_STOP_NONE;
    int stopped_at = -1;
    for (int i = 0; i < 6 && why == FM_STOP_NONE; i++) {
        const char *e;
        size_t el;
        CHECK_OK(fm_stop_push(st, 100 + i, toks[i], strlen(toks[i]), &why, &e, &el));
        collect(out, &n, e, el);
        if (i == 1 || i == 2 || i == 3) CHECK_MSG(!strcmp(out, "Hello"), "after token %d: \"%s\"", i, out);
        if (why != FM_STOP_NONE) stopped_at = i;
    }
    CHECK(why == FM_STOP_STRING && stopped_at == 4 && fm_stop_matched(st) == 0);
    CHECK(!strcmp(out, "Hello"));
    const char *e;
    size_t el;
    CHECK(fm_stop_push(st, 1, "x", 1, &why, &e, &el) == FM_ERR_ARG);
    fm_stop_free(st);

    /* a near miss releases the held text; a multi-byte stop string split over tokens; flush */
    CHECK_OK(fm_stop_new(NULL, 0, stops, 3, &st));
    const char *toks2[] = {"a\n", "\nUse", "d it. caf", "\xc3\xa9", "!", "zzz"};
    n = 0;
    why = FM_STOP_NONE;
    for (int i = 0; i < 6 && why == FM_STOP_NONE; i++) {
        CHECK_OK(fm_stop_push(st, i, toks2[i], strlen(toks2[i]), &why, &e, &el));
        collect(out, &n, e, el);
    }
    CHECK(why == FM_STOP_STRING && fm_stop_matched(st) == 2);
    CHECK_MSG(!strcmp(out, "a\n\nUsed it. caf"), "\"%s\"", out);
    fm_stop_free(st);

    CHECK_OK(fm_stop_new(NULL, 0, stops, 3, &st));
    n = 0;
    CHECK_OK(fm_stop_push(st, 0, "end</ans", 8, &why, &e, &el));
    collect(out, &n, e, el);
    CHECK(why == FM_STOP_NONE && !strcmp(out, "end"));
    e = fm_stop_flush(st, &el);
    collect(out, &n, e, el);
    CHECK(!strcmp(out, "end</ans"));
    fm_stop_free(st);

    /* stop ids: the held text is shown, the stop token's text is not */
    const int32_t ids[] = {151645, 151643};
    CHECK_OK(fm_stop_new(ids, 2, stops, 1, &st));
    n = 0;
    CHECK_OK(fm_stop_push(st, 10, "ok\n", 3, &why, &e, &el));
    collect(out, &n, e, el);
    CHECK(!strcmp(out, "ok"));
    CHECK_OK(fm_stop_push(st, 151643, "<|endoftext|>", 13, &why, &e, &el));
    collect(out, &n, e, el);
    CHECK(why == FM_STOP_TOKEN && fm_stop_matched(st) == 1 && !strcmp(out, "ok\n"));
    fm_stop_free(st);

    const char *empty[] = {""};
    CHECK(fm_stop_new(NULL, 0, empty, 1, &st) == FM_ERR_ARG);
    fm_stop_free(NULL);
}

/* Random streams: what is shown equals the text up to the first stop string, and the stop comes
 * with the first token that completes one. */
FM_TEST(sample_stop_random_streams) {
    const char alpha[] = "ab\n:";
    rs = 31337;
    for (int it = 0; it < 3000; it++) {
        char stops_buf[3][8];
        const char *stops[3];
        int ns = 1 + (int)(urand() * 3);
        for (int k = 0; k < ns; k++) {
            int sl = 1 + (int)(urand() * 5);
            for (int j = 0; j < sl; j++) stops_buf[k][j] = alpha[(int)(urand() * 4)];
            stops_buf[k][sl] = 0;
            stops[k] = stops_buf[k];
        }
        fm_stop *st;
        CHECK_OK(fm_stop_new(NULL, 0, stops, (size_t)ns, &st));
        char full[512] = "", shown[512] = "";
        size_t fl = 0, sl = 0;
        int stop_tok = -1, ntok = 1 + (int)(urand() * 30);
        fm_stop_reason why = FM_STOP_NONE;
        for (int i = 0; i < ntok && why == FM_STOP_NONE; i++) {
            char tok[8];
            int tl = (int)(urand() * 5);
            for (int j = 0; j < tl; j++) tok[j] = alpha[(int)(urand() * 4)];
            const char *e;
            size_t el;
            CHECK_OK(fm_stop_push(st, i, tok, (size_t)tl, &why, &e, &el));
            memcpy(full + fl, tok, (size_t)tl);
            fl += (size_t)tl;
            collect(shown, &sl, e, el);
            if (why != FM_STOP_NONE) stop_tok = i;
            /* shown text never contains a stop string and is a prefix of the full text */
            for (int k = 0; k < ns; k++) CHECK(!memmem(shown, sl, stops[k], strlen(stops[k])));
            CHECK(sl <= fl && !memcmp(shown, full, sl));
        }
        if (why == FM_STOP_NONE) {
            const char *e;
            size_t el;
            e = fm_stop_flush(st, &el);
            collect(shown, &sl, e, el);
        }
        /* expected: cut at the earliest occurrence of any stop string */
        size_t cut = fl;
        for (int k = 0; k < ns; k++) {
            const char *f = memmem(full, fl, stops[k], strlen(stops[k]));
            if (f && (size_t)(f - full) < cut) cut = (size_t)(f - full);
        }
        bool ok = sl == cut && !memcmp(shown, full, cut) && ((cut < fl) == (why == FM_STOP_STRING));
        CHECK_MSG(ok, "iteration %d: shown %zu bytes, want %zu (stop token %d)", it, sl, cut, stop_tok);
        fm_stop_free(st);
        if (!ok) break;
    }
}
