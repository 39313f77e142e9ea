// Generic encoder kernels: plain C++ for any x86-64 (no ISA flags), the same
// bodies as the SIMD paths over a four-float struct (see common/encoder_impl.inc).
// varlen_attention is attention_generic.cc's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pykernels/encoder.h"
#include "pykernels/runtime.h"

namespace pk {
namespace generic {

#include "vec_generic.inc"

#include "../common/encoder_impl.inc"

const EncoderKernels kEncoder = {"generic", &add_layer_norm, &embed_layer_norm,
                                 &varlen_attention, &pool, &encoder_layer};

}  // namespace generic
}  // namespace pk
