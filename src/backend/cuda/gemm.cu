/* Tensor-core GEMM for quantized weights at many tokens (prefill): out[t, r] = sum_c x[t, c] W[r, c]
 * for Q4 / Q8 weights (groups of 32, 64 or 128; BF16, F16 or F32 scales), through
 * fm_cuda_matmul_batch, which hands it every product fm_cuda_gemm_wants (docs/CUDA.md "Prefill
 * GEMM"). The one-token and few-token kernels of matmul.cu run on FP32 FMAs and re-read the weights
 * for every 8 tokens; here a block computes a 64-row x 64-token tile on mma.sync (m16n8k16, bf16
 * in, f32 accumulators), reading its 64 rows of weights once per 64 tokens.
 *
 * Numbers. q is an exact integer in bf16 (Q4: the q4_pair_bf16 trick; Q8: 0..255 has 8
 * significant bits, converted through float). x is split into three bf16 parts, x = hi + mid + lo
 * up to 2^-24 |x| (each part the rounding of what the previous ones left; the subtractions are
 * exact), as in matmul.cu's one-token Q4 kernel, so each q * part is exact in the f32 accumulators
 * and the result matches the FP32 kernels to float32 summation order (tests/test_cuda.c: the same
 * bounds as every other kernel). Two parts (2^-18) were measured first: within those bounds too, but
 * one near-tie row of a Q8 test model took another argmax than the CPU's float path. Per group:
 * acc += s * sum(q x) + b * sum(x), the sums of x taken in f32 from x itself.
 *
 * Layout. 8 warps: warp w owns rows 16 (w % 4) .. + 15 of the block's 64 and tokens 32 (w / 4) ..
 * + 31 (four n-tiles of 8). The columns go in k-blocks of 64 (four mma k-steps of 16). Within a
 * k-step the 16 k slots of the mma are permuted (the same way for A and B, so the sum is
 * unchanged): lane (g = lane / 4, c = lane % 4) holds slots (2c, 2c + 1) = columns (c, c + 4) and
 * slots (2c + 8, 2c + 9) = columns (8 + c, 12 + c) of the step. For Q4, columns (c, c + 4) are the
 * nibbles at bits 4c and 4c + 16 of the step's first word, one shift and one q4_pair_bf16; for Q8
 * byte c of the step's first and second words. The weights of a k-block (64 rows x 32 or 64 bytes)
 * are copied to shared memory with cp.async, two k-blocks ahead; x goes through registers one
 * k-block ahead: a thread loads 16 columns of one token, splits them into the B fragments' three
 * bf16 parts (per lane slot one 16-byte store {hi b0, hi b1, mid b0, mid b1} and one 8-byte store
 * {lo b0, lo b1}) and the 32-column sums. Token rows of the staged hi/mid are 80 words apart and
 * of lo 40 (16 and 8 mod 32: the 16-byte reads of a quarter warp and the 8-byte reads of a half
 * warp hit distinct banks). Grid: x = token tiles (so that blocks running together share
 * weight rows in L2), y = row tiles, z = product. */
#include <cuda_fp16.h>
#include <atomic>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/mma_util.cuh"

extern "C" {
#include "quant/quant.h"
}

