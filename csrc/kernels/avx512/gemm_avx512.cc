// AVX-512 kernels (compiled with -mavx512f/bw/vl/dq, -mavx512bf16, -mavx512vnni).
// 32 zmm registers: the 6x64 tile uses 24 accumulators + 4 B vectors + 1 A
// broadcast = 29 <= 32; M = 6 is also the natural latency quantum (a batch of up
// to 6 rows costs one pass over the weights).
// bf16 has two schemes over the same packed weights. "widen_fma" (the table's
// default) widens the packed pairs to fp32 (a shift and a mask) and uses FMA:
// on Sapphire/Emerald Rapids vdpbf16ps runs at half the FMA rate (173 vs 351
// GFLOP/s measured, issue 14), so convert-then-FMA keeps fp32 speed at half
// the bytes. "dpbf16ps" (kBF16Dot, swapped in by set_bf16_scheme when the CPU
// has AVX512_BF16; pykernels picks it where the measured vdpbf16ps rate is
// >= 1.5x the FMA rate, as on Zen 4: 234 vs 117 GFLOP/s per core) multiplies
// the packed pairs directly: 32 products per instruction instead of 16. int8 uses vpdpbusd when the CPU has
// AVX512_VNNI (kI8Vnni, swapped in by dispatch) and otherwise the exact vpmaddwd
// scheme of AVX2 at twice the width (kGemm). The VNNI tiles were never executed
// on the machines this was developed on (AVX2 only): their algorithm is the
// generic path's (gemm_generic.cc), tested everywhere; only the three
// intrinsics of VIVnni are specific to them.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {
namespace avx512 {

#include "vec_avx512.inc"

// int8 on AVX-512F/BW without VNNI (Skylake-X, Cascade Lake's F/BW subset).
struct VI {
  using act_t = int16_t;
  using reg = __m512i;
  using wreg = __m512i;
  using areg = __m512i;
  static constexpr int kRegsPerPanel = 2;  // 32 bytes (8 columns x 4 k) each
  static constexpr int kLanesPerCol = 2;
  static constexpr int kWeightBias = 0;
  // 2 accumulators per panel; 1x128 (16), 2x96 (24), 3x64 (24), ... 6x32 (24).
  static constexpr int kMR = 6;
  static constexpr int kMaxAcc = 24;
  static constexpr int kLatNP[kMR + 1] = {1, 8, 6, 4, 3, 2, 2};
  static reg zero() { return _mm512_setzero_si512(); }
  static areg bcast_a4(const int16_t* a) {
    long long x;
    std::memcpy(&x, a, sizeof(x));
    return _mm512_set1_epi64(x);
  }
  static wreg widen(const int8_t* group_row, int g) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_row + 32 * g)));
  }
  static reg madd(reg acc, wreg w, areg a) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, a)); }
  static void store(int32_t* p, reg v) { _mm512_storeu_si512(p, v); }
};

