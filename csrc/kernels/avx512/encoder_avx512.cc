// AVX-512 encoder kernels (compiled with -mavx512f/bw/vl/dq): residual add +
// LayerNorm, embedding gather + LayerNorm, pooling, 16 floats per zmm (see
// common/encoder_impl.inc). varlen_attention is attention_avx512.cc's.
// GCC 12's AVX-512 headers self-initialize their `_mm512_undefined_*` values,
// which -Wuninitialized flags in every inlined reduction (false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pykernels/encoder.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx512 {

#include "vec_avx512.inc"

#include "../common/encoder_impl.inc"

const EncoderKernels kEncoder = {"avx512", &add_layer_norm, &embed_layer_norm, &varlen_attention,
                                 &pool, &encoder_layer};

}  // namespace avx512
}  // namespace pk
