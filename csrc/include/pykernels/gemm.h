// GEMM contract shared by every ISA implementation and every precision.
//
//   C[m, n] = act(alpha * sum_k A[m, k] * B[k, n] + beta * C[m, n] + bias[n])
//
// Layout (all strides in *elements*, not bytes):
//   A: fp32, element (i, k) at a[i * a_rs + k * a_cs]. Any stride is legal,
//      including zero (broadcast views) and negative (reversed views).
//   B: fp32 raw, element (k, j) at b[k * b_rs + j * b_cs] (precision kF32 and
//      b_packed == nullptr), or packed (see below) for every precision.
//   C: fp32, row stride c_rs, unit column stride (checked by the binding).
// beta == 0 means C is write-only: it may hold NaN/Inf on entry and is never read.
// bias may be null; activation is applied last. Nothing aliases C (the binding
// reports an overlap and the Python layer computes into a temporary).
// Sizes are int64; m, n, k >= 1 (the binding handles empty dimensions).
//
// Packed weights: panels of 16 columns (one zmm, two ymm), the last panel
// zero-padded; inside a panel, K-major groups of `step` consecutive k for each
// column, so every precision moves 64 bytes per panel per group:
//   fp32  step 1: packed[p][k][c]                    = B[k, 16p + c]
//   bf16  step 2: packed[p][k/2][c][k%2]             = bf16(B[k, 16p + c])
//   int8  step 4: packed[p][k/4][c][k%4]             = round(B[k, 16p+c] / scale[16p+c])
//   (int8_7bit reads the int8 panels; only its activation quantization differs)
// K is padded with zeros to a multiple of `step` (k_padded). One layout serves
// both variants and every ISA, so switching variant or machine never repacks.
// int8 is symmetric per output column (scale[c] = max|B[:, c]| / 127); the
// activations are quantized per row at call time (scale max|A[i, :]| / 127); both
// round x * float32(127 / max) in float32 (kernels/common/quantize.inc); the
// products are accumulated exactly in int32 and dequantized in the epilogue.
//
// bf16 accuracy: A is rounded to bf16 per call (round to nearest even), B at
// pack time; the products of the rounded values are exact in fp32 (8 x 8
// significant bits) and summed in fp32. The two bf16 schemes differ only in
// how the sum is formed:
//   widen_fma  one fp32 FMA per product, k in order (within a K block);
//   dpbf16ps   vdpbf16ps (AVX512_BF16): per packed pair, the two products are
//              added to the fp32 accumulator one after the other, "each
//              accumulation of the FMA" rounded to nearest even (Intel SDM),
//              with denormal inputs read as 0 and denormal results flushed
//              to 0 whatever MXCSR says.
// Both obey |C - C~| <= gamma_K * sum_k |a~_k b~_k| (gamma_K = K u / (1 - K u),
// u = 2^-24; C~ the exact sum of the rounded inputs' products), the bound of
// any fp32 summation order; dpbf16ps adds at most 2^-126 per step for the
// flushed denormals (2K * 1.2e-38, and products whose inputs are below 2^-126
// in magnitude count as 0).
#pragma once
#include <cstdint>

namespace pk {

constexpr int kPanelCols = 16;

enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };
// kI8A7 ("int8_7bit"): int8 weights in the int8 packed format, activations
// quantized per row to 7 bits (|a| <= 63, step max|row| / 63): twice the
// activation rounding error of kI8, for the AVX2 vpmaddubsw scheme's ~2x rate
// on CPUs without VNNI (gemm_avx2.cc). A precision of its own, not a global
// switch, so the policy can choose between the two per call by accuracy budget.
enum class Precision : int { kF32 = 0, kBF16 = 1, kI8 = 2, kI8A7 = 3 };
constexpr int kNumPrecisions = 4;
constexpr bool is_int8(Precision p) { return p == Precision::kI8 || p == Precision::kI8A7; }

constexpr int k_step(Precision p) { return p == Precision::kF32 ? 1 : (p == Precision::kBF16 ? 2 : 4); }
constexpr int64_t pad_k(int64_t k, Precision p) { return (k + k_step(p) - 1) / k_step(p) * k_step(p); }

struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  Precision precision = Precision::kF32;
  const float* a = nullptr;
  int64_t a_rs = 0, a_cs = 0;
  const float* b = nullptr;         // raw fp32 B (used when b_packed == nullptr)
  int64_t b_rs = 0, b_cs = 0;
  const void* b_packed = nullptr;   // packed panels of `precision`, see above
  const float* col_scale = nullptr; // int8: per-column weight scale (length >= n)
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
  int64_t kc = 256;    // K block of the throughput variant (runtime/dispatch.cc)
  int64_t kc_latency = 256;  // the latency variant's, before dividing by its panels
  int64_t mc = 120;    // M block: an MC x KC block of packed A stays in L2
  int64_t nc = 512;    // N block: the unit of parallel work along N
  int64_t l2_bytes = 512 * 1024;  // per-core L2, for buffers that should stay in it
};

// A kernel table holds kLatency and kThroughput (run[p][variant]); kAuto is a
// request only: the binding resolves it to one of the two by size before any
// table is indexed.
enum class Variant : int { kLatency = 0, kThroughput = 1, kAuto = 2 };