// int8 with AVX512_VNNI: vpdpbusd multiplies u8 x s8 in groups of 4 and adds
// into int32 lanes: 64 multiply-adds per instruction, 4x vpmaddwd's 16 and no
// widening. The packed layout [K/4][16][4] is already its operand layout (one
// 64-byte panel group = one zmm). The unsigned operand is the weight, flipped
// to w + 128 by one vpxord per panel group and shared by MR rows; activations
// stay s8 and the epilogue removes 128 * sum_k a[k], a per-row sum computed by
// the quantization pass. (The alternative, a per-column 128 * sum_k w[k]
// folded in at pack time with activations as u8, would save the vpxord but
// change the packed format every precision shares.)
// Registers: 24 accumulators (6 rows x 4 panels) + 6 activation broadcasts +
// 1 weight = 31 of 32 zmm.
struct VIVnni {
  using act_t = int8_t;
  using reg = __m512i;
  using wreg = __m512i;
  using areg = __m512i;
  static constexpr int kRegsPerPanel = 1;
  static constexpr int kLanesPerCol = 1;
  static constexpr int kWeightBias = 128;
  // 1 accumulator per panel; 1-3x128 (<= 24), 4x96 (24), 5x64 (20), 6x64 (24).
  static constexpr int kMR = 6;
  static constexpr int kMaxAcc = 24;
  static constexpr int kLatNP[kMR + 1] = {1, 8, 8, 8, 6, 4, 4};
  static reg zero() { return _mm512_setzero_si512(); }
  static areg bcast_a4(const int8_t* a) {
    int32_t x;
    std::memcpy(&x, a, sizeof(x));
    return _mm512_set1_epi32(x);
  }
  static wreg widen(const int8_t* group_row, int) {
    return _mm512_xor_si512(_mm512_loadu_si512(group_row), _mm512_set1_epi8(static_cast<char>(0x80)));
  }
  static reg madd(reg acc, wreg w, areg a) { return _mm512_dpbusd_epi32(acc, w, a); }
  static void store(int32_t* p, reg v) { _mm512_storeu_si512(p, v); }
  // float(v - bias) per lane (the int32 subtraction wraps, as the epilogue's).
  static V::reg to_float_minus(reg v, int32_t bias) {
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(bias)));
  }
};

constexpr int kTputMR = 6;
constexpr int kTputNP = 4;
constexpr int kMaxAcc = 28;
// Latency tiles by rows: 1x128 (8 acc), 2x128 (16), 3x96 (18), 4x96 (24), 5-6x64.
constexpr int kLatNP[kTputMR + 1] = {1, 8, 8, 6, 6, 4, 4};

#include "../common/gemm_impl.inc"

// ---------------------------------------------------------------------------
// bf16 by vdpbf16ps. The packed layout [K/2][16][2] (gemm.h) is the
// instruction's operand layout: one 64-byte panel group is one zmm of 16
// (k, k+1) pairs, so B needs no new packing and no widening. Each row's A pair
// (a[k], a[k+1]) is broadcast as one 32-bit word. The drivers are those of the
// widening scheme (gemm_latency_packed / gemm_throughput_packed with this
// format; throughput without its widen_bf16_strip since FormatBF16Dot is not
// FormatBF16), so A arrives as they make it for kPairWordsA formats:
// bf16-rounded values with each pair's 32-bit word in the even slot, in place
// (latency: prepare_a's rows, a_cs = 1) or packed [kc][MR] (throughput:
// pack_a_block), and the tile broadcasts that word from memory (a load, no
// vector ALU work).
// Registers: MR x NP accumulators (at most 24: 6x64) + NP B vectors + the A
// broadcast <= 29 of 32 zmm, the fp32 tile shapes (kLatNP, kTputMR x kTputNP).

static inline __m512bh as_bh(__m512i x) {
  __m512bh r;
  std::memcpy(&r, &x, sizeof(r));  // a register move; SIMDe's types are structs
  return r;
}

template <int MR, int NP, bool PACKED_A>
static void tile_dpbf16(const Tile& t) {
  static_assert(kVecPerPanel == 1, "one zmm per 16-column panel");
  __m512 acc[MR][NP];
#pragma GCC unroll 64
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 64
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* a = t.a;
  const uint16_t* b = static_cast<const uint16_t*>(t.b);
  const int64_t a_rs = t.a_rs, a_cs = t.a_cs, b_ps = t.b_ps;
  for (int i = 0; i < MR; ++i) {  // as tile_kernel: C is read in the epilogue
    const float* crow = t.c + i * t.c_rs;
    for (int l = 0; l < NP; ++l) __builtin_prefetch(crow + l * kPanelCols, 1, 3);
    __builtin_prefetch(crow + NP * kPanelCols - 1, 1, 3);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < t.kc; k += 2) {
    if constexpr (!PACKED_A) {
#pragma GCC unroll 64
      for (int p = 0; p < NP; ++p)
        __builtin_prefetch(b + p * b_ps + kBPrefetchSteps * 2 * kPanelCols, 0, 0);
    }
    __m512bh bv[NP];
#pragma GCC unroll 64
    for (int p = 0; p < NP; ++p) bv[p] = as_bh(_mm512_loadu_si512(b + p * b_ps));
#pragma GCC unroll 64
    for (int i = 0; i < MR; ++i) {
      // the pair word prepare_a left in the even slot (a broadcast load)
      int32_t word;
      std::memcpy(&word, PACKED_A ? a + k * MR + i : a + i * a_rs + k * a_cs, sizeof(word));
      const __m512bh ai = as_bh(_mm512_set1_epi32(word));
#pragma GCC unroll 64
      for (int p = 0; p < NP; ++p) acc[i][p] = _mm512_dpbf16_ps(acc[i][p], bv[p], ai);
    }
    b += 2 * kPanelCols;
  }
  for (int i = 0; i < MR && i < t.mvalid; ++i) store_row<NP>(t, t.c + i * t.c_rs, acc[i]);
}

