// AVX2 + FMA kernels (compiled with -mavx2 -mfma -mf16c only); the traits and
// tile shapes are in gemm_avx2_traits.inc. On CPUs with AVX-VNNI, dispatch
// takes the int8 entries from gemm_avx2_vnni.cc instead.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx2 {

#include "gemm_avx2_traits.inc"

// int8 by vpmaddubsw (AVX2 without VNNI): the vpdpbusd layout and epilogue
// (VIVnni in gemm_avx2_vnni.cc) with the 4-product sum done in two steps:
// vpmaddubsw multiplies the u8 weights (w + 128, in [1, 255]) by the s8
// activations and sums adjacent pairs into int16 with saturation, then
// vpmaddwd by ones sums adjacent int16 pairs into int32. The pair sums never
// saturate because the activations are quantized to 7 bits: |a| <= 63, so
// |w_u8 * a0 + w_u8 * a1| <= 2 * 255 * 63 = 32130 < 32767; the int32 sums are
// then exact (as for vpmaddwd), and the epilogue removes 128 * sum_k a[k].
// The price is the activation rounding: a step of max|x| / 63 instead of
// max|x| / 127, twice the quantization error of the exact vpmaddwd scheme
// (relative error per activation <= 1 / 126 of the row's max instead of
// 1 / 254). 32 multiply-adds per 3 instructions (vpmaddubsw, vpmaddwd, vpaddd)
// against 16 per 3 (vpmovsxbw, vpmaddwd, vpaddd).
// Registers (16 ymm): 3 rows x 2 panels x 2 = 12 accumulators + 3 activation
// broadcasts + 1 weight; the ones constant is folded into vpmaddwd's memory
// operand or rematerialized.
struct VIMaddubs : U8S8Ymm {
  static constexpr int kActMax = 63;
  static reg madd(reg acc, wreg w, areg a) {
    const __m256i pairs = _mm256_maddubs_epi16(w, a);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

#include "../common/gemm_impl.inc"

const GemmKernels kGemm = {
    "avx2",
    {meta_of<FormatF32>("fma"), meta_of<FormatBF16>("widen_fma"),
     meta_of<Int8Format<VI>>("vpmaddwd"), meta_of<Int8Format<VIMaddubs>>("vpmaddubsw")},
    {{&f32_latency, &f32_throughput},
     {&bf16_latency, &bf16_throughput},
     {&i8_latency<VI>, &i8_throughput<VI>},
     {&i8_latency<VIMaddubs>, &i8_throughput<VIMaddubs>}}};

const GemmPair kI8Maddubs = {meta_of<Int8Format<VIMaddubs>>("vpmaddubsw"),
                             {&i8_latency<VIMaddubs>, &i8_throughput<VIMaddubs>}};

}  // namespace avx2
}  // namespace pk