// The table index (0 latency, 1 throughput) that kAuto resolves to when no
// policy chooses: the binding and the encoder's layers share this rule.
// Interleaved medians on Zen 3 (AVX2, 1 and 2 threads; latency / throughput
// time, < 1 means latency is faster):
//  * up to 32 rows the latency kernels (A read in place, B streamed once)
//    win in every precision;
//  * small products on several threads: the throughput variant splits the
//    columns among threads and each macro-tile packs its own A; latency is
//    0.45x at 64^3 fp32, 0.55-0.60x bf16, 0.71x int8 on 2 threads, 0.52x /
//    0.66-0.71x / 1.03x at 128^3;
//  * fp32 and bf16 up to 128 rows: fp32 0.83-0.97x at 64^3-128^3 on one
//    thread (0.63x at 64^3 with a plain b), 0.80-0.83x at 64x1024^2 with a
//    plain b (throughput packs all of b per call), 0.94-0.95x on 2 threads at
//    64-128 x 1024^2 prepacked; bf16 (strips widened once from 13 rows on)
//    0.86-0.97x on 2 threads at 48-128 rows; except one thread on a
//    prepacked b beyond a small product (64-128 x 1024^2: fp32 1.02-1.09x,
//    bf16 1.10x: throughput's packed A serves all of N);
//  * int8 is within 3% either way beyond that.
inline int auto_variant(Precision precision, bool packed_b, int64_t m, int64_t k, int64_t n,
                        int threads) {
  if (m <= 32) return 0;
  constexpr int64_t kSmallMacs = 128 * 128 * 128;
  const bool small = m <= 128 && k <= kSmallMacs / m && n <= kSmallMacs / m / (k > 0 ? k : 1);
  if (threads > 1 && small) return 0;
  if (!is_int8(precision) && m <= 128 && (threads > 1 || !packed_b || small)) return 0;
  return 1;
}

using GemmFn = void (*)(const GemmArgs&, const ParallelPolicy&, const Blocking&);

// What a kernel is, as data (the registry's fields; pk.kernels() derives the
// printed name from them, and nothing parses a name). Filled from the same
// constants the tiles are compiled from (meta_of in common/gemm_impl.inc).
struct KernelMeta {
  const char* scheme;  // the instruction scheme: "fma", "widen_fma", "dpbf16ps" (AVX512_BF16,
                       // set_bf16_scheme), "vpmaddwd", "vpdpbusd",
                       // "vpmaddubsw" (7-bit activations, opt-in: set_int8_scheme)
  int mr, nr;          // register tile of the throughput kernel, rows x columns
  int k_step;          // consecutive k per packed group (1 fp32, 2 bf16, 4 int8)
};

// One ISA's kernel table, indexed [precision][variant]. Every entry point takes
// plain data only: no vector types cross this boundary, so the baseline-compiled
// dispatcher never touches AVX registers. Both variants of a precision share
// one packed format and tile family, so one KernelMeta per precision.
struct GemmKernels {
  const char* isa;
  KernelMeta meta[kNumPrecisions];
  GemmFn run[kNumPrecisions][2];
};

// One precision's two entry points: the int8 and bf16 schemes that dispatch
// swaps into a table when the CPU has the instruction (runtime/dispatch.cc).
struct GemmPair {
  KernelMeta meta;
  GemmFn run[2];
};

namespace generic {
extern const GemmKernels kGemm;
extern const GemmPair kI8Maddubs;  // scalar model of avx2::kI8Maddubs (7-bit activations)
}
namespace avx2 {
extern const GemmKernels kGemm;    // int8 by vpmaddwd
extern const GemmPair kI8AvxVnni;  // int8 by VEX vpdpbusd (AVX-VNNI)
extern const GemmPair kI8A7AvxVnni;  // int8_7bit by VEX vpdpbusd (AVX-VNNI)
extern const GemmPair kI8Maddubs;  // int8 by vpmaddubsw, 7-bit activations (opt-in)
}
namespace avx512 {
extern const GemmKernels kGemm;    // int8 by vpmaddwd (AVX-512F/BW)
extern const GemmPair kI8Vnni;     // int8 by vpdpbusd (AVX512_VNNI)
extern const GemmPair kI8A7Vnni;   // int8_7bit by vpdpbusd (AVX512_VNNI)
extern const GemmPair kBF16Dot;    // bf16 by vdpbf16ps (AVX512_BF16), set_bf16_scheme
}

// ---- packing and quantization (baseline code, runtime/pack.cc) ---------------
// fp32: B (k x n, element strides) -> ceil(n/16) * k * 16 floats.
void pack_b_f32(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
                float* out, const ParallelPolicy& par);
// bf16 (round to nearest even, NaN kept quiet) -> ceil(n/16) * pad_k(k) * 16 uint16.
// Returns sum((B - bf16(B))^2) and sum(B^2) for the relative error.
void pack_b_bf16(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
                 uint16_t* out, double* err2, double* ref2);
// int8 symmetric per column -> ceil(n/16) * pad_k(k) * 16 int8 and scale[n].
void pack_b_i8(const float* b, int64_t k, int64_t n, int64_t b_rs, int64_t b_cs,
               int8_t* out, float* scale, double* err2, double* ref2);
}  // namespace pk
