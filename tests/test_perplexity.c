/* flashmoe perplexity: the perplexity it prints equals one computed here from the same logits, KL
 * against its own logits is zero, a quantized model's agreement is in range, and bad inputs give
 * one clear line and a usage/failure exit code. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/npy.h"
#include "test.h"

#define FX "tests/fixtures/qwen35_moe_trained_bf16"

/* Converts the trained fixture (once per process) to f32 and q8 under the test tmpdir, writes its
 * ids as text and the f32 model's logits; dir receives the tmpdir. */
static bool prepared(fm_test_ctx *t, char *dir, size_t cap) {
    static int made = 0;
    static char root[512];
    if (made) { /* fm_test_tmpdir empties its directory: make it once */
        snprintf(dir, cap, "%s", root);
        return made == 1;
    }
    fm_test_tmpdir("perplexity", root, sizeof root);
    snprintf(dir, cap, "%s", root);
    made = -1;
    fm_npy ids = {0};
    char path[700], cmd[8192], out[4096];
    snprintf(path, sizeof path, "%s/ids.txt", dir);
    FILE *f = NULL;
    char *idstr = NULL;
    if (fm_npy_read(FX "/ids.npy", &ids) != FM_OK || !(f = fopen(path, "w")) ||
        !(idstr = malloc(8 * (size_t)ids.n_elements + 1))) {
        CHECK_MSG(false, "cannot read " FX "/ids.npy or write %s", path);
        if (f) fclose(f);
        fm_npy_free(&ids);
        return false;
    }
    size_t len = 0;
    for (int64_t i = 0; i < ids.n_elements; i++)
        len += (size_t)sprintf(idstr + len, "%s%d", i ? "," : "", ((int32_t *)ids.data)[i]);
    fputs(idstr, f);
    fclose(f);
    fm_npy_free(&ids);
    snprintf(cmd, sizeof cmd,
             "%1$s convert --no-progress --force --quant f32 " FX "/model '%2$s/f32' && "
             "%1$s convert --no-progress --force --quant q8 " FX "/model '%2$s/q8' && "
             "%1$s logits -m '%2$s/f32' --ids '%3$s' --out '%2$s/base.npy'",
             fm_test_bin(), dir, idstr);
    free(idstr);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 0, "rc %d: %s", rc, out);
    made = rc == 0 ? 1 : -1;
    return rc == 0;
}

/* The value of "key": in a one-line JSON object (NAN if absent). */
static double json_num(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? strtod(p + strlen(pat), NULL) : NAN;
}

