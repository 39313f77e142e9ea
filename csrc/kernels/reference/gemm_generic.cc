// Generic kernels: plain C++ for any x86-64 (compiled with no ISA flags, so the
// compiler may use SSE2 at most). The "vector" is four floats in a struct and
// the same tile code as the SIMD paths runs on it; int8 sums are exact, so the
// generic path gives bit-identical int32 results and is the in-library oracle.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace generic {

#include "vec_generic.inc"

// int8: the u8 x s8 scheme of AVX512_VNNI's vpdpbusd, in scalar code, so the
// one path every test runs on every machine is the executable model of the
// VNNI kernels (which this project's CI machines cannot execute): weights
// read as u8 w + 128 (widen flips the sign bit), activations as s8, one int32
// lane per column accumulating 4 products per step with two's-complement
// wrap-around, and the tile epilogue removing 128 * sum_k a[k]. The integer
// results equal the vpmaddwd paths' exactly (tests/test_linear.py checks it).
struct VI {
  using act_t = int8_t;
  struct reg { int32_t v[4]; };   // 4 columns
  struct wreg { uint8_t w[16]; };  // 4 columns x 4 k, biased by 128
  struct areg { int8_t a[4]; };
  static constexpr int kRegsPerPanel = 4;
  static constexpr int kLanesPerCol = 1;
  static constexpr int kWeightBias = 128;
  static constexpr int kMR = 2;
  static constexpr int kMaxAcc = 8;
  static constexpr int kLatNP[kMR + 1] = {1, 2, 1};
  static reg zero() { return reg{{0, 0, 0, 0}}; }
  static areg bcast_a4(const int8_t* a) { return areg{{a[0], a[1], a[2], a[3]}}; }
  static wreg widen(const int8_t* group_row, int g) {
    wreg w;
    for (int i = 0; i < 16; ++i) w.w[i] = static_cast<uint8_t>(group_row[16 * g + i]) ^ 0x80u;
    return w;
  }
  static reg madd(reg acc, const wreg& w, const areg& a) {
    for (int c = 0; c < 4; ++c) {
      int32_t dot = 0;  // |dot| <= 4 * 255 * 128: no overflow
      for (int j = 0; j < 4; ++j) dot += static_cast<int32_t>(w.w[4 * c + j]) * a.a[j];
      acc.v[c] = static_cast<int32_t>(static_cast<uint32_t>(acc.v[c]) + static_cast<uint32_t>(dot));
    }
    return acc;
  }
  static void store(int32_t* p, const reg& v) { for (int i = 0; i < 4; ++i) p[i] = v.v[i]; }
};

// The executable model of the AVX2 vpmaddubsw scheme (VIMaddubs in
// gemm_avx2.cc): with activations limited to 7 bits its int16 pair sums never
// saturate, so it computes exactly the u8 x s8 sums above on 7-bit
// activations; same integers, bit for bit.
struct VI7 : VI {
  static constexpr int kActMax = 63;
};

constexpr int kTputMR = 4;
constexpr int kTputNP = 1;
constexpr int kMaxAcc = 16;  // 4x16: 16 xmm accumulators (the compiler spills a few)
constexpr int kLatNP[kTputMR + 1] = {1, 1, 1, 1, 1};

#include "../common/gemm_impl.inc"

const GemmKernels kGemm = {
    "generic",
    {meta_of<FormatF32>("scalar"), meta_of<FormatBF16>("widen_scalar"),
     meta_of<Int8Format<VI>>("scalar_u8s8"), meta_of<Int8Format<VI7>>("vpmaddubsw")},
    {{&f32_latency, &f32_throughput},
     {&bf16_latency, &bf16_throughput},
     {&i8_latency<VI>, &i8_throughput<VI>},
     {&i8_latency<VI7>, &i8_throughput<VI7>}}};

const GemmPair kI8Maddubs = {meta_of<Int8Format<VI7>>("vpmaddubsw"),
                             {&i8_latency<VI7>, &i8_throughput<VI7>}};

}  // namespace generic
}  // namespace pk
