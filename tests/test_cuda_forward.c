/* The forward pass on the GPU (--backend cuda): the layer kernels of src/backend/cuda/layers.cu
 * against the CPU code they mirror, and whole models against the CPU forward pass.
 *
 * Kernels (fresh random inputs each run; CUDA_SEED=n repeats one; outputs poisoned with NaN first):
 * each output is compared with the CPU computation of forward.c (copied here as the scalar oracle
 * where forward.c keeps it static), by err = max |gpu - cpu| / max |cpu| over the output:
 *   add_rmsnorm, rmsnorm_gated, head_norm_rope, conv1d_silu (+ state): err <= 1e-5
 *   delta_rule (output and state, 2 chunks in a row; the warp-per-8-columns kernel for dk <= 128 and
 *     dv a multiple of 8 up to 128, the register kernel for other dk, dv <= 128 and the
 *     global-memory one beyond): err <= 1e-4 (sums of dk products per step, compounded over the
 *     chunk's tokens; observed ~1e-6); delta_rule_gated (the same, then the gated norm, one kernel
 *     or the two): the same bound
 *   attention (decode and causal chunks, up to 700 positions): err <= 1e-5; attention_decode (q / k
 *     norms, RoPE, cache store and attention in one kernel, the context split over 1-32 blocks):
 *     err <= 1e-5 against the four kernels, cache row within 1e-6
 *   router_topk: the same ids (ties to the lower id), weights |gpu - cpu| <= 1e-6
 *   gather_rows: exact; moe_combine: err <= 1e-6
 * Models: every fixture of tests/fixtures that tests/test_model.c runs (converted the same way)
 * plus qwen35_moe_q64_bf16 converted to Q4 and to Q8, each evaluated in batch (all logits) and
 * token by token (a prefill of 40, then one at a time) on the GPU and on the CPU: the same argmax
 * in every row and max |gpu - cpu| / max |cpu| <= 2e-3 (the bound test_model.c holds the CPU to
 * against transformers; quantized models the same bound, since both sides compute the same
 * function of the same quantized weights; there the CPU reference evaluates one token at a time,
 * on its float kernels: CUDA_OR_SKIP turns the CPU's int8-activation path, an approximation, off). The VRAM expert cache is also run with a budget that
 * leaves k+1 slots (evictions on every layer) under both policies.
 * Without CUDA in the build, or without a GPU, these tests SKIP with the reason; the command line
 * test checks that --backend cuda then fails with one clear line. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/mixer_kernels.h"
#include "backend/cpu/ops.h"
#include "formats/npy.h"
#include "model/convert.h"
#include "model/forward_cuda.h"
#include "model/model.h"
#include "quant/quant.h"
#include "test.h"
#include "util/half.h"

#ifdef FM_HAVE_CUDA
#include "test_cuda_ctx.h"
#endif

/* ------------------------------------------------------------------------ command line */

/* --backend cuda on a machine or build without a GPU: one clear line and exit status 1; a bad
 * --backend or --vram-policy value is a usage error. */
