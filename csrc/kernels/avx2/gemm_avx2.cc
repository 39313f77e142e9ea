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
    {meta_of<FormatF32>("fma"), meta_of<FormatBF16>("widen_fma"),
     meta_of<Int8Format<VI>>("vpmaddwd")},
    {{&f32_latency, &f32_throughput},
     {&bf16_latency, &bf16_throughput},
     {&i8_latency<VI>, &i8_throughput<VI>}}};

}  // namespace avx2
}  // namespace pk