// The bf16 format with its own tile: same packed data, shapes and step as
// FormatBF16 (gemm_tiles.inc), so the drivers treat it alike.
struct FormatBF16Dot {
  using T = uint16_t;
  static constexpr bool kIsInt8 = false;
  static constexpr int kRows = kTputMR;
  static constexpr const int* kLatPanels = kLatNP;
  static constexpr int kTputPanels = kTputNP;
  static constexpr int kStep = 2;
  static constexpr bool kPairWordsA = true;  // prepare_a: pair words in the even slots
  template <int MR, int NP, bool PACKED_A>
  static void tile(const Tile& t) { tile_dpbf16<MR, NP, PACKED_A>(t); }
};

static void bf16dot_latency(const GemmArgs& g, const ParallelPolicy& par, const Blocking& blk) {
  gemm_latency_packed<FormatBF16Dot, uint16_t>(g, par, blk);
}

static void bf16dot_throughput(const GemmArgs& g, const ParallelPolicy& par, const Blocking& blk) {
  gemm_throughput_packed<FormatBF16Dot, uint16_t>(g, par, blk,
                                                  static_cast<const uint16_t*>(g.b_packed));
}

// int8_7bit (gemm.h): the same instructions on activations quantized to 7
// bits. No faster here (vpmaddwd and vpdpbusd are exact on 8 bits); offered so
// the precision exists on every ISA with the same results, and the policy,
// which measures it, simply does not pick it.
struct VI7 : VI {
  static constexpr int kActMax = 63;
};
struct VIVnni7 : VIVnni {
  static constexpr int kActMax = 63;
};

const GemmKernels kGemm = {
    "avx512",
    {meta_of<FormatF32>("fma"), meta_of<FormatBF16>("widen_fma"),
     meta_of<Int8Format<VI>>("vpmaddwd"), meta_of<Int8Format<VI7>>("vpmaddwd")},
    {{&f32_latency, &f32_throughput},
     {&bf16_latency, &bf16_throughput},
     {&i8_latency<VI>, &i8_throughput<VI>},
     {&i8_latency<VI7>, &i8_throughput<VI7>}}};

// Swapped into the table by dispatch when the CPU reports AVX512_VNNI.
const GemmPair kI8Vnni = {meta_of<Int8Format<VIVnni>>("vpdpbusd"),
                          {&i8_latency<VIVnni>, &i8_throughput<VIVnni>}};
const GemmPair kI8A7Vnni = {meta_of<Int8Format<VIVnni7>>("vpdpbusd"),
                            {&i8_latency<VIVnni7>, &i8_throughput<VIVnni7>}};

// Swapped into the table by set_bf16_scheme("dpbf16ps") on AVX512_BF16 CPUs.
const GemmPair kBF16Dot = {meta_of<FormatBF16Dot>("dpbf16ps"),
                           {&bf16dot_latency, &bf16dot_throughput}};

}  // namespace avx512
}  // namespace pk
