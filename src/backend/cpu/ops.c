#include "backend/cpu/ops.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include "backend/cpu/kernels.h"
#include "quant/quant.h"
#include "util/half.h"

void fm_cpu_get_row(float *out, const fm_weight *w, int64_t row) {
    int64_t n = w->cols;
    switch (w->dtype) {
    case FM_DTYPE_F32: memcpy(out, (const float *)w->data + row * n, sizeof(float) * (size_t)n); break;
    case FM_DTYPE_BF16: {
        const uint16_t *p = (const uint16_t *)w->data + row * n;
        for (int64_t i = 0; i < n; i++) out[i] = fm_bf16_to_f32(p[i]);
        break;
    }
    case FM_DTYPE_F16: {
        const uint16_t *p = (const uint16_t *)w->data + row * n;
        for (int64_t i = 0; i < n; i++) out[i] = fm_f16_to_f32(p[i]);
        break;
    }
    case FM_DTYPE_Q8:
    case FM_DTYPE_Q4:
    case FM_DTYPE_Q2: fm_dequant_row(out, w, row, 0, n); break;
    default: /* the loaders reject every other dtype before a weight reaches a kernel */
        memset(out, 0, sizeof(float) * (size_t)n);
        break;
    }
}

static float dot_f32(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

typedef struct matmul_job {
    float *out;
    const float *x;
    int64_t n_tokens;
    const fm_weight *w;
} matmul_job;

#define MATMUL_SEG 2048 /* columns converted at a time into a stack buffer; a multiple of 128 */

static void matmul_rows(void *arg, int64_t r0, int64_t r1) {
    const matmul_job *j = arg;
    int64_t K = j->w->cols, N = j->w->rows;
    if (j->w->dtype == FM_DTYPE_F32) {
        for (int64_t r = r0; r < r1; r++) {
            const float *row = (const float *)j->w->data + r * K;
            for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * N + r] = dot_f32(row, j->x + t * K, K);
        }
        return;
    }
    float seg[MATMUL_SEG];
    const bool quant = fm_dtype_is_quant(j->w->dtype);
    fm_weight part = *j->w; /* a view of one row segment, converted through fm_cpu_get_row */
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * N + r] = 0;
        for (int64_t c0 = 0; c0 < K; c0 += MATMUL_SEG) {
            int64_t n = K - c0 < MATMUL_SEG ? K - c0 : MATMUL_SEG;
            if (quant) { /* c0 is a multiple of MATMUL_SEG, hence of the group size */
                fm_dequant_row(seg, j->w, r, c0, n);
            } else {
                part.cols = n;
                part.data = (const char *)j->w->data + (r * K + c0) * (int64_t)fm_dtype_size(j->w->dtype);
                fm_cpu_get_row(seg, &part, 0);
            }
            for (int64_t t = 0; t < j->n_tokens; t++) j->out[t * N + r] += dot_f32(seg, j->x + t * K + c0, n);
        }
    }
}

void fm_cpu_matmul_ref(fm_pool *pool, float *out, const float *x, int64_t n_tokens, const fm_weight *w) {
    matmul_job j = {out, x, n_tokens, w};
    /* enough rows per chunk that a thread's work outweighs waking it */
    int64_t min_rows = (int64_t)(16384 / (w->cols * n_tokens + 1)) + 1;
    fm_pool_run(pool, matmul_rows, &j, w->rows, min_rows);
}

/* ---- SIMD dispatch ---- */

bool fm_cpu_level_supported(fm_cpu_level level) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    switch (level) {
    case FM_CPU_SCALAR: return true;
    case FM_CPU_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case FM_CPU_AVX512:
        return fm_cpu_level_supported(FM_CPU_AVX2) && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq");
    default: return false;
    }
#else
    return level == FM_CPU_SCALAR;
#endif
}

fm_cpu_level fm_cpu_level_best(void) {
    if (fm_cpu_level_supported(FM_CPU_AVX512)) return FM_CPU_AVX512;
    if (fm_cpu_level_supported(FM_CPU_AVX2)) return FM_CPU_AVX2;
    return FM_CPU_SCALAR;
}

const char *fm_cpu_level_name(fm_cpu_level level) {
    switch (level) {
    case FM_CPU_SCALAR: return "scalar";
    case FM_CPU_AVX2: return "avx2";
    case FM_CPU_AVX512: return "avx512";
    default: return "?";
    }
}