namespace {

constexpr int GM_BM = 64, GM_BN = 64, GM_BK = 64, GM_THREADS = 256;
constexpr int GM_XW = 80;  /* u32 words per token row of the staged x's hi/mid parts: 64 used, 16 of padding */
constexpr int GM_XL = 40;  /* ... and of its lo part: 32 used, 8 of padding */
constexpr int GM_MAX = 64; /* products per launch */

struct GmDesc {
    const unsigned char *w;
    const float *x;
    float *out;
    int n_tokens;
};

struct GmParams {
    int rows, cols, n;
    long long scale_off, bias_off; /* bytes from w to its scales / biases */
    GmDesc m[GM_MAX];
};

/* Shared memory of one launch, bytes: two stages of weights, of staged x (hi/mid, lo), of the x
 * sums per token and 32-column half, and of the scales and biases per row and half. */
__host__ __device__ constexpr int gm_smem_bytes(int bits) {
    return 2 * GM_BM * (bits * GM_BK / 32) * 4 + 2 * GM_BN * (GM_XW + GM_XL) * 4 + 2 * GM_BN * 2 * 4 +
           2 * 2 * GM_BM * 2 * 4;
}

/* Byte c of w0 and of w1 (Q8 values) as a bf16 pair (exact: q <= 255 has 8 significant bits). */
__device__ __forceinline__ uint32_t q8_pair_bf16(uint32_t w0, uint32_t w1, uint32_t sel) {
    const float a = __uint_as_float(__byte_perm(w0, 0x4B000000u, sel)) - 8388608.0f;
    const float b = __uint_as_float(__byte_perm(w1, 0x4B000000u, sel)) - 8388608.0f;
    return pack_bf16(a, b);
}

template <int BITS, int SK, int GS>
__global__ void __launch_bounds__(GM_THREADS, 2) gemm_q(const __grid_constant__ GmParams p) {
    constexpr int RW = BITS * GM_BK / 32; /* u32 words of a row in a k-block: 8 (Q4) or 16 (Q8) */
    constexpr int CPR = RW / 4;           /* 16-byte chunks of a row in a k-block */
    const GmDesc &d = p.m[blockIdx.z];
    const int t0 = (int)blockIdx.x * GM_BN;
    if (t0 >= d.n_tokens) return;
    const int r0 = (int)blockIdx.y * GM_BM, rows = p.rows, cols = p.cols, nkb = cols / GM_BK;
    const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const int wm = warp & 3, wn = warp >> 2;

    extern __shared__ __align__(16) uint32_t smem[];
    uint32_t *ws = smem;                          /* [2][GM_BM * RW] */
    uint32_t *xs = ws + 2 * GM_BM * RW;           /* [2][GM_BN * GM_XW] */
    uint32_t *xl = xs + 2 * GM_BN * GM_XW;        /* [2][GM_BN * GM_XL] */
    float *xsum = (float *)(xl + 2 * GM_BN * GM_XL); /* [2][GM_BN][2] */
    float *sbv = xsum + 2 * GM_BN * 2;            /* [2][2 (scale, bias)][GM_BM][2] */

    /* weights: chunk tid of a k-block's 64 rows (threads past 64 CPR copy nothing) */
    const int wrow = tid / CPR, wch = tid % CPR;
    const bool wcopy = tid < GM_BM * CPR;
    const unsigned char *wsrc = d.w + (long long)min(r0 + wrow, rows - 1) * (cols * BITS / 8) + wch * 16;
    const uint32_t wdst = (uint32_t)__cvta_generic_to_shared(ws + wrow * RW + wch * 4);
    auto issue_w = [&](int kb) {
        if (wcopy && kb < nkb) cp_async16(wdst + (kb & 1) * (GM_BM * RW * 4), wsrc + (long long)kb * (RW * 4));
        cp_async_commit();
    };
    /* x: token st of the tile, columns 16 sq .. + 15 of a k-block (zeros past the last token) */
    const int st = tid >> 2, sq = tid & 3;
    const bool xok = t0 + st < d.n_tokens;
    const float4 *xsrc = (const float4 *)(d.x + (long long)(xok ? t0 + st : 0) * cols) + 4 * sq;
    /* scales (which = 0) or biases (1) of row srow, both 32-column halves of a k-block */
    const int srow = tid & 63, swhich = (tid >> 6) & 1;
    const bool sload = tid < 128;
    const long long groups = cols / GS;
    const unsigned char *sbase = d.w + (swhich ? p.bias_off : p.scale_off);
    const long long sidx = (long long)min(r0 + srow, rows - 1) * groups;

    float4 xv[4];
    float sv[2];
    auto load_x = [&](int kb) {
#pragma unroll
        for (int i = 0; i < 4; i++) xv[i] = xok ? __ldg(xsrc + kb * (GM_BK / 4) + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        if (sload) {
#pragma unroll
            for (int h = 0; h < 2; h++) sv[h] = fm_scale_load(sbase, sidx + (kb * GM_BK + 32 * h) / GS, SK);
        }
    };
    auto store_x = [&](int buf) {
        const float e[16] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w,
                             xv[2].x, xv[2].y, xv[2].z, xv[2].w, xv[3].x, xv[3].y, xv[3].z, xv[3].w};
        float s16 = 0.f;
#pragma unroll
        for (int i = 0; i < 16; i++) s16 += e[i];
        s16 += __shfl_xor_sync(0xffffffffu, s16, 1); /* the other 16 columns of this 32-column half */
        if ((sq & 1) == 0) xsum[(buf * GM_BN + st) * 2 + (sq >> 1)] = s16;
        uint4 *dst = (uint4 *)(xs + buf * (GM_BN * GM_XW) + st * GM_XW + sq * 16);
        uint2 *dsl = (uint2 *)(xl + buf * (GM_BN * GM_XL) + st * GM_XL + sq * 8);
        /* a pair's three parts: each the bf16 rounding of what the previous ones left (exact differences) */
        auto parts = [](float a, float b, uint32_t &h, uint32_t &m, uint32_t &l) {
            h = pack_bf16(a, b);
            const float ra = a - __uint_as_float(h << 16), rb = b - __uint_as_float(h & 0xFFFF0000u);
            m = pack_bf16(ra, rb);
            l = pack_bf16(ra - __uint_as_float(m << 16), rb - __uint_as_float(m & 0xFFFF0000u));
        };
#pragma unroll
        for (int cc = 0; cc < 4; cc++) {
            uint32_t h0, m0, l0, h1, m1, l1;
            parts(e[cc], e[cc + 4], h0, m0, l0);
            parts(e[8 + cc], e[12 + cc], h1, m1, l1);
            dst[cc] = make_uint4(h0, h1, m0, m1);
            dsl[cc] = make_uint2(l0, l1);
        }
        if (sload) {
            sbv[((buf * 2 + swhich) * GM_BM + srow) * 2] = sv[0];
            sbv[((buf * 2 + swhich) * GM_BM + srow) * 2 + 1] = sv[1];
        }
    };

    float acc[4][4], part[4][4], xg[4][2];
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int i = 0; i < 4; i++) acc[j][i] = part[j][i] = 0.f;
        xg[j][0] = xg[j][1] = 0.f;
    }
    uint32_t magic = 0x43004300u;
    asm volatile("" : "+r"(magic)); /* opaque: keeps the magic in a register */
    const uint32_t sel8 = 0x7540u | (uint32_t)c;
    const int ra = wm * 16 + g; /* this lane's rows ra, ra + 8 of the block */

    issue_w(0);
    issue_w(1);
    load_x(0);
    store_x(0);
    if (nkb > 1) load_x(1);
    for (int kb = 0; kb < nkb; kb++) {
        const int buf = kb & 1;
        cp_async_wait<1>(); /* this thread's copies of k-block kb have landed */
        __syncthreads();    /* ... and everyone's, and the staged x of kb */
        const uint32_t *wb = ws + buf * (GM_BM * RW);
        const uint32_t *xb = xs + buf * (GM_BN * GM_XW), *xlb = xl + buf * (GM_BN * GM_XL);
#pragma unroll
        for (int ks = 0; ks < 4; ks++) {
            uint32_t a0, a1, a2, a3;
            if constexpr (BITS == 4) {
                const uint2 u = *(const uint2 *)(wb + ra * RW + 2 * ks), v = *(const uint2 *)(wb + (ra + 8) * RW + 2 * ks);
                a0 = q4_pair_bf16(u.x >> (4 * c), magic);
                a1 = q4_pair_bf16(v.x >> (4 * c), magic);
                a2 = q4_pair_bf16(u.y >> (4 * c), magic);
                a3 = q4_pair_bf16(v.y >> (4 * c), magic);
            } else {
                const uint4 u = *(const uint4 *)(wb + ra * RW + 4 * ks), v = *(const uint4 *)(wb + (ra + 8) * RW + 4 * ks);
                a0 = q8_pair_bf16(u.x, u.y, sel8);
                a1 = q8_pair_bf16(v.x, v.y, sel8);
                a2 = q8_pair_bf16(u.z, u.w, sel8);
                a3 = q8_pair_bf16(v.z, v.w, sel8);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const uint4 b = *(const uint4 *)(xb + (wn * 32 + 8 * j + g) * GM_XW + ks * 16 + c * 4);
                const uint2 bl = *(const uint2 *)(xlb + (wn * 32 + 8 * j + g) * GM_XL + ks * 8 + c * 2);
                mma_bf16(part[j], a0, a1, a2, a3, b.x, b.y);
                mma_bf16(part[j], a0, a1, a2, a3, b.z, b.w);
                mma_bf16(part[j], a0, a1, a2, a3, bl.x, bl.y);
            }
            if (ks & 1) { /* a 32-column half ends: its x sums; a group may end */
                const int h = ks >> 1;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    xg[j][0] += xsum[(buf * GM_BN + wn * 32 + 8 * j + 2 * c) * 2 + h];
                    xg[j][1] += xsum[(buf * GM_BN + wn * 32 + 8 * j + 2 * c + 1) * 2 + h];
                }
                if (((kb * GM_BK + 32 * (h + 1)) % GS) == 0) {
                    const float *sa = sbv + ((buf * 2) * GM_BM + ra) * 2 + h, *ba = sbv + ((buf * 2 + 1) * GM_BM + ra) * 2 + h;
                    const float s_a = sa[0], b_a = ba[0], s_b = sa[16], b_b = ba[16]; /* row ra + 8: 8 rows x 2 further */
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        acc[j][0] = fmaf(s_a, part[j][0], fmaf(b_a, xg[j][0], acc[j][0]));
                        acc[j][1] = fmaf(s_a, part[j][1], fmaf(b_a, xg[j][1], acc[j][1]));
                        acc[j][2] = fmaf(s_b, part[j][2], fmaf(b_b, xg[j][0], acc[j][2]));
                        acc[j][3] = fmaf(s_b, part[j][3], fmaf(b_b, xg[j][1], acc[j][3]));
#pragma unroll
                        for (int i = 0; i < 4; i++) part[j][i] = 0.f;
                        xg[j][0] = xg[j][1] = 0.f;
                    }
                }
            }
        }
        if (kb + 1 < nkb) store_x(buf ^ 1); /* read last in k-block kb - 1: free since the barrier above */
        if (kb + 2 < nkb) load_x(kb + 2);
        __syncthreads(); /* every warp is done with the weights of buffer buf */
        issue_w(kb + 2);
    }
    cp_async_wait<0>();
    const int ga = r0 + ra, gb = ga + 8;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int tk = t0 + wn * 32 + 8 * j + 2 * c;
        float *o0 = d.out + (long long)tk * rows, *o1 = o0 + rows;
        if (tk < d.n_tokens) {
            if (ga < rows) o0[ga] = acc[j][0];
            if (gb < rows) o0[gb] = acc[j][2];
        }
        if (tk + 1 < d.n_tokens) {
            if (ga < rows) o1[ga] = acc[j][1];
            if (gb < rows) o1[gb] = acc[j][3];
        }
    }
}