FM_TEST(cuda_forward_cli_backend_option) {
    char dir[600], cmd[2048], out[4096];
    fm_test_tmpdir("cuda_cli", dir, sizeof dir);
    snprintf(cmd, sizeof cmd, "%s synth --preset tiny --layers 2 '%s/m' >/dev/null 2>&1", fm_test_bin(), dir);
    int rc = fm_test_run_cmd(cmd, out, sizeof out);
    REQUIRE(rc == 0);
    snprintf(cmd, sizeof cmd, "%s logits -m '%s/m' --ids 1,2 --out '%s/l.npy' --backend tpu", fm_test_bin(), dir, dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 2 && strstr(out, "--backend must be cpu or cuda"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s logits -m '%s/m' --ids 1,2 --out '%s/l.npy' --vram-policy mru", fm_test_bin(), dir, dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 2 && strstr(out, "--vram-policy must be lru or flru"), "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s logits -m '%s/m' --ids 1,2 --out '%s/l.npy' --backend cpu", fm_test_bin(), dir, dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
    CHECK_MSG(rc == 0, "rc %d: %s", rc, out);
    snprintf(cmd, sizeof cmd, "%s logits -m '%s/m' --ids 1,2 --out '%s/l.npy' --backend cuda --vram-budget 4G", fm_test_bin(),
             dir, dir);
    rc = fm_test_run_cmd(cmd, out, sizeof out);
#ifdef FM_HAVE_CUDA
    int n = 0;
    if (fm_cuda_device_count(&n) != FM_OK || n == 0) {
        CHECK_MSG(rc == 1 && strstr(out, "flashmoe logits: --backend cuda: no usable CUDA device"), "rc %d: %s", rc, out);
    } else {
        CHECK_MSG(rc == 0, "rc %d: %s", rc, out);
    }
#else
    CHECK_MSG(rc == 1 && strstr(out, "flashmoe logits: --backend cuda: this flashmoe was built without CUDA"), "rc %d: %s",
              rc, out);
#endif
}

#ifndef FM_HAVE_CUDA

#define NO_CUDA(name)                                                                              \
    FM_TEST(name) { SKIP("built without CUDA (make CUDA=1)"); }
NO_CUDA(cuda_layer_add_rmsnorm)
NO_CUDA(cuda_layer_rmsnorm_gated)
NO_CUDA(cuda_layer_head_norm_rope)
NO_CUDA(cuda_layer_conv1d_silu)
NO_CUDA(cuda_layer_delta_rule)
NO_CUDA(cuda_layer_delta_rule_gated)
NO_CUDA(cuda_layer_attention)
NO_CUDA(cuda_layer_router_topk)
NO_CUDA(cuda_layer_gather_combine)
NO_CUDA(cuda_layer_expert_matvec)
NO_CUDA(cuda_layer_decode_at)
NO_CUDA(cuda_layer_attention_decode)
NO_CUDA(cuda_forward_resident_modes_match_cpu)
NO_CUDA(cuda_forward_fixtures_match_cpu)
NO_CUDA(cuda_forward_quantized_match_cpu)
NO_CUDA(cuda_forward_vram_cache_evicts)
NO_CUDA(cuda_forward_budget_errors)

#else

/* ------------------------------------------------------------------------ harness */

#define rnd_u64 fm_test_rand_u64
static float rnd(void) { return (float)fm_test_rand(); } /* [-1, 1) */

/* Device buffers of the test, freed at the end of each test. */
#define MAX_DEV 32
static void *g_dev[MAX_DEV];
static int g_ndev;

static void *dev_from(fm_test_ctx *t, fm_cuda *c, const void *host, size_t bytes) {
    void *d = NULL;
    if (g_ndev == MAX_DEV || fm_cuda_buf_alloc(c, bytes ? bytes : 4, &d) != FM_OK ||
        (host ? fm_cuda_buf_upload(c, d, host, bytes) : fm_cuda_buf_fill(c, d, 0xff, bytes ? bytes : 4)) != FM_OK) {
        t->failures++;
        fprintf(stderr, "  device buffer of %zu bytes: %s\n", bytes, fm_last_error());
        return NULL;
    }
    return g_dev[g_ndev++] = d;
}
static void dev_free_all(fm_cuda *c) {
    for (int i = 0; i < g_ndev; i++) fm_cuda_buf_free(c, g_dev[i]);
    g_ndev = 0;
}
static bool down(fm_test_ctx *t, fm_cuda *c, void *host, const void *dev, size_t bytes) {
    if (fm_cuda_buf_download(c, host, dev, bytes) == FM_OK) return true;
    t->failures++;
    fprintf(stderr, "  download: %s\n", fm_last_error());
    return false;
}

static float *rnd_vec(int64_t n, float amp) {
    float *v = malloc(sizeof(float) * (size_t)(n ? n : 1));
    for (int64_t i = 0; v && i < n; i++) v[i] = rnd() * amp;
    return v;
}

/* max |got - ref| / max |ref|; NaN in got gives infinity. */
static double rel_err(const float *got, const float *ref, int64_t n) {
    double mx = 0, e = 0;
    for (int64_t i = 0; i < n; i++) mx = fmax(mx, fabs(ref[i]));
    for (int64_t i = 0; i < n; i++) {
        if (isnan(got[i]) || isinf(got[i])) return INFINITY;
        e = fmax(e, fabs((double)got[i] - ref[i]));
    }
    return mx > 0 ? e / mx : e;
}

#define CHECK_ERR(what, err, tol)                                                                  \
    do {                                                                                           \
        double e_ = (err);                                                                         \
        fprintf(stderr, "  %s: err %.2e\n", what, e_);                                             \
        CHECK_MSG(e_ <= (tol), "%s: err %.3e > %.0e (seed %llu)", what, e_, (double)(tol), (unsigned long long)fm_test_cuda_seed()); \
    } while (0)

/* ------------------------------------------------------------------------ kernels */

FM_TEST(cuda_layer_add_rmsnorm) {
    CUDA_OR_SKIP(c);
    static const int64_t ns[] = {32, 2048, 5000};
    for (int ni = 0; ni < 3; ni++)
        for (int with_add = 0; with_add < 2; with_add++) {
            const int64_t n = ns[ni], T = 5;
            float *x = rnd_vec(T * n, 3), *add = rnd_vec(T * n, 1), *w = rnd_vec(n, 1), *gx = rnd_vec(T * n, 0),
                  *gxn = rnd_vec(T * n, 0), *rxn = rnd_vec(T * n, 0);
            float *dx = dev_from(t, c, x, sizeof(float) * T * n), *dadd = dev_from(t, c, add, sizeof(float) * T * n),
                  *dw = dev_from(t, c, w, sizeof(float) * n), *dxn = dev_from(t, c, NULL, sizeof(float) * T * n);
            if (dx && dadd && dw && dxn) {
                CHECK_OK(fm_cuda_add_rmsnorm(c, dx, dxn, with_add ? dadd : NULL, dw, T, n, 1e-6f));
                if (down(t, c, gx, dx, sizeof(float) * T * n) && down(t, c, gxn, dxn, sizeof(float) * T * n)) {
                    for (int64_t i = 0; with_add && i < T * n; i++) x[i] += add[i];
                    for (int64_t r = 0; r < T; r++) fm_cpu_rmsnorm(rxn + r * n, x + r * n, w, n, 1e-6f);
                    char what[96];
                    snprintf(what, sizeof what, "add_rmsnorm n=%lld add=%d", (long long)n, with_add);
                    CHECK_ERR(what, fmax(rel_err(gxn, rxn, T * n), rel_err(gx, x, T * n)), 1e-5);
                }
            }
            dev_free_all(c);
            free(x), free(add), free(w), free(gx), free(gxn), free(rxn);
        }
}

FM_TEST(cuda_layer_rmsnorm_gated) {
    CUDA_OR_SKIP(c);
    static const int64_t dvs[] = {8, 128, 300};
    for (int di = 0; di < 3; di++) {
        const int64_t dv = dvs[di], rows = 7 * 4;
        float *x = rnd_vec(rows * dv, 2), *z = rnd_vec(rows * dv, 6), *w = rnd_vec(dv, 1), *got = rnd_vec(rows * dv, 0);
        float *dx = dev_from(t, c, x, sizeof(float) * rows * dv), *dz = dev_from(t, c, z, sizeof(float) * rows * dv),
              *dw = dev_from(t, c, w, sizeof(float) * dv);
        if (dx && dz && dw) {
            CHECK_OK(fm_cuda_rmsnorm_gated(c, dx, dx, dz, dw, rows, dv, 1e-6f)); /* in place, as forward_cuda.c */
            if (down(t, c, got, dx, sizeof(float) * rows * dv)) {
                for (int64_t r = 0; r < rows; r++) { /* forward.c: rmsnorm(o) * w, then o *= silu(z) */
                    float *o = x + r * dv;
                    fm_cpu_rmsnorm(o, o, w, dv, 1e-6f);
                    for (int64_t j = 0; j < dv; j++) o[j] *= fm_silu(z[r * dv + j]);
                }
                char what[64];
                snprintf(what, sizeof what, "rmsnorm_gated dv=%lld", (long long)dv);
                CHECK_ERR(what, rel_err(got, x, rows * dv), 1e-5);
            }
        }
        dev_free_all(c);
        free(x), free(z), free(w), free(got);
    }
}

FM_TEST(cuda_layer_head_norm_rope) {
    CUDA_OR_SKIP(c);
    static const struct {
        int d, rot, heads, stride_mul;
        int64_t pos0;
        double theta;
    } cases[] = {{16, 4, 4, 2, 0, 1e7}, {256, 64, 16, 2, 1234, 1e7}, {256, 64, 2, 1, 100000, 1e7}, {64, 0, 3, 1, 5, 1e4},
                 {128, 128, 5, 2, 77, 1e6}};
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const int d = cases[ci].d, rot = cases[ci].rot, nh = cases[ci].heads, T = 6;
        const int64_t in_stride = (int64_t)d * cases[ci].stride_mul, pos0 = cases[ci].pos0;
        float *in = rnd_vec(T * nh * in_stride, 4), *w = rnd_vec(d, 1.5f), *got = rnd_vec(T * nh * d, 0),
              *ref = rnd_vec(T * nh * d, 0), inv[4096];
        for (int i = 0; i < rot / 2; i++) inv[i] = (float)(1.0 / pow(cases[ci].theta, (double)(2 * i) / (double)rot));
        float *din = dev_from(t, c, in, sizeof(float) * T * nh * in_stride), *dw = dev_from(t, c, w, sizeof(float) * d),
              *dinv = dev_from(t, c, inv, sizeof(float) * (rot / 2 + 1)), *dout = dev_from(t, c, NULL, sizeof(float) * T * nh * d);
        /* the _at variant: position from device memory, output moved by pos0 * 3 floats */
        float *dout_at = dev_from(t, c, NULL, sizeof(float) * (size_t)(pos0 * 3 + T * nh * d));
        int64_t *dpos = dev_from(t, c, &pos0, sizeof pos0);
        float *got_at = rnd_vec(T * nh * d, 0);
        for (int64_t i = 0; i < T * nh * d; i++) got[i] = got_at[i] = NAN;
        if (din && dw && dinv && dout && dout_at && dpos) {
            CHECK_OK(fm_cuda_head_norm_rope(c, dout, d, din, in_stride, dw, T, nh, d, 1e-6f, rot, dinv, pos0));
            CHECK_OK(fm_cuda_head_norm_rope_at(c, dout_at, 3, d, din, in_stride, dw, T, nh, d, 1e-6f, rot, dinv, dpos));
            if (down(t, c, got, dout, sizeof(float) * T * nh * d) &&
                down(t, c, got_at, dout_at + pos0 * 3, sizeof(float) * T * nh * d)) {
                for (int tt = 0; tt < T; tt++)
                    for (int h = 0; h < nh; h++) { /* forward.c full_attention */
                        float *dst = ref + ((int64_t)tt * nh + h) * d;
                        fm_cpu_rmsnorm(dst, in + ((int64_t)tt * nh + h) * in_stride, w, d, 1e-6f);
                        fm_cpu_rope_neox(dst, rot, pos0 + tt, cases[ci].theta);
                    }
                char what[96];
                snprintf(what, sizeof what, "head_norm_rope d=%d rot=%d pos0=%lld", d, rot, (long long)pos0);
                CHECK_ERR(what, rel_err(got, ref, T * nh * d), 1e-5);
                snprintf(what, sizeof what, "head_norm_rope_at d=%d rot=%d pos0=%lld", d, rot, (long long)pos0);
                CHECK_ERR(what, rel_err(got_at, ref, T * nh * d), 1e-5);
            }
        }
        dev_free_all(c);
        free(in), free(w), free(got), free(got_at), free(ref);
    }
}

/* forward.c linear_attention: the conv and the state update (the scalar oracle). */
static void conv_ref(float *out, const float *qkv, float *state, const float *w, int64_t T, int64_t cd, int64_t K) {
    for (int64_t tt = 0; tt < T; tt++)
        for (int64_t ch = 0; ch < cd; ch++) {
            const float *wc = w + ch * K;
            float acc = 0;
            for (int64_t jj = 0; jj < K; jj++) {
                int64_t idx = tt + jj - (K - 1);
                float v = idx >= 0 ? qkv[idx * cd + ch] : state[(K - 1 + idx) * cd + ch];
                acc += wc[jj] * v;
            }
            out[tt * cd + ch] = fm_silu(acc);
        }
    for (int64_t i = 0; i < K - 1; i++) {
        int64_t src = T + i;
        if (src < K - 1) memcpy(state + i * cd, state + src * cd, sizeof(float) * (size_t)cd);
        else memcpy(state + i * cd, qkv + (src - (K - 1)) * cd, sizeof(float) * (size_t)cd);
    }
}

FM_TEST(cuda_layer_conv1d_silu) {
    CUDA_OR_SKIP(c);
    static const int Ks[] = {4, 3, 1};
    static const int64_t Ts[] = {1, 2, 9};
    for (int ki = 0; ki < 3; ki++) {
        const int K = Ks[ki];
        const int64_t cd = 1000;
        float *state = rnd_vec((K - 1) * cd + 1, 2), *w = rnd_vec(cd * K, 1);
        float *dstate = dev_from(t, c, state, sizeof(float) * ((K - 1) * cd + 1)), *dw = dev_from(t, c, w, sizeof(float) * cd * K);
        for (int ti = 0; ti < 3 && dstate && dw; ti++) { /* three chunks in a row: the state carries */
            const int64_t T = Ts[ti];
            float *in = rnd_vec(T * cd, 3), *got = rnd_vec(T * cd, 0), *ref = rnd_vec(T * cd, 0);
            float *gst = rnd_vec((K - 1) * cd + 1, 0);
            float *din = dev_from(t, c, in, sizeof(float) * T * cd), *dout = dev_from(t, c, NULL, sizeof(float) * T * cd);
            if (din && dout) {
                CHECK_OK(fm_cuda_conv1d_silu(c, dout, din, dstate, dw, T, cd, K));
                conv_ref(ref, in, state, w, T, cd, K);
                if (down(t, c, got, dout, sizeof(float) * T * cd) &&
                    down(t, c, gst, dstate, sizeof(float) * ((K - 1) * cd + 1))) {
                    char what[64];
                    snprintf(what, sizeof what, "conv1d_silu K=%d T=%lld", K, (long long)T);
                    CHECK_ERR(what, rel_err(got, ref, T * cd), 1e-5);
                    CHECK_MSG(K == 1 || rel_err(gst, state, (K - 1) * cd) == 0, "conv state differs (K %d, T %lld)", K,
                              (long long)T);
                }
            }
            free(in), free(got), free(ref), free(gst);
        }
        dev_free_all(c);
        free(state), free(w);
    }
}

/* forward.c delta_heads, without the gated norm (the scalar oracle): all heads, T tokens. */
static void delta_ref(float *core, const float *conv_out, const float *bb, const float *aa, float *S_all,
                      const float *A_log, const float *dt_bias, int64_t T, int nk, int nv, int dk, int dv) {
    int64_t r = nv / nk, kd = (int64_t)nk * dk, vd = (int64_t)nv * dv, cd = 2 * kd + vd;
    float *qn = malloc(sizeof(float) * (size_t)dk), *kn = malloc(sizeof(float) * (size_t)dk),
          *kv = malloc(sizeof(float) * (size_t)dv);
    float q_scale = 1.0f / sqrtf((float)dk);
    for (int64_t h = 0; h < nv; h++) {
        float *S = S_all + h * dk * dv;
        int64_t g = h / r;
        float A = -expf(A_log[h]);
        for (int64_t tt = 0; tt < T; tt++) {
            const float *row = conv_out + tt * cd;
            const float *q = row + g * dk, *k = row + kd + g * dk, *v = row + 2 * kd + h * dv;
            float sq = 0, sk = 0;
            for (int64_t i = 0; i < dk; i++) {
                sq += q[i] * q[i];
                sk += k[i] * k[i];
            }
            float iq = 1.0f / sqrtf(sq + 1e-6f), ik = 1.0f / sqrtf(sk + 1e-6f);
            for (int64_t i = 0; i < dk; i++) {
                qn[i] = q[i] * iq * q_scale;
                kn[i] = k[i] * ik;
            }
            float b = bb[tt * nv + h], a = aa[tt * nv + h];
            float decay = expf(A * fm_softplus(a + dt_bias[h]));
            float beta = fm_sigmoid(b);
            for (int64_t jj = 0; jj < dv; jj++) kv[jj] = 0;
            for (int64_t i = 0; i < dk; i++) {
                float *Si = S + i * dv;
                for (int64_t jj = 0; jj < dv; jj++) {
                    Si[jj] *= decay;
                    kv[jj] += Si[jj] * kn[i];
                }
            }
            for (int64_t jj = 0; jj < dv; jj++) kv[jj] = beta * (v[jj] - kv[jj]);
            float *o = core + tt * vd + h * dv;
            for (int64_t jj = 0; jj < dv; jj++) o[jj] = 0;
            for (int64_t i = 0; i < dk; i++) {
                float *Si = S + i * dv;
                for (int64_t jj = 0; jj < dv; jj++) {
                    Si[jj] += kn[i] * kv[jj];
                    o[jj] += Si[jj] * qn[i];
                }
            }
        }
    }
    free(qn), free(kn), free(kv);
}

FM_TEST(cuda_layer_delta_rule) {
    CUDA_OR_SKIP(c);
    static const struct {
        int nk, nv, dk, dv;
    } cases[] = {{2, 4, 8, 8}, {2, 6, 12, 8}, {2, 4, 16, 24}, {4, 8, 128, 128}, {2, 4, 112, 64}, /* columns */
                 {2, 4, 16, 20}, {1, 2, 24, 100},                                             /* registers */
                 {1, 2, 160, 40}, {2, 2, 32, 256}};                                           /* global memory */
    static const int64_t Ts[] = {5, 1};
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const int nk = cases[ci].nk, nv = cases[ci].nv, dk = cases[ci].dk, dv = cases[ci].dv;
        const int64_t cd = 2LL * nk * dk + (int64_t)nv * dv, vd = (int64_t)nv * dv, sn = (int64_t)nv * dk * dv;
        float *S = rnd_vec(sn, 0.5f), *A_log = rnd_vec(nv, 1), *dt = rnd_vec(nv, 1), *gS = rnd_vec(sn, 0);
        float *dS = dev_from(t, c, S, sizeof(float) * sn), *dA = dev_from(t, c, A_log, sizeof(float) * nv),
              *ddt = dev_from(t, c, dt, sizeof(float) * nv);
        for (int ti = 0; ti < 2 && dS && dA && ddt; ti++) {
            const int64_t T = Ts[ti];
            float *qkv = rnd_vec(T * cd, 2), *bb = rnd_vec(T * nv, 3), *aa = rnd_vec(T * nv, 3), *got = rnd_vec(T * vd, 0),
                  *ref = rnd_vec(T * vd, 0);
            float *dq = dev_from(t, c, qkv, sizeof(float) * T * cd), *db = dev_from(t, c, bb, sizeof(float) * T * nv),
                  *da = dev_from(t, c, aa, sizeof(float) * T * nv), *dout = dev_from(t, c, NULL, sizeof(float) * T * vd);
            if (dq && db && da && dout) {
                CHECK_OK(fm_cuda_delta_rule(c, dout, dq, db, da, dS, dA, ddt, T, nk, nv, dk, dv));
                delta_ref(ref, qkv, bb, aa, S, A_log, dt, T, nk, nv, dk, dv);
                if (down(t, c, got, dout, sizeof(float) * T * vd) && down(t, c, gS, dS, sizeof(float) * sn)) {
                    char what[96];
                    snprintf(what, sizeof what, "delta_rule nk=%d nv=%d dk=%d dv=%d T=%lld (chunk %d)", nk, nv, dk, dv,
                             (long long)T, ti);
                    CHECK_ERR(what, fmax(rel_err(got, ref, T * vd), rel_err(gS, S, sn)), 1e-4);
                }
            }
            free(qkv), free(bb), free(aa), free(got), free(ref);
        }
        dev_free_all(c);
        free(S), free(A_log), free(dt), free(gS);
    }
}

