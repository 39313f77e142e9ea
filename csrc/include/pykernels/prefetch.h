// Software prefetches that the compiler keeps.
//
// GCC models no side effect for __builtin_prefetch, so a function made only of
// prefetches (a loop over the lines of the next tile, say) is found to have
// none, and every call to it is deleted once it is not inlined: the K/V
// prefetch of the attention kernels was gone from every ISA unit, and the
// first version of the raw-B chunk prefetch of the GEMM throughput variant
// too (found in the disassembly on 2026-12-07). An asm volatile statement is
// never removed. The instructions are SSE, present on every x86-64.
#pragma once

namespace pk {

enum class CacheLevel { kL1, kL2 };

// Requests the cache line holding *p, into L1 (prefetcht0) or L2 (prefetcht1).
template <CacheLevel kLevel>
inline void prefetch_line(const void* p) {
  if constexpr (kLevel == CacheLevel::kL1)
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
}

}  // namespace pk
