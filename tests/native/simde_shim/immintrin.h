// Stand-in for <immintrin.h> in the SIMDe build of the AVX-512 GEMM unit
// (tests/native/gemm_avx512_simde.cc): the _mm512_* names resolve to SIMDe's
// portable implementations, so the unit compiles and runs without AVX-512.
#pragma once
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
// Rounding-control constants SIMDe spells only with its prefix.
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT SIMDE_MM_FROUND_TO_NEAREST_INT
#endif
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
// Reductions SIMDe 0.8 does not provide, in the halving order GCC's
// avx512fintrin.h uses (256-bit halves, then 128, 64, 32).
#ifndef _mm512_reduce_add_ps
static inline float pk_shim_mm512_reduce_add_ps(simde__m512 v) {
  float s[16];
  simde_mm512_storeu_ps(s, v);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}
#define _mm512_reduce_add_ps(v) pk_shim_mm512_reduce_add_ps(v)
#endif
// The kernels' empty-asm register pins need a real vector register.
#define PK_NO_REGISTER_PINS 1
// AVX-VNNI's VEX vpdpbusd computes what the AVX512_VNNI/VL one does.
#ifndef _mm256_dpbusd_avx_epi32
#define _mm256_dpbusd_avx_epi32(src, a, b) simde_mm256_dpbusd_epi32(src, a, b)
#endif
