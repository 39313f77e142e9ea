// AVX-512 attention kernels (compiled with -mavx512f/bw/vl/dq; same templates as
// AVX2, 16 floats per register). 32 zmm registers:
//   scores, many rows: 6 keys x 4 zmm of query rows (64 rows, one task) = 24
//     accumulators + 4 Q + 1 broadcast = 29 zmm.
//   scores, few rows (dot along D): 1x8, 2x8, 3x4, 4x4 (rows x keys).
//   P.V: 6 rows x 4 zmm (24 accumulators) down to 1 row x 8 zmm (decode).
// bf16 K/V are converted to fp32 in registers (vpmovzxwd + vpslld) and fed to
// FMAs, so the numerics equal the AVX2 and generic paths; vdpbf16ps would round
// products differently and run at half the FMA rate on the parts we target.
// GCC 12's AVX-512 headers self-initialize their `_mm512_undefined_*` values,
// which -Wuninitialized flags in every inlined reduction/extract (false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pykernels/attention.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx512 {

struct AV {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg bcast(float x) { return _mm512_set1_ps(x); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg select_lt(reg a, reg b, reg x, reg y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  static reg load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // Pins a value to a register: GCC otherwise folds a load used by several
  // FMAs into each of them (one load per use instead of one per value).
  static void keep(reg& v) {
#ifndef PK_NO_REGISTER_PINS  // defined by the SIMDe test build, whose reg is a struct
    asm("" : "+v"(v));
#endif
  }
  static float hsum(reg v) { return _mm512_reduce_add_ps(v); }
  static reg round(reg x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static reg pow2i(reg n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
};

#include "attention_avx512_tiles.h"

#include "../common/attention_impl.inc"

const AttentionKernels kAttention = {"avx512", &attention_latency, &attention_throughput,
                                     &exp2_array};

}  // namespace avx512
}  // namespace pk