fm_cpu_level fm_cpu_level_choose(const char *request) {
    fm_cpu_level best = fm_cpu_level_best();
    if (!request || !*request || !strcmp(request, "auto")) return best;
    for (int l = FM_CPU_SCALAR; l <= FM_CPU_AVX512; l++) {
        if (strcmp(request, fm_cpu_level_name((fm_cpu_level)l))) continue;
        if (fm_cpu_level_supported((fm_cpu_level)l)) return (fm_cpu_level)l;
        fprintf(stderr, "flashmoe: FLASHMOE_CPU=%s: this CPU lacks %s; using %s\n", request,
                l == FM_CPU_AVX512 ? "AVX-512 F/BW/VL/DQ" : "AVX2/FMA/F16C", fm_cpu_level_name(best));
        return best;
    }
    fprintf(stderr, "flashmoe: FLASHMOE_CPU=%s: unknown level (scalar, avx2, avx512 or auto); using %s\n", request,
            fm_cpu_level_name(best));
    return best;
}

static pthread_once_t level_once = PTHREAD_ONCE_INIT;
static fm_cpu_level level_chosen;
static void level_init(void) { level_chosen = fm_cpu_level_choose(getenv("FLASHMOE_CPU")); }

fm_cpu_level fm_cpu_matmul_level(void) {
    pthread_once(&level_once, level_init);
    return level_chosen;
}

typedef struct simd_job {
    fm_kern_job k;
    fm_cpu_level level;
    float *xp, *xsum; /* writable views of k.xp, k.xsum for the preparation pass */
} simd_job;

static void simd_prep(void *arg, int64_t t0, int64_t t1) {
    simd_job *s = arg;
    if (s->level == FM_CPU_AVX512) fm_kern_avx512_prep(s->k.w, s->k.x, t0, t1, s->xp, s->k.xp_stride, s->xsum);
    else fm_kern_avx2_prep(s->k.w, s->k.x, t0, t1, s->xp, s->k.xp_stride, s->xsum);
}

/* items are groups of SIMD_ROWS rows (the kernels' row tile), so that every thread's share
 * starts on a tile; each row's arithmetic is the same in a tile or alone, so results do not
 * depend on the thread count either way */
#define SIMD_ROWS 4

static void simd_rows(void *arg, int64_t g0, int64_t g1) {
    const simd_job *s = arg;
    const int64_t N = s->k.w->rows, r0 = g0 * SIMD_ROWS, r1 = g1 * SIMD_ROWS < N ? g1 * SIMD_ROWS : N;
    if (s->level == FM_CPU_AVX512) fm_kern_avx512_rows(&s->k, r0, r1);
    else fm_kern_avx2_rows(&s->k, r0, r1);
}

#define PREP_STACK_FLOATS 6144 /* T = 1 at up to ~6000 columns needs no allocation */

fm_cpu_level fm_cpu_matmul_at(fm_cpu_level level, fm_pool *pool, float *out, const float *x, int64_t n_tokens,
                              const fm_weight *w) {
    while (level > FM_CPU_SCALAR && !fm_cpu_level_supported(level)) level = (fm_cpu_level)(level - 1);
    bool simd_type = w->dtype == FM_DTYPE_F32 || w->dtype == FM_DTYPE_BF16 || w->dtype == FM_DTYPE_F16 ||
                     (fm_dtype_is_quant(w->dtype) && fm_quant_nbytes(w->dtype, 1, w->cols, w->group_size, w->scale_dtype));
    if (level == FM_CPU_SCALAR || !simd_type || w->cols <= 0 || n_tokens <= 0) {
        fm_cpu_matmul_ref(pool, out, x, n_tokens, w);
        return FM_CPU_SCALAR;
    }
    const int lanes = level == FM_CPU_AVX512 ? FM_KERN_AVX512_LANES : FM_KERN_AVX2_LANES;
    /* group sums of x serve the one-token form only (kernels.h) */
    const int64_t xp_stride = fm_kern_xp_floats(w, lanes), xs_stride = n_tokens == 1 ? fm_kern_xsum_floats(w) : 0;
    const int64_t per_token = xp_stride + xs_stride;
    float stack_buf[PREP_STACK_FLOATS];
    float *buf = NULL;
    if (per_token > 0) {
        if (per_token <= PREP_STACK_FLOATS / n_tokens) buf = stack_buf;
        else if (per_token > INT64_MAX / 4 / n_tokens ||
                 !(buf = aligned_alloc(64, ((size_t)(per_token * n_tokens) * sizeof(float) + 63) & ~(size_t)63))) {
            fm_cpu_matmul_ref(pool, out, x, n_tokens, w);
            return FM_CPU_SCALAR;
        }
    }
    simd_job s = {.k = {.out = out, .x = x, .n_tokens = n_tokens, .w = w, .xp = buf, .xp_stride = xp_stride,
                        .xsum = buf && xs_stride ? buf + xp_stride * n_tokens : NULL},
                  .level = level,
                  .xp = buf,
                  .xsum = buf && xs_stride ? buf + xp_stride * n_tokens : NULL};
    if (per_token > 0) {
        if (n_tokens >= 16) fm_pool_run(pool, simd_prep, &s, n_tokens, 4);
        else simd_prep(&s, 0, n_tokens);
    }
    /* one contiguous share per thread (a long sequential stream each: dynamic hand-out of row
     * blocks measured slower here), each at least ~256K multiply-adds (~15 us at one token):
     * waking a pool thread costs ~15 us on the 2-core VM (docs/SPEED.md), so smaller matrices
     * run on the caller alone */
    const int64_t groups = (w->rows + SIMD_ROWS - 1) / SIMD_ROWS;
    fm_pool_run(pool, simd_rows, &s, groups, 262144 / (SIMD_ROWS * w->cols * n_tokens) + 1);
    if (buf != stack_buf) free(buf);
    return level;
}