/* fm_cuda_delta_rule_gated against delta_ref and then forward.c's gated norm per head:
 * rmsnorm(o) * w * silu(z). */
FM_TEST(cuda_layer_delta_rule_gated) {
    CUDA_OR_SKIP(c);
    static const struct {
        int nk, nv, dk, dv;
    } cases[] = {{2, 4, 8, 8}, {2, 6, 12, 8}, {2, 4, 16, 24}, {16, 32, 128, 128}, {2, 4, 112, 64}, /* one kernel */
                 {2, 4, 16, 20}, {1, 2, 160, 40}};                                              /* two */
    static const int64_t Ts[] = {1, 4};
    const float eps = 1e-6f;
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const int nk = cases[ci].nk, nv = cases[ci].nv, dk = cases[ci].dk, dv = cases[ci].dv;
        const int64_t cd = 2LL * nk * dk + (int64_t)nv * dv, vd = (int64_t)nv * dv, sn = (int64_t)nv * dk * dv;
        float *S = rnd_vec(sn, 0.5f), *A_log = rnd_vec(nv, 1), *dt = rnd_vec(nv, 1), *gS = rnd_vec(sn, 0),
              *nw = rnd_vec(dv, 1);
        float *dS = dev_from(t, c, S, sizeof(float) * sn), *dA = dev_from(t, c, A_log, sizeof(float) * nv),
              *ddt = dev_from(t, c, dt, sizeof(float) * nv), *dnw = dev_from(t, c, nw, sizeof(float) * dv);
        for (int ti = 0; ti < 2 && dS && dA && ddt && dnw; ti++) {
            const int64_t T = Ts[ti];
            float *qkv = rnd_vec(T * cd, 2), *bb = rnd_vec(T * nv, 3), *aa = rnd_vec(T * nv, 3), *z = rnd_vec(T * vd, 4),
                  *got = rnd_vec(T * vd, 0), *ref = rnd_vec(T * vd, 0);
            float *dq = dev_from(t, c, qkv, sizeof(float) * T * cd), *db = dev_from(t, c, bb, sizeof(float) * T * nv),
                  *da = dev_from(t, c, aa, sizeof(float) * T * nv), *dz = dev_from(t, c, z, sizeof(float) * T * vd),
                  *dout = dev_from(t, c, NULL, sizeof(float) * T * vd);
            if (dq && db && da && dz && dout) {
                CHECK_OK(fm_cuda_delta_rule_gated(c, dout, dq, db, da, dS, dA, ddt, dz, dnw, eps, T, nk, nv, dk, dv));
                delta_ref(ref, qkv, bb, aa, S, A_log, dt, T, nk, nv, dk, dv);
                for (int64_t r = 0; r < T * nv; r++) {
                    float *o = ref + r * dv;
                    fm_cpu_rmsnorm(o, o, nw, dv, eps);
                    for (int64_t j = 0; j < dv; j++) o[j] *= fm_silu(z[r * dv + j]);
                }
                if (down(t, c, got, dout, sizeof(float) * T * vd) && down(t, c, gS, dS, sizeof(float) * sn)) {
                    char what[96];
                    snprintf(what, sizeof what, "delta_rule_gated nk=%d nv=%d dk=%d dv=%d T=%lld (chunk %d)", nk, nv, dk,
                             dv, (long long)T, ti);
                    CHECK_ERR(what, fmax(rel_err(got, ref, T * vd), rel_err(gS, S, sn)), 1e-4);
                }
            }
            free(qkv), free(bb), free(aa), free(z), free(got), free(ref);
        }
        dev_free_all(c);
        free(S), free(A_log), free(dt), free(gS), free(nw);
    }
}

/* forward.c attn_heads (the scalar oracle): online softmax over p <= pos0 + t, times sigmoid(gate). */
static void attn_ref(float *att, const float *q, const float *gate, int64_t gate_stride, const float *kc, const float *vc,
                     int64_t T, int64_t pos0, int nh, int nkv, int d) {
    int group = nh / nkv;
    float scale = 1.0f / sqrtf((float)d);
    for (int h = 0; h < nh; h++) {
        int kvh = h / group;
        for (int64_t tt = 0; tt < T; tt++) {
            const float *qq = q + (tt * nh + h) * d;
            float *o = att + (tt * nh + h) * d;
            float m = -INFINITY, sum = 0;
            for (int i = 0; i < d; i++) o[i] = 0;
            for (int64_t p = 0; p <= pos0 + tt; p++) {
                const float *k = kc + (p * nkv + kvh) * d, *v = vc + (p * nkv + kvh) * d;
                float sc = 0;
                for (int i = 0; i < d; i++) sc += qq[i] * k[i];
                sc *= scale;
                if (sc > m) {
                    float rescale = expf(m - sc);
                    sum *= rescale;
                    for (int i = 0; i < d; i++) o[i] *= rescale;
                    m = sc;
                }
                float e = expf(sc - m);
                sum += e;
                for (int i = 0; i < d; i++) o[i] += e * v[i];
            }
            const float *g = gate + (tt * nh + h) * gate_stride;
            for (int i = 0; i < d; i++) o[i] = o[i] / sum * fm_sigmoid(g[i]);
        }
    }
}

FM_TEST(cuda_layer_attention) {
    CUDA_OR_SKIP(c);
    static const struct {
        int nh, nkv, d;
        int64_t T, pos0;
    } cases[] = {{4, 2, 16, 1, 0, }, {4, 2, 16, 9, 0}, {16, 2, 256, 1, 700}, {6, 2, 32, 7, 33}, {4, 1, 64, 3, 200},
                 {32, 4, 512, 2, 40}};
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const int nh = cases[ci].nh, nkv = cases[ci].nkv, d = cases[ci].d;
        const int64_t T = cases[ci].T, pos0 = cases[ci].pos0, P = pos0 + T, gs = 2LL * d;
        float *q = rnd_vec(T * nh * d, 2), *gate = rnd_vec(T * nh * gs, 4), *kc = rnd_vec(P * nkv * d, 2),
              *vc = rnd_vec(P * nkv * d, 1), *got = rnd_vec(T * nh * d, 0), *ref = rnd_vec(T * nh * d, 0);
        float *dq = dev_from(t, c, q, sizeof(float) * T * nh * d), *dg = dev_from(t, c, gate, sizeof(float) * T * nh * gs),
              *dk = dev_from(t, c, kc, sizeof(float) * P * nkv * d), *dv = dev_from(t, c, vc, sizeof(float) * P * nkv * d),
              *dout = dev_from(t, c, NULL, sizeof(float) * T * nh * d),
              *dout_at = dev_from(t, c, NULL, sizeof(float) * T * nh * d);
        int64_t *dpos = dev_from(t, c, &pos0, sizeof pos0);
        float *got_at = rnd_vec(T * nh * d, 0);
        if (dq && dg && dk && dv && dout && dout_at && dpos) {
            CHECK_OK(fm_cuda_attention(c, dout, dq, dg + d, gs, dk, dv, T, pos0, nh, nkv, d));
            CHECK_OK(fm_cuda_attention_at(c, dout_at, dq, dg + d, gs, dk, dv, T, dpos, nh, nkv, d));
            attn_ref(ref, q, gate + d, gs, kc, vc, T, pos0, nh, nkv, d);
            if (down(t, c, got, dout, sizeof(float) * T * nh * d) && down(t, c, got_at, dout_at, sizeof(float) * T * nh * d)) {
                char what[96];
                snprintf(what, sizeof what, "attention %d/%d heads d=%d T=%lld pos0=%lld", nh, nkv, d, (long long)T,
                         (long long)pos0);
                CHECK_ERR(what, rel_err(got, ref, T * nh * d), 1e-5);
                snprintf(what, sizeof what, "attention_at %d/%d heads d=%d T=%lld pos0=%lld", nh, nkv, d, (long long)T,
                         (long long)pos0);
                CHECK_ERR(what, rel_err(got_at, ref, T * nh * d), 1e-5);
            }
        }
        dev_free_all(c);
        free(q), free(gate), free(kc), free(vc), free(got), free(got_at), free(ref);
    }
    CHECK(fm_cuda_attention(c, (float *)8, (float *)8, (float *)8, 1024, (float *)8, (float *)8, 1, 0, 4, 2, 1024) ==
          FM_ERR_ARG);
}

