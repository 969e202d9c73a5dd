/* Matmul kernels of the CUDA backend: out[t, r] = sum_c x[t, c] * W[r, c] for W in F32, F16, BF16
 * and the affine Q8 / Q4 / Q2 types (docs/QUANT.md), several weights of one shape per launch.
 * docs/CUDA.md explains the design; in short:
 *
 * Fast kernel (mm_fast): a block of 8 warps owns 32 consecutive rows of one weight (blockIdx.y
 * picks the weight of the batch), each warp 4 rows (R). A row is cut into 16-byte chunks (4 u32
 * words: 32 Q4 values, 16 Q8, 64 Q2, 8 BF16/F16, 4 F32); lane l of a warp takes chunks l, l + 32,
 * ... of its 4 rows, one 16-byte load per row per chunk (ld.global.nc, no L1 allocation: weights
 * are read once), so a warp reads 512 contiguous bytes of each row per step; each chunk's successor
 * is requested before the chunk is used. The activations of the block's tokens are staged once per
 * block in shared memory, permuted so that the slice a lane needs for its chunk is one 16-byte
 * shared load at consecutive addresses across the warp (conflict-free), and reused for the 4 rows
 * from registers.
 *
 * Quantized chunks use the FMA form: per group part (or half chunk for Q2, whose 64-value chunk
 * spans two 32-groups), sum_j (q_j s + b) x_j = s * sum_j q_j x_j + b * sum_j x_j, with the sums of
 * x computed while staging. q is made a float without a conversion instruction: the masked bits
 * (q << k) OR 0x4B000000 read as a float are 2^23 + q 2^k, exact, so one subtraction of 2^23 leaves
 * q 2^k, and the staged x carries the factor 2^-k (exact scaling by a power of two). Per weight:
 * one LOP3 (PRMT for Q8), one FADD and one FFMA per token.
 *
 * Tokens are processed TT at a time (1, 2, 4 or 8; Q2 at most 4) from registers; more tokens loop,
 * re-reading the weights. The general kernel (mm_generic: a warp per row, 4-byte loads, x from
 * global memory) takes any shape and alignment. mm_q4_mma (FM_CUDA_Q4_MMA=1, off by default) is an
 * experimental tensor-core kernel for one-token Q4. */
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>
#include <utility>

#include "backend/cuda/cuda_internal.h"

extern "C" {
#include "quant/quant.h"
}