uint64_t fm_cpu_read_sum(fm_cpu_level level, const void *p, size_t n) {
    while (level > FM_CPU_SCALAR && !fm_cpu_level_supported(level)) level = (fm_cpu_level)(level - 1);
    if (level == FM_CPU_AVX512) return fm_kern_avx512_read(p, n);
    if (level == FM_CPU_AVX2) return fm_kern_avx2_read(p, n);
    const unsigned char *c = p;
    uint64_t s[4] = {0};
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++) {
            uint64_t v;
            memcpy(&v, c + i + 8 * k, 8);
            s[k] += v;
        }
    uint64_t r = s[0] + s[1] + s[2] + s[3];
    for (; i < n; i++) r += c[i];
    return r;
}

/* ---- int8 activations ---- */

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static bool amx_ok;

static void amx_init(void) {
#if defined(__linux__) && defined(__x86_64__)
    if (!fm_cpu_int8_supported(FM_CPU_INT8_VNNI) || !__builtin_cpu_supports("amx-tile") ||
        !__builtin_cpu_supports("amx-int8"))
        return;
    /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA (process-wide): without this permission (Linux <
     * 5.16, or refused) the first tile instruction would raise SIGILL */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return;
    amx_ok = fm_kern_amx_probe();
#endif
}

static pthread_once_t avxvnni_once = PTHREAD_ONCE_INIT;
static bool avxvnni_ok;

/* once per process: CPUID traps to the hypervisor in a VM (~20 us a call here, measured) */
static void avxvnni_init(void) {
#if defined(__x86_64__)
    /* CPUID.(EAX=7, ECX=1):EAX bit 4 (GCC 12's __builtin_cpu_supports has no "avxvnni"); the OS
     * saves the YMM registers if AVX2 is supported */
    unsigned a, b, c, d;
    avxvnni_ok = fm_cpu_level_supported(FM_CPU_AVX2) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1);
#endif
}

bool fm_cpu_int8_supported(fm_cpu_int8 k) {
    switch (k) {
    case FM_CPU_INT8_OFF: return true;
    case FM_CPU_INT8_AVX2: return fm_cpu_level_supported(FM_CPU_AVX2);
    case FM_CPU_INT8_AVXVNNI: pthread_once(&avxvnni_once, avxvnni_init); return avxvnni_ok;
    case FM_CPU_INT8_VNNI:
#if defined(__x86_64__)
        return fm_cpu_level_supported(FM_CPU_AVX512) && __builtin_cpu_supports("avx512vnni") &&
               __builtin_cpu_supports("avx512vbmi");
#else
        return false;
#endif
    case FM_CPU_INT8_AMX: pthread_once(&amx_once, amx_init); return amx_ok;
    default: return false;
    }
}

fm_cpu_int8 fm_cpu_int8_best(void) {
    if (fm_cpu_int8_supported(FM_CPU_INT8_AMX)) return FM_CPU_INT8_AMX;
    if (fm_cpu_int8_supported(FM_CPU_INT8_VNNI)) return FM_CPU_INT8_VNNI;
    if (fm_cpu_int8_supported(FM_CPU_INT8_AVXVNNI)) return FM_CPU_INT8_AVXVNNI;
    if (fm_cpu_int8_supported(FM_CPU_INT8_AVX2)) return FM_CPU_INT8_AVX2;
    return FM_CPU_INT8_OFF;
}

