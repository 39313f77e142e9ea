// AVX2 + FMA encoder kernels (compiled with -mavx2 -mfma -mf16c only): residual
// add + LayerNorm, embedding gather + LayerNorm, pooling, 8 floats per ymm (see
// common/encoder_impl.inc). varlen_attention is attention_avx2.cc's.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pykernels/encoder.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx2 {

#include "vec_avx2.inc"

#include "../common/encoder_impl.inc"

const EncoderKernels kEncoder = {"avx2", &add_layer_norm, &embed_layer_norm, &varlen_attention,
                                 &pool, &encoder_layer};

}  // namespace avx2
}  // namespace pk
