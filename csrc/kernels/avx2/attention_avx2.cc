// AVX2 + FMA attention kernels (compiled with -mavx2 -mfma -mf16c only).
// 16 ymm registers. Tiles (see attention_impl.inc for the loops):
//   scores, many rows: 6 keys x 2 ymm of query rows = 12 accumulators + 2 Q +
//     1 broadcast = 15 ymm; 12 independent FMAs cover the 4-cycle latency x 2 pipes.
//   scores, few rows (dot along D): 1x8, 2x4 (rows x keys) accumulators.
//   P.V: 6 rows x 2 ymm (12 accumulators) down to 1 row x 8 ymm (decode).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pykernels/attention.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx2 {

struct AV {
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
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg select_lt(reg a, reg b, reg x, reg y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  // 8 bfloat16 -> fp32: zero-extend to 32 bits, shift into the high half.
  static reg load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // Pins a value to a register: GCC otherwise folds a load used by several
  // FMAs into each of them (one load per use instead of one per value).
  static void keep(reg& v) { asm("" : "+x"(v)); }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static reg round(reg x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static reg pow2i(reg n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
};

constexpr int kSKR = 6;
constexpr int kSNV = 2;
// Two rows at most: 2 rows x 4 keys = 8 accumulators + 4 K + 2 Q registers, 6
// loads per 8 FMAs; 4 rows x 2 keys made GCC fold Q into the FMAs (10 loads per
// 8 FMAs, load-port bound). More rows take several passes over the L1 tile.
constexpr int kDotRows = 2;
constexpr int kDotKB[kDotRows + 1] = {1, 8, 4};
constexpr int kPvMR = 6;
constexpr int kPvDC[kPvMR + 1] = {8, 8, 4, 3, 3, 2, 2};

#include "../common/attention_impl.inc"

const AttentionKernels kAttention = {"avx2", &attention_latency, &attention_throughput,
                                     &exp2_array};

}  // namespace avx2
}  // namespace pk
