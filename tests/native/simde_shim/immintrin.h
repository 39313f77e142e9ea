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