typedef void (*gemm_fn)(GmParams);

template <int BITS, int SK> gemm_fn gemm_for_gs(int gs) {
    return gs == 32 ? gemm_q<BITS, SK, 32> : gs == 64 ? gemm_q<BITS, SK, 64> : gemm_q<BITS, SK, 128>;
}
template <int BITS> gemm_fn gemm_for_sk(fm_dtype sd, int gs) {
    return sd == FM_DTYPE_BF16 ? gemm_for_gs<BITS, 0>(gs) : sd == FM_DTYPE_F16 ? gemm_for_gs<BITS, 1>(gs)
                                                                               : gemm_for_gs<BITS, 2>(gs);
}

/* The threshold (fm_cuda_gemm_min_tokens): -1 until first read from FLASHMOE_CUDA_GEMM. */
std::atomic<int> gemm_min{-1};

bool gemm_shape_ok(const fm_weight *w) {
    if (!w || (w->dtype != FM_DTYPE_Q4 && w->dtype != FM_DTYPE_Q8)) return false;
    if (w->group_size != 32 && w->group_size != 64 && w->group_size != 128) return false;
    if (w->scale_dtype != FM_DTYPE_BF16 && w->scale_dtype != FM_DTYPE_F16 && w->scale_dtype != FM_DTYPE_F32) return false;
    return w->rows > 0 && w->rows <= 65535LL * GM_BM && w->cols > 0 && w->cols % GM_BK == 0 && w->cols <= (1 << 24);
}

} // namespace

