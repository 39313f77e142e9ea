// Peak probe of the generic (baseline x86-64) path: fp32 multiply + add on
// 4-float vectors as the generic kernels compute (no FMA in the baseline ISA),
// and a read-bandwidth loop. Compiled with no ISA flags.
#include <cstdint>
#include <cstring>

#include "pykernels/peaks.h"

namespace pk {
namespace generic {
namespace {

constexpr int kAcc = 12;

int64_t mul_add_f32(int64_t iters, volatile float* sink) {
  float acc[kAcc][4];
  for (int i = 0; i < kAcc; ++i)
    for (int l = 0; l < 4; ++l) acc[i][l] = static_cast<float>(*sink) + i + l;
  const float x = 0.999999f, y = 1e-7f;
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i)
#pragma GCC unroll 4
      for (int l = 0; l < 4; ++l) acc[i][l] = acc[i][l] * x + y;
  float s = 0;
  for (int i = 0; i < kAcc; ++i)
    for (int l = 0; l < 4; ++l) s += acc[i][l];
  *sink = s;
  return iters * kAcc * 4 * 2;
}

int64_t read_bw(const float* p, int64_t bytes, int64_t reps, volatile float* sink) {
  const auto* q = reinterpret_cast<const unsigned char*>(p);
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i < bytes; i += 64)
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        uint64_t v;
        std::memcpy(&v, q + i + 8 * j, 8);
        acc[j] |= v;
      }
  uint64_t s = 0;
  for (int j = 0; j < 8; ++j) s |= acc[j];
  *sink = static_cast<float>(s & 1u);
  return bytes * reps;
}

}  // namespace

const PeakProbes kPeaks = {"generic", {{"fp32_fma", &mul_add_f32}, {nullptr, nullptr}}, &read_bw};

}  // namespace generic
}  // namespace pk
