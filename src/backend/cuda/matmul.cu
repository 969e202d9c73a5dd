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
 * global memory) takes any shape and alignment. mm_q4_tc (FM_CUDA_Q4_MMA=1, the default) runs
 * one-token Q4 with groups of 64 or 128 on tensor cores (mma.sync, exact; see its comment). */
#include <cuda_fp16.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <type_traits>
#include <utility>

#include "backend/cuda/cuda_internal.h"
#include "backend/cuda/mma_util.cuh"

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
__device__ __forceinline__ float scale_value(uint32_t raw, int kind) { return fm_scale_bits(raw, kind); }
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

/* The Q4 tensor-core kernel (mm_q4_tc; FM_CUDA_Q4_MMA=1, the default): one-token Q4 with groups of
 * 64 or 128 and cols a multiple of 128 (docs/CUDA.md "Kernel design"). The FP32 kernel above needs
 * at least 3 instructions per weight (LOP3, FADD, FFMA; it spent ~5.8); here a pair of weights
 * costs one LOP3, one bf16x2 FMA and (for 3 pairs of 4) a shift, and one mma.sync takes 8 weights
 * of each lane. Exactly:
 *
 * - q is exact in bf16: the nibbles at bits 0 and 16 of a word, OR 0x4300 each, are the bf16 pair
 *   (128 + q0, 128 + q1); one fma.rn.bf16x2 by (1, 1) and (-128, -128) leaves (q0, q1). The mask
 *   is the lop3's immediate and the magic a register operand, so a pair costs one LOP3, not two.
 * - x is split into three bf16 parts, x = x0 + x1 + x2 up to 2^-24 |x| (each part is the rounding
 *   of what the previous ones left; the subtractions are exact), so q * x_p is exact in the FP32
 *   accumulation of mma.m16n8k16 (bf16 inputs, f32 accumulators).
 *
 * A warp owns 16 rows (the mma's M) and walks along them in spans of 128 columns: lane (g = lane /
 * 4, c = lane % 4) uses chunk c (16 bytes) of the span of rows g and g + 8, which are exactly the A
 * fragments of 8 mmas once the k order inside a chunk is permuted the same way for A and B. The 8
 * columns of the mma's N are (half h of the span, part p): column 4h + p holds x_p on the chunks of
 * half h and zeros elsewhere (p = 3 unused), so the result separates the two 64-column halves, whose
 * groups (and scales) differ for g64. Per span and lane:
 * acc += s * (C[., 2c] + C[., 2c + 1]) + b * sum(x over chunk c).
 *
 * Weights reach the fragments through shared memory: a warp copies a stage of FM_CUDA_MMA_SPS (4)
 * spans of its 16 rows (256 contiguous bytes per row, whole 128-byte lines; cp.async 16 bytes a
 * lane, 2 rows per instruction) into its own ring of FM_CUDA_MMA_STAGES (2) stages and reads each
 * lane's chunks back with 16-byte shared loads (chunk positions XOR-swizzled by the row's parity:
 * conflict-free). Loading the fragments straight into registers (64 bytes of each of 16 rows per
 * warp instruction) stalled at 48% of the copy bandwidth, stages of 2 spans (128 bytes a row) at
 * 58-62%, 4 spans reach 67% (docs/CUDA.md "Measurements"): the length of the contiguous piece of a
 * row that one request asks for matters more than the bytes in flight. A
 * stage's scales and biases (16 rows x both groups x 2 = one 32-bit word per lane and span for g64
 * BF16/F16) are loaded by one lane each into registers and handed out with 4 shuffles per span.
 * Rows past the last are clamped to it (read, never stored): no predicates.
 *
 * KS warps (a template parameter: 1, 2 or 4, chosen per launch so that small launches still fill
 * the GPU) split the stages of a 16-row tile and add up through shared memory at the end; a block
 * has 8 / KS tiles. The staged x (three parts permuted into the B fragment order, 16 zero words
 * that the lanes without a B column read for every span, and the chunk sums of x) is shared by
 * the block's tiles: a thread stages 8 consecutive columns (two 16-byte loads, one 16-byte store
 * per part). The scale type and group size are template parameters: no branches on them in the
 * loop. */
#ifndef FM_CUDA_Q4_MMA
#define FM_CUDA_Q4_MMA 1
#endif
#ifndef FM_CUDA_MMA_SPS
#define FM_CUDA_MMA_SPS 4 /* spans (128 columns) per weight stage: 4 (256 bytes a row) or 2 (128) */
#endif
#ifndef FM_CUDA_MMA_STAGES
#define FM_CUDA_MMA_STAGES 2 /* weight stages per warp: one computed while the others load */
#endif
#ifndef FM_CUDA_MMA_KSMAX
#define FM_CUDA_MMA_KSMAX 4 /* most warps per 16-row tile the launch may choose (1, 2 or 4) */
#endif
#ifndef FM_CUDA_MMA_MIN_BLOCKS
#define FM_CUDA_MMA_MIN_BLOCKS 2 /* blocks per SM (registers and shared memory are sized for them) */
#endif

#if FM_CUDA_Q4_MMA
constexpr int MMA_SPS = FM_CUDA_MMA_SPS, MMA_NST = FM_CUDA_MMA_STAGES;
constexpr int MMA_CPR = 4 * MMA_SPS;          /* 16-byte chunks of a row in a stage */
constexpr int MMA_STAGE = 16 * MMA_CPR * 16;  /* bytes of a stage: 16 rows */
constexpr int MMA_WBYTES = WARPS * MMA_NST * MMA_STAGE; /* the weight stages of a block */
/* staged x per block, bytes: what the SM's 227 KB leave to FM_CUDA_MMA_MIN_BLOCKS blocks (1 KB each
 * reserved, 512 bytes of reduction buffer), at most 40 KB; a 4096-column x takes 25 KB. With the
 * defaults (2 stages of 4 spans, 2 blocks per SM): 64 KB of weight stages + up to 40 KB of x a block */
constexpr int MMA_SMEM_CAP = (227 * 1024 / FM_CUDA_MMA_MIN_BLOCKS - MMA_WBYTES - 1536) < 40 * 1024
                                 ? (227 * 1024 / FM_CUDA_MMA_MIN_BLOCKS - MMA_WBYTES - 1536) : 40 * 1024;
static_assert(FM_CUDA_MMA_KSMAX == 1 || FM_CUDA_MMA_KSMAX == 2 || FM_CUDA_MMA_KSMAX == 4, "FM_CUDA_MMA_KSMAX");
static_assert(MMA_SPS == 2 || MMA_SPS == 4, "FM_CUDA_MMA_SPS");
static_assert(MMA_NST >= 2 && MMA_NST <= 6, "FM_CUDA_MMA_STAGES");
static_assert(MMA_SMEM_CAP >= 8 * 1024, "the Q4 tensor-core kernel's stages leave too little shared memory for x");

/* What one lane loads of a span's scales or biases for one row (SK: 0 BF16, 1 F16, 2 F32): both
 * groups of the span for GS = 64, the one group for GS = 128. Row r's values for span s are element
 * r * spans + s of an array of these. */
template <int SK, int GS> struct SVal {
    using T = typename std::conditional<GS == 64, typename std::conditional<SK == 2, uint2, uint32_t>::type,
                                        typename std::conditional<SK == 2, uint32_t, unsigned short>::type>::type;
};

/* The value of group half h (GS = 64; 0 for GS = 128) of v, fetched from lane src, as float. */
template <int SK, int GS> __device__ __forceinline__ float scale_from(const typename SVal<SK, GS>::T &v, int src, int h) {
    if constexpr (GS == 64 && SK == 2) {
        const uint32_t lo = __shfl_sync(0xffffffffu, v.x, src), hi = __shfl_sync(0xffffffffu, v.y, src);
        return __uint_as_float(h ? hi : lo);
    } else {
        const uint32_t u = __shfl_sync(0xffffffffu, (uint32_t)v, src);
        if constexpr (SK == 2) return __uint_as_float(u);
        else if constexpr (SK == 0) return __uint_as_float(__byte_perm(u, 0, GS == 64 && h ? 0x3244 : 0x1044));
        else return __half2float(__ushort_as_half((unsigned short)(GS == 64 && h ? u >> 16 : u)));
    }
}

/* Shared memory of the kernel for segments of segsp spans, bytes: the weight stages, then 3 parts of
 * ps = 64 segsp + 8 words (x0, x1, x2), 4 words of padding, 16 words of zeros (at 3 ps + 4: banks
 * apart from the parts' fragments), then the chunk sums. */
__host__ __device__ constexpr long long mma_xbytes(long long segsp) { return (3 * (segsp * 64 + 8) + 20 + segsp * 4) * 4; }
__host__ __device__ constexpr long long mma_smem_bytes(long long segsp) { return MMA_WBYTES + mma_xbytes(segsp); }