namespace {

enum Kind { K_F32 = 0, K_F16, K_BF16, K_Q8, K_Q4, K_Q2, K_NONE };

template <int KIND> struct KT {
    static constexpr int BITS = KIND == K_F32 ? 32 : KIND == K_F16 || KIND == K_BF16 ? 16 : KIND == K_Q8 ? 8
                                                                                        : KIND == K_Q4 ? 4 : 2;
    static constexpr int VPW = 32 / BITS; /* values per u32 word */
    static constexpr bool Q = KIND >= K_Q8;
    /* quantized: elements e < DIRECT are masked in place ((e + 1) * BITS <= 23 bits keeps 2^23 + q 2^k
     * exact); the others come from the word shifted right by DIRECT * BITS */
    static constexpr int DIRECT = KIND == K_Q4 || KIND == K_Q2 ? 23 / BITS : VPW;
    static constexpr int NH = KIND == K_Q2 ? 2 : 1; /* scale groups per 16-byte chunk */
    static_assert(DIRECT > 0 && VPW * BITS == 32, "kind table");
};

#ifndef FM_CUDA_ROWS_PER_WARP
#define FM_CUDA_ROWS_PER_WARP 4 /* a tuning constant (tools/cuda_device.sh builds variants) */
#endif
constexpr int WARPS = 8, THREADS = 32 * WARPS;
constexpr int R = FM_CUDA_ROWS_PER_WARP; /* rows per warp in the fast kernel (R * max tile <= 32) */
constexpr int TG = 4;                                 /* tokens per pass in the general kernel */
constexpr int SMEM_CAP = 32 * 1024;                   /* staged activations per block, bytes */

struct Desc {
    const void *w;
    const float *x;
    float *out;
    long long n_tokens;
};

struct Params {
    long long rows, cols;
    long long scale_off, bias_off; /* bytes from w to its scales / biases (quantized) */
    int gs_log2;                   /* log2 of the group size (quantized) */
    int scale_kind;                /* 0 BF16, 1 F16, 2 F32 */
    int seg_chunks;                /* fast kernel: chunks per staged column segment (a multiple of 32) */
    int n_mats;
    Desc m[FM_CUDA_BATCH_MAX];
};

template <typename F, int... I>
__device__ __forceinline__ void static_for_impl(F &&f, std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
}
/* f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>): indices usable as constants */
template <int N, typename F> __device__ __forceinline__ void static_for(F &&f) {
    static_for_impl(f, std::make_integer_sequence<int, N>{});
}

__device__ __forceinline__ uint4 ld_stream(const uint4 *p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ uint32_t word_of(const uint4 &q, int i) {
    return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}
__device__ __forceinline__ float comp_of(const float4 &v, int c) {
    return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

/* Element E of word w as a float. Quantized: q * 2^k with k = exponent_shift<KIND>(E), to be
 * multiplied by x * 2^-k. */
template <int KIND, int E> __device__ __forceinline__ float unpack(uint32_t w) {
    using T = KT<KIND>;
    if constexpr (KIND == K_F32) {
        return __uint_as_float(w);
    } else if constexpr (KIND == K_BF16) {
        return __uint_as_float(E == 0 ? w << 16 : w & 0xFFFF0000u);
    } else if constexpr (KIND == K_F16) {
        return __half2float(__ushort_as_half((unsigned short)(E == 0 ? (w & 0xFFFFu) : (w >> 16))));
    } else if constexpr (KIND == K_Q8) {
        return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | E)) - 8388608.0f;
    } else {
        constexpr uint32_t MASK = (1u << T::BITS) - 1;
        uint32_t m = E < T::DIRECT ? w & (MASK << (T::BITS * E))
                                   : (w >> (T::BITS * T::DIRECT)) & (MASK << (T::BITS * (E - T::DIRECT)));
        return __uint_as_float(m | 0x4B000000u) - 8388608.0f;
    }
}

/* The power of two k of element e's unpacked value (0 for Q8 and float types). */
template <int KIND> __device__ __forceinline__ int exponent_shift(int e) {
    using T = KT<KIND>;
    if constexpr (KIND == K_Q4 || KIND == K_Q2) return T::BITS * (e < T::DIRECT ? e : e - T::DIRECT);
    else return 0;
}

__device__ __forceinline__ float load_scale(const unsigned char *base, long long idx, int kind) {
    if (kind == 2) return __ldg((const float *)base + idx);
    unsigned short u = __ldg((const unsigned short *)base + idx);
    return kind == 0 ? __uint_as_float((uint32_t)u << 16) : __half2float(__ushort_as_half(u));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Stages tokens [t0, t0 + nt) (zeros for TT - nt more) of chunks [k0, k0 + segn) of x into shared
 * memory: xs[((t * nwb + kl / 32) * SL + slot) * 32 + kl % 32] is float4 `slot` of local chunk kl,
 * prescaled by 2^-k per element; xsum[(t * segch + kl) * NH + h] is the plain sum of x over half h
 * (NH = 2) or all (NH = 1) of chunk kl. Every thread of the block calls it. Each thread issues
 * STAGE_U independent 16-byte loads before using any. */
constexpr int STAGE_U = 4;

template <int KIND, int TT>
__device__ __forceinline__ void stage(float4 *xs, float *xsum, const float *x, long long cols, long long t0, int nt,
                                      long long k0, int segn, int segch) {
    using T = KT<KIND>;
    constexpr int SL = T::VPW, VPC = 4 * T::VPW, GRP = SL / T::NH;
    const int n4 = segch * SL, total = TT * n4, nwb = segch / 32;
    const long long c0 = k0 * VPC;
    /* total is a multiple of 32 and every j below a multiple of 32 plus the lane: a warp is wholly
     * inside or outside [0, total), so the shuffles run with full warps */
    for (int base = 0; base < total; base += THREADS * STAGE_U) {
        float4 v[STAGE_U];
#pragma unroll
        for (int u = 0; u < STAGE_U; u++) {
            const int j = base + u * THREADS + (int)threadIdx.x;
            v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (j < total) {
                const int t = j / n4, f = j - t * n4, kl = f / SL;
                if (t < nt && kl < segn) v[u] = __ldg((const float4 *)(x + (t0 + t) * cols + c0) + f);
            }
        }
#pragma unroll
        for (int u = 0; u < STAGE_U; u++) {
            const int j = base + u * THREADS + (int)threadIdx.x;
            if (j >= total) break;
            const int t = j / n4, f = j - t * n4, kl = f / SL, slot = f - kl * SL;
            float4 w = v[u];
            if constexpr (T::Q) {
                float s = (w.x + w.y) + (w.z + w.w);
#pragma unroll
                for (int o = 1; o < GRP; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (slot % GRP == 0) xsum[(t * segch + kl) * T::NH + slot / GRP] = s;
                if constexpr (KIND != K_Q8) {
                    const int e0 = (4 * slot) % T::VPW; /* element of its word of component 0 */
                    w.x *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0)) << 23);
                    w.y *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0 + 1)) << 23);
                    w.z *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0 + 2)) << 23);
                    w.w *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0 + 3)) << 23);
                }
            }
            xs[((t * nwb + (kl >> 5)) * SL + slot) * 32 + (kl & 31)] = w;
        }
    }
}

/* The weight words and the scales / biases of chunk k of rows row0 .. row0 + R - 1 (zeros past the
 * last row).
 *
 * FM_CUDA_SCALE_PREFETCH (a switch, docs/CUDA.md "Measurements"): 1 (the default) loads the raw 16-
 * or 32-bit scale and bias values back to back in one branch and converts them when the chunk is
 * used, a step later, so they are in flight together with the weight words; 0 (the previous
 * default, kept for comparison) loads each scale and bias and converts it to float at once, inside
 * a branch on the scale type, so a warp waits for every one of those loads in turn (up to 8 memory
 * latencies per chunk). On an H200, 1 moved Q4 g64 one-token streaming from 1141 to 1792 GB/s and
 * Q8 from 1955 to 3020 GB/s. */
#ifndef FM_CUDA_SCALE_PREFETCH
#define FM_CUDA_SCALE_PREFETCH 1
#endif

template <int KIND> struct ChunkRegs {
    uint4 q[R];
#if FM_CUDA_SCALE_PREFETCH
    uint32_t s[R][KT<KIND>::NH], b[R][KT<KIND>::NH]; /* raw scale / bias bits */
#else
    float s[R][KT<KIND>::NH], b[R][KT<KIND>::NH];
#endif
};