const char *fm_cpu_int8_name(fm_cpu_int8 k) {
    switch (k) {
    case FM_CPU_INT8_OFF: return "off";
    case FM_CPU_INT8_AVX2: return "avx2";
    case FM_CPU_INT8_AVXVNNI: return "avxvnni";
    case FM_CPU_INT8_VNNI: return "vnni";
    case FM_CPU_INT8_AMX: return "amx";
    default: return "?";
    }
}

/* Whether the int8 path is on when FLASHMOE_CPU_INT8 is not set: on, with two activation levels,
 * whose results on the trained fixture equal the float path's quality (q8 everything: 508/512
 * top-1 and KL 0.00140 both ways; docs/SPEED.md). The tests that check exactness against
 * transformers on quantized imports run the float kernels (fm_cpu_set_int8_mode): the random-weight
 * fixtures amplify any activation perturbation ~100x (2.1e-2 there with two levels). */
#define INT8_DEFAULT_ON 1

fm_cpu_int8 fm_cpu_int8_choose(const char *request) {
    fm_cpu_int8 best = fm_cpu_int8_best();
    if (!request || !*request) return INT8_DEFAULT_ON ? best : FM_CPU_INT8_OFF;
    if (!strcmp(request, "auto") || !strcmp(request, "1")) return best;
    if (!strcmp(request, "0") || !strcmp(request, "off")) return FM_CPU_INT8_OFF;
    for (int k = FM_CPU_INT8_AVX2; k <= FM_CPU_INT8_AMX; k++) {
        if (strcmp(request, fm_cpu_int8_name((fm_cpu_int8)k))) continue;
        if (fm_cpu_int8_supported((fm_cpu_int8)k)) return (fm_cpu_int8)k;
        fprintf(stderr, "flashmoe: FLASHMOE_CPU_INT8=%s: this CPU or OS lacks %s; using %s\n", request,
                k == FM_CPU_INT8_AMX       ? "AMX-INT8"
                : k == FM_CPU_INT8_VNNI    ? "AVX-512 VNNI/VBMI"
                : k == FM_CPU_INT8_AVXVNNI ? "AVX-VNNI"
                                           : "AVX2/FMA/F16C",
                fm_cpu_int8_name(best));
        return best;
    }
    fprintf(stderr, "flashmoe: FLASHMOE_CPU_INT8=%s: unknown value (0, off, avx2, avxvnni, vnni, amx or auto); using %s\n",
            request, fm_cpu_int8_name(best));
    return best;
}

fm_cpu_int8 fm_cpu_int8_for_level(fm_cpu_level level, fm_cpu_int8 k) {
    if (level == FM_CPU_AVX512 || k == FM_CPU_INT8_OFF) return k;
    if (level != FM_CPU_AVX2) return FM_CPU_INT8_OFF;
    if (k == FM_CPU_INT8_AVX2 || k == FM_CPU_INT8_AVXVNNI) return k;
    return fm_cpu_int8_supported(FM_CPU_INT8_AVXVNNI) ? FM_CPU_INT8_AVXVNNI
           : fm_cpu_int8_supported(FM_CPU_INT8_AVX2)  ? FM_CPU_INT8_AVX2
                                                      : FM_CPU_INT8_OFF;
}

static pthread_once_t int8_once = PTHREAD_ONCE_INIT;
static fm_cpu_int8 int8_chosen;
static void int8_init(void) {
    int8_chosen = fm_cpu_int8_for_level(fm_cpu_matmul_level(), fm_cpu_int8_choose(getenv("FLASHMOE_CPU_INT8")));
}

fm_cpu_int8 fm_cpu_matmul_int8_mode(void) {
    pthread_once(&int8_once, int8_init);
    return __atomic_load_n(&int8_chosen, __ATOMIC_RELAXED);
}

fm_cpu_int8 fm_cpu_set_int8_mode(fm_cpu_int8 k) {
    fm_cpu_int8 old = fm_cpu_matmul_int8_mode();
    if (k != FM_CPU_INT8_OFF && !fm_cpu_int8_supported(k)) k = fm_cpu_int8_best();
    __atomic_store_n(&int8_chosen, k, __ATOMIC_RELAXED);
    return old;
}

