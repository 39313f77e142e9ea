// Times the peak probes of the ISA in use on 1 and on all threads, and the
// read bandwidth at L2-, L3- and DRAM-sized working sets. Baseline code: the
// probes themselves live in the ISA units (peaks_<isa>.cc).
#include "pykernels/peaks.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "pykernels/dispatch.h"
#include "pykernels/runtime.h"

namespace pk {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Best of `reps` runs of fn on `threads` threads, in operations per second.
// Best, not median: other processes can only slow a register-only loop or a
// read stream down, never speed it up, so the fastest run is the closest to
// what the hardware does.
template <class Run>
double best_rate(int threads, int reps, Run run) {
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<int64_t> ops(static_cast<size_t>(threads), 0);
    auto task = [&](int64_t t, int) { ops[static_cast<size_t>(t)] = run(t); };
    const double t0 = now_s();
    parallel_for(threads, threads, false, task);
    const double dt = now_s() - t0;
    int64_t total = 0;
    for (int64_t o : ops) total += o;
    if (dt > 0 && total / dt > best) best = total / dt;
  }
  return best;
}

const PeakProbes& probes_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::kPeaks;
    case Isa::kAvx2: return avx2::kPeaks;
    default: return generic::kPeaks;
  }
}

bool probe_supported(const std::string& name, const CpuFeatures& f, Isa isa) {
  if (isa != Isa::kAvx512) return true;
  if (name == "bf16_dpbf16ps") return f.avx512_bf16;
  if (name == "int8_vpdpbusd") return f.avx512_vnni;
  return true;
}

// Iterations of probe p for ~per_run seconds on one thread.
int64_t calibrate(const PeakProbe& p, double per_run, volatile float* sink) {
  int64_t iters = 1 << 12;
  for (;;) {
    const double t0 = now_s();
    p.fn(iters, sink);
    const double dt = now_s() - t0;
    if (dt >= per_run / 4 || iters > (int64_t{1} << 40)) {
      iters = static_cast<int64_t>(iters * (per_run / (dt > 0 ? dt : 1e-9)));
      break;
    }
    iters *= 4;
  }
  return iters < 1 ? 1 : iters;
}

constexpr int kReps = 7;

}  // namespace

std::vector<PeakRate> measure_probes(const std::vector<std::string>& names, double seconds) {
  const Dispatch& d = dispatch();
  const CpuFeatures& f = cpu_features();
  const PeakProbes& pp = probes_for(d.isa);
  const double per_run = seconds > 0 ? seconds : 0.002;
  volatile float sink = 0.0f;
  std::vector<PeakRate> out;
  for (int i = 0; i < kMaxPeakProbes && pp.probes[i].name; ++i) {
    const PeakProbe& p = pp.probes[i];
    bool wanted = false;
    for (const std::string& n : names) wanted |= n == p.name;
    if (!wanted || !probe_supported(p.name, f, d.isa)) continue;
    const int64_t iters = calibrate(p, per_run, &sink);
    PeakRate r;
    r.name = p.name;
    r.one = best_rate(1, kReps, [&](int64_t) { return p.fn(iters, &sink); });
    out.push_back(r);
  }
  return out;
}

PeakReport measure_peaks(double seconds) {
  const Dispatch& d = dispatch();
  const CpuFeatures& f = cpu_features();
  const PeakProbes& pp = probes_for(d.isa);
  PeakReport rep;
  rep.isa = pp.isa;
  rep.threads = default_num_threads();
  const int all = rep.threads < 1 ? 1 : rep.threads;
  const double per_run = seconds > 0 ? seconds : 0.02;
  volatile float sink = 0.0f;
  for (int i = 0; i < kMaxPeakProbes && pp.probes[i].name; ++i) {
    const PeakProbe& p = pp.probes[i];
    if (!probe_supported(p.name, f, d.isa)) continue;
    const int64_t iters = calibrate(p, per_run, &sink);
    PeakRate r;
    r.name = p.name;
    r.one = best_rate(1, kReps, [&](int64_t) { return p.fn(iters, &sink); });
    r.all = best_rate(all, kReps, [&](int64_t) { return p.fn(iters, &sink); });
    rep.ops.push_back(r);
  }
  // Read bandwidth. Working sets per thread: half the L2 (stays in L2); the
  // L3 share (half of L3 split between the threads); DRAM: 8x L3 and at least
  // 256 MiB in total, so no cache holds it.
  const int64_t l3 = f.l3_bytes > 0 ? f.l3_bytes : 8 << 20;
  struct Level { const char* name; int64_t total_one, total_all; };
  const int64_t dram = 8 * l3 > (int64_t{256} << 20) ? 8 * l3 : (int64_t{256} << 20);
  const Level levels[] = {{"l2", f.l2_bytes / 2, f.l2_bytes / 2 * all},
                          {"l3", l3 / 2, l3 / 2},
                          {"dram", dram, dram}};
  for (const Level& lv : levels) {
    PeakRate r;
    r.name = lv.name;
    for (int pass = 0; pass < 2; ++pass) {
      const int threads = pass == 0 ? 1 : all;
      const int64_t total = pass == 0 ? lv.total_one : lv.total_all;
      const int64_t per_thread = total / threads / 256 * 256;
      if (per_thread < 256) continue;
      const size_t n = static_cast<size_t>(per_thread * threads / 4);
      std::unique_ptr<float[]> buf(new float[n + 16]);
      float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t{63});
      auto touch = [&](int64_t t, int) {  // each thread first-touches its own part
        std::memset(base + t * (per_thread / 4), 1, static_cast<size_t>(per_thread));
      };
      parallel_for(threads, threads, false, touch);
      // Repetitions for ~per_run seconds at ~20 GB/s, at least 1.
      int64_t reps = static_cast<int64_t>(per_run * 20e9 / static_cast<double>(per_thread));
      if (reps < 1) reps = 1;
      const double rate = best_rate(threads, 5, [&](int64_t t) {
        return pp.read(base + t * (per_thread / 4), per_thread, reps, &sink);
      });
      (pass == 0 ? r.one : r.all) = rate;
    }
    rep.read.push_back(r);
  }
  return rep;
}

}  // namespace pk
