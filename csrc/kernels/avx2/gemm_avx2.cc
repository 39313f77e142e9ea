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

#include "../common/gemm_impl.inc"

const GemmKernels kGemm = {
    "avx2",
    {{"gemm_avx2_f32_lat_6x16", "gemm_avx2_f32_6x16"},
     {"gemm_avx2_bf16_lat_6x16", "gemm_avx2_bf16_6x16"},
     {"gemm_avx2_i8_lat_3x16", "gemm_avx2_i8_3x16"}},
    {{&f32_latency, &f32_throughput},
     {&bf16_latency, &bf16_throughput},
     {&i8_latency<VI>, &i8_throughput<VI>}}};

}  // namespace avx2
}  // namespace pk