template <int SK, int GS, int KS>
__global__ void __launch_bounds__(THREADS, FM_CUDA_MMA_MIN_BLOCKS) mm_q4_tc(const __grid_constant__ Params p) {
    constexpr int TILES = WARPS / KS;
    using SV = typename SVal<SK, GS>::T;
    extern __shared__ float4 smem[];
    __shared__ float red[KS > 1 ? WARPS : 1][16];
    const Desc &d = p.m[blockIdx.y];
    if (d.n_tokens <= 0) return; /* the whole block; otherwise exactly 1 token */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int tile = warp / KS, kw = warp % KS;
    const int rows = (int)p.rows, chunks = (int)(p.cols / 32), spans = (int)(p.cols / 128);
    const int r0 = (blockIdx.x * TILES + tile) * 16; /* the tile's first row */
    const int segsp = p.seg_chunks;                  /* spans per staged segment (a multiple of MMA_SPS) */
    const int ps = segsp * 64 + 8;                   /* u32 words per staged x part */
    uint32_t *xb = (uint32_t *)smem + MMA_WBYTES / 4;
    float *xsum = (float *)(xb + 3 * ps + 20);
    /* this warp's weight stages (16 rows of MMA_CPR chunks); copy instruction i of a stage moves
     * chunk cq of row RPI i + cr (local) to position cq ^ 4 (cr & 1) of that row (the row's parity
     * swizzles, so that fragment reads are conflict-free) */
    constexpr int RPI = 32 / MMA_CPR, NCI = 16 / RPI; /* rows per copy instruction, instructions per stage */
    const uint32_t wst = (uint32_t)__cvta_generic_to_shared(smem) + warp * (MMA_NST * MMA_STAGE);
    const int cr = lane / MMA_CPR, cq = lane % MMA_CPR;
    const uint32_t cdst = wst + cr * (MMA_CPR * 16) + ((cq ^ ((cr & 1) << 2)) << 4);
    const uint4 *crow[NCI]; /* the rows this lane copies (clamped to the last row) */
#pragma unroll
    for (int i = 0; i < NCI; i++) crow[i] = (const uint4 *)d.w + (long long)min(r0 + RPI * i + cr, rows - 1) * chunks;
    /* fragment reads: row g, span j of a stage at word g * 4 MMA_CPR + 16 (j ^ (g & 1)) + 4 c; row
     * g + 8 at 32 MMA_CPR words further */
    const uint32_t *wsw = (const uint32_t *)smem + warp * (MMA_NST * MMA_STAGE / 4);
    const int fe = g * 4 * MMA_CPR + 16 * (g & 1) + 4 * c, fo = g * 4 * MMA_CPR - 16 * (g & 1) + 4 * c;
    /* lane l loads the scales (l < 16) or biases of row r0 + l % 16 */
    const SV *sp = (const SV *)((const unsigned char *)d.w + (lane < 16 ? p.scale_off : p.bias_off)) +
                   (long long)min(r0 + (lane & 15), rows - 1) * spans;
    /* the B fragments this lane reads: part bp of its chunk c, where column g = 4h + bp has h = c / 2
     * (64 words a span), or else the 16 zero words for every span */
    const int bp = g & 3, h = c >> 1;
    const bool bact = bp < 3 && (g >> 2) == h;
    const uint32_t *bsrc = xb + (bact ? bp * ps + c * 16 : 3 * ps + 4);
    const int bstr = bact ? 64 : 0;
    if (threadIdx.x < 16) xb[3 * ps + 4 + threadIdx.x] = 0u; /* ordered by the first __syncthreads below */
    uint32_t magic = 0x43004300u;
    asm volatile("" : "+r"(magic)); /* opaque: keeps the magic in a register (one LOP3 per pair) */
    float acc_a = 0.f, acc_b = 0.f;
    SV sv[MMA_NST][MMA_SPS]; /* the scales / biases of the stages in flight */

    for (int s0 = 0; s0 < spans; s0 += segsp) {
        const int segn = min(segsp, spans - s0), ng = (segn + MMA_SPS - 1) / MMA_SPS; /* spans, stages */
        const int n = ng > kw ? (ng - kw + KS - 1) / KS : 0; /* this warp's stages */
        /* stage m of this warp: spans s0 + MMA_SPS (kw + m KS) .., into buffer m % MMA_NST */
        auto issue = [&](int m, int b, SV(&v)[MMA_SPS]) {
            const int s = s0 + MMA_SPS * (kw + m * KS);
            const int col = min(4 * s + cq, chunks - 1); /* clamped: the row's last stage may be short */
#pragma unroll
            for (int i = 0; i < NCI; i++) cp_async16(cdst + b * MMA_STAGE + i * (RPI * MMA_CPR * 16), crow[i] + col);
#pragma unroll
            for (int j = 0; j < MMA_SPS; j++) v[j] = __ldg(sp + min(s + j, spans - 1));
        };
#pragma unroll
        for (int b = 0; b < MMA_NST - 1; b++) {
            if (b < n) issue(b, b, sv[b]);
            cp_async_commit();
        }
        __syncthreads(); /* the previous segment's readers are done */
        {
            /* item j: columns 8 j .. 8 j + 7 of the segment, quarter m = j % 4 of chunk j / 4. Its
             * pairs (8 j + e, 8 j + e + 4), e = 0 .. 3, are B words q = 4 m + e of the chunk (mma
             * i = q / 2, register q % 2: the x pair at chunk columns col = 8 (i / 2) + 2 (i % 2) +
             * q % 2 and col + 4), so each part is one 16-byte store; a chunk's sum is a 4-lane
             * butterfly (every lane runs it) */
            const float4 *x4 = (const float4 *)(d.x + (long long)s0 * 128);
            const int total = segn * 16;
            for (int base = 0; base < total; base += THREADS) {
                const int j = base + (int)threadIdx.x;
                const bool ok = j < total;
                const float4 v0 = ok ? __ldg(x4 + 2 * j) : make_float4(0.f, 0.f, 0.f, 0.f);
                const float4 v1 = ok ? __ldg(x4 + 2 * j + 1) : make_float4(0.f, 0.f, 0.f, 0.f);
                float sum = ((v0.x + v0.y) + (v0.z + v0.w)) + ((v1.x + v1.y) + (v1.z + v1.w));
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                const float lo[4] = {v0.x, v0.y, v0.z, v0.w}, hi[4] = {v1.x, v1.y, v1.z, v1.w};
                uint32_t w0[4], w1[4], w2[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const uint32_t p0 = pack_bf16(lo[e], hi[e]);
                    const float rl = lo[e] - __uint_as_float(p0 << 16), rh = hi[e] - __uint_as_float(p0 & 0xFFFF0000u);
                    const uint32_t p1 = pack_bf16(rl, rh);
                    w0[e] = p0;
                    w1[e] = p1;
                    w2[e] = pack_bf16(rl - __uint_as_float(p1 << 16), rh - __uint_as_float(p1 & 0xFFFF0000u));
                }
                if (ok) {
                    ((uint4 *)xb)[j] = make_uint4(w0[0], w0[1], w0[2], w0[3]);
                    ((uint4 *)(xb + ps))[j] = make_uint4(w1[0], w1[1], w1[2], w1[3]);
                    ((uint4 *)(xb + 2 * ps))[j] = make_uint4(w2[0], w2[1], w2[2], w2[3]);
                    if ((j & 3) == 0) xsum[j >> 2] = sum;
                }
            }
        }
        __syncthreads();
#pragma unroll 1
        for (int m0 = 0; m0 < n; m0 += MMA_NST) {
            static_for<MMA_NST>([&](auto B) {
                constexpr int b = decltype(B)::value;         /* stage m's buffer */
                constexpr int bn = (b + MMA_NST - 1) % MMA_NST; /* the buffer of stage m + MMA_NST - 1 */
                const int m = m0 + b;
                if (m < n) {
                    if (m + MMA_NST - 1 < n) issue(m + MMA_NST - 1, bn, sv[bn]);
                    cp_async_commit();
                    cp_async_wait<MMA_NST - 1>(); /* stage m has landed (this lane's copies) */
                    __syncwarp();                 /* ... and every lane's */
                    const int sl = MMA_SPS * (kw + m * KS); /* the stage's first span in the segment */
                    const uint32_t *st = wsw + b * (MMA_STAGE / 4);
                    const int nj = min(MMA_SPS, segn - sl);
#pragma unroll
                    for (int j = 0; j < MMA_SPS; j++) {
                        if (j < nj) {
                            const uint32_t *fr = st + ((j & 1) ? fo : fe) + 16 * j;
                            const uint4 qa = *(const uint4 *)fr, qb = *(const uint4 *)(fr + 32 * MMA_CPR);
                            const uint4 *b4 = (const uint4 *)(bsrc + (sl + j) * bstr);
                            float acc4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                            for (int wi = 0; wi < 4; wi++) {
                                /* mma 2 wi: nibbles (0, 4) and (1, 5) of word wi; mma 2 wi + 1: (2, 6) and (3, 7) */
                                const uint32_t wa = word_of(qa, wi), wb = word_of(qb, wi);
                                const uint4 bv = b4[wi];
                                mma_bf16(acc4, q4_pair_bf16(wa, magic), q4_pair_bf16(wb, magic),
                                         q4_pair_bf16(wa >> 4, magic), q4_pair_bf16(wb >> 4, magic), bv.x, bv.y);
                                mma_bf16(acc4, q4_pair_bf16(wa >> 8, magic), q4_pair_bf16(wb >> 8, magic),
                                         q4_pair_bf16(wa >> 12, magic), q4_pair_bf16(wb >> 12, magic), bv.z, bv.w);
                            }
                            const float x_s = xsum[(sl + j) * 4 + c];
                            const SV v = sv[b][j];
                            const float sa = scale_from<SK, GS>(v, g, h), ba = scale_from<SK, GS>(v, 16 + g, h);
                            const float sb = scale_from<SK, GS>(v, 8 + g, h), bb = scale_from<SK, GS>(v, 24 + g, h);
                            acc_a = fmaf(sa, acc4[0] + acc4[1], fmaf(ba, x_s, acc_a));
                            acc_b = fmaf(sb, acc4[2] + acc4[3], fmaf(bb, x_s, acc_b));
                        }
                    }
                    __syncwarp(); /* every lane has read the buffer before it is refilled */
                }
            });
        }
    }
    acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 1);
    acc_a += __shfl_xor_sync(0xffffffffu, acc_a, 2);
    acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 1);
    acc_b += __shfl_xor_sync(0xffffffffu, acc_b, 2);
    if constexpr (KS == 1) {
        if (c == 0) {
            if (r0 + g < rows) d.out[r0 + g] = acc_a;
            if (r0 + g + 8 < rows) d.out[r0 + g + 8] = acc_b;
        }
    } else {
        if (c == 0) {
            red[warp][g] = acc_a;
            red[warp][g + 8] = acc_b;
        }
        __syncthreads();
        if (threadIdx.x < TILES * 16) {
            const int t = threadIdx.x >> 4, r = threadIdx.x & 15;
            float v = 0.f;
#pragma unroll
            for (int k = 0; k < KS; k++) v += red[t * KS + k][r];
            const int row = (blockIdx.x * TILES + t) * 16 + r;
            if (row < rows) d.out[row] = v;
        }
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

#if FM_CUDA_Q4_MMA
template <int SK, int GS> kernel_fn tc_for_ks(int ks) {
    if (FM_CUDA_MMA_KSMAX >= 4 && ks == 4) return mm_q4_tc<SK, GS, (FM_CUDA_MMA_KSMAX >= 4 ? 4 : 1)>;
    if (FM_CUDA_MMA_KSMAX >= 2 && ks == 2) return mm_q4_tc<SK, GS, (FM_CUDA_MMA_KSMAX >= 2 ? 2 : 1)>;
    return mm_q4_tc<SK, GS, 1>;
}
template <int SK> kernel_fn tc_for_gs(int gs_log2, int ks) {
    return gs_log2 == 6 ? tc_for_ks<SK, 64>(ks) : tc_for_ks<SK, 128>(ks);
}
kernel_fn tc_kernel(int scale_kind, int gs_log2, int ks) {
    return scale_kind == 0 ? tc_for_gs<0>(gs_log2, ks) : scale_kind == 1 ? tc_for_gs<1>(gs_log2, ks) : tc_for_gs<2>(gs_log2, ks);
}
#endif

/* Checks the shape; fills the shape part of p. */
fm_status check_shape(const fm_weight *w, Params *p, int *kind) {
    if (!w) return fm_error_set(FM_ERR_ARG, "CUDA matmul: NULL weight");
    *kind = kind_of(w->dtype);
    if (*kind == K_NONE)
        return fm_error_set(FM_ERR_UNSUPPORTED, "CUDA matmul: weight type %s is not supported (F32, F16, BF16, Q8, Q4, Q2)",
                            fm_dtype_name(w->dtype));
    if (w->rows < 0 || w->cols <= 0)
        return fm_error_set(FM_ERR_ARG, "CUDA matmul: bad shape [%lld, %lld]", (long long)w->rows, (long long)w->cols);
    if ((uint64_t)w->rows * (uint64_t)w->cols > (UINT64_C(1) << 58))
        return fm_error_set(FM_ERR_ARG, "CUDA matmul: shape [%lld, %lld] too large", (long long)w->rows,
                            (long long)w->cols);
    memset(p, 0, sizeof *p);
    p->rows = w->rows;
    p->cols = w->cols;
    if (fm_dtype_is_quant(w->dtype)) {
        fm_status st = fm_quant_check("CUDA matmul weight", w->dtype, w->cols, w->group_size, w->scale_dtype);
        if (st != FM_OK) return st;
        int64_t so, bo;
        fm_quant_part_offsets(w, &so, &bo);
        p->gs_log2 = w->group_size == 32 ? 5 : w->group_size == 64 ? 6 : 7;
        p->scale_kind = w->scale_dtype == FM_DTYPE_BF16 ? 0 : w->scale_dtype == FM_DTYPE_F16 ? 1 : 2;
        p->scale_off = so;
        p->bias_off = bo;
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
    if (fast && kind == K_Q4 && tt == 1 && p.gs_log2 >= 6 && p.cols % 128 == 0 && p.rows < (1LL << 30) &&
        p.rows * (p.cols / 32) < (1LL << 32)) {
        const long long spans = p.cols / 128;
        long long segsp = spans; /* one segment, or several of a multiple of MMA_SPS spans (whole stages) */
        if (mma_xbytes(segsp) > MMA_SMEM_CAP) {
            segsp = MMA_SPS;
            while (mma_xbytes(segsp + MMA_SPS) <= MMA_SMEM_CAP) segsp += MMA_SPS;
        }
        p.seg_chunks = (int)segsp;
        /* warps per 16-row tile: doubled (up to FM_CUDA_MMA_KSMAX) while the launch's warps would
         * fill at most half of the GPU's resident slots and each warp keeps >= 2 stages of 4 spans */
        const long long tiles = (p.rows + 15) / 16 * p.n_mats;
        const long long slots = (long long)ctx->sm_count * FM_CUDA_MMA_MIN_BLOCKS * WARPS;
        int ks = 1;
        while (ks < FM_CUDA_MMA_KSMAX && tiles * ks * 2 <= slots && spans >= ks * 4 * MMA_SPS) ks *= 2;
        const long long rows_per_block = 16 * (WARPS / ks);
        const dim3 mgrid((unsigned)((p.rows + rows_per_block - 1) / rows_per_block), (unsigned)p.n_mats);
        const kernel_fn fn = tc_kernel(p.scale_kind, p.gs_log2, ks);
        /* more than 48 KB of dynamic shared memory needs the kernel's opt-in (set once per device) */
        static bool opted[64][18];
        const int ki = (p.scale_kind * 2 + (p.gs_log2 == 6 ? 0 : 1)) * 3 + (ks == 1 ? 0 : ks == 2 ? 1 : 2);
        const bool known = ctx->device >= 0 && ctx->device < 64;
        if (!known || !opted[ctx->device][ki]) {
            FM_CUDA_CHECK(cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               MMA_WBYTES + MMA_SMEM_CAP));
            if (known) opted[ctx->device][ki] = true;
        }
        const size_t smem = (size_t)mma_smem_bytes(segsp);
        fn<<<mgrid, THREADS, smem, ctx->stream>>>(p);
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
    /* many tokens of Q4/Q8 weights: the tensor-core GEMM (gemm.cu); the rest here */
    if ((st = fm_cuda_gemm_batch(ctx, shape, mats, n_mats)) != FM_OK) return st;
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
            if (m->n_tokens == 0 || tile_for(kind, m->n_tokens) != tile_for(kind, tiles[ti]) ||
                fm_cuda_gemm_wants(shape, m))
                continue;
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

/* ==== One-token matvecs: fm_cuda_matvec and the routed experts of fm_cuda_expert_matvec ====
 *
 * A decode step's dense products are small (0.06 to 18 MB) and each was one launch of mm_fast with
 * 32 rows a block: 64 to 256 blocks, one partial wave, so a product spent most of its time ramping
 * up and draining. Here (mv_block) a block of 256 threads splits each row over its columns: the
 * threads form G = 256 / L groups of L lanes (L the power of two >= the row's 16-byte chunks, at
 * most 256), lane l of a group takes chunks l, l + L, ... of NR rows at once (NR = 2, 4 or 8, a
 * template parameter chosen per launch so that the grid has >= 2 blocks per SM), and reads the
 * chunk's x straight from global memory (16-byte loads, L1-cached: every group and block of the SM
 * reads the same x) once for its NR rows. With the model's shapes (<= 256 chunks a row) a thread
 * issues all its loads at once: NR weight chunks (16 bytes each, ld.global.nc, no L1 allocation),
 * their scales and biases, and its x. The group's partial sums meet by shuffles (L <= 32) or
 * shuffles and shared memory (L > 32): a fixed order, so results are deterministic. The arithmetic
 * per chunk is mm_fast's (q as a float by the 2^23 trick, the FMA form s * sum(q x) + b * sum(x)).
 *
 * One launch takes up to FM_CUDA_MV_MAX products of one weight type with their own shapes,
 * activations and outputs (a block finds its product by a scan of the products' first blocks), so
 * the products of a layer that share an input (in_proj_qkv/z/b/a; q/k/v; router, shared gate/up,
 * shared-expert gate) are one launch. The expert form reads its weights through the device table
 * of expert addresses (fm_cuda_expert_mv) and can fuse the SwiGLU either into its input (x =
 * silu(x) * x_up) or into its output (pair: a thread's rows are NR / 2 rows of part 0 and the same
 * rows of part 1, and the output is silu(part 0) * part 1). */
namespace {

struct MvShape {
    long long scale_off, bias_off; /* bytes from w to its scales / biases (quantized) */
    int rows, cols, chunks;        /* chunks: 16-byte chunks of a row */
    int lpr_log2;                  /* log2 of L, the lanes of a row group */
    int gs_log2, scale_kind;       /* quantized: log2 of the group size; 0 BF16, 1 F16, 2 F32 */
};

/* The folded input norm, the residual and the conv of a one-token product (fm_cuda_mv's norm_w,
 * norm_eps, norm_out, residual, conv_*); all NULL: none. */
struct MvFold {
    const float *nw;  /* the input is x / sqrt(mean(x^2) + eps) * nw (the kernel's NORM = true) */
    float *xn;        /* with nw: that input also stored here by the product's first block */
    const float *res; /* out = res + W x */
    const float *conv_w;
    float *conv_state, *conv_out;
    float eps;
    int conv_k;
};

constexpr int MV_CONV_K = 8; /* the longest conv the epilogue takes */

/* Stores output `row` (of `rows`) of a product: v, plus the residual; with a conv, also channel
 * row's causal conv over [its state; v] with the SiLU, and the state advanced: the arithmetic of
 * layers.cu's conv1d_silu_one_kernel, so the same values bit for bit. One thread a row. */
__device__ __forceinline__ void mv_store(const MvFold &f, float *out, int row, int rows, float v) {
    const int K = f.conv_k;
    const long long C = rows;
    float wv[MV_CONV_K], sv[MV_CONV_K];
    if (f.conv_w) { /* loaded before out is stored: nvcc cannot know out does not alias them */
#pragma unroll
        for (int j = 0; j < MV_CONV_K; j++) {
            wv[j] = j < K ? f.conv_w[(long long)row * K + j] : 0.f;
            sv[j] = j < K - 1 ? f.conv_state[(long long)j * C + row] : 0.f;
        }
    }
    out[row] = f.res ? f.res[row] + v : v;
    if (!f.conv_w) return;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < MV_CONV_K; j++)
        if (j < K) acc += wv[j] * (j < K - 1 ? sv[j] : v);
    f.conv_out[row] = acc / (1.0f + expf(-acc));
#pragma unroll
    for (int i = 0; i < MV_CONV_K - 1; i++) /* keep the last K-1 inputs */
        if (i < K - 1) f.conv_state[(long long)i * C + row] = i + 1 < K - 1 ? sv[i + 1] : v;
}

/* Pulls into L1 what mv_store will load for `row` (the residual, the conv's weights and state), so
 * the epilogue does not add a memory round trip after the reduction. Only after the PDL wait (L1 is
 * not coherent with the predecessors' writes before it). */
__device__ __forceinline__ void mv_store_prefetch(const MvFold &f, int row, int rows) {
    if (row < 0 || row >= rows) return;
    if (f.res) asm volatile("prefetch.global.L1 [%0];" ::"l"(f.res + row));
    if (!f.conv_w) return;
    asm volatile("prefetch.global.L1 [%0];" ::"l"(f.conv_w + (long long)row * f.conv_k));
    for (int j = 0; j < f.conv_k - 1; j++)
        asm volatile("prefetch.global.L1 [%0];" ::"l"(f.conv_state + (long long)j * rows + row));
}

/* The raw scale and bias (16 or 32 bits, fm_scale_bits decodes them) of the group of 16-byte chunk
 * c of row `row` of a one-token product's weight w; 0 for the float kinds. */
template <int KIND>
__device__ __forceinline__ void mv_load_scales(const MvShape &s, const unsigned char *w, long long row, int c,
                                               uint32_t &sr, uint32_t &br) {
    using T = KT<KIND>;
    if constexpr (T::Q) {
        constexpr int VPC = 4 * T::VPW;
        const long long gi = row * ((long long)s.cols >> s.gs_log2) + (((long long)c * VPC) >> s.gs_log2);
        if (s.scale_kind == 2) {
            sr = __ldg((const unsigned int *)(w + s.scale_off) + gi);
            br = __ldg((const unsigned int *)(w + s.bias_off) + gi);
        } else {
            sr = __ldg((const unsigned short *)(w + s.scale_off) + gi);
            br = __ldg((const unsigned short *)(w + s.bias_off) + gi);
        }
    } else {
        sr = br = 0;
    }
}

/* Chunk c of row `row` of w: its words and, for the quantized kinds, its group's raw scale and bias. */
template <int KIND>
__device__ __forceinline__ void mv_load_chunk(const MvShape &s, const unsigned char *w, long long row, int c, uint4 &q,
                                              uint32_t &sr, uint32_t &br) {
    q = ld_stream((const uint4 *)w + row * s.chunks + c);
    mv_load_scales<KIND>(s, w, row, c, sr, br);
}

/* A chunk's x (NQ float4, as loaded) made ready for mv_chunk_acc: for the quantized kinds returns
 * sum(x) and scales each element by the 2^-k its unpacked value carries (exponent_shift); else 0,
 * x unchanged. */
template <int KIND, int NQ> __device__ __forceinline__ float mv_x_prep(float4 (&xv)[NQ]) {
    float xsum = 0.f;
    if constexpr (KT<KIND>::Q) {
        constexpr int VPW = KT<KIND>::VPW;
#pragma unroll
        for (int j = 0; j < NQ; j++) xsum += (xv[j].x + xv[j].y) + (xv[j].z + xv[j].w);
        if constexpr (KIND != K_Q8) {
#pragma unroll
            for (int j = 0; j < NQ; j++) { /* x carries 2^-k of its element's unpacked value */
                const int e0 = (4 * j) % VPW;
                xv[j].x *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0)) << 23);
                xv[j].y *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0 + 1)) << 23);
                xv[j].z *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0 + 2)) << 23);
                xv[j].w *= __uint_as_float((uint32_t)(127 - exponent_shift<KIND>(e0 + 3)) << 23);
            }
        }
    }
    return xsum;
}