/* A scale or bias as float: from the raw bits (FM_CUDA_SCALE_PREFETCH) or as stored. */
#if FM_CUDA_SCALE_PREFETCH
__device__ __forceinline__ float scale_value(uint32_t raw, int kind) {
    return kind == 0 ? __uint_as_float(raw << 16)
                     : kind == 1 ? __half2float(__ushort_as_half((unsigned short)raw)) : __uint_as_float(raw);
}
#else
__device__ __forceinline__ float scale_value(float v, int) { return v; }
#endif

/* SB: bytes per scale (2 or 4), for FM_CUDA_SCALE_PREFETCH */
template <int KIND, int SB>
__device__ __forceinline__ void load_chunk_sb(ChunkRegs<KIND> &c, const Params &p, const uint4 *wq,
                                              const unsigned char *sbase, const unsigned char *bbase, long long row0,
                                              long long chunks, long long groups, long long k) {
    using T = KT<KIND>;
    constexpr int VPC = 4 * T::VPW, NH = T::NH;
#pragma unroll
    for (int r = 0; r < R; r++) {
        const bool ok = row0 + r < p.rows;
        c.q[r] = ok ? ld_stream(wq + (row0 + r) * chunks + k) : make_uint4(0, 0, 0, 0);
        if constexpr (T::Q) {
#pragma unroll
            for (int h = 0; h < NH; h++) {
#if FM_CUDA_SCALE_PREFETCH
                const long long gi = (row0 + r) * groups + ((k * VPC + h * (VPC / NH)) >> p.gs_log2);
                if constexpr (SB == 4) {
                    c.s[r][h] = ok ? __ldg((const unsigned int *)sbase + gi) : 0u;
                    c.b[r][h] = ok ? __ldg((const unsigned int *)bbase + gi) : 0u;
                } else {
                    c.s[r][h] = ok ? (uint32_t)__ldg((const unsigned short *)sbase + gi) : 0u;
                    c.b[r][h] = ok ? (uint32_t)__ldg((const unsigned short *)bbase + gi) : 0u;
                }
#else
                c.s[r][h] = c.b[r][h] = 0.f;
                if (ok) {
                    const long long gi = (row0 + r) * groups + ((k * VPC + h * (VPC / NH)) >> p.gs_log2);
                    c.s[r][h] = load_scale(sbase, gi, p.scale_kind);
                    c.b[r][h] = load_scale(bbase, gi, p.scale_kind);
                }
#endif
            }
        }
    }
}

template <int KIND>
__device__ __forceinline__ void load_chunk(ChunkRegs<KIND> &c, const Params &p, const uint4 *wq,
                                           const unsigned char *sbase, const unsigned char *bbase, long long row0,
                                           long long chunks, long long groups, long long k) {
    if (FM_CUDA_SCALE_PREFETCH && KT<KIND>::Q && p.scale_kind == 2)
        load_chunk_sb<KIND, 4>(c, p, wq, sbase, bbase, row0, chunks, groups, k);
    else
        load_chunk_sb<KIND, 2>(c, p, wq, sbase, bbase, row0, chunks, groups, k);
}

#ifndef FM_CUDA_MIN_BLOCKS
#define FM_CUDA_MIN_BLOCKS 3 /* blocks per SM the one- and two-token kernels must fit (a register cap) */
#endif