/* Crossovers measured with a 2-thread microbenchmark on Sapphire Rapids (docs/SPEED.md): the int8
 * kernels beat the float ones from 2 tokens on (Q4/Q8, expert shapes), and at one token the
 * in-place VNNI kernel does too (Q4 ~21.5 against ~16.5 GB/s from RAM, two levels); AMX, whose
 * tiles always hold 16 tokens, beats VNNI from about 6 tokens with two activation levels (VNNI's
 * work doubles with the levels, AMX's less) and about 12 with one. */
#define INT8_MIN_TOKENS 1

fm_cpu_int8 fm_cpu_int8_pick(fm_cpu_int8 mode, int levels, const fm_weight *w, int64_t n_tokens) {
    if (mode == FM_CPU_INT8_OFF || !fm_dtype_is_quant(w->dtype) || n_tokens < INT8_MIN_TOKENS) return FM_CPU_INT8_OFF;
    /* AVX2 paths: one token of Q8 stays on the float kernels (as fast in kernelbench, and end to end
     * on a Q8-dense model the int8 form made the mixer and lm_head ~10% slower; docs/SPEED.md,
     * session 7); Q4/Q2 gain 40-130% there */
    if (mode == FM_CPU_INT8_AVX2 || mode == FM_CPU_INT8_AVXVNNI)
        return n_tokens == 1 && w->dtype == FM_DTYPE_Q8 ? FM_CPU_INT8_OFF : mode;
    return mode == FM_CPU_INT8_AMX && n_tokens >= (levels == 1 ? 12 : 6) ? FM_CPU_INT8_AMX : FM_CPU_INT8_VNNI;
}

static pthread_once_t levels_once = PTHREAD_ONCE_INIT;
static int levels_chosen;
static void levels_init(void) {
    const char *v = getenv("FLASHMOE_CPU_INT8_LEVELS");
    levels_chosen = 2;
    if (!v || !*v || !strcmp(v, "2")) return;
    if (!strcmp(v, "1")) levels_chosen = 1;
    else fprintf(stderr, "flashmoe: FLASHMOE_CPU_INT8_LEVELS=%s: not 1 or 2; using 2\n", v);
}

int fm_cpu_int8_levels(void) {
    pthread_once(&levels_once, levels_init);
    return levels_chosen;
}

typedef struct int8_job {
    fm_kern_i8_job k;
    fm_cpu_int8 kind;
    const float *x;
    int8_t *xq, *xq2; /* writable views of k.xq, k.xq2, k.dx, k.xs, k.xw for the quantization pass */
    float *dx, *xs;
    int16_t *xw;
} int8_job;

/* the AVX2 paths (their own quantizer, widened activations, kernels) */
static bool int8_avx2(fm_cpu_int8 k) { return k == FM_CPU_INT8_AVX2 || k == FM_CPU_INT8_AVXVNNI; }

/* The fewest multiply-adds worth a thread of path k (waking one costs ~15 us on the 2-core VM):
 * ~1M for VNNI/AMX; ~256K for the AVX2 paths, the float kernels' figure (their speed is nearer the
 * float kernels': with ~1M, the decode's 1024-row dense products ran on one thread, mixer +50%). */
static int64_t int8_min_work(fm_cpu_int8 k) { return int8_avx2(k) ? 262144 : 1048576; }

static void int8_prep(void *arg, int64_t t0, int64_t t1) {
    int8_job *s = arg;
    if (!int8_avx2(s->kind)) {
        fm_kern_i8_quant(s->k.w, s->x, t0, t1, s->xq, s->xq2, s->k.xq_stride, s->dx, s->xs);
        return;
    }
    fm_kern_avx2_i8_quant(s->k.w, s->x, t0, t1, s->xq, s->xq2, s->k.xq_stride, s->dx, s->xs);
    for (int64_t t = t0; t < t1; t++)
        fm_kern_avx2_i8_widen(s->xq + t * s->k.xq_stride, s->xq2 ? s->xq2 + t * s->k.xq_stride : NULL, s->k.w->cols,
                              s->xw + t * s->k.xw_stride);
}

#define INT8_ROWS 16 /* the kernels' row block */

static void int8_rows(void *arg, int64_t b0, int64_t b1) {
    const int8_job *s = arg;
    const int64_t N = s->k.w->rows, r0 = b0 * INT8_ROWS, r1 = b1 * INT8_ROWS < N ? b1 * INT8_ROWS : N;
    if (s->kind == FM_CPU_INT8_AMX) fm_kern_amx_rows(&s->k, r0, r1);
    else if (s->kind == FM_CPU_INT8_AVX2) fm_kern_avx2_i8_rows(&s->k, r0, r1);
    else if (s->kind == FM_CPU_INT8_AVXVNNI) fm_kern_avxvnni_i8_rows(&s->k, r0, r1);
    else fm_kern_vnni_rows(&s->k, r0, r1);
}

