// int8 GEMM with AVX-VNNI (the VEX-encoded vpdpbusd of Alder Lake, Sapphire
// Rapids, Zen 5), compiled with -mavx2 -mfma -mf16c -mavxvnni. Only the int8
// entry points are taken from this unit (dispatch.cc swaps them into the avx2
// table when CPUID reports AVX-VNNI); the fp32/bf16 templates it includes are
// never instantiated here. Its own namespace (pk::avx2::vnni), so no function
// compiled with -mavxvnni can be merged into the plain AVX2 unit's callers.
//
// Same scheme as AVX-512 VNNI (see VIVnni in gemm_avx512.cc and the generic
// model in gemm_generic.cc): weights flipped to u8 w + 128 by one vpxor per
// 32-byte half panel group, s8 activations broadcast 4 at a time, the epilogue
// removing 128 * sum_k a[k]. 32 multiply-adds per instruction against
// vpmaddwd's 16 plus a widening and an add.
// Registers (16 ymm): 2 accumulators per panel; 3 rows x 2 panels = 12
// accumulators + 3 activation broadcasts + 1 weight = 16.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx2 {
namespace vnni {

#include "gemm_avx2_traits.inc"

struct VIVnni : U8S8Ymm {
  static reg madd(reg acc, wreg w, areg a) { return _mm256_dpbusd_avx_epi32(acc, w, a); }
};
// int8_7bit: with vpdpbusd the 7-bit activations buy nothing (it is exact on 8
// bits and 4 products per instruction, vs vpmaddubsw's 2 per 1.5); same results.
struct VIVnni7 : VIVnni {
  static constexpr int kActMax = 63;
};

#include "../common/gemm_impl.inc"

}  // namespace vnni

const GemmPair kI8AvxVnni = {vnni::meta_of<vnni::Int8Format<vnni::VIVnni>>("vpdpbusd"),
                             {&vnni::i8_latency<vnni::VIVnni>, &vnni::i8_throughput<vnni::VIVnni>}};
const GemmPair kI8A7AvxVnni = {
    vnni::meta_of<vnni::Int8Format<vnni::VIVnni7>>("vpdpbusd"),
    {&vnni::i8_latency<vnni::VIVnni7>, &vnni::i8_throughput<vnni::VIVnni7>}};

}  // namespace avx2
}  // namespace pk