/* fm_cuda_attention_decode against the four calls it replaces (each tested against the CPU above and
 * in cuda_layer_head_norm_rope): the same output within float rounding (err <= 1e-5; the softmax is
 * summed in another order), the same caches (row pos within 1e-6: the norm's sum of squares is
 * reduced by more threads; every other row untouched), with the context in one block a head and
 * split over 2, 5 and 32 (the chunk boundaries 63 / 64 and long contexts included). Each split count
 * runs twice on the same scratch: the second call must agree with the first bit for bit (the
 * kernel leaves its counters at zero). */
FM_TEST(cuda_layer_attention_decode) {
    CUDA_OR_SKIP(c);
    static const struct {
        int nh, nkv, d, rot;
        int64_t pos;
    } cases[] = {{16, 2, 256, 64, 0},  {16, 2, 256, 64, 37}, {16, 2, 256, 64, 63}, {16, 2, 256, 64, 64},
                 {16, 2, 256, 64, 2000}, {4, 1, 64, 64, 5},  {6, 2, 32, 16, 700},  {8, 8, 512, 0, 3},
                 {8, 8, 512, 0, 300}};
    static const int splits[] = {1, 2, 5, 32};
    const float eps = 1e-6f;
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        const int nh = cases[ci].nh, nkv = cases[ci].nkv, d = cases[ci].d, rot = cases[ci].rot;
        const int64_t pos = cases[ci].pos, P = pos + 3, cn = P * nkv * d, row = pos * nkv * d, rn = (int64_t)nkv * d;
        float *qg = rnd_vec(2LL * nh * d, 2), *kv = rnd_vec(2LL * nkv * d, 2), *qw = rnd_vec(d, 1), *kw = rnd_vec(d, 1),
              *kc = rnd_vec(cn, 1), *vc = rnd_vec(cn, 1), *inv = rnd_vec(d / 2 + 1, 0);
        float *o1 = rnd_vec((int64_t)nh * d, 0), *o2 = rnd_vec((int64_t)nh * d, 0), *o3 = rnd_vec((int64_t)nh * d, 0),
              *k1 = rnd_vec(cn, 0), *k2 = rnd_vec(cn, 0), *v1 = rnd_vec(cn, 0), *v2 = rnd_vec(cn, 0);
        for (int i = 0; i <= d / 2; i++) inv[i] = powf(10000.0f, -(float)(2 * i) / (float)(rot ? rot : 2));
        const size_t scratch_bytes = fm_cuda_attention_decode_scratch_bytes(nh, d, 32);
        float *dqg = dev_from(t, c, qg, sizeof(float) * 2 * nh * d), *dkv = dev_from(t, c, kv, sizeof(float) * 2 * nkv * d),
              *dqw = dev_from(t, c, qw, sizeof(float) * d), *dkw = dev_from(t, c, kw, sizeof(float) * d),
              *dinv = dev_from(t, c, inv, sizeof(float) * (d / 2 + 1)), *dk1 = dev_from(t, c, kc, sizeof(float) * cn),
              *dv1 = dev_from(t, c, vc, sizeof(float) * cn), *dk2 = dev_from(t, c, NULL, sizeof(float) * cn),
              *dv2 = dev_from(t, c, NULL, sizeof(float) * cn), *dq = dev_from(t, c, NULL, sizeof(float) * nh * d),
              *do1 = dev_from(t, c, NULL, sizeof(float) * nh * d), *do2 = dev_from(t, c, NULL, sizeof(float) * nh * d),
              *dscr = dev_from(t, c, NULL, scratch_bytes);
        int64_t *dpos = dev_from(t, c, &pos, sizeof pos);
        if (dqg && dkv && dqw && dkw && dinv && dk1 && dv1 && dk2 && dv2 && dq && do1 && do2 && dscr && dpos) {
            CHECK_OK(fm_cuda_buf_fill(c, dscr, 0, scratch_bytes));
            /* the four kernels, as forward_cuda.c's full_attention_dev with FLASHMOE_CUDA_ATT_FUSE=0 */
            CHECK_OK(fm_cuda_head_norm_rope_at(c, dq, 0, d, dqg, 2 * d, dqw, 1, nh, d, eps, rot, dinv, dpos));
            CHECK_OK(fm_cuda_head_norm_rope_at(c, dk1, (int64_t)nkv * d, d, dkv, d, dkw, 1, nkv, d, eps, rot, dinv, dpos));
            CHECK_OK(fm_cuda_store_at(c, dv1, (int64_t)nkv * d, dkv + (int64_t)nkv * d, (int64_t)nkv * d, dpos));
            CHECK_OK(fm_cuda_attention_at(c, do1, dq, dqg + d, 2 * d, dk1, dv1, 1, dpos, nh, nkv, d));
            bool got_ref = down(t, c, o1, do1, sizeof(float) * nh * d) && down(t, c, k1, dk1, sizeof(float) * cn) &&
                           down(t, c, v1, dv1, sizeof(float) * cn);
            for (size_t si = 0; got_ref && si < sizeof splits / sizeof *splits; si++) {
                const int ns = splits[si];
                for (int rep = 0; rep < 2; rep++) {
                    CHECK_OK(fm_cuda_buf_upload(c, dk2, kc, sizeof(float) * cn));
                    CHECK_OK(fm_cuda_buf_upload(c, dv2, vc, sizeof(float) * cn));
                    CHECK_OK(fm_cuda_buf_fill(c, do2, 0xff, sizeof(float) * nh * d)); /* NaN */
                    CHECK_OK(fm_cuda_attention_decode(c, do2, dqg, dkv, dqw, dkw, eps, rot, dinv, dk2, dv2, dpos, nh,
                                                      nkv, d, ns, ns > 1 ? dscr : NULL));
                    if (!down(t, c, rep ? o3 : o2, do2, sizeof(float) * nh * d) ||
                        !down(t, c, k2, dk2, sizeof(float) * cn) || !down(t, c, v2, dv2, sizeof(float) * cn))
                        break;
                }
                char what[128];
                snprintf(what, sizeof what, "attention_decode %d/%d heads d=%d rot=%d pos=%lld splits=%d", nh, nkv, d,
                         rot, (long long)pos, ns);
                CHECK_ERR(what, rel_err(o2, o1, (int64_t)nh * d), 1e-5);
                CHECK_MSG(memcmp(o2, o3, sizeof(float) * (size_t)nh * d) == 0, "%s: a second call differs", what);
                CHECK_MSG(memcmp(k1, k2, sizeof(float) * (size_t)row) == 0 &&
                              memcmp(v1, v2, sizeof(float) * (size_t)row) == 0 &&
                              memcmp(k1 + row + rn, k2 + row + rn, sizeof(float) * (size_t)(cn - row - rn)) == 0 &&
                              memcmp(v1 + row + rn, v2 + row + rn, sizeof(float) * (size_t)(cn - row - rn)) == 0,
                          "%s: cache rows other than pos changed", what);
                CHECK_MSG(rel_err(k2 + row, k1 + row, rn) <= 1e-6 && memcmp(v1 + row, v2 + row, sizeof(float) * rn) == 0,
                          "%s: cache row pos differs (k err %.3g)", what, rel_err(k2 + row, k1 + row, rn));
            }
        }
        dev_free_all(c);
        free(qg), free(kv), free(qw), free(kw), free(kc), free(vc), free(inv), free(o1), free(o2), free(o3), free(k1),
            free(k2), free(v1), free(v2);
    }
    CHECK(fm_cuda_attention_decode(c, (float *)8, (float *)8, (float *)8, (float *)8, (float *)8, 1e-6f, 0, NULL,
                                   (float *)8, (float *)8, (int64_t *)8, 4, 2, 1024, 1, NULL) == FM_ERR_ARG);
    CHECK(fm_cuda_attention_decode(c, (float *)8, (float *)8, (float *)8, (float *)8, (float *)8, 1e-6f, 0, NULL,
                                   (float *)8, (float *)8, (int64_t *)8, 4, 2, 64, 4, NULL) == FM_ERR_ARG);
    CHECK(fm_cuda_attention_decode(c, (float *)8, (float *)8, (float *)8, (float *)8, (float *)8, 1e-6f, 0, NULL,
                                   (float *)8, (float *)8, (int64_t *)8, 4, 2, 64, 33, (void *)8) == FM_ERR_ARG);
    CHECK(fm_cuda_attention_decode_splits(c, 16, 32) == 1 && fm_cuda_attention_decode_splits(c, 16, 1 << 20) >= 1 &&
          fm_cuda_attention_decode_splits(c, 16, 1 << 20) <= 32);
}

/* forward.c moe's router (the scalar oracle). */
static void router_ref(int32_t *ids, float *tw, const float *logits, int64_t T, int E, int k, bool norm) {
    float *p = malloc(sizeof(float) * (size_t)E);
    for (int64_t t = 0; t < T; t++) {
        float mx = -INFINITY, sum = 0, tsum = 0;
        memcpy(p, logits + t * E, sizeof(float) * (size_t)E);
        for (int e = 0; e < E; e++) mx = p[e] > mx ? p[e] : mx;
        for (int e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
        for (int e = 0; e < E; e++) p[e] /= sum;
        for (int i = 0; i < k; i++) {
            int32_t best = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int q = 0; q < i; q++) taken |= ids[t * k + q] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            ids[t * k + i] = best;
            tw[t * k + i] = p[best];
            tsum += p[best];
        }
        if (norm)
            for (int i = 0; i < k; i++) tw[t * k + i] /= tsum;
    }
    free(p);
}