static void int8_t1_rows(void *arg, int64_t r0, int64_t r1) { fm_kern_vnni_t1_rows(arg, r0, r1); }
static void int8_t1_rows_avx2(void *arg, int64_t r0, int64_t r1) { fm_kern_avx2_i8_t1_rows(arg, r0, r1); }
static void int8_t1_rows_avxvnni(void *arg, int64_t r0, int64_t r1) { fm_kern_avxvnni_i8_t1_rows(arg, r0, r1); }

#define T1_STACK_COLS 16384 /* one token at up to 16K columns needs no allocation */

static fm_pool_fn t1_rows_fn(fm_cpu_int8 k) {
    return !int8_avx2(k) ? int8_t1_rows : k == FM_CPU_INT8_AVX2 ? int8_t1_rows_avx2 : int8_t1_rows_avxvnni;
}

/* The one-token kernel's scratch for w on path k: the rounded activations (*Kc bytes a level, Kc a
 * multiple of 32 (64 for VNNI); with *wide, the AVX2 Q8 kernel's int16 Q: 4 Kc in all), then dx and
 * xs (*G floats each). Returns its bytes. */
static size_t t1_layout(fm_cpu_int8 k, const fm_weight *w, int64_t *Kc, int64_t *G, bool *wide) {
    const bool avx2 = int8_avx2(k);
    *Kc = avx2 ? fm_kern_avx2_i8_t1_cols(w) : fm_kern_i8_t1_cols(w);
    *G = w->cols / w->group_size;
    *wide = avx2 && fm_quant_bits(w->dtype) == 8;
    return (size_t)((*wide ? 4 : 2) * *Kc) + sizeof(float) * (size_t)(2 * *G);
}

static size_t t1_scratch_bytes(fm_cpu_int8 k, const fm_weight *w) {
    int64_t Kc, G;
    bool wide;
    return t1_layout(k, w, &Kc, &G, &wide);
}

/* Rounds one token x for w's in-place kernel of path k into buf (t1_scratch_bytes(k, w) bytes,
 * 64-byte aligned) and fills that kernel's job *j (out: w->rows floats). */
static void t1_prepare(fm_cpu_int8 k, int levels, unsigned char *buf, float *out, const float *x, const fm_weight *w,
                       fm_kern_i8_job *j) {
    const bool avx2 = int8_avx2(k);
    int64_t Kc, G;
    bool wide;
    t1_layout(k, w, &Kc, &G, &wide);
    int8_t *xq = (int8_t *)buf, *xq2 = levels == 2 ? (int8_t *)buf + Kc : NULL;
    int16_t *xw = wide ? (int16_t *)(void *)(buf + 2 * Kc) : NULL;
    float *dx = (float *)(void *)(buf + (wide ? 4 : 2) * Kc), *xs = dx + G;
    memset(buf + w->cols, 0, (size_t)(Kc - w->cols));
    if (xq2) memset(xq2 + w->cols, 0, (size_t)(Kc - w->cols));
    if (avx2) fm_kern_avx2_i8_quant(w, x, 0, 1, xq, xq2, Kc, dx, xs);
    else fm_kern_i8_quant(w, x, 0, 1, xq, xq2, Kc, dx, xs);
    if (wide) fm_kern_avx2_i8_widen(xq, xq2, Kc, xw);
    for (int l = 0; l < levels && !wide; l++) {
        int8_t *v = l ? xq2 : xq;
        if (avx2) fm_kern_avx2_i8_t1_order(w, v);
        else fm_kern_i8_t1_order(w, v);
    }
    *j = (fm_kern_i8_job){.out = out, .n_tokens = 1, .w = w, .xq = xq, .xq2 = xq2, .xq_stride = Kc, .dx = dx, .xs = xs,
                          .xw = xw, .xw_stride = Kc};
}

/* One token through the in-place kernel of path k (kernels.h): AVX2's, AVXVNNI's, else VNNI's;
 * false if the scratch cannot be had. */