/* acc plus one chunk's dot product with its x (mv_x_prep'd; xsum its return): the FMA form
 * s * sum(q x) + b * sum(x) for the quantized kinds, the plain sum for the float ones. */
template <int KIND, int NQ>
__device__ __forceinline__ float mv_chunk_acc(float acc, const uint4 &q, const float4 (&xv)[NQ], uint32_t sr,
                                              uint32_t br, int sk, float xsum) {
    constexpr int VPW = KT<KIND>::VPW;
    float part = 0.f;
    static_for<NQ>([&](auto J) {
        constexpr int j = decltype(J)::value;
        static_for<4>([&](auto CC) {
            constexpr int v = 4 * j + decltype(CC)::value, i = v / VPW, e = v % VPW;
            part = fmaf(unpack<KIND, e>(word_of(q, i)), comp_of(xv[j], decltype(CC)::value), part);
        });
    });
    if constexpr (KT<KIND>::Q) return fmaf(fm_scale_bits(sr, sk), part, fmaf(fm_scale_bits(br, sk), xsum, acc));
    else return acc + part;
}

struct MvProd {
    const unsigned char *w, *w_up; /* w_up: pair mode (out = silu(W x) * (W_up x)), else NULL */
    const float *x;
    float *out;
    MvShape s;
    MvFold f;
    int blk0; /* the product's first block in the launch */
};

struct MvParams {
    int n;
    int tk_prod; /* fm_cuda_matvec_topk: the product whose output (logits) the top-k reads, else -1 */
    int tk_E, tk_k, tk_norm;
    int32_t *tk_ids;
    float *tk_w;
    unsigned *tk_count; /* blocks of product tk_prod finished (the last one resets it to 0) */
    MvProd m[FM_CUDA_MV_MAX];
};

struct MvExpParams {
    const unsigned char *const *table;
    const int32_t *ids;
    long long part_off[2];
    const float *x, *x_up;
    long long x_stride, out_stride;
    float *out[2];
    MvShape s;
    int k, n_experts, pair;
};

__device__ __forceinline__ float mv_silu(float x) { return x / (1.0f + expf(-x)); }

