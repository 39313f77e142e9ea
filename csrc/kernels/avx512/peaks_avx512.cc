// Peak probes of the AVX-512 unit (compiled with the unit's -mavx512* flags).
// 32 zmm: 24 independent accumulators. Every probe's instruction takes its
// accumulator (or for vpmaddwd / vpmaddubsw, which have none, its chain's own
// value) as an input, so no operation is loop-invariant. The bf16 and VNNI
// probes run only where CPUID reports the feature (runtime/peaks.cc).
// fp16 (AVX512_FP16 vfmadd..ph) is not probed: this unit is not compiled with
// -mavx512fp16.
#include <immintrin.h>

#include <cstdint>

#include "pykernels/peaks.h"

namespace pk {
namespace avx512 {
namespace {

constexpr int kAcc = 24;
// Every loop over the accumulators is unrolled, so each one is indexed by a
// constant: with a run-time index (the final sum's loop, left rolled) GCC
// kept the array on the stack and stored every accumulator at every step of
// the timed vpmaddwd and vpdpbusd loops (seen in the disassembly; on AVX2 the
// same pattern halved the vpmaddwd probe's figure).

int64_t fma_f32(int64_t iters, volatile float* sink) {
  __m512 acc[kAcc];
#pragma GCC unroll 32
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(*sink) + i);
  const __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 32
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
  __m512 s = acc[0];
#pragma GCC unroll 32
  for (int i = 1; i < kAcc; ++i) s = _mm512_add_ps(s, acc[i]);
  *sink = _mm512_reduce_add_ps(s);
  return iters * kAcc * 16 * 2;
}

// vdpbf16ps: 32 bf16 products (pairs summed into 16 fp32 lanes) per instruction.
int64_t dpbf16(int64_t iters, volatile float* sink) {
  __m512 acc[kAcc];
#pragma GCC unroll 32
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(*sink) + i);
  const __m512bh w = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 32
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], w, w);
  __m512 s = acc[0];
#pragma GCC unroll 32
  for (int i = 1; i < kAcc; ++i) s = _mm512_add_ps(s, acc[i]);
  *sink = _mm512_reduce_add_ps(s);
  return iters * kAcc * 32 * 2;
}

// vpdpbusd: 64 u8 x s8 multiply-adds per instruction. Named like the VNNI
// tiles (VIVnni...): runs only where CPUID reports AVX512_VNNI (peaks.cc checks
// it, as dispatch does for the tiles), and tests/test_isa_guard.py identifies
// VNNI-gated code by that name.
struct VIVnniPeak {
  static int64_t dpbusd(int64_t iters, volatile float* sink) {
    __m512i acc[kAcc];
#pragma GCC unroll 32
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_epi32(static_cast<int>(*sink) + i);
    const __m512i w = _mm512_set1_epi8(3), a = _mm512_set1_epi8(5);
    for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 32
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], w, a);
    __m512i s = acc[0];
#pragma GCC unroll 32
    for (int i = 1; i < kAcc; ++i) s = _mm512_add_epi32(s, acc[i]);
    // or, not add: GCC's _mm512_reduce_add_epi32 sums in scalar int, whose
    // wrap-around (the accumulators wrap by design) is undefined (UBSan).
    *sink = static_cast<float>(_mm512_reduce_or_epi32(s));
    return iters * kAcc * 64 * 2;
  }
};

// The int8 scheme probes add a product to each chain: 12 chains, so the 12
// products in flight, the accumulators and the operands fit the 32 zmm (with
// 24, GCC kept accumulators on the stack inside the timed loop). Each product
// still reads its own chain's value (unlike the AVX2 asm probes): 12 chains
// cover a ~6-cycle multiply + add at 2 per cycle with no slack, so on a CPU
// with longer latencies this reads low. Not yet timed on an AVX-512 machine.
constexpr int kChains = 12;

// vpmaddwd + vpaddd: 32 int16 multiply-adds per step.
int64_t madd_i16(int64_t iters, volatile float* sink) {
  __m512i acc[kChains];
#pragma GCC unroll 32
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(static_cast<int>(*sink) + i);
  const __m512i w = _mm512_set1_epi16(3);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 32
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_add_epi32(acc[i], _mm512_madd_epi16(acc[i], w));
  __m512i s = acc[0];
#pragma GCC unroll 32
  for (int i = 1; i < kChains; ++i) s = _mm512_add_epi32(s, acc[i]);
  *sink = static_cast<float>(_mm512_reduce_or_epi32(s));
  return iters * kChains * 32 * 2;
}

// vpmaddubsw + vpmaddwd by ones + vpaddd: 64 u8 x s8 multiply-adds per step.
int64_t maddubs_i8(int64_t iters, volatile float* sink) {
  __m512i acc[kChains];
#pragma GCC unroll 32
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(static_cast<int>(*sink) + i);
  const __m512i w = _mm512_set1_epi8(3), ones = _mm512_set1_epi16(1);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 32
    for (int i = 0; i < kChains; ++i)
      acc[i] = _mm512_add_epi32(acc[i], _mm512_madd_epi16(_mm512_maddubs_epi16(acc[i], w), ones));
  __m512i s = acc[0];
#pragma GCC unroll 32
  for (int i = 1; i < kChains; ++i) s = _mm512_add_epi32(s, acc[i]);
  *sink = static_cast<float>(_mm512_reduce_or_epi32(s));
  return iters * kChains * 64 * 2;
}

int64_t read_bw(const float* p, int64_t bytes, int64_t reps, volatile float* sink) {
  __m512i acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_si512();
  const int64_t n = bytes / 4;
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i < n; i += 64)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        acc[j] = _mm512_or_si512(acc[j], _mm512_loadu_si512(p + i + 16 * j));
  __m512i s = _mm512_or_si512(_mm512_or_si512(acc[0], acc[1]), _mm512_or_si512(acc[2], acc[3]));
  *sink = static_cast<float>(_mm512_reduce_or_epi32(s));
  return bytes * reps;
}

}  // namespace

const PeakProbes kPeaks = {"avx512",
                           {{"fp32_fma", &fma_f32},
                            {"bf16_dpbf16ps", &dpbf16},
                            {"int8_vpdpbusd", &VIVnniPeak::dpbusd},
                            {"int16_vpmaddwd", &madd_i16},
                            {"int8_vpmaddubsw", &maddubs_i8},
                            {nullptr, nullptr}},
                           &read_bw};

}  // namespace avx512
}  // namespace pk
