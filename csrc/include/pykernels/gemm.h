// fp32 GEMM contract shared by every ISA implementation.
//
//   C[m, n] = act(alpha * sum_k A[m, k] * B[k, n] + beta * C[m, n] + bias[n])
//
// Layout (all strides in *elements*, not bytes):
//   A: element (i, k) at a[i * a_rs + k * a_cs]. Any stride is legal, including
//      zero (broadcast views) and negative (reversed views); A is never packed on
//      the latency path, so its strides reach the micro-kernel.
//   B: either raw, element (k, j) at b[k * b_rs + j * b_cs], or packed (b_packed
//      != nullptr, raw pointers ignored): see kPanelCols below.
//   C: row stride c_rs, unit column stride (checked by the Python layer).
// beta == 0 means C is write-only: it may hold NaN/Inf on entry and is never read.
// bias may be null; activation is applied last. Nothing aliases C (the Python
// layer computes into a temporary when `out` overlaps an input).
// Sizes are int64; m, n, k >= 1 (the Python layer handles empty dimensions).
#pragma once
#include <cstdint>

namespace pk {

// Packed fp32 weight layout, identical for every ISA and both variants so that
// switching variant or machine never repacks: panels of 16 columns (one zmm, two
// ymm), K-major inside a panel, the last panel zero-padded:
//   packed[p][k][c] = B[k, 16 p + c]      shape (ceil(N/16), K, 16)
constexpr int kPanelCols = 16;

enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

struct GemmF32Args {
  int64_t m = 0, n = 0, k = 0;
  const float* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  const float* b = nullptr;         // raw B (used when b_packed == nullptr)
  int64_t b_rs = 0, b_cs = 0;
  const float* b_packed = nullptr;  // packed panels, see kPanelCols
  float* c = nullptr;
  int64_t c_rs = 0;
  float alpha = 1.0f, beta = 0.0f;
  const float* bias = nullptr;      // length n, or null
  Activation act = Activation::kNone;
};

// How a call may use the thread pool.
struct ParallelPolicy {
  int threads = 1;     // upper bound on threads, the caller included
  bool spin = false;   // latency calls: workers spin briefly before parking
};

// Cache-blocking parameters, derived once from the detected caches (see
// runtime/dispatch.cc for the arithmetic).
struct Blocking {
  int64_t kc = 256;    // K block: a KC x NR strip of B stays in L1
  int64_t mc = 120;    // M block: an MC x KC block of packed A stays in L2
  int64_t nc = 512;    // N block: the unit of parallel work along N
  int64_t l2_bytes = 512 * 1024;  // per-core L2, for buffers that should stay in it
};

// One ISA's kernel table. Every entry point takes plain data only: no vector
// types cross this boundary, so the baseline-compiled dispatcher never touches
// AVX registers.
struct GemmF32Kernels {
  const char* isa;
  const char* latency_name;     // e.g. "gemm_avx2_f32_lat_6x16"
  const char* throughput_name;  // e.g. "gemm_avx2_f32_6x16"
  void (*latency)(const GemmF32Args&, const ParallelPolicy&, const Blocking&);
  void (*throughput)(const GemmF32Args&, const ParallelPolicy&, const Blocking&);
};

namespace generic { extern const GemmF32Kernels kGemmF32; }
namespace avx2 { extern const GemmF32Kernels kGemmF32; }
namespace avx512 { extern const GemmF32Kernels kGemmF32; }

// Packs B (k x n, element strides b_rs/b_cs) into the panel layout. Baseline
// code (plain copies); `out` holds ceil(n/16) * k * 16 floats.
void pack_b_f32(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
                float* out, const ParallelPolicy& par);

}  // namespace pk