FM_TEST(cuda_layer_router_topk) {
    CUDA_OR_SKIP(c);
    static const struct {
        int E, k;
        int ties;
    } cases[] = {{6, 2, 0}, {8, 3, 1}, {256, 8, 0}, {512, 10, 1}, {64, 64, 0}, {300, 5, 1},
                 {1024, 16, 1}, {1025, 8, 1}, {3000, 20, 0}}; /* up to 1024: the warp kernel; beyond: the block kernel */
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++)
        for (int norm = 0; norm < 2; norm++) {
            const int E = cases[ci].E, k = cases[ci].k;
            const int64_t T = 13;
            float *lg = rnd_vec(T * E, 6), *gw = rnd_vec(T * k, 0), *rw = rnd_vec(T * k, 0);
            if (cases[ci].ties) /* coarse values: many exact ties, which go to the lower id */
                for (int64_t i = 0; i < T * E; i++) lg[i] = roundf(lg[i]);
            int32_t *gid = malloc(sizeof(int32_t) * (size_t)(T * k)), *rid = malloc(sizeof(int32_t) * (size_t)(T * k));
            float *dl = dev_from(t, c, lg, sizeof(float) * T * E), *dw = dev_from(t, c, NULL, sizeof(float) * T * k);
            int32_t *di = dev_from(t, c, NULL, sizeof(int32_t) * T * k);
            if (dl && dw && di) {
                CHECK_OK(fm_cuda_router_topk(c, di, dw, dl, T, E, k, norm));
                router_ref(rid, rw, lg, T, E, k, norm);
                if (down(t, c, gid, di, sizeof(int32_t) * T * k) && down(t, c, gw, dw, sizeof(float) * T * k)) {
                    int64_t bad = 0;
                    double werr = 0;
                    for (int64_t i = 0; i < T * k; i++) {
                        bad += gid[i] != rid[i];
                        werr = fmax(werr, isnan(gw[i]) ? INFINITY : fabs((double)gw[i] - rw[i]));
                    }
                    fprintf(stderr, "  router_topk E=%d k=%d norm=%d ties=%d: %lld ids differ, weight err %.2e\n", E, k, norm,
                            cases[ci].ties, (long long)bad, werr);
                    CHECK_MSG(bad == 0, "router E=%d k=%d: %lld ids differ (seed %llu)", E, k, (long long)bad,
                              (unsigned long long)fm_test_cuda_seed());
                    CHECK_MSG(werr <= 1e-6, "router E=%d k=%d: weight error %.3e (seed %llu)", E, k, werr,
                              (unsigned long long)fm_test_cuda_seed());
                }
            }
            dev_free_all(c);
            free(lg), free(gw), free(rw), free(gid), free(rid);
        }
}

FM_TEST(cuda_layer_gather_combine) {
    CUDA_OR_SKIP(c);
    static const int64_t Hs[] = {32, 2048, 4100};
    for (int hi = 0; hi < 3; hi++)
        for (int with_shared = 0; with_shared < 2; with_shared++) {
            const int64_t H = Hs[hi], T = 5;
            const int k = 3;
            /* gather: n = T*k rows of xn */
            float *xn = rnd_vec(T * H, 1), *gx = rnd_vec(T * k * H, 0);
            int32_t idx[15];
            for (int i = 0; i < T * k; i++) idx[i] = (int32_t)(rnd_u64() % (uint64_t)T);
            float *dxn = dev_from(t, c, xn, sizeof(float) * T * H), *dX = dev_from(t, c, NULL, sizeof(float) * T * k * H);
            int32_t *didx = dev_from(t, c, idx, sizeof idx);
            /* combine */
            float *x = rnd_vec(T * H, 2), *sh = rnd_vec(T * H, 1), *sl = rnd_vec(T, 4), *Y = rnd_vec(T * k * H, 1),
                  *w = rnd_vec(T * k, 1), *got = rnd_vec(T * H, 0);
            int32_t rows[15];
            for (int i = 0; i < T * k; i++) rows[i] = i % 4 == 3 ? -1 : (int32_t)(rnd_u64() % (uint64_t)(T * k));
            float *dx = dev_from(t, c, x, sizeof(float) * T * H), *dsh = dev_from(t, c, sh, sizeof(float) * T * H),
                  *dsl = dev_from(t, c, sl, sizeof(float) * T), *dY = dev_from(t, c, Y, sizeof(float) * T * k * H),
                  *dw = dev_from(t, c, w, sizeof(float) * T * k);
            int32_t *drows = dev_from(t, c, rows, sizeof rows);
            if (dxn && dX && didx && dx && dsh && dsl && dY && dw && drows) {
                CHECK_OK(fm_cuda_gather_rows(c, dX, dxn, didx, T * k, H));
                CHECK_OK(fm_cuda_moe_combine(c, dx, with_shared ? dsh : NULL, dsl, dY, drows, dw, T, k, H));
                if (down(t, c, gx, dX, sizeof(float) * T * k * H) && down(t, c, got, dx, sizeof(float) * T * H)) {
                    int64_t bad = 0;
                    for (int64_t r = 0; r < T * k; r++) bad += memcmp(gx + r * H, xn + idx[r] * H, sizeof(float) * (size_t)H) != 0;
                    CHECK_MSG(bad == 0, "gather_rows: %lld rows differ", (long long)bad);
                    for (int64_t tt = 0; tt < T; tt++) { /* forward.c moe: out = sg*y; out += w*Y; x += out */
                        float sg = fm_sigmoid(sl[tt]);
                        for (int64_t i = 0; i < H; i++) {
                            float o = with_shared ? sg * sh[tt * H + i] : 0;
                            for (int j = 0; j < k; j++)
                                if (rows[tt * k + j] >= 0) o += w[tt * k + j] * Y[(int64_t)rows[tt * k + j] * H + i];
                            x[tt * H + i] += o;
                        }
                    }
                    char what[64];
                    snprintf(what, sizeof what, "moe_combine H=%lld shared=%d", (long long)H, with_shared);
                    CHECK_ERR(what, rel_err(got, x, T * H), 1e-6);
                }
            }
            dev_free_all(c);
            free(xn), free(gx), free(x), free(sh), free(sl), free(Y), free(w), free(got);
        }
}

/* ---- routed experts with device ids (fm_cuda_expert_matvec) ---- */

static float scale_val(const unsigned char *p, fm_dtype sd) {
    if (sd == FM_DTYPE_F32) {
        float v;
        memcpy(&v, p, 4);
        return v;
    }
    uint16_t u;
    memcpy(&u, p, 2);
    return sd == FM_DTYPE_BF16 ? fm_bf16_to_f32(u) : fm_f16_to_f32(u);
}

/* Random bytes of one weight in the stored layout: float types uniform in [-1, 1); quantized random
 * q and per group a scale and bias giving values in about [-1, 1] (some negative scales). */
static void rnd_weight(unsigned char *d, fm_dtype dt, int64_t N, int64_t K, int gs, fm_dtype sd) {
    if (!fm_dtype_is_quant(dt)) {
        for (int64_t i = 0; i < N * K; i++) {
            float v = rnd();
            if (dt == FM_DTYPE_F32) memcpy(d + 4 * i, &v, 4);
            else {
                uint16_t u = dt == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                memcpy(d + 2 * i, &u, 2);
            }
        }
        return;
    }
    const int bits = fm_quant_bits(dt);
    const int64_t G = K / gs, qbytes = N * K * bits / 8;
    for (int64_t i = 0; i < qbytes; i++) d[i] = (unsigned char)rnd_u64();
    const size_t ss = sd == FM_DTYPE_F32 ? 4 : 2;
    unsigned char *sp = d + qbytes, *bp = sp + (size_t)(N * G) * ss;
    const float maxq = (float)((1 << bits) - 1);
    for (int64_t g = 0; g < N * G; g++)
        for (int k = 0; k < 2; k++) {
            float v = k ? -(0.5f + 0.5f * fabsf(rnd())) : (0.2f + 0.8f * fabsf(rnd())) * 2.0f / maxq;
            if (g % 7 == 3) v = -v;
            unsigned char *at = (k ? bp : sp) + (size_t)g * ss;
            if (sd == FM_DTYPE_F32) memcpy(at, &v, 4);
            else {
                uint16_t u = sd == FM_DTYPE_BF16 ? fm_f32_to_bf16(v) : fm_f32_to_f16(v);
                memcpy(at, &u, 2);
            }
        }
}

/* One case: E experts whose blocks hold n_parts weights [rows, cols] of type dt; k distinct random
 * ids; products checked against a float64 sum over the decoded weights (fm_cpu_get_row), bound
 * |gpu - f64| <= 1e-5 * sum_c (|w_c| + 2 |b_c|) |x_c| (test_cuda.c's bound for the FMA form). With
 * swiglu, x is silu(x) * x_up per product (the down projection's input). With pair (swiglu_out,
 * n_parts = 2) the output is silu(g) * u of the two parts' products g, u, held to the bound carried
 * through: 1e-5 (1.1 mag_g |u| + |silu(g)| mag_u) + 1e-6 |silu(g) u| (|silu'| <= 1.1). */