FM_TEST(perplexity_matches_its_definition_and_kl_to_itself_is_zero) {
    char dir[512], cmd[2048], out[4096];
    if (!prepared(t, dir, sizeof dir)) return;
    snprintf(cmd, sizeof cmd, "%s perplexity -m '%s/f32' --ids-file '%s/ids.txt' --kl-base '%s/base.npy' --json 2>/dev/null",
             fm_test_bin(), dir, dir, dir);
    REQUIRE(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    /* exp(mean over positions of -log p(next id)) from the reference logits, in double */
    char path[700];
    snprintf(path, sizeof path, "%s/base.npy", dir);
    fm_npy base = {0}, ids = {0};
    REQUIRE(fm_npy_read(path, &base) == FM_OK && fm_npy_read(FX "/ids.npy", &ids) == FM_OK);
    int64_t n = ids.n_elements, V = base.shape[1];
    const float *lg = base.data;
    const int32_t *id = ids.data;
    double nll = 0;
    for (int64_t r = 0; r + 1 < n; r++) {
        double mx = -INFINITY, z = 0;
        for (int64_t c = 0; c < V; c++) mx = fmax(mx, lg[r * V + c]);
        for (int64_t c = 0; c < V; c++) z += exp(lg[r * V + c] - mx);
        nll -= lg[r * V + id[r + 1]] - mx - log(z);
    }
    double want = exp(nll / (double)(n - 1)), got = json_num(out, "perplexity");
    fprintf(stderr, "  perplexity %.6f (computed here %.6f), %s", got, want, out);
    CHECK_MSG(fabs(got - want) <= 1e-4 * want, "perplexity %.6f, want %.6f", got, want);
    CHECK_MSG(json_num(out, "tokens") == (double)n, "tokens: %s", out);
    CHECK_MSG(json_num(out, "kl_mean") >= 0 && json_num(out, "kl_mean") < 1e-9, "KL to itself: %s", out);
    CHECK_MSG(json_num(out, "top1_agreement") == 1 && json_num(out, "top5_overlap") == 1, "agreement: %s", out);
    fm_npy_free(&base);
    fm_npy_free(&ids);
    /* a quantized model: a positive KL, agreement below 1 but high on this trained model */
    snprintf(cmd, sizeof cmd, "%s perplexity -m '%s/q8' --ids-file '%s/ids.txt' --kl-base '%s/base.npy' --json 2>/dev/null",
             fm_test_bin(), dir, dir, dir);
    REQUIRE(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    fprintf(stderr, "  q8: %s", out);
    double kl = json_num(out, "kl_mean"), top1 = json_num(out, "top1_agreement");
    CHECK_MSG(kl > 0 && kl < 0.1, "q8 KL %g", kl);
    CHECK_MSG(top1 >= 0.99 && top1 <= 1, "q8 top-1 %g", top1);
}

FM_TEST(perplexity_fewer_experts_warns_and_costs_quality) {
    char dir[512], cmd[2048], out[4096];
    if (!prepared(t, dir, sizeof dir)) return;
    snprintf(cmd, sizeof cmd, "%s perplexity -m '%s/f32' --ids-file '%s/ids.txt' --kl-base '%s/base.npy' --experts 1 --json 2>&1",
             fm_test_bin(), dir, dir, dir);
    REQUIRE(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    CHECK_MSG(strstr(out, "lower quality"), "no warning: %s", out);
    const char *js = strchr(out, '{');
    REQUIRE(js);
    CHECK_MSG(json_num(js, "kl_mean") > 0.01 && json_num(js, "top1_agreement") < 1, "1 expert instead of 3: %s", js);
}

FM_TEST(perplexity_bad_inputs) {
    char dir[512], cmd[2048], out[4096];
    if (!prepared(t, dir, sizeof dir)) return;
    struct {
        const char *args, *want;
        int rc;
    } cases[] = {
        {"", "are required", 2},
        {"-m '%1$s/f32'", "are required", 2},
        {"-m '%1$s/f32' -f '%1$s/ids.txt' --ids-file '%1$s/ids.txt'", "not both", 2},
        {"-m '%1$s/f32' -f '%1$s/ids.txt'", "no tokenizer.json", 1},
        {"-m '%1$s/f32' --ids-file '%1$s/missing.txt'", "cannot read", 1},
        {"-m '%1$s/f32' --ids-file '%1$s/one.txt'", "at least 2 tokens", 2},
        {"-m '%1$s/f32' --ids-file '%1$s/bad.txt'", "perplexity", 2},
        {"-m '%1$s/f32' --ids-file '%1$s/short.txt' --kl-base '%1$s/base.npy'", "expected float32", 1},
        {"-m '%1$s/f32' --ids-file '%1$s/ids.txt' --kl-base '%1$s/ids.txt'", "perplexity", 1},
        {"-m '%1$s/nope' --ids-file '%1$s/ids.txt'", "perplexity", 1},
    };
    snprintf(cmd, sizeof cmd, "printf '7' > '%1$s/one.txt' && printf '1,2,x' > '%1$s/bad.txt' && printf '[1, 2, 3]' > '%1$s/short.txt'", dir);
    REQUIRE(fm_test_run_cmd(cmd, out, sizeof out) == 0);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char args[1024];
        snprintf(args, sizeof args, cases[i].args, dir);
        snprintf(cmd, sizeof cmd, "%s perplexity %s 2>&1", fm_test_bin(), args);
        int rc = fm_test_run_cmd(cmd, out, sizeof out);
        CHECK_MSG(rc == cases[i].rc && strstr(out, cases[i].want) && strchr(out, '\n') == out + strlen(out) - 1,
                  "perplexity %s: rc %d (want %d), output \"%s\" (want one line with \"%s\")", args, rc, cases[i].rc, out,
                  cases[i].want);
    }
}