/* Row block rblk of one product: rows (rblk * G + group) * RO + r, RO = NR (or NR / 2 with pair,
 * whose rows r >= NR / 2 are the same rows of wb). x: cols floats, 16-byte aligned (xu: silu(x) *
 * xu is the input). f: the folded norm (NORM: f.nw, 16-byte aligned), the residual and the conv
 * (mv_store). Every thread of the block calls it.
 *
 * The norm is linear in the dot products: W (x * nw * g) = g * (W (x * nw)) with g = 1 / sqrt(sum
 * x^2 / cols + eps), so each thread multiplies its chunk of x by nw as it loads it and adds up the
 * squares of x; the lanes of a group cover every chunk of x, so the group's reduction that meets
 * the partial dot products also gives sum x^2, and the outputs are scaled by g before the pair's
 * SwiGLU and the residual. No launch of its own, and no pass over x before the weights stream. */
template <int KIND, int NR, bool NORM = false>
__device__ __forceinline__ void mv_block(const MvShape &s, const unsigned char *wa, const unsigned char *wb,
                                         const float *x, const float *xu, float *out, int rblk, bool pair,
                                         const MvFold &f = MvFold{}) {
    using T = KT<KIND>;
    constexpr int VPW = T::VPW, VPC = 4 * VPW, NQ = VPC / 4, H = NR / 2;
    constexpr int NS = NR + (NORM ? 1 : 0); /* the reduced sums: NR rows and, with NORM, sum x^2 */
    __shared__ float red[WARPS][NS];
    const int lg = s.lpr_log2, L = 1 << lg, G = THREADS >> lg;
    const int grp = (int)threadIdx.x >> lg, lt = (int)threadIdx.x & (L - 1);
    const int RO = pair ? H : NR;
    const int rows = s.rows, C = s.chunks;
    const int row0 = (rblk * G + grp) * RO;
    const int sk = s.scale_kind;
    float acc[NR], ssq = 0.f;
#pragma unroll
    for (int r = 0; r < NR; r++) acc[r] = 0.f;
    /* the first row this thread stores (the two reductions below) */
    const int st_row = L <= 32 ? (lt < RO ? row0 + lt : -1)
                               : ((int)threadIdx.x < G * RO ? (rblk * G + (int)threadIdx.x / RO) * RO + (int)threadIdx.x % RO : -1);
    for (int c = lt; c < C; c += L) {
        uint4 q[NR];
        uint32_t sr[NR], br[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const bool second = pair && r >= H;
            const unsigned char *w = second ? wb : wa;
            const long long row = min(row0 + (second ? r - H : r), rows - 1); /* clamped: read, never stored */
            mv_load_chunk<KIND>(s, w, row, c, q[r], sr[r], br[r]);
        }
        fm_pdl_wait(); /* the weights are constant; x is the predecessor's output */
        if (c == lt && (f.res || f.conv_w)) mv_store_prefetch(f, st_row, rows);
        float4 xv[NQ];
        const float4 *x4 = (const float4 *)x + (long long)c * NQ;
#pragma unroll
        for (int j = 0; j < NQ; j++) xv[j] = __ldg(x4 + j);
        if constexpr (NORM) {
            float4 nv[NQ];
            const float4 *n4 = (const float4 *)f.nw + (long long)c * NQ;
#pragma unroll
            for (int j = 0; j < NQ; j++) nv[j] = __ldg(n4 + j);
#pragma unroll
            for (int j = 0; j < NQ; j++) {
                ssq = fmaf(xv[j].x, xv[j].x, ssq), ssq = fmaf(xv[j].y, xv[j].y, ssq);
                ssq = fmaf(xv[j].z, xv[j].z, ssq), ssq = fmaf(xv[j].w, xv[j].w, ssq);
                xv[j] = make_float4(xv[j].x * nv[j].x, xv[j].y * nv[j].y, xv[j].z * nv[j].z, xv[j].w * nv[j].w);
            }
        }
        if (xu) {
            const float4 *u4 = (const float4 *)xu + (long long)c * NQ;
#pragma unroll
            for (int j = 0; j < NQ; j++) {
                const float4 u = __ldg(u4 + j);
                xv[j] = make_float4(mv_silu(xv[j].x) * u.x, mv_silu(xv[j].y) * u.y, mv_silu(xv[j].z) * u.z,
                                    mv_silu(xv[j].w) * u.w);
            }
        }
        const float xsum = mv_x_prep<KIND>(xv);
#pragma unroll
        for (int r = 0; r < NR; r++) acc[r] = mv_chunk_acc<KIND>(acc[r], q[r], xv, sr[r], br[r], sk, xsum);
    }
    fm_pdl_wait(); /* threads without a chunk: before any store */
    if (lt >= C && (f.res || f.conv_w)) mv_store_prefetch(f, st_row, rows);
    float gain = 1.f; /* NORM: 1 / sqrt(mean(x^2) + eps), the same in every group */
    if (L <= 32) {
#pragma unroll
        for (int r = 0; r < NR; r++)
            for (int o = L >> 1; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
        if constexpr (NORM) {
            for (int o = L >> 1; o > 0; o >>= 1) ssq += __shfl_xor_sync(0xffffffffu, ssq, o);
            gain = 1.0f / sqrtf(ssq / (float)s.cols + f.eps);
#pragma unroll
            for (int r = 0; r < NR; r++) acc[r] *= gain;
        }
        /* every lane holds the sums: lane lt stores rows r = lt (mod L), so the stores (and the
         * residual's and the conv's loads, which may alias out) are not one lane's serial chain */
#pragma unroll
        for (int r = 0; r < NR; r++) {
            if (r >= RO || (r & (L - 1)) != lt || row0 + r >= rows) continue;
            mv_store(f, out, row0 + r, rows, pair ? mv_silu(acc[r]) * acc[(r + H) % NR] : acc[r]);
        }
    } else {
        const int warp = (int)threadIdx.x >> 5;
#pragma unroll
        for (int r = 0; r < NR; r++) acc[r] = warp_sum(acc[r]);
        if constexpr (NORM) ssq = warp_sum(ssq);
        if ((threadIdx.x & 31) == 0) {
#pragma unroll
            for (int r = 0; r < NR; r++) red[warp][r] = acc[r];
            if constexpr (NORM) red[warp][NS - 1] = ssq;
        }
        __syncthreads();
        const int wpg = L >> 5; /* warps of a group */
        if constexpr (NORM) { /* group 0's sum (every group's is the same sum in the same order) */
            float t = 0.f;
            for (int i = 0; i < wpg; i++) t += red[i][NS - 1];
            gain = 1.0f / sqrtf(t / (float)s.cols + f.eps);
        }
        if ((int)threadIdx.x < G * RO) {
            const int g = (int)threadIdx.x / RO, r = (int)threadIdx.x - g * RO, row = (rblk * G + g) * RO + r;
            float v = 0.f, u = 0.f;
            for (int i = 0; i < wpg; i++) {
                v += red[g * wpg + i][r];
                if (pair) u += red[g * wpg + i][r + H];
            }
            if constexpr (NORM) v *= gain, u *= gain;
            if (row < rows) mv_store(f, out, row, rows, pair ? mv_silu(v) * u : v);
        }
    }
    if constexpr (NORM) /* the normalised input for later kernels (the experts), a slice per block */
        if (f.xn) {
            const int nblk = (rows + G * RO - 1) / (G * RO), per = (s.cols + nblk - 1) / nblk;
            const int end = min(s.cols, (rblk + 1) * per);
            for (int i = rblk * per + (int)threadIdx.x; i < end; i += THREADS) f.xn[i] = x[i] * gain * f.nw[i];
        }
}

/* fm_cuda_matvec_topk: every block of product i (the router's logits) counts itself done; the last
 * one resets the count and runs the router top-k with one warp (fm_topk_warp, the code of
 * router_topk_warp_kernel: the same ids and weights). The usual last-block pattern: each thread's
 * stores fenced before the count, the logits read back through L2. */
__device__ __forceinline__ void mv_topk_tail(const MvParams &p, int i) {
    __shared__ unsigned last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int nb = (i + 1 < p.n ? p.m[i + 1].blk0 : (int)gridDim.x) - p.m[i].blk0;
        const unsigned done = atomicAdd(p.tk_count, 1u);
        last = done + 1 == (unsigned)nb;
        if (last) atomicExch(p.tk_count, 0u);
        __threadfence();
    }
    __syncthreads();
    if (!last || threadIdx.x >= 32) return;
    const int E = p.tk_E, lane = (int)threadIdx.x;
    const float *lg = p.m[i].out;
    if (E <= 128) fm_topk_warp<4>(p.tk_ids, p.tk_w, lg, E, p.tk_k, p.tk_norm, lane);
    else if (E <= 256) fm_topk_warp<8>(p.tk_ids, p.tk_w, lg, E, p.tk_k, p.tk_norm, lane);
    else if (E <= 512) fm_topk_warp<16>(p.tk_ids, p.tk_w, lg, E, p.tk_k, p.tk_norm, lane);
    else fm_topk_warp<32>(p.tk_ids, p.tk_w, lg, E, p.tk_k, p.tk_norm, lane);
}

/* NORM: every product of the launch has the folded norm (mv_run launches those apart). */
template <int KIND, int NR, bool TK, bool NORM>
__global__ void __launch_bounds__(THREADS) mv_dense(const __grid_constant__ MvParams p) {
    fm_pdl_trigger();
    int i = 0;
    while (i + 1 < p.n && (int)blockIdx.x >= p.m[i + 1].blk0) i++;
    const MvProd &d = p.m[i];
    mv_block<KIND, NR, NORM>(d.s, d.w, d.w_up, d.x, nullptr, d.out, (int)blockIdx.x - d.blk0, d.w_up != nullptr, d.f);
    if constexpr (TK)
        if (i == p.tk_prod) mv_topk_tail(p, i);
}

/* Row block bx of product y = part * k + slot (pair: slot only) of an expert launch. */
template <int KIND, int NR> __device__ __forceinline__ void mv_expert_body(const MvExpParams &p, int bx, int y) {
    fm_pdl_wait(); /* the ids (and x) come from the predecessors */
    const int slot = y % p.k, part = y / p.k;
    const int e = min(max(p.ids[slot], 0), p.n_experts - 1); /* the router writes valid ids; never read outside */
    const unsigned char *base = p.table[e];
    const float *x = p.x + slot * p.x_stride, *xu = p.x_up ? p.x_up + slot * p.x_stride : nullptr;
    mv_block<KIND, NR>(p.s, base + p.part_off[part], base + p.part_off[1], x, xu, p.out[part] + slot * p.out_stride,
                       bx, p.pair != 0);
}

/* blockIdx.y = part * k + slot (pair: slot only) */
template <int KIND, int NR> __global__ void __launch_bounds__(THREADS) mv_expert(const __grid_constant__ MvExpParams p) {
    fm_pdl_trigger();
    mv_expert_body<KIND, NR>(p, (int)blockIdx.x, (int)blockIdx.y);
}

/* An expert launch plus one dense one-token product of another type (the shared expert's down next
 * to the routed experts' down): blockIdx.y < gridDim.y - 1 as mv_expert (blocks past the experts'
 * bx return), the last row of the grid the dense product's row blocks (its weight loads issued
 * before the PDL wait, as in mv_dense). */
struct MvExpXParams {
    MvExpParams e;
    MvProd d;
    int bx, dbx; /* row blocks of an expert product / of the dense product */
};

template <int KIND, int NR, int KIND2>
__global__ void __launch_bounds__(THREADS) mv_expert_x(const __grid_constant__ MvExpXParams p) {
    fm_pdl_trigger();
    if ((int)blockIdx.y == (int)gridDim.y - 1) {
        if ((int)blockIdx.x < p.dbx) mv_block<KIND2, NR>(p.d.s, p.d.w, nullptr, p.d.x, nullptr, p.d.out, (int)blockIdx.x, false);
        return;
    }
    if ((int)blockIdx.x < p.bx) mv_expert_body<KIND, NR>(p.e, (int)blockIdx.x, (int)blockIdx.y);
}

