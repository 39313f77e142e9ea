// Generic kernels: plain C++ for any x86-64 (compiled with no ISA flags, so the
// compiler may use SSE2 at most). Also the in-library oracle the other ISAs are
// compared against in the tests. The "vector" is four floats in a struct; the
// same tile code as the SIMD paths runs on it.
#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace generic {

struct V {
  struct reg { float v[4]; };
  static constexpr int W = 4;
  static reg zero() { return reg{{0.f, 0.f, 0.f, 0.f}}; }
  static reg load(const float* p) { return reg{{p[0], p[1], p[2], p[3]}}; }
  static void store(float* p, reg x) { for (int i = 0; i < 4; ++i) p[i] = x.v[i]; }
  static reg bcast(float x) { return reg{{x, x, x, x}}; }
  // a*b + c rounded twice (no fused multiply-add in the baseline ISA).
  static reg fma(reg a, reg b, reg c) {
    reg r;
    for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static reg mul(reg a, reg b) { reg r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
  static reg add(reg a, reg b) { reg r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
  // NaN-propagating like IEEE max is not: match _mm_max_ps (second operand on NaN).
  static reg max(reg a, reg b) { reg r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return r; }
};

constexpr int kTputMR = 4;
constexpr int kTputNP = 1;
constexpr int kMaxAcc = 16;  // 4x16: 16 xmm accumulators (the compiler spills a few)
constexpr int kLatNP[kTputMR + 1] = {1, 1, 1, 1, 1};

#include "../common/gemm_f32_impl.inc"

const GemmF32Kernels kGemmF32 = {"generic", "gemm_generic_f32_lat_4x16", "gemm_generic_f32_4x16",
                                 &gemm_latency, &gemm_throughput};

}  // namespace generic
}  // namespace pk