static void emv_case(fm_test_ctx *t, fm_cuda *c, fm_dtype dt, int gs, fm_dtype sd, int64_t rows, int64_t cols, int E,
                     int k, int n_parts, bool swiglu, bool pair, double *worst) {
    const bool quant = fm_dtype_is_quant(dt);
    const size_t wbytes = quant ? (size_t)fm_quant_nbytes(dt, rows, cols, gs, sd) : (size_t)(rows * cols) * fm_dtype_size(dt);
    const size_t part = (wbytes + 15) / 16 * 16, stride = (n_parts * part + 255) / 256 * 256;
    unsigned char *blocks = malloc(stride * (size_t)E);
    float *deq = malloc(sizeof(float) * (size_t)cols), *babs = malloc(sizeof(float) * (size_t)cols);
    const int64_t xs = swiglu ? cols : 0; /* per product x stride */
    float *x = rnd_vec((swiglu ? k : 1) * cols, 2), *xu = rnd_vec(k * cols, 2);
    float *got = malloc(sizeof(float) * (size_t)(n_parts * k * rows));
    int32_t ids[64];
    REQUIRE(blocks && deq && babs && x && xu && got && k <= 64 && k <= E);
    for (int e = 0; e < E; e++)
        for (int p = 0; p < n_parts; p++) rnd_weight(blocks + (size_t)e * stride + p * part, dt, rows, cols, gs, sd);
    for (int j = 0; j < k; j++) { /* distinct, random order */
        int32_t e;
        bool dup;
        do {
            e = (int32_t)(rnd_u64() % (uint64_t)E);
            dup = false;
            for (int i = 0; i < j; i++) dup |= ids[i] == e;
        } while (dup);
        ids[j] = e;
    }
    for (int64_t i = 0; i < n_parts * k * rows; i++) got[i] = NAN;
    unsigned char *dblocks = dev_from(t, c, blocks, stride * (size_t)E);
    void *table[1024];
    REQUIRE(E <= 1024);
    for (int e = 0; dblocks && e < E; e++) table[e] = dblocks + (size_t)e * stride;
    void *dtable = dev_from(t, c, table, sizeof(void *) * (size_t)E);
    int32_t *dids = dev_from(t, c, ids, sizeof(int32_t) * (size_t)k);
    float *dx = dev_from(t, c, x, sizeof(float) * (size_t)((swiglu ? k : 1) * cols)),
          *dxu = dev_from(t, c, xu, sizeof(float) * (size_t)(k * cols)),
          *dout = dev_from(t, c, got, sizeof(float) * (size_t)(n_parts * k * rows));
    if (!dblocks || !dtable || !dids || !dx || !dxu || !dout) goto done;
    fm_weight shape = {.dtype = dt, .rows = rows, .cols = cols, .group_size = gs, .scale_dtype = sd};
    fm_cuda_expert_mv mv = {.table = (const void *const *)dtable, .ids = dids, .k = k, .n_parts = n_parts,
                            .n_experts = E, .part_off = {0, (int64_t)part}, .x = dx, .x_up = swiglu ? dxu : NULL,
                            .x_stride = xs, .out = {dout, dout + k * rows}, .out_stride = rows, .swiglu_out = pair};
    CHECK(fm_cuda_expert_matvec_supported(&shape));
    CHECK_OK(fm_cuda_expert_matvec(c, &shape, &mv));
    if (!down(t, c, got, dout, sizeof(float) * (size_t)(n_parts * k * rows))) goto done;
    int64_t bad = 0;
    double *refs = malloc(sizeof(double) * (size_t)(2 * n_parts * k * rows)); /* ref, mag per output */
    REQUIRE(refs);
    for (int p = 0; p < n_parts; p++)
        for (int j = 0; j < k; j++) {
            const float *xj = x + j * xs;
            float xe[16384];
            for (int64_t i = 0; i < cols; i++) xe[i] = swiglu ? fm_silu(xj[i]) * xu[j * cols + i] : xj[i];
            fm_weight w = shape;
            w.data = blocks + (size_t)ids[j] * stride + p * part;
            const int64_t G = quant ? cols / gs : 0;
            const size_t ss = sd == FM_DTYPE_F32 ? 4 : 2;
            const unsigned char *bp = quant ? (const unsigned char *)w.data + rows * cols * fm_quant_bits(dt) / 8 +
                                                  (size_t)(rows * G) * ss
                                            : NULL;
            for (int64_t r = 0; r < rows; r++) {
                fm_cpu_get_row(deq, &w, r);
                double ref = 0, mag = 0;
                for (int64_t i = 0; i < cols; i++) {
                    babs[i] = quant ? fabsf(scale_val(bp + (size_t)(r * G + i / gs) * ss, sd)) : 0.f;
                    ref += (double)deq[i] * xe[i];
                    mag += (fabs(deq[i]) + 2.0 * babs[i]) * fabs(xe[i]);
                }
                refs[2 * ((p * k + j) * rows + r)] = ref;
                refs[2 * ((p * k + j) * rows + r) + 1] = mag;
                if (pair) continue; /* checked below */
                const float g = got[(p * k + j) * rows + r];
                const double err = isnan(g) ? INFINITY : fabs(g - ref) / (mag > 0 ? mag : 1);
                if (err > *worst) *worst = err;
                bad += !(err <= 1e-5);
            }
        }
    for (int64_t i = 0; pair && i < k * rows; i++) {
        const double gv = refs[2 * i], gm = refs[2 * i + 1], uv = refs[2 * (k * rows + i)], um = refs[2 * (k * rows + i) + 1];
        const double sg = gv / (1.0 + exp(-gv)), ref = sg * uv;
        const double tol = 1e-5 * (1.1 * gm * fabs(uv) + fabs(sg) * um) + 1e-6 * fabs(ref) + 1e-30;
        const float g = got[i];
        const double err = isnan(g) ? INFINITY : fabs(g - ref);
        if (err / tol * 1e-5 > *worst) *worst = err / tol * 1e-5;
        bad += !(err <= tol);
    }
    free(refs);
    CHECK_MSG(bad == 0,
              "expert_matvec %s g%d %s [%lld, %lld] k=%d parts=%d swiglu=%d pair=%d old=%d: %lld wrong outputs (seed %llu)",
              fm_dtype_name(dt), gs, fm_dtype_name(sd), (long long)rows, (long long)cols, k, n_parts, swiglu, pair,
              getenv("FLASHMOE_CUDA_EMV_OLD") != NULL, (long long)bad, (unsigned long long)fm_test_cuda_seed());
done:
    dev_free_all(c);
    free(blocks), free(deq), free(babs), free(x), free(xu), free(got);
}

FM_TEST(cuda_layer_expert_matvec) {
    CUDA_OR_SKIP(c);
    static const struct {
        fm_dtype dt;
        int gs;
        fm_dtype sd;
    } types[] = {{FM_DTYPE_F32, 0, FM_DTYPE_UNKNOWN}, {FM_DTYPE_F16, 0, FM_DTYPE_UNKNOWN},
                 {FM_DTYPE_BF16, 0, FM_DTYPE_UNKNOWN}, {FM_DTYPE_Q8, 32, FM_DTYPE_BF16},
                 {FM_DTYPE_Q8, 64, FM_DTYPE_F16}, {FM_DTYPE_Q8, 128, FM_DTYPE_F32},
                 {FM_DTYPE_Q4, 32, FM_DTYPE_BF16}, {FM_DTYPE_Q4, 64, FM_DTYPE_BF16},
                 {FM_DTYPE_Q4, 128, FM_DTYPE_F16}, {FM_DTYPE_Q4, 64, FM_DTYPE_F32}};
    static const struct {
        int64_t rows, cols;
        int E, k;
    } shapes[] = {{64, 128, 8, 3}, {37, 256, 16, 5}, {512, 2048, 32, 8}, {2048, 512, 32, 8}, {5, 4096, 4, 4},
                  {100, 384, 64, 10}, {8, 128, 600, 4} /* more experts than any preset */};
    double worst = 0;
    /* matmul.cu's one-token kernel (the default), and the earlier kernel (FLASHMOE_CUDA_EMV_OLD; pair
     * always runs on the first); rows per thread by the launch's choice and forced to 2, 4, 8 */
    static const char *const modes[][2] = {{NULL, NULL}, {"1", NULL}, {NULL, "2"}, {NULL, "4"}, {NULL, "8"}};
    for (int mi = 0; mi < 5; mi++) {
        if (modes[mi][0]) setenv("FLASHMOE_CUDA_EMV_OLD", modes[mi][0], 1);
        else unsetenv("FLASHMOE_CUDA_EMV_OLD");
        if (modes[mi][1]) setenv("FLASHMOE_CUDA_MV_RPT", modes[mi][1], 1);
        else unsetenv("FLASHMOE_CUDA_MV_RPT");
        for (size_t ti = 0; ti < sizeof types / sizeof *types; ti++)
            for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
                if (types[ti].gs && shapes[si].cols % types[ti].gs) continue;
                /* the forced modes on the smaller shapes only (the float64 oracle dominates the time) */
                if (mi >= 2 && shapes[si].rows * shapes[si].cols > 262144) continue;
                emv_case(t, c, types[ti].dt, types[ti].gs, types[ti].sd, shapes[si].rows, shapes[si].cols, shapes[si].E,
                         shapes[si].k, 2, false, false, &worst); /* gate + up */
                emv_case(t, c, types[ti].dt, types[ti].gs, types[ti].sd, shapes[si].rows, shapes[si].cols, shapes[si].E,
                         shapes[si].k, 1, true, false, &worst); /* down with the SwiGLU fused into x */
                if (mi != 1) /* (pair always runs on the one-token kernel) */
                    emv_case(t, c, types[ti].dt, types[ti].gs, types[ti].sd, shapes[si].rows, shapes[si].cols,
                             shapes[si].E, shapes[si].k, 2, false, true, &worst); /* SwiGLU in the output */
            }
    }
    unsetenv("FLASHMOE_CUDA_EMV_OLD");
    unsetenv("FLASHMOE_CUDA_MV_RPT");
    fprintf(stderr, "  expert_matvec: worst |gpu - f64| / mag = %.2e\n", worst);
    /* refusals */
    fm_weight q2 = {.dtype = FM_DTYPE_Q2, .rows = 8, .cols = 64, .group_size = 32, .scale_dtype = FM_DTYPE_BF16};
    fm_weight odd = {.dtype = FM_DTYPE_BF16, .rows = 8, .cols = 36};
    fm_weight wide = {.dtype = FM_DTYPE_F32, .rows = 8, .cols = 16384};
    CHECK(!fm_cuda_expert_matvec_supported(&q2) && !fm_cuda_expert_matvec_supported(&odd) &&
          !fm_cuda_expert_matvec_supported(&wide));
    fm_weight ok = {.dtype = FM_DTYPE_F32, .rows = 8, .cols = 64};
    fm_cuda_expert_mv mv = {.table = (const void *const *)8, .ids = (const int32_t *)8, .k = 2, .n_parts = 1,
                            .n_experts = 4, .part_off = {8, 0}, .x = (const float *)8, .out = {(float *)8, NULL}};
    CHECK(fm_cuda_expert_matvec(c, &ok, &mv) == FM_ERR_ARG); /* part offset not a multiple of 16 */
    mv.part_off[0] = 0;
    mv.ids = NULL;
    CHECK(fm_cuda_expert_matvec(c, &ok, &mv) == FM_ERR_ARG);
    CHECK(fm_cuda_expert_matvec(c, &q2, &mv) == FM_ERR_UNSUPPORTED);
    CHECK_OK(fm_cuda_sync(c));
}