typedef void (*mv_dense_fn)(const MvParams);
typedef void (*mv_exp_fn)(const MvExpParams);

template <int KIND, bool TK, bool NORM> mv_dense_fn mv_dense_for(int nr) {
    return nr == 8 ? mv_dense<KIND, 8, TK, NORM> : nr == 4 ? mv_dense<KIND, 4, TK, NORM> : mv_dense<KIND, 2, TK, NORM>;
}
template <bool TK, bool NORM> mv_dense_fn mv_dense_tk(int kind, int nr) {
    switch (kind) {
    case K_F32: return mv_dense_for<K_F32, TK, NORM>(nr);
    case K_F16: return mv_dense_for<K_F16, TK, NORM>(nr);
    case K_BF16: return mv_dense_for<K_BF16, TK, NORM>(nr);
    case K_Q8: return mv_dense_for<K_Q8, TK, NORM>(nr);
    default: return mv_dense_for<K_Q4, TK, NORM>(nr);
    }
}
mv_dense_fn mv_dense_kernel(int kind, int nr, bool tk, bool norm) {
    return tk ? (norm ? mv_dense_tk<true, true>(kind, nr) : mv_dense_tk<true, false>(kind, nr))
              : (norm ? mv_dense_tk<false, true>(kind, nr) : mv_dense_tk<false, false>(kind, nr));
}
template <int KIND> mv_exp_fn mv_exp_for(int nr) {
    return nr == 8 ? mv_expert<KIND, 8> : nr == 4 ? mv_expert<KIND, 4> : mv_expert<KIND, 2>;
}
mv_exp_fn mv_exp_kernel(int kind, int nr) {
    switch (kind) {
    case K_F32: return mv_exp_for<K_F32>(nr);
    case K_F16: return mv_exp_for<K_F16>(nr);
    case K_BF16: return mv_exp_for<K_BF16>(nr);
    case K_Q8: return mv_exp_for<K_Q8>(nr);
    default: return mv_exp_for<K_Q4>(nr);
    }
}
typedef void (*mv_expx_fn)(const MvExpXParams);
template <int KIND, int KIND2> mv_expx_fn mv_expx_for(int nr) {
    return nr == 8 ? mv_expert_x<KIND, 8, KIND2> : nr == 4 ? mv_expert_x<KIND, 4, KIND2> : mv_expert_x<KIND, 2, KIND2>;
}
/* The fused kernels that exist: experts Q4 or Q8, the dense product Q8, Q4 or BF16; else NULL. */
mv_expx_fn mv_expx_kernel(int kind, int kind2, int nr) {
    if (kind == K_Q4) return kind2 == K_Q8 ? mv_expx_for<K_Q4, K_Q8>(nr) : kind2 == K_Q4 ? mv_expx_for<K_Q4, K_Q4>(nr)
                             : kind2 == K_BF16 ? mv_expx_for<K_Q4, K_BF16>(nr) : nullptr;
    if (kind == K_Q8) return kind2 == K_Q8 ? mv_expx_for<K_Q8, K_Q8>(nr) : kind2 == K_Q4 ? mv_expx_for<K_Q8, K_Q4>(nr)
                             : kind2 == K_BF16 ? mv_expx_for<K_Q8, K_BF16>(nr) : nullptr;
    return nullptr;
}

/* The shape part of a one-token product; false when the kernel does not take the weight (Q2, a
 * row not whole chunks, sizes past int). w must have passed check_shape. */
bool mv_shape(const fm_weight *w, int kind, MvShape *s) {
    if (kind == K_Q2 || kind == K_NONE) return false;
    const long long vpc = 4 * (32 / bits_of(kind));
    if (w->rows <= 0 || w->cols % vpc || w->rows > (1LL << 30) || w->cols > (1LL << 30)) return false;
    memset(s, 0, sizeof *s);
    s->rows = (int)w->rows;
    s->cols = (int)w->cols;
    s->chunks = (int)(w->cols / vpc);
    int lg = 0;
    while ((1 << lg) < s->chunks && (1 << lg) < THREADS) lg++;
    s->lpr_log2 = lg;
    if (kind >= K_Q8) {
        int64_t so, bo;
        fm_quant_part_offsets(w, &so, &bo);
        s->gs_log2 = w->group_size == 32 ? 5 : w->group_size == 64 ? 6 : 7;
        s->scale_kind = w->scale_dtype == FM_DTYPE_BF16 ? 0 : w->scale_dtype == FM_DTYPE_F16 ? 1 : 2;
        s->scale_off = so;
        s->bias_off = bo;
    }
    return true;
}

/* Row blocks of a product with NR rows a thread (RO output rows: NR, or NR / 2 in pair mode). */
long long mv_blocks(const MvShape &s, int ro) {
    const long long per = (long long)(THREADS >> s.lpr_log2) * ro;
    return (s.rows + per - 1) / per;
}

/* NR for a launch: FLASHMOE_CUDA_MV_RPT (2, 4 or 8) if set, else the one whose grid is nearest (by
 * ratio) to 2 blocks an SM, the larger NR on a tie (blocks_of(nr) gives the launch's blocks). The
 * NR = 8 kernels fit 2 blocks an SM (116-126 registers), so that is one full wave with the most bytes
 * in flight per thread. On the H100: out_proj [2048, 4096] Q8 5.9 us with NR = 8 (256 blocks)
 * against 6.3 us with 4 (512); the experts' down 6.4 us with NR = 4 (256 blocks) against 9.0 us with
 * 2 (512); the router group 4.2 us with NR = 2 (324 blocks) against 5.6 us with 4 (162). */
template <typename F> int mv_pick_nr(const fm_cuda *ctx, F blocks_of) {
    const char *e = getenv("FLASHMOE_CUDA_MV_RPT"); /* read per launch (tests switch it) */
    const int forced = e ? atoi(e) : 0;
    if (forced == 2 || forced == 4 || forced == 8) return forced;
    const double want = 2.0 * ctx->sm_count;
    int best = 8;
    double best_d = 1e300;
    for (int nr = 8; nr >= 2; nr >>= 1) {
        const double b = (double)blocks_of(nr), d = b > want ? b / want : want / (b > 0 ? b : 1);
        if (d < best_d) best_d = d, best = nr;
    }
    return best;
}

/* Launches P's products (all of one kind; with norm, all with the folded norm) and empties P. */
fm_status mv_launch(fm_cuda *ctx, int kind, bool norm, MvParams &P) {
    if (P.n == 0) return FM_OK;
    const int nr = mv_pick_nr(ctx, [&](int r) {
        long long b = 0;
        for (int i = 0; i < P.n; i++) b += mv_blocks(P.m[i].s, P.m[i].w_up ? r / 2 : r);
        return b;
    });
    long long b = 0;
    for (int i = 0; i < P.n; i++) {
        P.m[i].blk0 = (int)b;
        b += mv_blocks(P.m[i].s, P.m[i].w_up ? nr / 2 : nr);
    }
    if (b > 0x7fffffffLL) return fm_error_set(FM_ERR_ARG, "CUDA matvec: too many rows in one launch");
    FM_CUDA_CHECK(
        fm_launch_pdl(ctx, mv_dense_kernel(kind, nr, P.tk_prod >= 0, norm), dim3((unsigned)b), dim3(THREADS), 0, P));
    FM_CUDA_CHECK_LAUNCH("the CUDA one-token matvec kernel");
    P.n = 0;
    P.tk_prod = -1;
    return FM_OK;
}

} // namespace

extern "C" bool fm_cuda_matvec_takes(const fm_weight *w, const float *x) {
    Params p;
    int kind = K_NONE;
    MvShape s;
    if (!w || !w->data || check_shape(w, &p, &kind) != FM_OK) return false;
    return (uintptr_t)w->data % 16 == 0 && (uintptr_t)x % 16 == 0 && mv_shape(w, kind, &s);
}

/* The folded norm's, the residual's and the conv's checks of product i (fm_cuda_mv's contract). */
static fm_status mv_check_fold(const fm_cuda_mv *m, int i) {
    const bool conv = m->conv_w || m->conv_state || m->conv_out || m->conv_k;
    if (!m->norm_w && !m->norm_out && !m->residual && !conv) return FM_OK;
    if (conv && (!m->conv_w || !m->conv_state || !m->conv_out || m->conv_k < 2 || m->conv_k > MV_CONV_K || m->w_up))
        return fm_error_set(FM_ERR_ARG,
                            "CUDA matvec: product %d: a conv needs conv_w, conv_state, conv_out, 2 <= conv_k <= %d "
                            "(got %d) and no SwiGLU pair",
                            i, MV_CONV_K, m->conv_k);
    if (m->norm_out && !m->norm_w)
        return fm_error_set(FM_ERR_ARG, "CUDA matvec: product %d: norm_out without norm_w", i);
    if (m->norm_w && !(m->norm_eps >= 0.f && m->norm_eps < INFINITY))
        return fm_error_set(FM_ERR_ARG, "CUDA matvec: product %d: bad norm epsilon %g", i, (double)m->norm_eps);
    if (m->residual && m->w_up)
        return fm_error_set(FM_ERR_ARG, "CUDA matvec: product %d: a residual with a SwiGLU pair", i);
    const uintptr_t x0 = (uintptr_t)m->x, x1 = x0 + sizeof(float) * (size_t)m->w->cols, n0 = (uintptr_t)m->norm_out;
    if (m->norm_out && n0 < x1 && x0 < n0 + sizeof(float) * (size_t)m->w->cols)
        return fm_error_set(FM_ERR_ARG, "CUDA matvec: product %d: norm_out overlaps x", i);
    if (!fm_cuda_matvec_takes(m->w, m->x) || (uintptr_t)m->norm_w % 16)
        return fm_error_set(FM_ERR_UNSUPPORTED,
                            "CUDA matvec: product %d: a folded norm, residual or conv needs the one-token kernel (16-byte "
                            "aligned weights, x and norm weights, rows of whole 16-byte chunks, not Q2)",
                            i);
    return FM_OK;
}

/* fm_cuda_matvec's argument checks (nothing is enqueued). */
static fm_status mv_check(const fm_cuda_mv *mv, int n) {
    if (n < 0 || (n > 0 && !mv)) return fm_error_set(FM_ERR_ARG, "CUDA matvec: bad batch (%d products)", n);
    for (int i = 0; i < n; i++) {
        Params p;
        int kind = K_NONE;
        fm_status st = check_shape(mv[i].w, &p, &kind);
        if (st != FM_OK) return st;
        const fm_cuda_mat m = {mv[i].w->data, mv[i].x, mv[i].out, 1};
        bool fast = true;
        if ((st = check_mat(&m, i, kind, p.cols, &fast)) != FM_OK) return st;
        if (mv[i].w_up) {
            const fm_weight *a = mv[i].w, *u = mv[i].w_up;
            if (u->dtype != a->dtype || u->rows != a->rows || u->cols != a->cols ||
                (fm_dtype_is_quant(a->dtype) && (u->group_size != a->group_size || u->scale_dtype != a->scale_dtype)))
                return fm_error_set(FM_ERR_ARG, "CUDA matvec: product %d: w_up has another shape than w", i);
            if (!u->data) return fm_error_set(FM_ERR_ARG, "CUDA matvec: product %d: NULL pointer", i);
            if (!fm_cuda_matvec_takes(a, mv[i].x) || (uintptr_t)u->data % 16)
                return fm_error_set(FM_ERR_UNSUPPORTED,
                                    "CUDA matvec: product %d: w_up (SwiGLU pair) needs the one-token kernel (16-byte "
                                    "aligned weights and x, rows of whole 16-byte chunks, not Q2)", i);
        }
        if ((st = mv_check_fold(&mv[i], i)) != FM_OK) return st;
    }
    return FM_OK;
}

