// AVX-512 kernels (compiled with -mavx512f/bw/vl/dq, -mavx512bf16, -mavx512vnni).
// 32 zmm registers: the 6x64 tile uses 24 accumulators + 4 B vectors + 1 A
// broadcast = 29 <= 32; M = 6 is also the natural latency quantum (a batch of up
// to 6 rows costs one pass over the weights).
// bf16 widens the packed pairs to fp32 (a shift and a mask) and uses FMA: on
// current Xeons vdpbf16ps runs at half the FMA rate, so convert-then-FMA keeps
// fp32 speed at half the bytes. int8 uses vpdpbusd when the CPU has
// AVX512_VNNI (kI8Vnni, swapped in by dispatch) and otherwise the exact vpmaddwd
// scheme of AVX2 at twice the width (kGemm). The VNNI tiles were never executed
// on the machines this was developed on (AVX2 only): their algorithm is the
// generic path's (gemm_generic.cc), tested everywhere; only the three
// intrinsics of VIVnni are specific to them.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx512 {

#include "vec_avx512.inc"

// int8 on AVX-512F/BW without VNNI (Skylake-X, Cascade Lake's F/BW subset).
struct VI {
  using act_t = int16_t;
  using reg = __m512i;
  using wreg = __m512i;
  using areg = __m512i;
  static constexpr int kRegsPerPanel = 2;  // 32 bytes (8 columns x 4 k) each
  static constexpr int kLanesPerCol = 2;
  static constexpr int kWeightBias = 0;
  // 2 accumulators per panel; 1x128 (16), 2x96 (24), 3x64 (24), ... 6x32 (24).
  static constexpr int kMR = 6;
  static constexpr int kMaxAcc = 24;
  static constexpr int kLatNP[kMR + 1] = {1, 8, 6, 4, 3, 2, 2};
  static reg zero() { return _mm512_setzero_si512(); }
  static areg bcast_a4(const int16_t* a) {
    long long x;
    std::memcpy(&x, a, sizeof(x));
    return _mm512_set1_epi64(x);
  }
  static wreg widen(const int8_t* group_row, int g) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_row + 32 * g)));
  }
  static reg madd(reg acc, wreg w, areg a) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, a)); }
  static void store(int32_t* p, reg v) { _mm512_storeu_si512(p, v); }
};

// int8 with AVX512_VNNI: vpdpbusd multiplies u8 x s8 in groups of 4 and adds
// into int32 lanes: 64 multiply-adds per instruction, 4x vpmaddwd's 16 and no
// widening. The packed layout [K/4][16][4] is already its operand layout (one
// 64-byte panel group = one zmm). The unsigned operand is the weight, flipped
// to w + 128 by one vpxord per panel group and shared by MR rows; activations
// stay s8 and the epilogue removes 128 * sum_k a[k], a per-row sum computed by
// the quantization pass. (The alternative, a per-column 128 * sum_k w[k]
// folded in at pack time with activations as u8, would save the vpxord but
// change the packed format every precision shares.)
// Registers: 24 accumulators (6 rows x 4 panels) + 6 activation broadcasts +
// 1 weight = 31 of 32 zmm.
struct VIVnni {
  using act_t = int8_t;
  using reg = __m512i;
  using wreg = __m512i;
  using areg = __m512i;
  static constexpr int kRegsPerPanel = 1;
  static constexpr int kLanesPerCol = 1;
  static constexpr int kWeightBias = 128;
  // 1 accumulator per panel; 1-3x128 (<= 24), 4x96 (24), 5x64 (20), 6x64 (24).
  static constexpr int kMR = 6;
  static constexpr int kMaxAcc = 24;
  static constexpr int kLatNP[kMR + 1] = {1, 8, 8, 8, 6, 4, 4};
  static reg zero() { return _mm512_setzero_si512(); }
  static areg bcast_a4(const int8_t* a) {
    int32_t x;
    std::memcpy(&x, a, sizeof(x));
    return _mm512_set1_epi32(x);
  }
  static wreg widen(const int8_t* group_row, int) {
    return _mm512_xor_si512(_mm512_loadu_si512(group_row), _mm512_set1_epi8(static_cast<char>(0x80)));
  }
  static reg madd(reg acc, wreg w, areg a) { return _mm512_dpbusd_epi32(acc, w, a); }
  static void store(int32_t* p, reg v) { _mm512_storeu_si512(p, v); }
};

constexpr int kTputMR = 6;
constexpr int kTputNP = 4;
constexpr int kMaxAcc = 28;
// Latency tiles by rows: 1x128 (8 acc), 2x128 (16), 3x96 (18), 4x96 (24), 5-6x64.
constexpr int kLatNP[kTputMR + 1] = {1, 8, 8, 6, 6, 4, 4};

#include "../common/gemm_impl.inc"

const GemmKernels kGemm = {
    "avx512",
    {meta_of<FormatF32>("fma"), meta_of<FormatBF16>("widen_fma"),
     meta_of<Int8Format<VI>>("vpmaddwd")},
    {{&f32_latency, &f32_throughput},
     {&bf16_latency, &bf16_throughput},
     {&i8_latency<VI>, &i8_throughput<VI>}}};

// Swapped into the table by dispatch when the CPU reports AVX512_VNNI.
const GemmPair kI8Vnni = {meta_of<Int8Format<VIVnni>>("vpdpbusd"),
                          {&i8_latency<VIVnni>, &i8_throughput<VIVnni>}};

}  // namespace avx512
}  // namespace pk
