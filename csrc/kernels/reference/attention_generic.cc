// Generic attention kernels: plain C++ for any x86-64 (no ISA flags). The
// "vector" is four floats in a struct; the same online-softmax, split-KV and
// masking code as the SIMD paths runs on it, so it is also the in-library
// oracle the other ISAs are compared against.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pykernels/attention.h"
#include "pykernels/runtime.h"

namespace pk {
namespace generic {

struct AV {
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
  static reg sub(reg a, reg b) { reg r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] - b.v[i]; return r; }
  // As maxps: the second operand when either is NaN.
  static reg max(reg a, reg b) { reg r; for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return r; }
  static reg select_lt(reg a, reg b, reg x, reg y) {
    reg r;
    for (int i = 0; i < 4; ++i) r.v[i] = a.v[i] < b.v[i] ? x.v[i] : y.v[i];
    return r;
  }
  static reg load_bf16(const uint16_t* p) {
    reg r;
    for (int i = 0; i < 4; ++i) {
      const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      std::memcpy(&r.v[i], &u, sizeof(float));
    }
    return r;
  }
  static void keep(reg&) {}
  static float hsum(reg x) { return (x.v[0] + x.v[2]) + (x.v[1] + x.v[3]); }
  // Round to nearest even by the 1.5 * 2^23 trick (exact for |x| < 2^22; the
  // callers clamp to [-127, 0]), as cvtps2dq does under the default MXCSR.
  static reg round(reg x) {
    reg r;
    for (int i = 0; i < 4; ++i) {
      const float t = x.v[i] + 12582912.0f;  // no -ffast-math: not folded away
      r.v[i] = t - 12582912.0f;
    }
    return r;
  }
  static reg pow2i(reg n) {
    reg r;
    for (int i = 0; i < 4; ++i) {
      const float f = n.v[i];
      // NaN: any bits will do, the polynomial factor is NaN already.
      const int32_t e = (f == f) ? static_cast<int32_t>(f) + 127 : 0;
      const uint32_t u = static_cast<uint32_t>(e) << 23;
      std::memcpy(&r.v[i], &u, sizeof(float));
    }
    return r;
  }
};

constexpr int kSKR = 4;
constexpr int kSNV = 2;
constexpr int kDotRows = 4;
constexpr int kDotKB[kDotRows + 1] = {1, 4, 2, 2, 1};
constexpr int kPvMR = 4;
constexpr int kPvDC[kPvMR + 1] = {4, 4, 2, 2, 2};

#include "../common/attention_impl.inc"

const AttentionKernels kAttention = {"generic", &attention_latency, &attention_throughput,
                                     &exp2_array};

}  // namespace generic
}  // namespace pk