/* The router top-k fused into fm_cuda_matvec_topk's launch (NULL: none). */
struct MvTopk {
    int32_t *ids;
    float *w;
    int k, norm;
};

/* fm_cuda_matvec_topk in one launch unless FLASHMOE_CUDA_TOPK_FUSE=0 (two launches; on the H100,
 * 40-layer 35B decode 303.1 -> 306.9 tok/s fused, medians of 3, docs/SPEED.md); read per call (the
 * tests switch it; graph replays keep what their capture saw). */
static bool mv_topk_fuse_on() {
    const char *e = getenv("FLASHMOE_CUDA_TOPK_FUSE");
    return !e || !e[0] || strcmp(e, "0") != 0;
}

/* fm_cuda_matvec's launches (arguments checked); with tk, the top-k of product 0's output in the
 * launch that carries product 0 when it can (*fused), else the caller launches it. */
static fm_status mv_run(fm_cuda *ctx, const fm_cuda_mv *mv, int n, const MvTopk *tk, bool *fused) {
    if (fused) *fused = false;
    for (int kn = 0; kn < 2 * K_NONE; kn++) { /* a launch per weight type, with and without the norm */
        const int kind = kn >> 1;
        const bool norm = kn & 1;
        MvParams P;
        P.n = 0;
        P.tk_prod = -1;
        for (int i = 0; i < n; i++) {
            const fm_weight *w = mv[i].w;
            if (kind_of(w->dtype) != kind || (mv[i].norm_w != nullptr) != norm || w->rows == 0) continue;
            MvShape s;
            const bool ok = (uintptr_t)w->data % 16 == 0 && (uintptr_t)mv[i].x % 16 == 0 && mv_shape(w, kind, &s);
            if (!ok) { /* the general path */
                fm_status st = fm_cuda_matmul(ctx, mv[i].out, mv[i].x, 1, w);
                if (st != FM_OK) return st;
                continue;
            }
            if (i == 0 && tk && !mv[0].w_up && w->rows <= 1024 && tk->k <= 32 && mv_topk_fuse_on()) {
                P.tk_prod = P.n;
                P.tk_E = (int)w->rows;
                P.tk_k = tk->k;
                P.tk_norm = tk->norm;
                P.tk_ids = tk->ids;
                P.tk_w = tk->w;
                P.tk_count = ctx->tk_count;
                *fused = true;
            }
            const MvFold f = {mv[i].norm_w,    mv[i].norm_out, mv[i].residual, mv[i].conv_w,
                              mv[i].conv_state, mv[i].conv_out, mv[i].norm_eps, mv[i].conv_k};
            const unsigned char *wu = (const unsigned char *)(mv[i].w_up ? mv[i].w_up->data : nullptr);
            P.m[P.n++] = MvProd{(const unsigned char *)w->data, wu, mv[i].x, mv[i].out, s, f, 0};
            if (P.n == FM_CUDA_MV_MAX) {
                fm_status st = mv_launch(ctx, kind, norm, P);
                if (st != FM_OK) return st;
            }
        }
        fm_status st = mv_launch(ctx, kind, norm, P);
        if (st != FM_OK) return st;
    }
    return FM_OK;
}

extern "C" fm_status fm_cuda_matvec(fm_cuda *ctx, const fm_cuda_mv *mv, int n) {
    FM_CUDA_CTX(ctx);
    fm_status cst = mv_check(mv, n); /* everything validated before anything is enqueued */
    if (cst != FM_OK) return cst;
    return mv_run(ctx, mv, n, nullptr, nullptr);
}

extern "C" fm_status fm_cuda_matvec_topk(fm_cuda *ctx, const fm_cuda_mv *mv, int n, int32_t *ids, float *weights, int k,
                                         bool norm) {
    FM_CUDA_CTX(ctx);
    if (n < 1 || !mv) return fm_error_set(FM_ERR_ARG, "CUDA matvec_topk: needs the router's product first (%d products)", n);
    fm_status cst = mv_check(mv, n);
    if (cst != FM_OK) return cst;
    const int64_t E = mv[0].w->rows;
    if (E <= 0 || E > 4096 || k <= 0 || k > E || mv[0].w_up)
        return fm_error_set(FM_ERR_ARG, "CUDA matvec_topk: bad router (%lld experts, top-%d%s)", (long long)E, k,
                            mv[0].w_up ? ", a SwiGLU pair" : "");
    if (!ids || !weights) return fm_error_set(FM_ERR_ARG, "CUDA matvec_topk: NULL pointer");
    const MvTopk tk = {ids, weights, k, norm ? 1 : 0};
    bool fused = false;
    fm_status st = mv_run(ctx, mv, n, &tk, &fused);
    if (st != FM_OK || fused) return st;
    return fm_cuda_router_topk(ctx, ids, weights, mv[0].out, 1, (int)E, k, norm);
}

/* The kernel parameters of an expert launch on the one-token kernel; false when it does not take
 * the shape or the alignment of x (mv already checked by fm_cuda_expert_matvec's rules). */
static bool mv_exp_params(const fm_weight *shape, const fm_cuda_expert_mv *mv, MvExpParams &P, int *kind_out) {
    Params p;
    int kind = K_NONE;
    MvShape s;
    if (check_shape(shape, &p, &kind) != FM_OK || !mv_shape(shape, kind, &s)) return false;
    if ((uintptr_t)mv->x % 16 || mv->x_stride % 4 || (mv->x_up && (uintptr_t)mv->x_up % 16)) return false;
    const bool pair = mv->swiglu_out != 0;
    memset(&P, 0, sizeof P);
    P.table = (const unsigned char *const *)mv->table;
    P.ids = mv->ids;
    P.part_off[0] = mv->part_off[0];
    P.part_off[1] = mv->n_parts > 1 ? mv->part_off[1] : mv->part_off[0];
    P.x = mv->x;
    P.x_up = mv->x_up;
    P.x_stride = mv->x_stride;
    P.out_stride = mv->out_stride;
    P.out[0] = mv->out[0];
    P.out[1] = mv->n_parts > 1 && mv->out[1] ? mv->out[1] : mv->out[0];
    P.s = s;
    P.k = mv->k;
    P.n_experts = mv->n_experts;
    P.pair = pair;
    *kind_out = kind;
    return true;
}

fm_status fm_cuda_mv_experts(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv, bool *done) {
    *done = false;
    MvExpParams P;
    int kind = K_NONE;
    if (!mv_exp_params(shape, mv, P, &kind)) return FM_OK;
    const MvShape &s = P.s;
    const bool pair = P.pair != 0;
    const int ny = pair ? mv->k : mv->k * mv->n_parts;
    const int nr = mv_pick_nr(ctx, [&](int r) { return mv_blocks(s, pair ? r / 2 : r) * ny; });
    const long long bx = mv_blocks(s, pair ? nr / 2 : nr);
    FM_CUDA_CHECK(fm_launch_pdl(ctx, mv_exp_kernel(kind, nr), dim3((unsigned)bx, (unsigned)ny), dim3(THREADS), 0, P));
    FM_CUDA_CHECK_LAUNCH("the CUDA one-token expert matvec kernel");
    *done = true;
    return FM_OK;
}

/* The fused launch of fm_cuda_expert_matvec_with when everything qualifies; *done false otherwise
 * (nothing enqueued). */
static fm_status mv_experts_with(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv,
                                 const fm_cuda_mv *extra, bool *done) {
    *done = false;
    const char *f = getenv("FLASHMOE_CUDA_MV_FUSE");
    if ((f && !strcmp(f, "0")) || getenv("FLASHMOE_CUDA_EMV_OLD")) return FM_OK;
    /* fm_cuda_expert_matvec's rules for mv (the fallback reports what is wrong) */
    if (!mv || !mv->table || !mv->ids || !mv->x || !mv->out[0] || (mv->n_parts == 2 && !mv->out[1])) return FM_OK;
    if (mv->k < 1 || mv->n_parts < 1 || mv->n_parts > 2 || mv->k * mv->n_parts > 65534 || mv->n_experts < 1 ||
        mv->x_stride < 0 || mv->out_stride < 0 || (mv->swiglu_out && mv->n_parts != 2))
        return FM_OK;
    for (int i = 0; i < mv->n_parts; i++)
        if (mv->part_off[i] < 0 || mv->part_off[i] % 16) return FM_OK;
    if (!fm_cuda_expert_matvec_supported(shape)) return FM_OK;
    MvExpXParams X;
    memset(&X, 0, sizeof X);
    int kind = K_NONE, kind2 = K_NONE;
    if (!mv_exp_params(shape, mv, X.e, &kind)) return FM_OK;
    /* the dense product: fm_cuda_matvec's one-token kernel must take it */
    Params p2;
    if (!extra->w || !extra->w->data || !extra->x || !extra->out || extra->w_up || extra->norm_w || extra->norm_out ||
        extra->residual || extra->conv_w || check_shape(extra->w, &p2, &kind2) != FM_OK || !fm_cuda_matvec_takes(extra->w, extra->x))
        return FM_OK;
    const int ny = X.e.pair ? mv->k : mv->k * mv->n_parts;
    const MvShape &s = X.e.s;
    MvShape ds;
    if (!mv_shape(extra->w, kind2, &ds) || !mv_expx_kernel(kind, kind2, 2)) return FM_OK;
    const bool pair = X.e.pair != 0;
    const int nr = mv_pick_nr(ctx, [&](int r) { return mv_blocks(s, pair ? r / 2 : r) * ny + mv_blocks(ds, r); });
    X.bx = (int)mv_blocks(s, pair ? nr / 2 : nr);
    X.dbx = (int)mv_blocks(ds, nr);
    X.d = MvProd{(const unsigned char *)extra->w->data, nullptr, extra->x, extra->out, ds, MvFold{}, 0};
    const unsigned gx = (unsigned)(X.bx > X.dbx ? X.bx : X.dbx);
    FM_CUDA_CHECK(fm_launch_pdl(ctx, mv_expx_kernel(kind, kind2, nr), dim3(gx, (unsigned)ny + 1), dim3(THREADS), 0, X));
    FM_CUDA_CHECK_LAUNCH("the CUDA one-token expert matvec kernel (with a dense product)");
    *done = true;
    return FM_OK;
}

extern "C" fm_status fm_cuda_expert_matvec_with(fm_cuda *ctx, const fm_weight *shape, const fm_cuda_expert_mv *mv,
                                                const fm_cuda_mv *extra) {
    FM_CUDA_CTX(ctx);
    if (!extra) return fm_cuda_expert_matvec(ctx, shape, mv);
    bool done = false;
    fm_status st = mv_experts_with(ctx, shape, mv, extra, &done);
    if (st != FM_OK || done) return st;
    /* two launches; the dense product's checks first, so that nothing is enqueued on an argument error */
    if ((st = mv_check(extra, 1)) != FM_OK || (st = fm_cuda_expert_matvec(ctx, shape, mv)) != FM_OK) return st;
    return fm_cuda_matvec(ctx, extra, 1);
}

