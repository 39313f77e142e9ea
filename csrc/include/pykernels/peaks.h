// Measured peaks: register-only instruction-rate probes, compiled in each ISA's
// own translation unit with its flags, and a read-bandwidth probe. The
// runtime (runtime/peaks.cc, baseline code) times them on 1 and on all
// threads; pykernels.measure_peaks() caches the result per CPU model.
#pragma once
#include <cstdint>

namespace pk {

// One probe: runs `iters` iterations of a loop of independent register-only
// operations and returns the number of operations performed (flops for fp
// probes: an FMA is 2; multiply-adds x 2 for int8/int16 probes). The result of
// the loop is written to `sink` so the compiler keeps it.
using PeakProbeFn = int64_t (*)(int64_t iters, volatile float* sink);
// Reads `bytes` bytes at p (a multiple of 256) `reps` times; returns bytes read.
using ReadProbeFn = int64_t (*)(const float* p, int64_t bytes, int64_t reps, volatile float* sink);

struct PeakProbe {
  const char* name;  // "fp32_fma", "bf16_dpbf16ps", "int8_vpdpbusd", "int16_vpmaddwd", "int8_vpmaddubsw"
  PeakProbeFn fn;    // null: the ISA unit lacks the instruction
};

constexpr int kMaxPeakProbes = 6;
struct PeakProbes {
  const char* isa;
  PeakProbe probes[kMaxPeakProbes];  // terminated by a null name
  ReadProbeFn read;
};

namespace generic { extern const PeakProbes kPeaks; }
namespace avx2 { extern const PeakProbes kPeaks; }
namespace avx512 { extern const PeakProbes kPeaks; }

}  // namespace pk

#include <string>
#include <vector>

namespace pk {

struct PeakRate {
  std::string name;
  double one = 0, all = 0;  // per second on 1 thread / on all threads
};

struct PeakReport {
  std::string isa;
  int threads = 1;               // "all threads": the default thread count
  std::vector<PeakRate> ops;     // operations/s per probe (an FMA = 2)
  std::vector<PeakRate> read;    // bytes/s, "l2", "l3", "dram"
};

// Runs every probe of the ISA in use (those its CPU supports) and the read
// bandwidth probes; ~`seconds` per timed run. Takes a few seconds in all.
PeakReport measure_peaks(double seconds);

// One-thread rates (`one`; `all` stays 0) of the named probes only, those the
// ISA in use has and the CPU supports, ~`seconds` per timed run (best of 7):
// what the bf16 scheme choice needs when no peaks are cached, in a few ms.
std::vector<PeakRate> measure_probes(const std::vector<std::string>& names, double seconds);

}  // namespace pk