/* store_at (exact) and moe_combine_topk against forward.c's combine in ascending expert id. */
FM_TEST(cuda_layer_decode_at) {
    CUDA_OR_SKIP(c);
    const int64_t n = 3000, P = 7, pos = 5;
    float *src = rnd_vec(n, 1), *cache = rnd_vec(P * n, 1), *got = rnd_vec(P * n, 0);
    float *dsrc = dev_from(t, c, src, sizeof(float) * n), *dcache = dev_from(t, c, cache, sizeof(float) * P * n);
    int64_t *dpos = dev_from(t, c, &pos, sizeof pos);
    if (dsrc && dcache && dpos) {
        CHECK_OK(fm_cuda_store_at(c, dcache, n, dsrc, n, dpos));
        if (down(t, c, got, dcache, sizeof(float) * P * n)) {
            memcpy(cache + pos * n, src, sizeof(float) * n);
            CHECK(memcmp(got, cache, sizeof(float) * P * n) == 0);
        }
    }
    dev_free_all(c);
    free(src), free(cache), free(got);
    static const int64_t Hs[] = {32, 2048, 4100};
    static const int ks[] = {1, 8, 10, 64};
    for (int hi = 0; hi < 3; hi++)
        for (int ki = 0; ki < 4; ki++)
            for (int with_shared = 0; with_shared < 2; with_shared++) {
                const int64_t H = Hs[hi], T = 3;
                const int k = ks[ki];
                float *x = rnd_vec(T * H, 2), *sh = rnd_vec(T * H, 1), *sl = rnd_vec(T, 4), *Y = rnd_vec(T * k * H, 1),
                      *w = rnd_vec(T * k, 1), *res = rnd_vec(T * H, 0), *nw = rnd_vec(H, 1);
                float *x0 = malloc(sizeof(float) * (size_t)(T * H)), *xn2 = rnd_vec(T * H, 0),
                      *res3 = rnd_vec(T * H, 0), *xn3 = rnd_vec(T * H, 0);
                REQUIRE(x0);
                memcpy(x0, x, sizeof(float) * (size_t)(T * H));
                int32_t ids[3 * 64];
                for (int64_t tt = 0; tt < T; tt++) /* distinct ids in random order: a shuffled range */
                    for (int j = 0; j < k; j++) {
                        int i = (int)(rnd_u64() % (uint64_t)(j + 1));
                        ids[tt * k + j] = ids[tt * k + i];
                        ids[tt * k + i] = (int32_t)(j * 3 + 1);
                    }
                float *dx = dev_from(t, c, x, sizeof(float) * T * H), *dsh = dev_from(t, c, sh, sizeof(float) * T * H),
                      *dsl = dev_from(t, c, sl, sizeof(float) * T), *dY = dev_from(t, c, Y, sizeof(float) * T * k * H),
                      *dw = dev_from(t, c, w, sizeof(float) * T * k);
                int32_t *dids = dev_from(t, c, ids, sizeof(int32_t) * (size_t)(T * k));
                if (dx && dsh && dsl && dY && dw && dids) {
                    CHECK_OK(fm_cuda_moe_combine_topk(c, dx, with_shared ? dsh : NULL, dsl, dY, dids, dw, T, k, H));
                    if (down(t, c, res, dx, sizeof(float) * T * H)) {
                        for (int64_t tt = 0; tt < T; tt++) {
                            int ord[64], n_ord = 0;
                            for (int32_t e = 0; e < 3 * 64; e++) /* the token's experts in ascending id */
                                for (int j = 0; j < k; j++)
                                    if (ids[tt * k + j] == e) ord[n_ord++] = j;
                            float sg = fm_sigmoid(sl[tt]);
                            for (int64_t i = 0; i < H; i++) {
                                float o = with_shared ? sg * sh[tt * H + i] : 0;
                                for (int j = 0; j < n_ord; j++) o += w[tt * k + ord[j]] * Y[(tt * k + ord[j]) * H + i];
                                x[tt * H + i] += o;
                            }
                        }
                        char what[80];
                        snprintf(what, sizeof what, "moe_combine_topk H=%lld k=%d shared=%d", (long long)H, k, with_shared);
                        CHECK_ERR(what, rel_err(res, x, T * H), 1e-6);
                    }
                    /* the fused combine + norm against the two launches (bit-identical) and the CPU norm */
                    float *dxn = dev_from(t, c, xn2, sizeof(float) * T * H), *dnw = dev_from(t, c, nw, sizeof(float) * H),
                          *dx3 = dev_from(t, c, x0, sizeof(float) * T * H), *dxn3 = dev_from(t, c, xn3, sizeof(float) * T * H);
                    if (dxn && dnw && dx3 && dxn3) {
                        const float eps = 1e-6f;
                        CHECK_OK(fm_cuda_add_rmsnorm(c, dx, dxn, NULL, dnw, T, H, eps));
                        CHECK_OK(fm_cuda_moe_combine_topk_norm(c, dx3, dxn3, dnw, eps, with_shared ? dsh : NULL, dsl, dY,
                                                               dids, dw, T, k, H));
                        if (down(t, c, res, dx, sizeof(float) * T * H) && down(t, c, xn2, dxn, sizeof(float) * T * H) &&
                            down(t, c, res3, dx3, sizeof(float) * T * H) &&
                            down(t, c, xn3, dxn3, sizeof(float) * T * H)) {
                            CHECK_MSG(memcmp(res, res3, sizeof(float) * (size_t)(T * H)) == 0 &&
                                          memcmp(xn2, xn3, sizeof(float) * (size_t)(T * H)) == 0,
                                      "moe_combine_topk_norm H=%lld k=%d shared=%d: not the two launches' results",
                                      (long long)H, k, with_shared);
                            float *ref = malloc(sizeof(float) * (size_t)(T * H));
                            REQUIRE(ref);
                            for (int64_t tt = 0; tt < T; tt++) /* x: the CPU's combine above */
                                fm_cpu_rmsnorm(ref + tt * H, x + tt * H, nw, H, eps);
                            CHECK_ERR("moe_combine_topk_norm xn", rel_err(xn3, ref, T * H), 1e-5);
                            free(ref);
                        }
                    }
                }
                dev_free_all(c);
                free(x), free(sh), free(sl), free(Y), free(w), free(res), free(nw), free(x0), free(xn2), free(res3),
                    free(xn3);
            }
    CHECK(fm_cuda_moe_combine_topk(c, (float *)8, NULL, NULL, (float *)8, (int32_t *)8, (float *)8, 1, 65, 8) ==
          FM_ERR_ARG);
}

/* ------------------------------------------------------------------------ whole models */

#define REL_TOL 2e-3
#define PREFILL_SPLIT 40

static int argmax(const float *x, int64_t n) {
    int b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = (int)i;
    return b;
}

static void compare(fm_test_ctx *t, const char *what, const float *ref, const float *got, int64_t n, int64_t V) {
    double mx = 0, worst = 0;
    int64_t bad = 0;
    for (int64_t i = 0; i < n * V; i++) mx = fmax(mx, fabs(ref[i]));
    for (int64_t i = 0; i < n * V; i++) worst = fmax(worst, isnan(got[i]) ? INFINITY : fabs((double)ref[i] - got[i]) / mx);
    for (int64_t r = 0; r < n; r++) bad += argmax(ref + r * V, V) != argmax(got + r * V, V);
    fprintf(stderr, "  %s: max rel err %.2e, argmax mismatches %lld of %lld\n", what, worst, (long long)bad, (long long)n);
    CHECK_MSG(worst <= REL_TOL, "%s: relative error %.3e > %.0e", what, worst, REL_TOL);
    CHECK_MSG(bad == 0, "%s: %lld rows with a different argmax", what, (long long)bad);
}

/* Batch (all logits) and token by token (a prefill of `split` tokens, then one at a time), into
 * full and incr (n x V each). split = 0: every token alone, also for full. */
static bool run_model(fm_test_ctx *t, fm_model *m, const int32_t *ids, int64_t n, float *full, float *incr, int64_t split) {
    fm_session *s = NULL;
    int64_t V = fm_model_n_vocab(m);
    bool ok = fm_session_init(m, n, &s) == FM_OK;
    for (int64_t i = 0; ok && !split && i < n; i++) ok = fm_session_eval(s, ids + i, 1, full + i * V, true) == FM_OK;
    ok = ok && (!split || fm_session_eval(s, ids, n, full, true) == FM_OK);
    if (ok && split && incr) {
        fm_session_reset(s);
        ok = fm_session_eval(s, ids, split, incr, true) == FM_OK;
        for (int64_t i = split; ok && i < n; i++) ok = fm_session_eval(s, ids + i, 1, incr + i * V, true) == FM_OK;
        ok = ok && fm_session_n_past(s) == n;
    }
    if (!ok) {
        t->failures++;
        fprintf(stderr, "  %s\n", fm_last_error());
    }
    fm_session_free(s);
    return ok;
}

/* fm_session_eval_greedy on model m (the argmax on the device in a resident one-token step) picks
 * the same GREEDY_STEPS tokens after the prompt ids[0..n) as the host's argmax of fm_session_eval's
 * logits. */
#define GREEDY_STEPS 12
static void check_greedy(fm_test_ctx *t, fm_model *m, const char *name, const int32_t *ids, int64_t n) {
    fm_session *s = NULL;
    int64_t V = fm_model_n_vocab(m);
    float *logits = malloc(sizeof(float) * (size_t)V), top;
    int32_t want[GREEDY_STEPS], got[GREEDY_STEPS];
    REQUIRE(logits);
    fm_status st = fm_session_init(m, n + GREEDY_STEPS, &s);
    if (st == FM_OK) st = fm_session_eval(s, ids, n, logits, false);
    for (int i = 0; st == FM_OK && i < GREEDY_STEPS; i++) {
        want[i] = (int32_t)fm_cpu_argmax(logits, V, &top);
        if (i + 1 < GREEDY_STEPS) st = fm_session_eval(s, &want[i], 1, logits, false);
    }
    if (st == FM_OK) fm_session_reset(s), st = fm_session_eval_greedy(s, ids, n, &got[0]);
    for (int i = 1; st == FM_OK && i < GREEDY_STEPS; i++) st = fm_session_eval_greedy(s, &got[i - 1], 1, &got[i]);
    CHECK_MSG(st == FM_OK, "%s greedy: %s", name, fm_last_error());
    int agree = 0;
    while (st == FM_OK && agree < GREEDY_STEPS && got[agree] == want[agree]) agree++;
    CHECK_MSG(st != FM_OK || agree == GREEDY_STEPS, "%s: fm_session_eval_greedy agrees for %d of %d tokens (%d, not %d)",
              name, agree, GREEDY_STEPS, agree < GREEDY_STEPS ? got[agree] : 0, agree < GREEDY_STEPS ? want[agree] : 0);
    fm_session_free(s);
    free(logits);
}

/* Converts fixture `name` (weights to `quant`, UNKNOWN = as stored) and compares GPU with CPU;
 * with check_ref, also the GPU with the fixture's transformers logits (test_model.c's bound). */
