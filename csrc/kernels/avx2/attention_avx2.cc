// AVX2 + FMA attention kernels (compiled with -mavx2 -mfma -mf16c only).
// 16 ymm registers. Tiles (see attention_impl.inc for the loops):
//   scores, many rows: 6 keys x 2 ymm of query rows = 12 accumulators + 2 Q +
//     1 broadcast = 15 ymm; 12 independent FMAs cover the 4-cycle latency x 2 pipes.
//   scores, few rows (dot along D): 1x8, 2x4 (rows x keys) accumulators.
//   P.V: 6 rows x 2 ymm (12 accumulators) down to 1 row x 8 ymm (decode).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "pykernels/attention.h"
#include "pykernels/encoder.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx2 {

#include "vec_avx2.inc"

constexpr int kSKR = 6;
constexpr int kSNV = 2;
// Two rows at most: 2 rows x 4 keys = 8 accumulators + 4 K + 2 Q registers, 6
// loads per 8 FMAs; 4 rows x 2 keys made GCC fold Q into the FMAs (10 loads per
// 8 FMAs, load-port bound). More rows take several passes over the L1 tile.
constexpr int kDotRows = 2;
constexpr int kDotKB[kDotRows + 1] = {1, 8, 4};
constexpr int kPvMR = 6;
constexpr int kPvDC[kPvMR + 1] = {8, 8, 4, 3, 3, 2, 2};

#include "../common/attention_impl.inc"
#include "../common/attention_varlen.inc"  // varlen_attention (encoder.h)

const AttentionKernels kAttention = {"avx2", &attention_latency, &attention_throughput,
                                     &exp2_array};

}  // namespace avx2
}  // namespace pk
