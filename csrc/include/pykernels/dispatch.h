// The kernel table chosen once at import: the best ISA the CPU and OS support,
// capped by PYKERNELS_ISA. Nothing here runs per call.
#pragma once
#include <string>

#include "pykernels/attention.h"
#include "pykernels/encoder.h"
#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace pk {

struct Dispatch {
  Isa isa = Isa::kGeneric;       // the ISA in use
  Isa supported = Isa::kGeneric; // the best the machine supports
  bool capped = false;           // PYKERNELS_ISA lowered it
  const GemmKernels* gemm = nullptr;  // points at gemm_table
  GemmKernels gemm_table;             // the ISA's table, int8 entries swapped for
                                      // the VNNI ones when the CPU has them, bf16
                                      // entries by set_bf16_scheme
  GemmPair int8_default;              // the table's int8 entries at init
  GemmPair bf16_default;              // the table's bf16 entries at init (widen_fma,
                                      // widen_scalar on generic)
  Blocking gemm_blocking;
  const AttentionKernels* attention = nullptr;
  AttentionTiling attention_tiling;
  const EncoderKernels* encoder = nullptr;  // shares attention_tiling
};

// Resolves the table. `requested` is the PYKERNELS_ISA value ("" = best);
// an unknown name or one above what the machine supports throws
// std::invalid_argument with the reason.
void init_dispatch(const std::string& requested);
const Dispatch& dispatch();

// Swaps the int8 entries of the table: "default" (what init chose: vpmaddwd,
// or vpdpbusd on VNNI CPUs) or "vpmaddubsw" (AVX2 and generic paths: 7-bit
// activations, ~2x the activation rounding error, no VNNI needed). Returns the
// previous scheme's name; an unknown or unavailable name throws
// std::invalid_argument. Not synchronized with running kernels: call it before
// kernel calls start, or between them.
std::string set_int8_scheme(const std::string& scheme);

// Swaps the bf16 entries of the table: "widen" or its own name (what init
// chose on every ISA: widen_fma, or widen_scalar on generic) or "dpbf16ps" (avx512 with AVX512_BF16: vdpbf16ps on the packed pairs;
// see gemm.h for the accuracy of each). Returns the previous scheme's name; an
// unknown or unavailable name throws std::invalid_argument. The choice between
// them by measured rate ("auto") is made in Python (pykernels/_runtime.py),
// where the cached peaks are. Same synchronization caveat as set_int8_scheme.
std::string set_bf16_scheme(const std::string& scheme);
bool bf16_dot_available();  // "dpbf16ps" can be set

// Replaces the cache blocking init derived from the caches (the in-process
// form of PYKERNELS_BLOCKING, for tuning experiments that compare blockings
// interleaved in one process). Returns the previous blocking. Same
// synchronization caveat as set_int8_scheme.
Blocking set_gemm_blocking(int64_t kc, int64_t kc_latency, int64_t mc, int64_t nc);

}  // namespace pk
