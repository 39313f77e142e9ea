// Packing of B into the fp32 panel layout (see gemm.h). Baseline code: a copy
// bound by memory bandwidth, so vector width does not matter here.
#include <cstring>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {

void pack_b_f32(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
                float* out, const ParallelPolicy& par) {
  const int64_t npanels = (n + kPanelCols - 1) / kPanelCols;
  auto pack_panel = [&](int64_t p, int) {
    const int64_t col0 = p * kPanelCols;
    const int64_t cols = n - col0 < kPanelCols ? n - col0 : kPanelCols;
    float* dst = out + p * k * kPanelCols;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float* src = b + kk * b_rs + col0 * b_cs;
      float* d = dst + kk * kPanelCols;
      if (b_cs == 1 && cols == kPanelCols) {
        std::memcpy(d, src, sizeof(float) * kPanelCols);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = src[c * b_cs];
        for (int64_t c = cols; c < kPanelCols; ++c) d[c] = 0.0f;
      }
    }
  };
  // Packing streams memory: parallel only when there is enough of it.
  const int threads = npanels * k >= 4096 ? par.threads : 1;
  parallel_for(npanels, threads, par.spin, pack_panel);
}

}  // namespace pk
