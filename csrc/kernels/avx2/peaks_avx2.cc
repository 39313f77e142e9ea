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

int64_t fma_f32(int64_t iters, volatile float* sink) {
  __m256 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(*sink) + i);
  const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(acc[i], x, y);
  __m256 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_ps(s, acc[i]);
  *sink = _mm256_cvtss_f32(s);
  return iters * kAcc * 8 * 2;
}

// int16 pairs by vpmaddwd into int32, then vpaddd: the exact int8 scheme
// (16 multiply-adds per vpmaddwd).
int64_t madd_i16(int64_t iters, volatile float* sink) {
  __m256i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_epi32(static_cast<int>(*sink) + i);
  const __m256i w = _mm256_set1_epi16(3);
  // Each chain multiplies its own accumulator: nothing loop-invariant to hoist.
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(acc[i], w));
  __m256i s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_epi32(s, acc[i]);
  *sink = static_cast<float>(_mm256_extract_epi32(s, 0));
  return iters * kAcc * 16 * 2;
}

// u8 x s8 pairs by vpmaddubsw, vpmaddwd by ones, vpaddd: the 7-bit int8
// scheme (32 multiply-adds per step).
int64_t maddubs_i8(int64_t iters, volatile float* sink) {
  __m256i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_epi32(static_cast<int>(*sink) + i);
  const __m256i w = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(acc[i], w), ones));
  __m256i s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_epi32(s, acc[i]);
  *sink = static_cast<float>(_mm256_extract_epi32(s, 0));
  return iters * kAcc * 32 * 2;
}

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