extern "C" int fm_cuda_gemm_min_tokens(void) {
    int v = gemm_min.load(std::memory_order_relaxed);
    if (v >= 0) return v;
    v = FM_CUDA_GEMM_MIN_TOKENS;
    const char *e = getenv("FLASHMOE_CUDA_GEMM");
    if (e && *e) {
        char *end;
        const long n = strtol(e, &end, 10);
        if (*end == 0 && n >= 0 && n <= 1 << 30) v = (int)n;
    }
    int expect = -1; /* a concurrent first read or a setter wins */
    return gemm_min.compare_exchange_strong(expect, v) ? v : expect;
}

extern "C" int fm_cuda_set_gemm_min_tokens(int n) {
    const int old = fm_cuda_gemm_min_tokens();
    gemm_min.store(n < 0 ? 0 : n);
    return old;
}

bool fm_cuda_gemm_wants(const fm_weight *shape, const fm_cuda_mat *m) {
    const int min = fm_cuda_gemm_min_tokens();
    if (min == 0 || !m || m->n_tokens < min || m->n_tokens > (1 << 30) || !gemm_shape_ok(shape)) return false;
    return m->w && m->x && m->out && (uintptr_t)m->w % 16 == 0 && (uintptr_t)m->x % 16 == 0 && (uintptr_t)m->out % 4 == 0;
}