namespace {

/* ---- The routed experts' whole SwiGLU FFN in one launch of thread-block clusters (sm_90) ----
 *
 * fm_cuda_expert_ffn. Gate+up, then down as two launches leave the GPU idle between them: down's
 * weight addresses depend on the router's ids and its input on every gate+up block, so its loads
 * start only after the first launch has drained. Here a cluster of CS blocks (one block of 512
 * threads an SM) owns one expert slot, or one of its `parts` (1/parts of the intermediate rows
 * with the matching columns of down, whose partial sums the combine adds): as soon as the ids are
 * known, every block issues the loads of its gate/up rows (phase A) and of its down rows (phase B)
 * together (phase A's into registers, phase B's into shared memory by cp.async, so that no
 * registers are held for them), so the whole FFN's weights are in flight in one memory round trip.
 * With combine_x the MoE combine follows in the same launch (the last block of each slice of
 * rows adds it). Off unless FLASHMOE_CUDA_FFN asks for it (docs/CUDA.md). A block's SwiGLU
 * outputs go into every peer's shared memory (distributed shared memory) and one hardware cluster
 * barrier separates the phases: no global-memory counters, no polling. The dense product (the
 * shared expert's down) rides along, its rows split over all blocks and its loads issued before
 * the PDL wait, its arithmetic done while the cluster barrier settles. Q4 experts only (the
 * shapes fm_cuda_expert_ffn_parts accepts). */
constexpr int FFN_THREADS = 512, FFN_WARPS = FFN_THREADS / 32;
constexpr int FFN_A_IT = 2; /* phase A: chunks of a gate/up row a lane (a row is <= 64 chunks) */
constexpr int FFN_B_NR = 4; /* phase B: down rows a row group */
constexpr int FFN_D_IT = 2; /* the dense product: chunks of its row a lane */
constexpr int FFN_H_MAX = 512; /* the intermediate values a cluster exchanges (I / parts) */
constexpr int FFN_K_MAX = 16;  /* top-k with the combine in the launch */
constexpr int FFN_SLICE = 64;  /* rows of a slice of the combine */
constexpr int FFN_P_MAX = 8;   /* parts of an expert */
constexpr int FFN_CTR = FM_CUDA_FFN_COUNTERS; /* the context's counters (fm_cuda::ffn_ctr): ranks x slices */

struct FfnParams {
    const unsigned char *const *table;
    const int32_t *ids;
    long long gate_off, up_off, down_off;
    MvShape sa, sb;         /* gate / up [I, H]; down [H, I] */
    const float *x;         /* [H] */
    float *out;             /* [k * parts][H] */
    long long out_stride;
    int n_experts, parts;
    int ia;                 /* intermediate values a block computes in phase A (<= 2 a warp) */
    int rb, lb_log2;        /* down rows a block; log2 of the lanes of a down row */
    const unsigned char *dw; /* the dense product, or NULL */
    MvShape sd;
    const float *dx;
    float *dout;
    int rd, ld_log2;        /* its rows a block; log2 of the lanes of one of its rows */
    /* the MoE combine (cx NULL: none): by the last block of each rank, over the rank's rows */
    float *cx;
    const float *sl, *cw;   /* the shared expert's gate logit (with dw); the routing weights [k] */
    unsigned *ctr;          /* [CS x slices] blocks done with each slice (the last one resets it to 0) */
    int k;
};

/* NR rows' chunks c0 + it * step (it < IT, those below cend) in registers, the rows' weights at
 * w[r] with shape s; chunk c's scales are those of absolute chunk cbase + c. */
template <int KIND, int NR, int IT> struct FfnRows {
    uint4 q[IT][NR];
    uint32_t sr[IT][NR], br[IT][NR];

    __device__ __forceinline__ void load(const unsigned char *const (&w)[NR], const MvShape &s, const int (&row)[NR],
                                         int cbase, int c0, int step, int cend) {
#pragma unroll
        for (int it = 0; it < IT; it++) {
            const int c = c0 + it * step;
#pragma unroll
            for (int r = 0; r < NR; r++) {
                if (c < cend) mv_load_chunk<KIND>(s, w[r], row[r], cbase + c, q[it][r], sr[it][r], br[it][r]);
                else q[it][r] = make_uint4(0, 0, 0, 0), sr[it][r] = br[it][r] = 0;
            }
        }
    }

    /* acc[r] += the rows' dot products with x (x + c * VPC is chunk c's input; GLOBAL: read
     * through the non-coherent path, else shared memory) over this lane's chunks */
    template <bool GLOBAL>
    __device__ __forceinline__ void accumulate(float (&acc)[NR], const float *x, int sk, int c0, int step, int cend) const {
        constexpr int NQ = KT<KIND>::VPW; /* float4s of x a chunk: 4 * VPW values */
#pragma unroll
        for (int it = 0; it < IT; it++) {
            const int c = c0 + it * step;
            if (c >= cend) break;
            float4 xv[NQ];
            const float4 *x4 = (const float4 *)x + (long long)c * NQ;
#pragma unroll
            for (int j = 0; j < NQ; j++) xv[j] = GLOBAL ? __ldg(x4 + j) : x4[j];
            const float xsum = mv_x_prep<KIND>(xv);
#pragma unroll
            for (int r = 0; r < NR; r++) acc[r] = mv_chunk_acc<KIND>(acc[r], q[it][r], xv, sr[it][r], br[it][r], sk, xsum);
        }
    }
};

/* One chunk (c, below cend) of NR rows whose words land in shared memory by cp.async, so that no
 * registers are held while they travel (phase B's loads are issued with phase A's and used after
 * the cluster barrier); the scales in registers. slot: this thread's first slot, NR slots
 * FFN_THREADS apart (consecutive lanes read consecutive 16 bytes). */
template <int KIND, int NR> struct FfnRowsAsync {
    uint32_t sr[NR], br[NR];

    __device__ __forceinline__ void load(uint4 *slot, const unsigned char *w, const MvShape &s, const int (&row)[NR],
                                         int cbase, int c, int cend) {
#pragma unroll
        for (int r = 0; r < NR; r++) {
            sr[r] = br[r] = 0;
            if (c >= cend) continue;
            const uint32_t dst = (uint32_t)__cvta_generic_to_shared(slot + r * FFN_THREADS);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst),
                         "l"((const uint4 *)w + (long long)row[r] * s.chunks + cbase + c)
                         : "memory");
            mv_load_scales<KIND>(s, w, row[r], cbase + c, sr[r], br[r]);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    }

    /* acc[r] += row r's chunk c times x + c * VPC (shared memory), after this thread's copies land */
    __device__ __forceinline__ void accumulate(float (&acc)[NR], const uint4 *slot, const float *x, int sk, int c,
                                               int cend) const {
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        if (c >= cend) return;
        constexpr int NQ = KT<KIND>::VPW;
        float4 xv[NQ];
        const float4 *x4 = (const float4 *)x + (long long)c * NQ;
#pragma unroll
        for (int j = 0; j < NQ; j++) xv[j] = x4[j];
        const float xsum = mv_x_prep<KIND>(xv);
#pragma unroll
        for (int r = 0; r < NR; r++) acc[r] = mv_chunk_acc<KIND>(acc[r], slot[r * FFN_THREADS], xv, sr[r], br[r], sk, xsum);
    }
};

/* v summed over the L = 2^lg lanes of each aligned group of a warp (every lane gets its group's sum) */
__device__ __forceinline__ float ffn_group_sum(float v, int lg) {
    for (int o = (1 << lg) >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ void cluster_arrive_relaxed() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive_release() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait_acquire() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
/* *(p in the shared memory of the cluster's block `rank`) = v */
__device__ __forceinline__ void cluster_store(float *p, int rank, float v) {
#if __CUDA_ARCH__ >= 900
    uint32_t local = (uint32_t)__cvta_generic_to_shared(p), remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
#endif
}

/* blockIdx.x = unit * CS + rank, unit = slot * parts + part; KD: the dense product's kind (K_NONE:
 * none). Launched with cluster dimensions (CS, 1, 1), only on sm_90 and later. */
template <int KD, int CS>
__global__ void __launch_bounds__(FFN_THREADS, 1) mv_expert_ffn(const __grid_constant__ FfnParams p) {
#if __CUDA_ARCH__ >= 900
    constexpr int VPC = 4 * KT<K_Q4>::VPW; /* 32 */
    __shared__ float4 hs4[FFN_H_MAX / 4];  /* this unit's SwiGLU outputs, written by every block of the cluster */
    float *hs = (float *)hs4;
    fm_pdl_trigger();
    cluster_arrive_relaxed(); /* (waited for before the first remote store: every block has started) */
    const int rank = (int)(blockIdx.x % CS), unit = (int)(blockIdx.x / CS);
    const int slot = unit / p.parts, part = unit - slot * p.parts;
    const int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;

    /* the dense product's row for this lane's group: its weights are constant, loaded before the PDL
     * wait. With the combine, a rank's blocks take the rows of that rank's down rows (the last of them
     * adds them up), else the launch's blocks take consecutive slices. */
    constexpr int KDL = KD == K_NONE ? K_Q8 : KD; /* (a kind to instantiate with when there is none) */
    FfnRows<KDL, 1, FFN_D_IT> dr;
    const int spwd = 32 >> p.ld_log2, gd = lane >> p.ld_log2, ltd = lane & ((1 << p.ld_log2) - 1);
    const int dloc = warp * spwd + gd;
    const int drow = p.cx ? rank * p.rb + unit * p.rd + dloc : (int)blockIdx.x * p.rd + dloc;
    const bool dvalid = KD != K_NONE && p.dw && dloc < p.rd && drow < p.sd.rows &&
                        (!p.cx || unit * p.rd + dloc < p.rb);
    if constexpr (KD != K_NONE) {
        const unsigned char *const dws[1] = {p.dw};
        const int drows[1] = {dvalid ? drow : 0};
        dr.load(dws, p.sd, drows, 0, ltd, 1 << p.ld_log2, dvalid ? p.sd.chunks : 0);
    }

    fm_pdl_wait(); /* the ids, x and the dense product's input come from the predecessors */
    const int e = min(max(p.ids[slot], 0), p.n_experts - 1);
    const unsigned char *base = p.table[e];
    const int ipart = p.sa.rows / p.parts; /* intermediate values of a part */

    /* phase A's loads: intermediates i0, i0 + 1 of this warp (gate and up rows) */
    const int il = rank * p.ia + 2 * warp, i0 = part * ipart + il;
    const bool a_any = 2 * warp < p.ia, a_two = 2 * warp + 1 < p.ia;
    FfnRows<K_Q4, 4, FFN_A_IT> ar;
    {
        const unsigned char *g = base + p.gate_off, *u = base + p.up_off;
        const unsigned char *const ws[4] = {g, g, u, u};
        const int r1 = a_two ? i0 + 1 : i0;
        const int rows[4] = {i0, r1, i0, r1};
        ar.load(ws, p.sa, rows, 0, lane, 32, a_any ? p.sa.chunks : 0);
    }
    /* phase B's loads: FFN_B_NR down rows a row group, the part's columns */
    const int lb = 1 << p.lb_log2, spwb = 32 >> p.lb_log2, gb = lane >> p.lb_log2, ltb = lane & (lb - 1);
    const int cb = ipart / VPC; /* chunks of the part in a down row */
    const int bloc = (warp * spwb + gb) * FFN_B_NR, brow0 = rank * p.rb + bloc;
    __shared__ uint4 bslots[FFN_B_NR * FFN_THREADS]; /* phase B's weight chunks (FfnRowsAsync) */
    FfnRowsAsync<K_Q4, FFN_B_NR> br;
    {
        int rows[FFN_B_NR];
#pragma unroll
        for (int r = 0; r < FFN_B_NR; r++) rows[r] = bloc + r < p.rb ? brow0 + r : brow0; /* clamped: read, not stored */
        br.load(bslots + threadIdx.x, base + p.down_off, p.sb, rows, part * cb, ltb, bloc < p.rb ? cb : 0);
    }

    /* phase A: gate and up of two intermediate values, their SwiGLU into every block of the cluster */
    float a[4] = {0.f, 0.f, 0.f, 0.f};
    ar.accumulate<true>(a, p.x, p.sa.scale_kind, lane, 32, a_any ? p.sa.chunks : 0);
#pragma unroll
    for (int r = 0; r < 4; r++) a[r] = ffn_group_sum(a[r], 5);
    const float h0 = mv_silu(a[0]) * a[2], h1 = mv_silu(a[1]) * a[3];
    cluster_wait_acquire(); /* every block of the cluster runs: its shared memory may be written */
    {
        const int peer = lane & 15, which = lane >> 4;
        if (peer < CS && (which ? a_two : a_any)) cluster_store(hs + il + which, peer, which ? h1 : h0);
    }
    cluster_arrive_release();

    /* the dense product while the barrier settles */
    if constexpr (KD != K_NONE) {
        float d[1] = {0.f};
        dr.template accumulate<true>(d, p.dx, p.sd.scale_kind, ltd, 1 << p.ld_log2, dvalid ? p.sd.chunks : 0);
        d[0] = ffn_group_sum(d[0], p.ld_log2);
        if (dvalid && ltd == 0) p.dout[drow] = d[0];
    }

    cluster_wait_acquire(); /* every block's SwiGLU outputs are in hs */
    /* phase B: the part's share of down for this block's rows */
    float b[FFN_B_NR] = {};
    br.accumulate(b, bslots + threadIdx.x, hs, p.sb.scale_kind, ltb, bloc < p.rb ? cb : 0);
#pragma unroll
    for (int r = 0; r < FFN_B_NR; r++) {
        b[r] = ffn_group_sum(b[r], p.lb_log2);
        if ((r & (lb - 1)) == ltb && bloc + r < p.rb) p.out[(long long)unit * p.out_stride + brow0 + r] = b[r];
    }
    if (!p.cx) return;

    /* the combine: a rank's rows are cut into slices of FFN_SLICE; each slice is combined by the last
     * of the k * parts blocks that wrote it (the usual last-block pattern: stores fenced before the
     * count, the outputs read back through L2), so the work spreads over several blocks. The
     * arithmetic of moe_combine_regs_kernel: x is the same bit for bit. */
    __shared__ unsigned last; /* bit s: this block is the last for slice s of its rank */
    const int nsl = (p.rb + FFN_SLICE - 1) / FFN_SLICE;
    if (threadIdx.x == 0) last = 0;
    __threadfence();
    __syncthreads();
    if ((int)threadIdx.x < nsl) {
        unsigned *c = p.ctr + rank * nsl + (int)threadIdx.x;
        if (atomicAdd(c, 1u) + 1 == gridDim.x / CS) {
            atomicExch(c, 0u);
            atomicOr(&last, 1u << threadIdx.x);
        }
        __threadfence();
    }
    __syncthreads();
    const unsigned mine = last;
    if (!mine) return;
    int rk[FFN_K_MAX];
    float wv[FFN_K_MAX], yv[FFN_K_MAX];
    fm_combine_ranks<FFN_K_MAX>(p.ids, p.cw, p.k, rk, wv);
    const float sg = p.dw ? fm_sigmoid(*p.sl) : 0.f;
    for (int t = (int)threadIdx.x; t < p.rb; t += FFN_THREADS) { /* every thread, over the slices it won */
        if (!(mine >> (t / FFN_SLICE) & 1u)) continue;
        const int i = rank * p.rb + t;
#pragma unroll
        for (int j = 0; j < FFN_K_MAX; j++) yv[j] = j < p.k ? __ldcg(p.out + (long long)j * p.parts * p.out_stride + i) : 0.f;
#pragma unroll
        for (int q = 1; q < FFN_P_MAX; q++) /* (unrolled: the loads of every part in flight together) */
            if (q < p.parts)
#pragma unroll
                for (int j = 0; j < FFN_K_MAX; j++)
                    if (j < p.k) yv[j] += __ldcg(p.out + ((long long)j * p.parts + q) * p.out_stride + i);
        const float acc = p.dw ? sg * __ldcg(p.dout + i) : 0.f;
        p.cx[i] = p.cx[i] + fm_combine_experts<FFN_K_MAX>(acc, yv, rk, wv, p.k);
    }
#endif
}

typedef void (*ffn_fn)(const FfnParams);
template <int CS> ffn_fn ffn_kernel_cs(int kd) {
    return kd == K_Q8 ? mv_expert_ffn<K_Q8, CS> : kd == K_Q4 ? mv_expert_ffn<K_Q4, CS>
         : kd == K_BF16 ? mv_expert_ffn<K_BF16, CS> : kd == K_NONE ? mv_expert_ffn<K_NONE, CS> : nullptr;
}
ffn_fn ffn_kernel(int kd, int cs) {
    return cs == 16 ? ffn_kernel_cs<16>(kd) : cs == 8 ? ffn_kernel_cs<8>(kd) : cs == 4 ? ffn_kernel_cs<4>(kd)
         : cs == 2 ? ffn_kernel_cs<2>(kd) : nullptr;
}

/* The fused FFN's launch shape for these weights on this device; false when it does not take them. */
struct FfnPlan {
    int cs, parts, kd;
    FfnParams p; /* the shape fields (sa, sb, sd, parts, ia, rb, lb_log2, rd, ld_log2) */
};

int ffn_log2_ceil(long long n) {
    int l = 0;
    while ((1LL << l) < n) l++;
    return l;
}

/* The most clusters of cs blocks of `kernel` resident at once (cached per context and cluster size). */
int ffn_max_clusters(fm_cuda *ctx, ffn_fn kernel, int cs) {
    int &cached = ctx->ffn_clusters[cs == 16 ? 3 : cs == 8 ? 2 : cs == 4 ? 1 : 0];
    if (cached >= 0) return cached;
    cached = 0;
    if (cs > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)cs);
    cfg.blockDim = dim3(FFN_THREADS);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = (unsigned)cs, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        n = 0;
    }
    return cached = n;
}

