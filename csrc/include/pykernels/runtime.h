// Runtime services used by the kernels: CPU features, the thread pool and the
// per-thread workspace. Compiled for the x86-64 baseline only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <vector>
#include "pykernels/prefetch.h"  // for the kernel units, which all include this header

namespace pk {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* isa_name(Isa isa);

struct CpuFeatures {
  // Each flag is the CPUID bit *and* the OS saving the register state (XCR0).
  bool avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vnni = false, avx512_fp16 = false, avx_vnni = false;
  bool amx = false;
  std::string vendor, model;
  int64_t l1d_bytes = 32 * 1024, l2_bytes = 512 * 1024, l3_bytes = 0;
  int cores = 1;  // CPUs this process may run on (sched_getaffinity)
  Isa best_isa() const;
  std::vector<std::string> names() const;
};

const CpuFeatures& cpu_features();  // detected once

// ---- thread pool -----------------------------------------------------------
// A persistent pool shared by every call. One parallel region runs at a time;
// a call that finds the pool busy (another Python thread is inside a kernel)
// runs its tasks on its own thread instead of queueing or oversubscribing.
// fn(ctx, task, slot): `slot` in [0, threads) identifies the executing thread
// within this region, so per-region scratch can be indexed by it.
using TaskFn = void (*)(void* ctx, int64_t task, int slot);
void parallel_for(int64_t ntasks, int threads, bool spin, TaskFn fn, void* ctx);

template <class F>
void parallel_for(int64_t ntasks, int threads, bool spin, F& f) {
  parallel_for(ntasks, threads, spin,
               [](void* c, int64_t t, int s) { (*static_cast<F*>(c))(t, s); }, &f);
}

// Most threads one call may use, the caller included: the pool's limit
// (runtime/threadpool.cc clamps to kMaxWorkers + 1 = 256).
constexpr int kMaxThreads = 256;
int default_num_threads();
void set_default_num_threads(int n);
// Measures the median fork/join cost (ns) of an empty parallel region.
double measure_fork_join_ns(int threads, bool spin, int reps);

// ---- workspace ---------------------------------------------------------------
// Per-calling-thread scratch, 64-byte aligned, grown on demand and reused, so a
// warm latency call allocates nothing. Slot 0..kWorkspaceSlots-1 are
// independent buffers. Throws std::bad_alloc (MemoryError in Python).
constexpr int kWorkspaceSlots = 4;
float* workspace_floats(int slot, size_t count);

// Scratch above this size is not kept between calls: workspace_trim() (run by
// the binding when a kernel call returns) frees it. Without a cap, one huge
// call (a raw B of 8192 x 8192 packed by the throughput variant: 256 MiB) pins
// its scratch for the life of the calling thread. 128 MiB per buffer keeps the
// scratch of ordinary calls warm (the latency path's is a few hundred KiB; the
// packed copy of a raw B up to 4096 x 8192); a call that needs more allocates
// it afresh, which costs about one more pass over that memory (page faults)
// next to a GEMM that streams it; prepack such a weight (pk.pack) to avoid it.
constexpr size_t kWorkspaceRetainBytes = size_t{128} << 20;
// Frees the calling thread's buffers larger than kWorkspaceRetainBytes.
void workspace_trim();
// Bytes of scratch the calling thread currently holds (for tests).
size_t workspace_held_bytes();

// a * b + add floats for workspace_floats, or std::bad_alloc (MemoryError) when
// that does not fit: sizes derive from the caller's shapes, which broadcast
// views make as large as int64 allows, and a wrapped product would allocate a
// small buffer that the kernel then overruns.
inline size_t workspace_count(int64_t a, int64_t b, int64_t add = 0) {
  int64_t r = 0;
  if (a < 0 || b < 0 || add < 0 || __builtin_mul_overflow(a, b, &r) ||
      __builtin_add_overflow(r, add, &r))
    throw std::bad_alloc();
  return static_cast<size_t>(r);
}

}  // namespace pk