template <int KIND, int TT>
__global__ void __launch_bounds__(THREADS, TT <= 2 ? FM_CUDA_MIN_BLOCKS : 1) mm_fast(const __grid_constant__ Params p) {
    using T = KT<KIND>;
    constexpr int VPW = T::VPW, VPC = 4 * VPW, SL = VPW, NH = T::NH;
    extern __shared__ float4 smem[];
    const Desc &d = p.m[blockIdx.y];
    const long long n_tok = d.n_tokens;
    if (n_tok <= 0) return; /* the whole block */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long rows = p.rows, cols = p.cols, chunks = cols / VPC;
    const long long row0 = ((long long)blockIdx.x * WARPS + warp) * R;
    const int segch = p.seg_chunks, nwb = segch / 32;
    float4 *xs = smem;
    float *xsum = (float *)(smem + (size_t)TT * segch * SL);
    const uint4 *wq = (const uint4 *)d.w;
    const unsigned char *sbase = (const unsigned char *)d.w + p.scale_off;
    const unsigned char *bbase = (const unsigned char *)d.w + p.bias_off;
    const long long groups = cols >> p.gs_log2;

    for (long long t0 = 0; t0 < n_tok; t0 += TT) {
        const int nt = (int)min((long long)TT, n_tok - t0);
        float acc[R][TT];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < TT; t++) acc[r][t] = 0.f;
        for (long long k0 = 0; k0 < chunks; k0 += segch) {
            const int segn = (int)min((long long)segch, chunks - k0);
            /* the lane's first chunk is requested before the activations are staged, and each
             * chunk's successor before the chunk is used: two chunks in flight per lane */
            ChunkRegs<KIND> next;
            if (lane < segn) load_chunk<KIND>(next, p, wq, sbase, bbase, row0, chunks, groups, k0 + lane);
            __syncthreads(); /* the previous segment's readers are done */
            stage<KIND, TT>(xs, xsum, d.x, cols, t0, nt, k0, segn, segch);
            __syncthreads();
            for (int kl = lane; kl < segn; kl += 32) {
                const ChunkRegs<KIND> cur = next;
                if (kl + 32 < segn) load_chunk<KIND>(next, p, wq, sbase, bbase, row0, chunks, groups, k0 + kl + 32);
                float part[R][TT][NH];
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int t = 0; t < TT; t++)
#pragma unroll
                        for (int h = 0; h < NH; h++) part[r][t][h] = 0.f;
                const float4 *xc = xs + (size_t)(kl >> 5) * SL * 32 + (kl & 31);
                static_for<SL>([&](auto J) {
                    constexpr int j = decltype(J)::value;
                    float4 xv[TT];
#pragma unroll
                    for (int t = 0; t < TT; t++) xv[t] = xc[((size_t)t * nwb * SL + j) * 32];
                    static_for<4>([&](auto C) {
                        constexpr int v = 4 * j + decltype(C)::value; /* value index in the chunk */
                        constexpr int i = v / VPW, e = v % VPW, h = NH == 2 ? v / (VPC / 2) : 0;
#pragma unroll
                        for (int r = 0; r < R; r++) {
                            const float qf = unpack<KIND, e>(word_of(cur.q[r], i));
#pragma unroll
                            for (int t = 0; t < TT; t++)
                                part[r][t][h] = fmaf(qf, comp_of(xv[t], decltype(C)::value), part[r][t][h]);
                        }
                    });
                });
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int t = 0; t < TT; t++) {
                        if constexpr (T::Q) {
#pragma unroll
                            for (int h = 0; h < NH; h++)
                                acc[r][t] = fmaf(scale_value(cur.s[r][h], p.scale_kind), part[r][t][h],
                                                 fmaf(scale_value(cur.b[r][h], p.scale_kind),
                                                      xsum[((size_t)t * segch + kl) * NH + h], acc[r][t]));
                        } else {
                            acc[r][t] += part[r][t][0];
                        }
                    }
            }
        }
        /* every lane gets every sum; lane r * TT + t stores (row0 + r, t0 + t) */
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < TT; t++) {
                const float v = warp_sum(acc[r][t]);
                if (lane == r * TT + t && t < nt && row0 + r < rows) d.out[(t0 + t) * rows + row0 + r] = v;
            }
    }
}

/* FM_CUDA_Q4_MMA (an experimental switch, off by default; docs/CUDA.md "Measurements": it passes the
 * tests but was not faster): Q4 with groups of 64 or more, one token, on tensor cores. The idea:
 * the FP32 kernel above needs at least 3 instructions per weight (LOP3, FADD, FFMA); dequantizing
 * to bf16 pairs needs a shift, a LOP3 and a bf16x2 FMA per 2 weights, then mma.sync. (As compiled,
 * the address arithmetic and a second LOP3 per pair, see docs/CUDA.md, ate the saving.) Exactly:
 *
 * - q is exact in bf16: the nibbles at bits sh and sh + 16 of a word, OR 0x4300 each, are the bf16
 *   pair (128 + q0, 128 + q1); one fma.rn.bf16x2 by (1, 1) and (-128, -128) leaves (q0, q1).
 * - x is split into three bf16 parts, x = x0 + x1 + x2 up to 2^-24 |x| (each part is the rounding
 *   of what the previous ones left; the subtractions are exact), so q * x_p is exact in the FP32
 *   accumulation of mma.m16n8k16 (bf16 inputs, f32 accumulators).
 *
 * A warp owns 16 rows (the mma's M), walks along them in spans of 128 columns (one 16-byte chunk
 * per lane and row: lane (g = lane / 4, c = lane % 4) holds chunk c of the span of rows g and g + 8,
 * which are exactly the A fragments of 8 mmas, once the k order inside a chunk is permuted the same
 * way for A and B). The 8 columns of the mma's N are (half h of the span, part p): column 4h + p
 * holds x_p on the chunks of half h and zeros elsewhere (p = 3 unused), so the result separates
 * the two 64-column halves, whose groups (and scales) differ for g64. Per span and lane:
 * acc += s * (C[., 2c] + C[., 2c + 1]) + b * sum(x over chunk c). MMA_KS warps split the spans of
 * a 16-row tile and add up through shared memory at the end; a block has WARPS / MMA_KS tiles. The
 * staged x (three parts, permuted into the B fragment order) is shared by the block's tiles. The
 * q words and raw scale / bias bits of the next two spans are in flight while one is used. */
#ifndef FM_CUDA_Q4_MMA
#define FM_CUDA_Q4_MMA 0
#endif
#ifndef FM_CUDA_MMA_KSPLIT
#define FM_CUDA_MMA_KSPLIT 4 /* warps sharing a 16-row tile */
#endif
#ifndef FM_CUDA_MMA_MIN_BLOCKS
#define FM_CUDA_MMA_MIN_BLOCKS 3 /* blocks per SM the kernel must fit (a register cap) */
#endif

#if FM_CUDA_Q4_MMA
constexpr int MMA_KS = FM_CUDA_MMA_KSPLIT, MMA_TILES = WARPS / MMA_KS;
constexpr int MMA_PAD = 8; /* u32 words between the staged parts (bank spread) */
static_assert(WARPS % MMA_KS == 0, "FM_CUDA_MMA_KSPLIT must divide the warps of a block");

/* Nibbles at bits sh .. sh + 3 and sh + 16 .. sh + 19 of w as a bf16 pair of integers (exact). */
__device__ __forceinline__ uint32_t q4_pair_bf16(uint32_t w, int sh) {
    const uint32_t t = ((w >> sh) & 0x000F000Fu) | 0x43004300u; /* (128 + q0, 128 + q1) */
    uint32_t r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(t), "r"(0x3F803F80u), "r"(0xC300C300u));
    return r;
}

