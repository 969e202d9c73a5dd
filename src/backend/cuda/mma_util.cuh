/* Internal to src/backend/cuda/ (CUDA C++): the tensor-core and async-copy building blocks that
 * matmul.cu's one-token Q4 kernel and gemm.cu's prefill GEMM share. */
#ifndef FM_BACKEND_CUDA_MMA_UTIL_CUH
#define FM_BACKEND_CUDA_MMA_UTIL_CUH

#include <stdint.h>

/* The nibbles at bits 0 .. 3 and 16 .. 19 of w as a bf16 pair of integers (exact: q is OR-ed into
 * the mantissa of 128.0 and 128 subtracted by one bf16x2 FMA); magic holds 0x43004300 in a
 * register, so a pair costs one LOP3 and one FMA. */
__device__ __forceinline__ uint32_t q4_pair_bf16(uint32_t w, uint32_t magic) {
    uint32_t t, r;
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(t) : "r"(w), "r"(magic)); /* (w & mask) | magic */
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(t), "r"(0x3F803F80u), "r"(0xC300C300u));
    return r;
}

/* (lo, hi) rounded to bf16 and packed, lo in the low half. */
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

/* d += A B for one m16n8k16 tile: bf16 inputs, f32 accumulators (PTX fragment layouts). */
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* 16 bytes global -> shared, asynchronously (L2 only), and the group bookkeeping. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

#endif
