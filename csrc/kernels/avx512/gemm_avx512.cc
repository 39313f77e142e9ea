// AVX-512 kernels (compiled with -mavx512f/bw/vl/dq, -mavx512bf16, -mavx512vnni).
// 32 zmm registers: the 6x64 tile uses 24 accumulators + 4 B vectors + 1 A
// broadcast = 29 <= 32; M = 6 is also the natural latency quantum (a batch of up
// to 6 rows costs one pass over the weights).
#include <immintrin.h>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx512 {

struct V {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg bcast(float x) { return _mm512_set1_ps(x); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
};

constexpr int kTputMR = 6;
constexpr int kTputNP = 4;
constexpr int kMaxAcc = 28;
// Latency tiles by rows: 1x128 (8 acc), 2x128 (16), 3x96 (18), 4x96 (24), 5-6x64.
constexpr int kLatNP[kTputMR + 1] = {1, 8, 8, 6, 6, 4, 4};

#include "../common/gemm_f32_impl.inc"

const GemmF32Kernels kGemmF32 = {"avx512", "gemm_avx512_f32_lat_6x64", "gemm_avx512_f32_6x64",
                                 &gemm_latency, &gemm_throughput};

}  // namespace avx512
}  // namespace pk