/* (lo, hi) rounded to bf16 and packed, lo in the low half. */
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* A float from raw scale bits (0 BF16, 1 F16, 2 F32). */
__device__ __forceinline__ float raw_scale(uint32_t raw, int kind) {
    return kind == 0 ? __uint_as_float(raw << 16)
                     : kind == 1 ? __half2float(__ushort_as_half((unsigned short)raw)) : __uint_as_float(raw);
}

struct MSpan {
    uint4 qa, qb;               /* chunk c of the span, rows g and g + 8 */
    uint32_t sa, ba, sb, bb;    /* raw scale / bias bits of the chunk's group, rows g and g + 8 */
};

/* Span s: pa / pb point at chunk c of span 0 of rows g / g + 8 (NULL past the last row), sa / sb at
 * the rows' scales (bytes); biases lie boff bytes after the scales; ss2: log2 of the scale size. */
__device__ __forceinline__ void load_span(MSpan &m, const uint4 *pa, const uint4 *pb, const unsigned char *sa,
                                          const unsigned char *sb, long long boff, int ss2, int gs_log2, int c,
                                          long long s) {
    m.qa = pa ? ld_stream(pa + 4 * s) : make_uint4(0, 0, 0, 0);
    m.qb = pb ? ld_stream(pb + 4 * s) : make_uint4(0, 0, 0, 0);
    const long long go = ((s * 128 + 64 * (c >> 1)) >> gs_log2) << ss2;
    if (ss2 == 2) {
        m.sa = pa ? __ldg((const unsigned int *)(sa + go)) : 0u;
        m.ba = pa ? __ldg((const unsigned int *)(sa + boff + go)) : 0u;
        m.sb = pb ? __ldg((const unsigned int *)(sb + go)) : 0u;
        m.bb = pb ? __ldg((const unsigned int *)(sb + boff + go)) : 0u;
    } else {
        m.sa = pa ? (uint32_t)__ldg((const unsigned short *)(sa + go)) : 0u;
        m.ba = pa ? (uint32_t)__ldg((const unsigned short *)(sa + boff + go)) : 0u;
        m.sb = pb ? (uint32_t)__ldg((const unsigned short *)(sb + go)) : 0u;
        m.bb = pb ? (uint32_t)__ldg((const unsigned short *)(sb + boff + go)) : 0u;
    }
}

/* Shared memory of the kernel for a segment of segsp spans, bytes. */
__host__ __device__ constexpr long long mma_smem_bytes(long long segsp) {
    return (3 * (segsp * 64 + MMA_PAD) + segsp * 4) * 4;
}

