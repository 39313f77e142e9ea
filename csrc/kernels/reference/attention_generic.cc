// Generic attention kernels: plain C++ for any x86-64 (no ISA flags). The
// "vector" is four floats in a struct; the same online-softmax, split-KV and
// masking code as the SIMD paths runs on it, so it is also the in-library
// oracle the other ISAs are compared against.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pykernels/attention.h"
#include "pykernels/encoder.h"
#include "pykernels/runtime.h"

namespace pk {
namespace generic {

#include "vec_generic.inc"

constexpr int kSKR = 4;
constexpr int kSNV = 2;
constexpr int kDotRows = 4;
constexpr int kDotKB[kDotRows + 1] = {1, 4, 2, 2, 1};
constexpr int kPvMR = 4;
constexpr int kPvDC[kPvMR + 1] = {4, 4, 2, 2, 2};

#include "../common/attention_impl.inc"
#include "../common/attention_varlen.inc"  // varlen_attention (encoder.h)

const AttentionKernels kAttention = {"generic", &attention_latency, &attention_throughput,
                                     &exp2_array};

}  // namespace generic
}  // namespace pk