static void check_fixture(fm_test_ctx *t, const char *name, fm_dtype quant, bool check_ref, uint64_t budget,
                          fm_vram_policy policy) {
    char path[512], tmp[256], dir[600];
    fm_npy ids = {0}, ref = {0};
    fm_model *cpu = NULL, *gpu = NULL;
    float *a = NULL, *b = NULL, *ai = NULL, *bi = NULL;
    snprintf(path, sizeof path, "tests/fixtures/%s/ids.npy", name);
    REQUIRE(fm_npy_read(path, &ids) == FM_OK);
    snprintf(path, sizeof path, "tests/fixtures/%s/logits_full.npy", name);
    if (check_ref && fm_npy_read(path, &ref) != FM_OK) {
        CHECK_MSG(false, "%s", fm_last_error());
        goto done;
    }
    snprintf(tmp, sizeof tmp, "cuda_fwd_%s_%s", name, quant ? fm_dtype_name(quant) : "source");
    fm_test_tmpdir(tmp, dir, sizeof dir);
    strcat(dir, "/packed");
    snprintf(path, sizeof path, "tests/fixtures/%s/model", name);
    fm_convert_options o = {.dense_dtype = quant, .expert_dtype = quant};
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    if (fm_convert_hf(path, dir, &o) != FM_OK || fm_model_open(dir, &p, &cpu) != FM_OK) {
        CHECK_MSG(false, "%s: %s", name, fm_last_error());
        goto done;
    }
    p.backend = FM_BACKEND_CUDA;
    p.vram_budget = budget;
    p.vram_policy = policy;
    if (fm_model_open(dir, &p, &gpu) != FM_OK) {
        CHECK_MSG(false, "%s: %s", name, fm_last_error());
        goto done;
    }
    int64_t n = ids.n_elements, V = fm_model_n_vocab(cpu);
    a = malloc(sizeof(float) * (size_t)(n * V)), b = malloc(sizeof(float) * (size_t)(n * V));
    ai = malloc(sizeof(float) * (size_t)(n * V)), bi = malloc(sizeof(float) * (size_t)(n * V));
    REQUIRE(a && b && ai && bi);
    for (int64_t i = 0; i < n * V; i++) b[i] = bi[i] = NAN;
    /* quantized: the CPU reference runs token by token (its float kernels); else batch and split */
    bool quant_ref = quant != FM_DTYPE_UNKNOWN && fm_dtype_is_quant(quant);
    if (!run_model(t, cpu, ids.data, n, a, ai, quant_ref ? 0 : PREFILL_SPLIT) ||
        !run_model(t, gpu, ids.data, n, b, bi, PREFILL_SPLIT))
        goto done;
    if (quant_ref) memcpy(ai, a, sizeof(float) * (size_t)(n * V));
    char what[200];
    snprintf(what, sizeof what, "%s %s%s batch, gpu vs cpu", name, quant ? fm_dtype_name(quant) : "",
             budget ? " (small VRAM budget)" : "");
    compare(t, what, a, b, n, V);
    snprintf(what, sizeof what, "%s %s%s token by token, gpu vs cpu", name, quant ? fm_dtype_name(quant) : "",
             budget ? " (small VRAM budget)" : "");
    compare(t, what, ai, bi, n, V);
    if (check_ref) {
        snprintf(what, sizeof what, "%s batch, gpu vs transformers", name);
        compare(t, what, ref.data, b, n, V);
    }
    fm_cuda_stats st = fm_forward_cuda_stats(gpu);
    fprintf(stderr, "  %s: VRAM %d slots of %llu bytes, %llu requested, %llu hits, %llu misses, %llu evictions, %llu bytes up\n",
            name, st.slots, (unsigned long long)st.slot_bytes, (unsigned long long)st.requested,
            (unsigned long long)st.hits, (unsigned long long)st.misses, (unsigned long long)st.evictions,
            (unsigned long long)st.h2d_bytes);
    CHECK(st.requested == st.hits + st.misses && st.misses > 0 && st.h2d_bytes >= st.misses * st.slot_bytes / 2);
    if (budget) CHECK_MSG(st.evictions > 0, "a budget of %d slots evicted nothing", st.slots);
    /* the mode: resident (every expert fits) unless a budget or FLASHMOE_CUDA_RESIDENT=0 says not;
     * then the one-token steps run with the ids on the device when fm_cuda_expert_matvec takes the
     * experts' parts (gate and up of one shape; not the odd column counts of release_bf16's and
     * qwen3_next_f32's down projections: 12 BF16, 10 F32), as graph replays unless
     * FLASHMOE_CUDA_GRAPH=0 */
    const char *er = getenv("FLASHMOE_CUDA_RESIDENT"), *eg = getenv("FLASHMOE_CUDA_GRAPH");
    bool dev_ok = true;
    for (int l = 0; l < gpu->cfg.n_layers; l++) {
        const fm_packed_expert_layer *L = &gpu->packed->experts[l];
        fm_weight pg = fm_packed_weight(&L->parts[FM_PART_GATE], L), pu = fm_packed_weight(&L->parts[FM_PART_UP], L),
                  pd = fm_packed_weight(&L->parts[FM_PART_DOWN], L);
        dev_ok = dev_ok && pg.dtype == pu.dtype && pg.rows == pu.rows && pg.cols == pu.cols &&
                 fm_cuda_expert_matvec_supported(&pg) && fm_cuda_expert_matvec_supported(&pd);
    }
    bool want_res = !budget && !(er && !strcmp(er, "0")), want_dev = want_res && dev_ok,
         want_graph = want_dev && !(eg && !strcmp(eg, "0"));
    fprintf(stderr, "  %s: resident %d, %llu device steps, %llu graph replays\n", name, st.resident,
            (unsigned long long)st.dev_steps, (unsigned long long)st.graph_steps);
    CHECK_MSG(st.resident == want_res, "%s: resident %d, expected %d", name, st.resident, want_res);
    CHECK_MSG((st.dev_steps > 0) == want_dev, "%s: %llu device steps", name, (unsigned long long)st.dev_steps);
    CHECK_MSG((st.graph_steps > 0) == want_graph && (!want_graph || st.graph_steps + 1 == st.dev_steps), "%s: %llu graph replays of %llu",
              name, (unsigned long long)st.graph_steps, (unsigned long long)st.dev_steps);
    check_greedy(t, gpu, name, ids.data, n < PREFILL_SPLIT ? n : PREFILL_SPLIT); /* after the counts above */
done:
    fm_model_free(gpu);
    fm_model_free(cpu);
    fm_npy_free(&ids);
    fm_npy_free(&ref);
    free(a), free(b), free(ai), free(bi);
}

FM_TEST(cuda_forward_fixtures_match_cpu) {
    CUDA_OR_SKIP(c);
    (void)c;
    check_fixture(t, "qwen35_moe_f32", FM_DTYPE_UNKNOWN, true, 0, FM_VRAM_LRU);
    check_fixture(t, "qwen35_moe_release_bf16", FM_DTYPE_UNKNOWN, true, 0, FM_VRAM_LRU);
    check_fixture(t, "qwen3_next_f32", FM_DTYPE_UNKNOWN, true, 0, FM_VRAM_LRU);
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_UNKNOWN, true, 0, FM_VRAM_FLRU);
}

FM_TEST(cuda_forward_quantized_match_cpu) {
    CUDA_OR_SKIP(c);
    (void)c;
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_Q4, false, 0, FM_VRAM_LRU);
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_Q8, false, 0, FM_VRAM_LRU);
}

/* Resident mode without graphs (each one-token step enqueued as it goes, no host sync), without
 * the norms folded into the products (FLASHMOE_CUDA_NORM_FOLD=0: a launch per norm) and the
 * per-layer host path with every expert in VRAM (FLASHMOE_CUDA_RESIDENT=0): the same logits. */
FM_TEST(cuda_forward_resident_modes_match_cpu) {
    CUDA_OR_SKIP(c);
    (void)c;
    setenv("FLASHMOE_CUDA_NORM_FOLD", "0", 1);
    check_fixture(t, "qwen35_moe_release_bf16", FM_DTYPE_UNKNOWN, false, 0, FM_VRAM_LRU);
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_Q8, false, 0, FM_VRAM_LRU);
    unsetenv("FLASHMOE_CUDA_NORM_FOLD");
    setenv("FLASHMOE_CUDA_GRAPH", "0", 1);
    check_fixture(t, "qwen35_moe_f32", FM_DTYPE_UNKNOWN, false, 0, FM_VRAM_LRU);
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_Q4, false, 0, FM_VRAM_LRU);
    unsetenv("FLASHMOE_CUDA_GRAPH");
    setenv("FLASHMOE_CUDA_RESIDENT", "0", 1);
    check_fixture(t, "qwen3_next_f32", FM_DTYPE_UNKNOWN, false, 0, FM_VRAM_LRU);
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_Q8, false, 0, FM_VRAM_FLRU);
    unsetenv("FLASHMOE_CUDA_RESIDENT");
}

/* The budget of one model: dense + one session of `n_ctx` + `slots` expert slots. */
static uint64_t budget_for(fm_test_ctx *t, const char *dir, int64_t n_ctx, int slots, fm_cuda_stats *out) {
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    p.backend = FM_BACKEND_CUDA;
    fm_model *m = NULL;
    fm_session *s = NULL;
    uint64_t b = 0;
    if (fm_model_open(dir, &p, &m) == FM_OK && fm_session_init(m, n_ctx, &s) == FM_OK) {
        *out = fm_forward_cuda_stats(m);
        b = out->dense_bytes + out->state_bytes + (uint64_t)slots * out->slot_bytes;
    } else {
        t->failures++;
        fprintf(stderr, "  %s\n", fm_last_error());
    }
    fm_session_free(s);
    fm_model_free(m);
    return b;
}

FM_TEST(cuda_forward_vram_cache_evicts) {
    CUDA_OR_SKIP(c);
    (void)c;
    char dir[600];
    fm_convert_options o = {0};
    fm_test_tmpdir("cuda_fwd_budget", dir, sizeof dir);
    strcat(dir, "/packed");
    REQUIRE(fm_convert_hf("tests/fixtures/qwen35_moe_q64_bf16/model", dir, &o) == FM_OK);
    fm_cuda_stats st;
    uint64_t b = budget_for(t, dir, 96, 3 + 1, &st); /* top-3 of 8 experts, 4 layers: 4 of 32 slots */
    REQUIRE(b > 0);
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_UNKNOWN, false, b, FM_VRAM_LRU);
    check_fixture(t, "qwen35_moe_q64_bf16", FM_DTYPE_UNKNOWN, false, b, FM_VRAM_FLRU);
}

FM_TEST(cuda_forward_budget_errors) {
    CUDA_OR_SKIP(c);
    (void)c;
    char dir[600];
    fm_convert_options o = {0};
    fm_test_tmpdir("cuda_fwd_budget_err", dir, sizeof dir);
    strcat(dir, "/packed");
    REQUIRE(fm_convert_hf("tests/fixtures/qwen35_moe_f32/model", dir, &o) == FM_OK);
    fm_cuda_stats st;
    uint64_t b = budget_for(t, dir, 64, 0, &st);
    REQUIRE(b > 0);
    fm_model_params p = fm_model_default_params();
    p.n_threads = 2;
    p.backend = FM_BACKEND_CUDA;
    p.vram_budget = st.dense_bytes - 1; /* the dense weights do not fit */
    fm_model *m = NULL;
    CHECK(fm_model_open(dir, &p, &m) == FM_ERR_NOMEM && m == NULL);
    CHECK_MSG(strstr(fm_last_error(), "the dense weights need") && strstr(fm_last_error(), "--vram-budget"), "%s",
              fm_last_error());
    p.vram_budget = b + st.slot_bytes; /* the session fits, one expert slot of the two needed */
    CHECK_OK(fm_model_open(dir, &p, &m));
    fm_session *s = NULL;
    CHECK(fm_session_init(m, 64, &s) == FM_ERR_NOMEM && s == NULL);
    CHECK_MSG(strstr(fm_last_error(), "room for 1 expert slots") != NULL, "%s", fm_last_error());
    CHECK(fm_session_init(m, 1 << 20, &s) == FM_ERR_NOMEM && s == NULL); /* a huge context */
    CHECK_MSG(strstr(fm_last_error(), "a session of 1048576 tokens needs") != NULL, "%s", fm_last_error());
    fm_model_free(m);
}

#endif /* FM_HAVE_CUDA */