__global__ void __launch_bounds__(THREADS, FM_CUDA_MMA_MIN_BLOCKS) mm_q4_mma(const __grid_constant__ Params p) {
    extern __shared__ float4 smem[];
    __shared__ float red[WARPS][16];
    const Desc &d = p.m[blockIdx.y];
    if (d.n_tokens <= 0) return; /* the whole block; otherwise exactly 1 token */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int tile = warp / MMA_KS, kw = warp % MMA_KS;
    const long long rows = p.rows, cols = p.cols, chunks = cols / 32, spans = cols / 128;
    const long long groups = cols >> p.gs_log2;
    const long long ra = ((long long)blockIdx.x * MMA_TILES + tile) * 16 + g;
    const int segsp = p.seg_chunks; /* spans per staged segment */
    const int ps = segsp * 64 + MMA_PAD;  /* u32 words per staged part */
    uint32_t *xb = (uint32_t *)smem;
    float *xsum = (float *)(xb + 3 * ps);
    const int ss2 = p.scale_kind == 2 ? 2 : 1;
    const long long boff = p.bias_off - p.scale_off;
    const uint4 *pa = ra < rows ? (const uint4 *)d.w + ra * chunks + c : nullptr;
    const uint4 *pb = ra + 8 < rows ? (const uint4 *)d.w + (ra + 8) * chunks + c : nullptr;
    const unsigned char *sa = (const unsigned char *)d.w + p.scale_off + ((ra * groups) << ss2);
    const unsigned char *sb = sa + ((8 * groups) << ss2);
    /* the B fragments this lane supplies: part bp of its chunk c, where column g = 4h + bp has h = c / 2 */
    const int bp = g & 3;
    const bool bact = bp < 3 && (g >> 2) == (c >> 1);
    float acc_a = 0.f, acc_b = 0.f;

    for (long long s0 = 0; s0 < spans; s0 += segsp) {
        const int segn = (int)min((long long)segsp, spans - s0);
        const long long end = s0 + segn;
        long long s = s0 + kw;
        MSpan n0, n1;
        if (s < end) load_span(n0, pa, pb, sa, sb, boff, ss2, p.gs_log2, c, s);
        if (s + MMA_KS < end) load_span(n1, pa, pb, sa, sb, boff, ss2, p.gs_log2, c, s + MMA_KS);
        __syncthreads(); /* the previous segment's readers are done */
        {
            /* item j: chunk j / 16 of the segment, B word q = j % 16 (mma i = q / 2, register q % 2): the
             * x pair at chunk columns (col, col + 4), col = 8 (i / 2) + 2 (i % 2) + q % 2; 16 items per
             * chunk, so a chunk's sum is a 16-lane butterfly (all lanes run it: total and THREADS are
             * multiples of 32) */
            const float *x = d.x + s0 * 128;
            const int total = segn * 64;
            for (int base = 0; base < total; base += THREADS) {
                const int j = base + (int)threadIdx.x, kl = j >> 4, q = j & 15, i = q >> 1;
                const int col = kl * 32 + 8 * (i >> 1) + 2 * (i & 1) + (q & 1);
                const bool ok = j < total;
                const float lo = ok ? __ldg(x + col) : 0.f, hi = ok ? __ldg(x + col + 4) : 0.f;
                float sum = lo + hi;
#pragma unroll
                for (int o = 1; o < 16; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
                if (ok) {
                    const uint32_t p0 = pack_bf16(lo, hi);
                    const float rl = lo - __uint_as_float(p0 << 16), rh = hi - __uint_as_float(p0 & 0xFFFF0000u);
                    const uint32_t p1 = pack_bf16(rl, rh);
                    const uint32_t p2 = pack_bf16(rl - __uint_as_float(p1 << 16), rh - __uint_as_float(p1 & 0xFFFF0000u));
                    xb[kl * 16 + q] = p0;
                    xb[ps + kl * 16 + q] = p1;
                    xb[2 * ps + kl * 16 + q] = p2;
                    if (q == 0) xsum[kl] = sum;
                }
            }
        }
        __syncthreads();
#pragma unroll 1
        for (; s < end; s += MMA_KS) {
            const MSpan cur = n0;
            n0 = n1;
            if (s + 2 * MMA_KS < end) load_span(n1, pa, pb, sa, sb, boff, ss2, p.gs_log2, c, s + 2 * MMA_KS);
            const int kl = (int)(s - s0) * 4 + c; /* the lane's chunk in the segment */
            uint4 bw[4] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
            if (bact) {
                const uint4 *src = (const uint4 *)(xb + bp * ps + kl * 16);
#pragma unroll
                for (int v = 0; v < 4; v++) bw[v] = src[v];
            }
            float acc4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const uint32_t wa = word_of(cur.qa, i >> 1), wb = word_of(cur.qb, i >> 1);
                const int sh = 8 * (i & 1);
                const uint4 &b = bw[i >> 1];
                mma_bf16(acc4, q4_pair_bf16(wa, sh), q4_pair_bf16(wb, sh), q4_pair_bf16(wa, sh + 4),
                         q4_pair_bf16(wb, sh + 4), (i & 1) ? b.z : b.x, (i & 1) ? b.w : b.y);
            }
            const float xs = xsum[kl];
            acc_a = fmaf(raw_scale(cur.sa, p.scale_kind), acc4[0] + acc4[1], fmaf(raw_scale(cur.ba, p.scale_kind), xs, acc_a));
            acc_b = fmaf(raw_scale(cur.sb, p.scale_kind), acc4[2] + acc4[3], fmaf(raw_scale(cur.bb, p.scale_kind), xs, acc_b));
        }
    }
    acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
    acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 2);
    acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
    acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 2);
    if (c == 0) {
        red[warp][g] = acc_a;
        red[warp][g + 8] = acc_b;
    }
    __syncthreads();
    if (threadIdx.x < MMA_TILES * 16) {
        const int t = threadIdx.x >> 4, r = threadIdx.x & 15;
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < MMA_KS; k++) v += red[t * MMA_KS + k][r];
        const long long row = ((long long)blockIdx.x * MMA_TILES + t) * 16 + r;
        if (row < rows) d.out[row] = v;
    }
}
#endif

/* Any shape and alignment (4-byte words for quantized and F32 weights, 2-byte for F16/BF16): a warp
 * per row, lanes over the row's words (quantized) or elements, x read from global memory. */
