// Packing of B into the fp32 panel layout (see gemm.h). Baseline code: a copy
// bound by memory bandwidth, so vector width does not matter here.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {

#include "../kernels/common/quantize.inc"

void pack_b_f32(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
                float* out, const ParallelPolicy& par) {
  // Work unit: a group of up to 16 panels (256 columns). The loop order follows
  // the source's contiguous direction so every source stream is sequential:
  // row-major B walks each row's 1 KiB run of the group; column-major B walks
  // each column. (Visiting panel by panel instead reads 64 bytes from each of K
  // rows in turn: K interleaved streams that no prefetcher follows, ~6 GB/s.)
  constexpr int64_t kGroupPanels = 16;
  const int64_t npanels = (n + kPanelCols - 1) / kPanelCols;
  const int64_t ngroups = (npanels + kGroupPanels - 1) / kGroupPanels;
  const bool rows_contiguous = (b_cs < 0 ? -b_cs : b_cs) <= (b_rs < 0 ? -b_rs : b_rs);
  auto pack_group = [&](int64_t grp, int) {
    const int64_t p0 = grp * kGroupPanels;
    const int64_t p1 = p0 + kGroupPanels < npanels ? p0 + kGroupPanels : npanels;
    const int64_t col_end = p1 * kPanelCols < n ? p1 * kPanelCols : n;
    // Zero the padding columns of the last panel first.
    if (p1 == npanels && n % kPanelCols != 0) {
      float* last = out + (npanels - 1) * k * kPanelCols;
      for (int64_t kk = 0; kk < k; ++kk)
        for (int64_t c = n % kPanelCols; c < kPanelCols; ++c) last[kk * kPanelCols + c] = 0.0f;
    }
    if (rows_contiguous) {
      for (int64_t kk = 0; kk < k; ++kk) {
        const float* src = b + kk * b_rs;
        for (int64_t p = p0; p < p1; ++p) {
          float* d = out + (p * k + kk) * kPanelCols;
          const int64_t c0 = p * kPanelCols;
          if (b_cs == 1 && c0 + kPanelCols <= n) {
            std::memcpy(d, src + c0, sizeof(float) * kPanelCols);
          } else {
            const int64_t cols = (n - c0 < kPanelCols ? n - c0 : kPanelCols);
            for (int64_t c = 0; c < cols; ++c) d[c] = src[(c0 + c) * b_cs];
          }
        }
      }
    } else {
      for (int64_t col = p0 * kPanelCols; col < col_end; ++col) {
        const float* src = b + col * b_cs;
        float* d = out + (col / kPanelCols) * k * kPanelCols + col % kPanelCols;
        for (int64_t kk = 0; kk < k; ++kk) d[kk * kPanelCols] = src[kk * b_rs];
      }
    }
  };
  // Packing streams memory: parallel only when there is enough of it.
  const int threads = npanels * k >= 4096 ? par.threads : 1;
  parallel_for(ngroups, threads, par.spin, pack_group);
}

namespace {
uint16_t bf16_bits(float x) {
  float r = round_to_bf16(x);
  uint32_t u;
  std::memcpy(&u, &r, 4);
  return static_cast<uint16_t>(u >> 16);
}

// Writes element (k, col) of a `step`-grouped panel layout.
inline int64_t panel_index(int64_t k, int64_t col, int64_t k_padded, int step) {
  const int64_t p = col / kPanelCols, c = col % kPanelCols;
  return p * k_padded * kPanelCols + (k / step) * kPanelCols * step + c * step + k % step;
}
}  // namespace

void pack_b_bf16(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
                 uint16_t* out, double* err2, double* ref2) {
  const int64_t kp = pad_k(k, Precision::kBF16);
  const int64_t npanels = (n + kPanelCols - 1) / kPanelCols;
  std::memset(out, 0, sizeof(uint16_t) * npanels * kp * kPanelCols);
  double e2 = 0, r2 = 0;
  for (int64_t kk = 0; kk < k; ++kk) {
    for (int64_t col = 0; col < n; ++col) {
      const float w = b[kk * b_rs + col * b_cs];
      out[panel_index(kk, col, kp, 2)] = bf16_bits(w);
      const double d = static_cast<double>(w) - round_to_bf16(w);
      e2 += d * d;
      r2 += static_cast<double>(w) * w;
    }
  }
  *err2 = e2;
  *ref2 = r2;
}

void pack_b_i8(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
               int8_t* out, float* scale, double* err2, double* ref2) {
  const int64_t kp = pad_k(k, Precision::kI8);
  const int64_t npanels = (n + kPanelCols - 1) / kPanelCols;
  std::memset(out, 0, npanels * kp * kPanelCols);
  double e2 = 0, r2 = 0;
  // Two row-major passes (the source's usual contiguous direction): column
  // maxima, then quantization.
  for (int64_t col = 0; col < n; ++col) scale[col] = 0.0f;
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t col = 0; col < n; ++col)
      scale[col] = std::fmax(scale[col], std::fabs(b[kk * b_rs + col * b_cs]));
  // The quantization rule of quantize.inc (as for activations): 127 / max in
  // double, rounded to float32 unless that overflows (max < ~3.7e-37: tiny or
  // subnormal columns, which keep the double inv and product).
  std::vector<double> inv(static_cast<size_t>(n));
  std::vector<float> inv_f(static_cast<size_t>(n));
  std::vector<char> fits(static_cast<size_t>(n));
  for (int64_t col = 0; col < n; ++col) {
    inv[col] = scale[col] > 0.0f ? 127.0 / scale[col] : 0.0;
    fits[col] = quantize_inv_fits(inv[col]);
    inv_f[col] = fits[col] ? static_cast<float>(inv[col]) : 0.0f;
    scale[col] /= 127.0f;
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    for (int64_t col = 0; col < n; ++col) {
      const float w = b[kk * b_rs + col * b_cs];
      // The product in float32 (or double), then clamped and rounded in
      // double: for finite products rint exactly, and a NaN product (a NaN
      // weight, or an Inf one times a zero inv) clamps to -127 as fmax picks
      // the number (a NaN cast to int would be undefined).
      const double prod = fits[col] ? static_cast<double>(w * inv_f[col]) : w * inv[col];
      const double q = round_half_even(std::fmin(127.0, std::fmax(-127.0, prod)));
      out[panel_index(kk, col, kp, 4)] = static_cast<int8_t>(q);
      const double d = static_cast<double>(w) - static_cast<double>(q) * scale[col];
      e2 += d * d;
      r2 += static_cast<double>(w) * w;
    }
  }
  *err2 = e2;
  *ref2 = r2;
}

}  // namespace pk
