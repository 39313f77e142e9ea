// Peak probes of the AVX2 + FMA unit (compiled with -mavx2 -mfma -mf16c only).
// 16 ymm: 12 independent accumulators cover FMA latency x ports (4 x 2 = 8 on
// Zen 3 and Intel cores) with margin, and leave registers for the operands.
#include <immintrin.h>

#include <cstdint>

#include "pykernels/peaks.h"

namespace pk {
namespace avx2 {
namespace {

constexpr int kAcc = 12;
// The fp32 probe's loops over the accumulators are unrolled, so each one is
// indexed by a constant (with a run-time index GCC keeps such an array on
// the stack; see the int8 probes below).
int64_t fma_f32(int64_t iters, volatile float* sink) {
  __m256 acc[kAcc];
#pragma GCC unroll 32
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(*sink) + i);
  const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(acc[i], x, y);
  __m256 s = acc[0];
#pragma GCC unroll 32
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_ps(s, acc[i]);
  *sink = _mm256_cvtss_f32(s);
  return iters * kAcc * 8 * 2;
}

// The int8 scheme probes run the tiles' instruction mix: independent
// products (none waits on another) summed into 8 vpaddd chains (1-cycle
// latency), 4 activation by 2 weight registers (1 for vpmaddubsw: ymm13 holds
// the int16 ones), as one asm loop. In C++ a product per chain needs a
// temporary per chain: 12 chains + 12 products + the weight exceed 16 ymm,
// and GCC kept accumulators on the stack (13 stack accesses per step of the
// timed loop); that form measured 60-79 GOP/s for vpmaddwd on Zen 3, below
// the 97-120 the 3x16 tile reaches on one thread.
// Operand values do not matter (integer multiplies take fixed time; sums wrap).
#define PK_PROBE_SETUP                                                          \
  "vpcmpeqd %%ymm8, %%ymm8, %%ymm8\n\t"                                       \
  "vpsrlw $15, %%ymm8, %%ymm13\n\t" /* int16 ones */                          \
  "vpaddw %%ymm13, %%ymm13, %%ymm9\n\t"                                       \
  "vpaddw %%ymm13, %%ymm9, %%ymm10\n\t"                                       \
  "vpaddw %%ymm13, %%ymm10, %%ymm11\n\t"                                      \
  "vpaddw %%ymm9, %%ymm9, %%ymm12\n\t"                                        \
  "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"                                          \
  "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"                                          \
  "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"                                          \
  "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"                                          \
  "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"                                          \
  "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"                                          \
  "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"                                          \
  "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
#define PK_PROBE_FINISH                                                         \
  "vpaddd %%ymm1, %%ymm0, %%ymm0\n\t"                                         \
  "vpaddd %%ymm3, %%ymm2, %%ymm2\n\t"                                         \
  "vpaddd %%ymm5, %%ymm4, %%ymm4\n\t"                                         \
  "vpaddd %%ymm7, %%ymm6, %%ymm6\n\t"                                         \
  "vpaddd %%ymm2, %%ymm0, %%ymm0\n\t"                                         \
  "vpaddd %%ymm6, %%ymm4, %%ymm4\n\t"                                         \
  "vpaddd %%ymm4, %%ymm0, %%ymm0\n\t"                                         \
  "vmovdqu %%ymm0, (%1)\n\t"                                                  \
  "vzeroupper\n\t"

// The timed loop around 8 steps of one scheme; returns the iterations run.
#define PK_PROBE_LOOP(STEPS)                                                    \
  alignas(32) int32_t out[8];                                                   \
  const int64_t n_iters = iters > 0 ? iters : 1;                                \
  int64_t n = n_iters;                                                          \
  asm volatile(PK_PROBE_SETUP "1:\n\t" STEPS "dec %0\n\t"                      \
               "jnz 1b\n\t" PK_PROBE_FINISH                                     \
               : "+r"(n)                                                        \
               : "r"(out)                                                       \
               : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",  \
                 "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",       \
                 "xmm13", "xmm14", "xmm15");                                    \
  *sink = static_cast<float>(out[0]);

// One product of activation register X by weight W into temporary T, added
// to accumulator ACC.
#define PK_MADD_STEP(W, X, T, ACC)                                              \
  "vpmaddwd %%ymm" #W ", %%ymm" #X ", %%ymm" #T "\n\t"                         \
  "vpaddd %%ymm" #T ", %%ymm" #ACC ", %%ymm" #ACC "\n\t"
#define PK_MADDUBS_STEP(W, X, T, ACC)                                           \
  "vpmaddubsw %%ymm" #W ", %%ymm" #X ", %%ymm" #T "\n\t"                       \
  "vpmaddwd %%ymm13, %%ymm" #T ", %%ymm" #T "\n\t" /* pairs by ones */         \
  "vpaddd %%ymm" #T ", %%ymm" #ACC ", %%ymm" #ACC "\n\t"

// int16 pairs by vpmaddwd into int32, then vpaddd: the exact int8 scheme
// (16 multiply-adds per vpmaddwd), 8 per iteration.
int64_t madd_i16(int64_t iters, volatile float* sink) {
  PK_PROBE_LOOP(PK_MADD_STEP(12, 8, 14, 0) PK_MADD_STEP(12, 9, 15, 1)
                PK_MADD_STEP(12, 10, 14, 2) PK_MADD_STEP(12, 11, 15, 3)
                PK_MADD_STEP(13, 8, 14, 4) PK_MADD_STEP(13, 9, 15, 5)
                PK_MADD_STEP(13, 10, 14, 6) PK_MADD_STEP(13, 11, 15, 7))
  return n_iters * 8 * 16 * 2;
}

// u8 x s8 pairs by vpmaddubsw, vpmaddwd by ones (ymm13), vpaddd: the 7-bit
// int8 scheme (32 multiply-adds per step), 8 steps per iteration.
int64_t maddubs_i8(int64_t iters, volatile float* sink) {
  PK_PROBE_LOOP(PK_MADDUBS_STEP(12, 8, 14, 0) PK_MADDUBS_STEP(12, 9, 15, 1)
                PK_MADDUBS_STEP(12, 10, 14, 2) PK_MADDUBS_STEP(12, 11, 15, 3)
                PK_MADDUBS_STEP(12, 8, 14, 4) PK_MADDUBS_STEP(12, 9, 15, 5)
                PK_MADDUBS_STEP(12, 10, 14, 6) PK_MADDUBS_STEP(12, 11, 15, 7))
  return n_iters * 8 * 32 * 2;
}
#undef PK_PROBE_LOOP
#undef PK_MADD_STEP
#undef PK_MADDUBS_STEP
#undef PK_PROBE_SETUP
#undef PK_PROBE_FINISH

// Sequential reads, 8 independent ymm OR chains per 256 bytes.
int64_t read_bw(const float* p, int64_t bytes, int64_t reps, volatile float* sink) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t n = bytes / 4;
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i < n; i += 64)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_or_ps(acc[j], _mm256_loadu_ps(p + i + 8 * j));
  __m256 s = acc[0];
  for (int i = 1; i < 8; ++i) s = _mm256_or_ps(s, acc[i]);
  *sink = _mm256_cvtss_f32(s);
  return bytes * reps;
}

}  // namespace

const PeakProbes kPeaks = {"avx2",
                           {{"fp32_fma", &fma_f32},
                            {"int16_vpmaddwd", &madd_i16},
                            {"int8_vpmaddubsw", &maddubs_i8},
                            {nullptr, nullptr}},
                           &read_bw};

}  // namespace avx2
}  // namespace pk
