// AVX-512 attention kernels (compiled with -mavx512f/bw/vl/dq; same templates as
// AVX2, 16 floats per register). 32 zmm registers:
//   scores, many rows: 6 keys x 4 zmm of query rows (64 rows, one task) = 24
//     accumulators + 4 Q + 1 broadcast = 29 zmm.
//   scores, few rows (dot along D): 1x8, 2x8, 3x4, 4x4 (rows x keys).
//   P.V: 6 rows x 4 zmm (24 accumulators) down to 1 row x 8 zmm (decode).
// bf16 K/V are converted to fp32 in registers (vpmovzxwd + vpslld) and fed to
// FMAs, so the numerics equal the AVX2 and generic paths; vdpbf16ps would round
// products differently and run at half the FMA rate on the parts we target.
// GCC 12's AVX-512 headers self-initialize their `_mm512_undefined_*` values,
// which -Wuninitialized flags in every inlined reduction/extract (false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pykernels/attention.h"
#include "pykernels/encoder.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx512 {

#include "vec_avx512.inc"

#include "attention_avx512_tiles.h"

#include "../common/attention_impl.inc"
#include "../common/attention_varlen.inc"  // varlen_attention (encoder.h)

const AttentionKernels kAttention = {"avx512", &attention_latency, &attention_throughput,
                                     &exp2_array};

}  // namespace avx512
}  // namespace pk
