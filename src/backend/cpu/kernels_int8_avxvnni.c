/* The AVX-VNNI build of the AVX2 int8-activation kernels: kernels_int8_avx2.c compiled with
 * FM_I8_VNNI = 1 and -mavx2 -mfma -mf16c -mavxvnni (vpdpbusd / vpdpwssd on 256-bit vectors, VEX
 * encoded: no AVX-512 needed). Entered only after ops.c has checked the CPUID bit. Contracts:
 * kernels.h. */
#define FM_I8_VNNI 1
#include "kernels_int8_avx2.c"