template <int KIND> __global__ void __launch_bounds__(THREADS) mm_generic(const __grid_constant__ Params p) {
    using T = KT<KIND>;
    const Desc &d = p.m[blockIdx.y];
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const long long rows = p.rows, cols = p.cols, n_tok = d.n_tokens;
    if (row >= rows) return;
    for (long long t0 = 0; t0 < n_tok; t0 += TG) {
        const int nt = (int)min((long long)TG, n_tok - t0);
        float acc[TG] = {0.f, 0.f, 0.f, 0.f};
        if constexpr (T::Q) {
            constexpr uint32_t MASK = (1u << T::BITS) - 1;
            const long long wpr = cols / T::VPW, groups = cols >> p.gs_log2;
            const uint32_t *wr = (const uint32_t *)d.w + row * wpr;
            const unsigned char *sbase = (const unsigned char *)d.w + p.scale_off;
            const unsigned char *bbase = (const unsigned char *)d.w + p.bias_off;
            for (long long i = lane; i < wpr; i += 32) {
                const uint32_t w = __ldg(wr + i);
                const long long c0 = i * T::VPW, gi = row * groups + (c0 >> p.gs_log2);
                const float s = load_scale(sbase, gi, p.scale_kind), b = load_scale(bbase, gi, p.scale_kind);
#pragma unroll
                for (int t = 0; t < TG; t++) {
                    if (t >= nt) break;
                    const float *xr = d.x + (t0 + t) * cols + c0;
                    float part = 0.f, xsum = 0.f;
#pragma unroll
                    for (int e = 0; e < T::VPW; e++) {
                        const float xv = __ldg(xr + e);
                        part = fmaf((float)((w >> (T::BITS * e)) & MASK), xv, part);
                        xsum += xv;
                    }
                    acc[t] = fmaf(s, part, fmaf(b, xsum, acc[t]));
                }
            }
        } else {
            for (long long c = lane; c < cols; c += 32) {
                float wv;
                if constexpr (KIND == K_F32) wv = __ldg((const float *)d.w + row * cols + c);
                else {
                    const unsigned short u = __ldg((const unsigned short *)d.w + row * cols + c);
                    wv = KIND == K_BF16 ? __uint_as_float((uint32_t)u << 16) : __half2float(__ushort_as_half(u));
                }
#pragma unroll
                for (int t = 0; t < TG; t++)
                    if (t < nt) acc[t] = fmaf(wv, __ldg(d.x + (t0 + t) * cols + c), acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < TG; t++) {
            const float v = warp_sum(acc[t]);
            if (lane == t && t < nt) d.out[(t0 + t) * rows + row] = v;
        }
    }
}

typedef void (*kernel_fn)(const Params);

int kind_of(fm_dtype t) {
    switch (t) {
    case FM_DTYPE_F32: return K_F32;
    case FM_DTYPE_F16: return K_F16;
    case FM_DTYPE_BF16: return K_BF16;
    case FM_DTYPE_Q8: return K_Q8;
    case FM_DTYPE_Q4: return K_Q4;
    case FM_DTYPE_Q2: return K_Q2;
    default: return K_NONE;
    }
}

int bits_of(int kind) {
    static const int b[] = {32, 16, 16, 8, 4, 2};
    return b[kind];
}

/* Token tile for n tokens: 1, 2, 4 or 8 (Q2: at most 4, to keep the staged x within SMEM_CAP). */
int tile_for(int kind, long long n) {
    int tt = n <= 1 ? 1 : n == 2 ? 2 : n <= 4 ? 4 : 8;
    return kind == K_Q2 && tt > 4 ? 4 : tt;
}

template <int KIND> kernel_fn fast_for(int tt) {
    switch (tt) {
    case 1: return mm_fast<KIND, 1>;
    case 2: return mm_fast<KIND, 2>;
    case 4: return mm_fast<KIND, 4>;
    default:
        if constexpr (KIND == K_Q2) return mm_fast<KIND, 4>;
        else return mm_fast<KIND, 8>;
    }
}

kernel_fn kernel_for(int kind, bool fast, int tt) {
    switch (kind) {
    case K_F32: return fast ? fast_for<K_F32>(tt) : mm_generic<K_F32>;
    case K_F16: return fast ? fast_for<K_F16>(tt) : mm_generic<K_F16>;
    case K_BF16: return fast ? fast_for<K_BF16>(tt) : mm_generic<K_BF16>;
    case K_Q8: return fast ? fast_for<K_Q8>(tt) : mm_generic<K_Q8>;
    case K_Q4: return fast ? fast_for<K_Q4>(tt) : mm_generic<K_Q4>;
    default: return fast ? fast_for<K_Q2>(tt) : mm_generic<K_Q2>;
    }
}

/* Checks the shape; fills the shape part of p. */
fm_status check_shape(const fm_weight *w, Params *p, int *kind) {
    if (!w) return fm_error_set(FM_ERR_ARG, "CUDA matmul: NULL weight");
    *kind = kind_of(w->dtype);
    if (*kind == K_NONE)
        return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA matmul: weight type %s is not supported (F32, F16, BF16, Q8, Q4, Q2)",
                            fm_dtype_name(w->dtype));
    if (w->rows < 0 || w->cols <= 0)
        return fm_error_set(FM_ERR_ARG, "CUDA matmul: bad shape [%lld, %lld]", (long long)w->rows, (long long)w->cols);
    const int bits = bits_of(*kind);
    if ((uint64_t)w->rows * (uint64_t)w->cols > (UINT64_C(1) << 58))
        return fm_error_set(FM_ERR_ARG, "CUDA matmul: shape [%lld, %lld] too large", (long long)w->rows,
                            (long long)w->cols);
    memset(p, 0, sizeof *p);
    p->rows = w->rows;
    p->cols = w->cols;
    if (fm_dtype_is_quant(w->dtype)) {
        fm_status st = fm_quant_check("CUDA matmul weight", w->dtype, w->cols, w->group_size, w->scale_dtype);
        if (st != FM_OK) return st;
        const long long groups = w->cols / w->group_size, ss = w->scale_dtype == FM_DTYPE_F32 ? 4 : 2;
        p->gs_log2 = w->group_size == 32 ? 5 : w->group_size == 64 ? 6 : 7;
        p->scale_kind = w->scale_dtype == FM_DTYPE_BF16 ? 0 : w->scale_dtype == FM_DTYPE_F16 ? 1 : 2;
        p->scale_off = w->rows * w->cols * bits / 8;
        p->bias_off = p->scale_off + w->rows * groups * ss;
    }
    return FM_OK;
}

/* Checks one product's pointers; *fast is cleared if it cannot take the fast kernel. */
fm_status check_mat(const fm_cuda_mat *m, int i, int kind, long long cols, bool *fast) {
    if (m->n_tokens < 0) return fm_error_set(FM_ERR_ARG, "CUDA matmul: product %d: n_tokens %lld < 0", i, (long long)m->n_tokens);
    if (m->n_tokens == 0) return FM_OK;
    if (!m->w || !m->x || !m->out) return fm_error_set(FM_ERR_ARG, "CUDA matmul: product %d: NULL pointer", i);
    const uintptr_t wa = (uintptr_t)m->w, xa = (uintptr_t)m->x;
    const uintptr_t need = kind == K_F16 || kind == K_BF16 ? 2 : 4;
    if (wa % need || xa % 4 || (uintptr_t)m->out % 4)
        return fm_error_set(FM_ERR_ARG,
                            "CUDA matmul: product %d: weight must be %d-byte aligned and x, out 4-byte aligned", i,
                            (int)need);
    if (wa % 16 || xa % 16 || (cols * bits_of(kind)) % 128) *fast = false;
    return FM_OK;
}

/* Launches up to FM_CUDA_BATCH_MAX products (p.m[0..n)) with token tile tt. */
fm_status launch(fm_cuda *ctx, Params &p, int kind, bool fast, int tt) {
    if (p.n_mats == 0 || p.rows == 0) return FM_OK;
#if FM_CUDA_Q4_MMA
    if (fast && kind == K_Q4 && tt == 1 && p.gs_log2 >= 6 && p.cols % 128 == 0) {
        const long long spans = p.cols / 128;
        long long segsp = 1;
        while (segsp < spans && mma_smem_bytes(segsp + 1) <= SMEM_CAP) segsp++;
        p.seg_chunks = (int)segsp;
        const dim3 mgrid((unsigned)((p.rows + MMA_TILES * 16 - 1) / (MMA_TILES * 16)), (unsigned)p.n_mats);
        mm_q4_mma<<<mgrid, THREADS, (size_t)mma_smem_bytes(segsp), ctx->stream>>>(p);
        FM_CUDA_CHECK_LAUNCH("the CUDA Q4 tensor-core matmul kernel");
        return FM_OK;
    }
#endif
    kernel_fn fn = kernel_for(kind, fast, tt);
    dim3 grid;
    size_t smem = 0;
    if (fast) {
        const int SL = 32 / bits_of(kind), VPC = 4 * SL, NH = kind == K_Q2 ? 2 : 1;
        const bool q = kind >= K_Q8;
        const int ttk = kind == K_Q2 && tt > 4 ? 4 : tt;
        const long long chunks = p.cols / VPC;
        const long long per_chunk = (long long)ttk * (16 * SL + (q ? 4 * NH : 0)); /* bytes of staged x */
        long long segch = (SMEM_CAP / per_chunk) / 32 * 32;
        if (segch < 32) segch = 32;
        const long long need = (chunks + 31) / 32 * 32;
        if (segch > need) segch = need;
        p.seg_chunks = (int)segch;
        smem = (size_t)(segch * per_chunk);
        grid = dim3((unsigned)((p.rows + WARPS * R - 1) / (WARPS * R)), (unsigned)p.n_mats);
    } else {
        grid = dim3((unsigned)((p.rows + WARPS - 1) / WARPS), (unsigned)p.n_mats);
    }
    fn<<<grid, THREADS, smem, ctx->stream>>>(p);
    FM_CUDA_CHECK_LAUNCH("the CUDA matmul kernel");
    return FM_OK;
}

} // namespace