static bool matmul_int8_t1(fm_cpu_int8 k, int levels, fm_pool *pool, float *out, const float *x, const fm_weight *w) {
    const size_t bytes = t1_scratch_bytes(k, w);
    unsigned char stack_buf[4 * T1_STACK_COLS + 2 * sizeof(float) * (T1_STACK_COLS / 32)] __attribute__((aligned(64)));
    unsigned char *buf = bytes <= sizeof stack_buf ? stack_buf : aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    if (!buf) return false;
    fm_kern_i8_job j;
    t1_prepare(k, levels, buf, out, x, w, &j);
    /* one contiguous share per thread of at least ~1M multiply-adds, as below (AVX2: ~256K) */
    fm_pool_run(pool, t1_rows_fn(k), &j, w->rows, int8_min_work(k) / w->cols + 1);
    if (buf != stack_buf) free(buf);
    return true;
}

/* Whether path k can take w with `levels` levels (else fm_cpu_matmul_int8 runs the float kernels). */
static bool int8_takes(fm_cpu_int8 k, int levels, const fm_weight *w) {
    return k != FM_CPU_INT8_OFF && (levels == 1 || levels == 2) && fm_dtype_is_quant(w->dtype) &&
           fm_quant_nbytes(w->dtype, 1, w->cols, w->group_size, w->scale_dtype);
}

/* The path fm_cpu_matmul runs one token of w on: its pick, less what the CPU lacks. */
static fm_cpu_int8 t1_path(int levels, const fm_weight *w) {
    fm_cpu_int8 k = fm_cpu_int8_pick(fm_cpu_matmul_int8_mode(), levels, w, 1);
    while (k > FM_CPU_INT8_OFF && !fm_cpu_int8_supported(k)) k = (fm_cpu_int8)(k - 1);
    return int8_takes(k, levels, w) ? k : FM_CPU_INT8_OFF;
}

typedef struct t1_many_job {
    fm_pool_fn fn;
    int n;
    fm_kern_i8_job *jobs;
    const int64_t *row0; /* [n + 1]: product i has the batch's rows row0[i] .. row0[i + 1] - 1 */
} t1_many_job;

static void t1_many_rows(void *arg, int64_t r0, int64_t r1) {
    const t1_many_job *m = arg;
    int i = 0;
    while (m->row0[i + 1] <= r0) i++;
    for (; i < m->n && m->row0[i] < r1; i++) {
        const int64_t a = r0 > m->row0[i] ? r0 : m->row0[i], b = r1 < m->row0[i + 1] ? r1 : m->row0[i + 1];
        m->fn(&m->jobs[i], a - m->row0[i], b - m->row0[i]);
    }
}

#define T1_MANY_STACK (192 * 1024) /* the batch's activation scratch, on the stack */

void fm_cpu_matvec_many(fm_pool *pool, const fm_cpu_mv *mv, int n) {
    const int levels = fm_cpu_int8_levels();
    fm_cpu_int8 k = n > 1 && n <= FM_CPU_MV_MANY ? t1_path(levels, mv[0].w) : FM_CPU_INT8_OFF;
    size_t at[FM_CPU_MV_MANY + 1] = {0}; /* product i's scratch at buf + at[i] */
    int64_t row0[FM_CPU_MV_MANY + 1] = {0}, min_cols = INT64_MAX;
    for (int i = 0; i < n && k != FM_CPU_INT8_OFF; i++) {
        if (i && t1_path(levels, mv[i].w) != k) {
            k = FM_CPU_INT8_OFF;
            break;
        }
        at[i + 1] = at[i] + ((t1_scratch_bytes(k, mv[i].w) + 63) & ~(size_t)63);
        row0[i + 1] = row0[i] + mv[i].w->rows;
        if (mv[i].w->cols < min_cols) min_cols = mv[i].w->cols;
    }
    if (k == FM_CPU_INT8_OFF || at[n] > T1_MANY_STACK) { /* one product at a time */
        for (int i = 0; i < n; i++) fm_cpu_matmul(pool, mv[i].out, mv[i].x, 1, mv[i].w);
        return;
    }
    unsigned char buf[T1_MANY_STACK] __attribute__((aligned(64)));
    fm_kern_i8_job jobs[FM_CPU_MV_MANY];
    for (int i = 0; i < n; i++) t1_prepare(k, levels, buf + at[i], mv[i].out, mv[i].x, mv[i].w, &jobs[i]);
    t1_many_job m = {.fn = t1_rows_fn(k), .n = n, .jobs = jobs, .row0 = row0};
    /* as one product: a share of at least ~1M multiply-adds a thread (AVX2 ~256K) */
    fm_pool_run(pool, t1_many_rows, &m, row0[n], int8_min_work(k) / min_cols + 1);
}