fm_status fm_cuda_gemm_batch(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_mat *mats, int n_mats) {
    int wanted = 0;
    for (int i = 0; i < n_mats; i++) wanted += fm_cuda_gemm_wants(shape, &mats[i]);
    if (wanted == 0) return FM_OK; /* nothing to enqueue (a one-token step under graph capture, say) */
    const int bits = shape->dtype == FM_DTYPE_Q4 ? 4 : 8;
    const gemm_fn fn = bits == 4 ? gemm_for_sk<4>(shape->scale_dtype, shape->group_size)
                                 : gemm_for_sk<8>(shape->scale_dtype, shape->group_size);
    const int smem = gm_smem_bytes(bits);
    FM_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    GmParams p;
    memset(&p, 0, sizeof p);
    p.rows = (int)shape->rows;
    p.cols = (int)shape->cols;
    int64_t so, bo;
    fm_quant_part_offsets(shape, &so, &bo);
    p.scale_off = so;
    p.bias_off = bo;
    int max_tokens = 0;
    for (int i = 0; i <= n_mats; i++) {
        const bool flush = i == n_mats || p.n == GM_MAX;
        if (flush && p.n > 0) {
            const dim3 grid((unsigned)((max_tokens + GM_BN - 1) / GM_BN), (unsigned)((p.rows + GM_BM - 1) / GM_BM),
                            (unsigned)p.n);
            fn<<<grid, GM_THREADS, smem, ctx->stream>>>(p);
            FM_CUDA_CHECK_LAUNCH("the CUDA prefill GEMM kernel");
            p.n = 0;
            max_tokens = 0;
        }
        if (i == n_mats) break;
        if (!fm_cuda_gemm_wants(shape, &mats[i])) continue;
        p.m[p.n++] = GmDesc{(const unsigned char *)mats[i].w, mats[i].x, mats[i].out, (int)mats[i].n_tokens};
        if (mats[i].n_tokens > max_tokens) max_tokens = (int)mats[i].n_tokens;
    }
    return FM_OK;
}
