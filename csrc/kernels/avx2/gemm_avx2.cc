// AVX2 + FMA kernels (compiled with -mavx2 -mfma -mf16c only).
// 16 ymm registers: the fp32/bf16 6x16 tile uses 12 accumulators + 2 B vectors
// (4 for bf16: even and odd k) + 1 A broadcast. FMA latency 4 x 2 pipes needs
// >= 8 independent accumulators, which 12 satisfies.
// int8 without VNNI: weights sign-extended to int16 (vpmovsxbw) and multiplied
// by int16 activations with vpmaddwd, which sums pairs of products into int32
// exactly (no saturation, unlike vpmaddubsw): 16 multiply-adds per instruction.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx2 {

struct V {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg bcast(float x) { return _mm256_set1_ps(x); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }  // b if unordered
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }  // b if unordered
  static reg round(reg x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg pow2(reg n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static reg select_neg(reg x, reg a, reg b) { return _mm256_blendv_ps(b, a, x); }
  static void load_bf16_pairs(const uint16_t* p, reg& even, reg& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
};

struct VI {
  using act_t = int16_t;
  using reg = __m256i;
  using wreg = __m256i;
  using areg = __m256i;
  static constexpr int kRegsPerPanel = 4;  // 16 bytes (4 columns x 4 k) each
  static constexpr int kLanesPerCol = 2;
  static constexpr int kWeightBias = 0;
  // 4 accumulators per panel; 1x48 (12), 2x16 (8), 3x16 (12).
  static constexpr int kMR = 3;
  static constexpr int kMaxAcc = 12;
  static constexpr int kLatNP[kMR + 1] = {1, 3, 1, 1};
  static reg zero() { return _mm256_setzero_si256(); }
  static areg bcast_a4(const int16_t* a) {
    long long x;
    std::memcpy(&x, a, sizeof(x));
    return _mm256_set1_epi64x(x);
  }
  static wreg widen(const int8_t* group_row, int g) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group_row + 16 * g)));
  }
  static reg madd(reg acc, wreg w, areg a) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, a)); }
  static void store(int32_t* p, reg v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};

constexpr int kTputMR = 6;
constexpr int kTputNP = 1;
constexpr int kMaxAcc = 12;
// Latency tiles by rows: 1x64 (8 acc), 2x48 (12), 3x32 (12), then 16 wide.
constexpr int kLatNP[kTputMR + 1] = {1, 4, 3, 2, 1, 1, 1};

#include "../common/gemm_impl.inc"

const GemmKernels kGemm = {
    "avx2",
    {{"gemm_avx2_f32_lat_6x16", "gemm_avx2_f32_6x16"},
     {"gemm_avx2_bf16_lat_6x16", "gemm_avx2_bf16_6x16"},
     {"gemm_avx2_i8_lat_3x16", "gemm_avx2_i8_3x16"}},
    {{&f32_latency, &f32_throughput},
     {&bf16_latency, &bf16_throughput},
     {&i8_latency<VI>, &i8_throughput<VI>}}};

}  // namespace avx2
}  // namespace pk