fm_cpu_int8 fm_cpu_matmul_int8(fm_cpu_int8 k, int levels, fm_pool *pool, float *out, const float *x, int64_t n_tokens,
                               const fm_weight *w) {
    while (k > FM_CPU_INT8_OFF && !fm_cpu_int8_supported(k)) k = (fm_cpu_int8)(k - 1);
    const bool ok = int8_takes(k, levels, w) && n_tokens > 0 && n_tokens <= (INT64_MAX / 8 - 15) / (w->cols + 64);
    const bool avx2 = int8_avx2(k);
    if (ok && n_tokens == 1 && matmul_int8_t1(k, levels, pool, out, x, w)) return avx2 ? k : FM_CPU_INT8_VNNI;
    void *buf = NULL;
    const int64_t K = ok ? w->cols : 0, G = ok ? K / w->group_size : 0, tpad = (n_tokens + 15) & ~(int64_t)15;
    /* rows of xq 64 bytes longer than K: at K = 1024, 4096, .. the 16 rows of an AMX tile load
     * would otherwise fall in one L1 set */
    const int64_t stride = K + 64;
    const size_t lv_bytes = ok ? (size_t)(tpad * stride) : 0, xq_bytes = lv_bytes * (size_t)levels; /* 32-byte multiples */
    /* AVX2: the int16 Q of every token after dx and xs (K + 32 per token) */
    const size_t dx_bytes = sizeof(float) * (size_t)(2 * n_tokens * G),
                 xw_bytes = ok && avx2 ? 2 * (size_t)(n_tokens * (K + 32)) : 0;
    if (ok) buf = aligned_alloc(64, (xq_bytes + dx_bytes + xw_bytes + 63) & ~(size_t)63);
    if (!buf) {
        fm_cpu_matmul_at(fm_cpu_level_best(), pool, out, x, n_tokens, w);
        return FM_CPU_INT8_OFF;
    }
    int8_job s = {.kind = k, .x = x, .xq = buf, .xq2 = levels == 2 ? (int8_t *)buf + lv_bytes : NULL,
                  .dx = (float *)(void *)((char *)buf + xq_bytes)};
    s.xs = s.dx + n_tokens * G;
    s.xw = xw_bytes ? (int16_t *)(void *)((char *)buf + xq_bytes + dx_bytes) : NULL;
    s.k = (fm_kern_i8_job){.out = out, .n_tokens = n_tokens, .w = w, .xq = s.xq, .xq2 = s.xq2, .xq_stride = stride,
                           .dx = s.dx, .xs = s.xs, .xw = s.xw, .xw_stride = K + 32};
    memset(s.xq + n_tokens * stride, 0, (size_t)((tpad - n_tokens) * stride));
    if (s.xq2) memset(s.xq2 + n_tokens * stride, 0, (size_t)((tpad - n_tokens) * stride));
    if (n_tokens >= 16) fm_pool_run(pool, int8_prep, &s, n_tokens, 8);
    else int8_prep(&s, 0, n_tokens);
    /* one contiguous share of 16-row blocks per thread, each at least ~1M multiply-adds (the int8
     * kernels do several times the float ones' work per microsecond; AVX2's ~1.5x: ~256K) */
    const int64_t blocks = (w->rows + INT8_ROWS - 1) / INT8_ROWS;
    fm_pool_run(pool, int8_rows, &s, blocks, int8_min_work(k) / (INT8_ROWS * K * n_tokens) + 1);
    free(buf);
    return k;
}

void fm_cpu_matmul(fm_pool *pool, float *out, const float *x, int64_t n_tokens, const fm_weight *w) {
    const int levels = fm_cpu_int8_levels();
    const fm_cpu_int8 k = fm_cpu_int8_pick(fm_cpu_matmul_int8_mode(), levels, w, n_tokens);
    if (k != FM_CPU_INT8_OFF) {
        fm_cpu_matmul_int8(k, levels, pool, out, x, n_tokens, w);
        return;
    }
    fm_cpu_matmul_at(fm_cpu_matmul_level(), pool, out, x, n_tokens, w);
}

void fm_cpu_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    float ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float scale = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * (w ? w[i] : 1.0f);
}

void fm_cpu_rope_neox(float *x, int rot_dim, int64_t pos, double theta) {
    int half = rot_dim / 2;
    for (int i = 0; i < half; i++) {
        /* as transformers: inv_freq in float32, angle = pos * inv_freq in float32 */
        float inv_freq = (float)(1.0 / pow(theta, (double)(2 * i) / (double)rot_dim));
        float f = (float)pos * inv_freq;
        float c = cosf(f), s = sinf(f);
        float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
    }
}
