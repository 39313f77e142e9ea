// AVX2 + FMA kernels (compiled with -mavx2 -mfma -mf16c only).
// 16 ymm registers: the 6x16 tile uses 12 accumulators + 2 B vectors + 1 A
// broadcast = 15. FMA latency 4-5 cycles x 2 pipes needs >= 8-10 independent
// accumulators, which 12 satisfies.
#include <immintrin.h>

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
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
};

constexpr int kTputMR = 6;
constexpr int kTputNP = 1;
constexpr int kMaxAcc = 12;
// Latency tiles by rows: 1x64 (8 acc), 2x48 (12), 3x32 (12), then 16 wide.
constexpr int kLatNP[kTputMR + 1] = {1, 4, 3, 2, 1, 1, 1};

#include "../common/gemm_f32_impl.inc"

const GemmF32Kernels kGemmF32 = {"avx2", "gemm_avx2_f32_lat_6x16", "gemm_avx2_f32_6x16",
                                 &gemm_latency, &gemm_throughput};

}  // namespace avx2
}  // namespace pk