bool ffn_plan(fm_cuda *ctx, const fm_weight *gu, const fm_weight *dn, int k, const fm_cuda_mv *extra, bool combine,
              FfnPlan &P) {
    /* opt-in (docs/CUDA.md: slower than the two launches where measured): unset or 0 off, 1 on, 2, 4,
     * 8 or 16 on with that cluster size only */
    const char *env = getenv("FLASHMOE_CUDA_FFN");
    const int forced = env ? atoi(env) : 0;
    if (forced <= 0 || ctx->cc_major < 9 || k < 1 || !gu || !dn) return false;
    Params pp;
    int ka = K_NONE, kb = K_NONE;
    memset(&P, 0, sizeof P);
    FfnParams &p = P.p;
    if (check_shape(gu, &pp, &ka) != FM_OK || check_shape(dn, &pp, &kb) != FM_OK) return false;
    if (ka != K_Q4 || kb != K_Q4 || !mv_shape(gu, ka, &p.sa) || !mv_shape(dn, kb, &p.sb)) return false;
    const long long I = gu->rows, H = gu->cols;
    if (dn->rows != H || dn->cols != I || p.sa.chunks > FFN_A_IT * 32 || (combine && k > FFN_K_MAX)) return false;
    P.kd = K_NONE;
    if (extra) {
        if (!extra->w || !extra->w->data || !extra->x || !extra->out || extra->w_up || extra->norm_w ||
            extra->norm_out || extra->residual || extra->conv_w || check_shape(extra->w, &pp, &P.kd) != FM_OK ||
            (P.kd != K_Q8 && P.kd != K_Q4 && P.kd != K_BF16) || !fm_cuda_matvec_takes(extra->w, extra->x) ||
            !mv_shape(extra->w, P.kd, &p.sd) || p.sd.chunks > FFN_D_IT * 32 || (combine && p.sd.rows != H))
            return false;
    }
    for (int cs = 16; cs >= 2; cs /= 2) {
        if (forced > 1 && forced != cs) continue;
        for (int parts = 1; parts <= 8; parts *= 2) {
            const long long ipart = I / parts, blocks = (long long)k * parts * cs;
            if (I % (parts * cs) || ipart % 32 || ipart > FFN_H_MAX || H % cs || blocks > 65535) continue;
            p.parts = parts;
            p.ia = (int)(I / (parts * cs));
            p.lb_log2 = ffn_log2_ceil(ipart / 32);
            p.rb = (int)(H / cs);
            if (p.ia > 2 * FFN_WARPS || p.rb > FFN_WARPS * (32 >> p.lb_log2) * FFN_B_NR) continue;
            const int nsl = (p.rb + FFN_SLICE - 1) / FFN_SLICE;
            if (combine && (nsl > 32 || cs * nsl > FFN_CTR)) continue;
            if (extra) {
                p.ld_log2 = ffn_log2_ceil((p.sd.chunks + FFN_D_IT - 1) / FFN_D_IT);
                p.rd = combine ? (p.rb + k * parts - 1) / (k * parts) : (int)((p.sd.rows + blocks - 1) / blocks);
                if (p.ld_log2 > 5 || p.rd > FFN_WARPS * (32 >> p.ld_log2)) continue;
            }
            if (ffn_max_clusters(ctx, ffn_kernel(P.kd, cs), cs) < k * parts) continue;
            P.cs = cs;
            P.parts = parts;
            return true;
        }
    }
    return false;
}

} // namespace

extern "C" int fm_cuda_expert_ffn_parts(fm_cuda *ctx, const fm_weight *gate_up, const fm_weight *down, int k,
                                        const fm_cuda_mv *extra, bool combine) {
    FfnPlan P;
    if (!ctx || cudaSetDevice(ctx->device) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return ffn_plan(ctx, gate_up, down, k, extra, combine, P) ? P.parts : 0;
}

extern "C" fm_status fm_cuda_expert_ffn(fm_cuda *ctx, const fm_weight *gate_up, const fm_weight *down,
                                        const fm_cuda_expert_ffn_args *f, const fm_cuda_mv *extra) {
    FM_CUDA_CTX(ctx);
    if (!f || !f->table || !f->ids || !f->x || !f->out || (extra && (!extra->w || !extra->x || !extra->out)))
        return fm_error_set(FM_ERR_ARG, "CUDA expert FFN: NULL pointer");
    if (f->combine_x && (!f->weights || (extra && !f->shared_logit)))
        return fm_error_set(FM_ERR_ARG, "CUDA expert FFN: a combine needs the routing weights (and, with a dense "
                                        "product, the shared expert's gate logit)");
    if (f->k < 1 || f->n_experts < 1 || f->gate_off < 0 || f->up_off < 0 || f->down_off < 0 || f->gate_off % 16 ||
        f->up_off % 16 || f->down_off % 16 || (uintptr_t)f->x % 16)
        return fm_error_set(FM_ERR_ARG,
                            "CUDA expert FFN: bad arguments (top-%d of %d experts; part offsets must be multiples of 16 "
                            "bytes and x 16-byte aligned)",
                            f->k, f->n_experts);
    FfnPlan P;
    if (!ffn_plan(ctx, gate_up, down, f->k, extra, f->combine_x != nullptr, P))
        return fm_error_set(FM_ERR_UNSUPPORTED,
                            "CUDA expert FFN: the fused launch does not take these weights, this top-%d or this device "
                            "(fm_cuda_expert_ffn_parts is 0; use fm_cuda_expert_matvec)",
                            f->k);
    FfnParams &p = P.p;
    p.table = (const unsigned char *const *)f->table;
    p.ids = f->ids;
    p.gate_off = f->gate_off, p.up_off = f->up_off, p.down_off = f->down_off;
    p.x = f->x;
    p.out = f->out;
    p.out_stride = gate_up->cols;
    p.n_experts = f->n_experts;
    p.cx = f->combine_x;
    p.sl = f->shared_logit;
    p.cw = f->weights;
    p.ctr = ctx->ffn_ctr;
    p.k = f->k;
    if (extra) {
        p.dw = (const unsigned char *)extra->w->data;
        p.dx = extra->x;
        p.dout = extra->out;
    }
    const ffn_fn kernel = ffn_kernel(P.kd, P.cs);
    if (P.cs > 8) FM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    FM_CUDA_CHECK(fm_launch_pdl_cluster(ctx, kernel, dim3((unsigned)(f->k * P.parts * P.cs)), dim3(FFN_THREADS), 0,
                                        (unsigned)P.cs, p));
    FM_CUDA_CHECK_LAUNCH("the CUDA expert FFN kernel");
    return FM_OK;
}