extern "C" fm_status fm_cuda_matmul_batch(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_mat *mats, int n_mats) {
    FM_CUDA_CTX(ctx);
    Params p;
    int kind;
    fm_status st = check_shape(shape, &p, &kind);
    if (st != FM_OK) return st;
    if (n_mats < 0 || (n_mats > 0 && !mats)) return fm_error_set(FM_ERR_ARG, "CUDA matmul: bad batch (%d products)", n_mats);
    /* validate everything before enqueuing anything */
    for (int i = 0; i < n_mats; i++) {
        bool dummy = true;
        st = check_mat(&mats[i], i, kind, p.cols, &dummy);
        if (st != FM_OK) return st;
    }
    /* products grouped by token tile (a tile of 8 costs 8 tokens of arithmetic even for 1), each
     * group launched in batches of FM_CUDA_BATCH_MAX */
    static const int tiles[] = {1, 2, 4, 8};
    for (int ti = 0; ti < 4; ti++) {
        p.n_mats = 0;
        bool fast = true;
        for (int i = 0; i <= n_mats; i++) {
            const bool flush = i == n_mats || p.n_mats == FM_CUDA_BATCH_MAX;
            if (flush && p.n_mats > 0) {
                if ((st = launch(ctx, p, kind, fast, tiles[ti])) != FM_OK) return st;
                p.n_mats = 0;
                fast = true;
            }
            if (i == n_mats) break;
            const fm_cuda_mat *m = &mats[i];
            if (m->n_tokens == 0 || tile_for(kind, m->n_tokens) != tile_for(kind, tiles[ti])) continue;
            if (tile_for(kind, tiles[ti]) != tiles[ti]) continue; /* Q2: tile 8 is tile 4 */
            check_mat(m, i, kind, p.cols, &fast);
            p.m[p.n_mats++] = Desc{m->w, m->x, m->out, (long long)m->n_tokens};
        }
    }
    return FM_OK;
}

extern "C" fm_status fm_cuda_matmul(fm_cuda *ctx, float *out, const float *x, int64_t n_tokens, const fm_weight *w) {
    if (!w) return fm_error_set(FM_ERR_ARG, "CUDA matmul: NULL weight");
    fm_cuda_mat m = {w->data, x, out, n_tokens};
    return fm_cuda_matmul_batch(ctx, w, &m, 1);
}
