// Probe: does requesting a slice of B's rows (16 KiB apart, as in a 4096-wide
// row-major fp32 matrix) during a phase of FMAs make the later copy of it hit
// the cache? The question behind the plain-b copy of gemm_rows.inc.
//
//   g++ -O2 -mavx2 -mfma -o /tmp/prefetch_probe bench/native/prefetch_burst_probe.cc
//   /tmp/prefetch_probe MODE ROWS LINES ITERS
//
// MODE: -1 no request; 0 / 1 / 2 / 3 prefetcht0 / t1 / t2 / nta, all lines
// of the slice in one burst before the FMAs; 4 demand loads of every line (a
// burst that cannot be dropped); 10 + G one prefetcht0 every G iterations of
// the FMA loop. ROWS x LINES: the slice (16 x 16 = 16 KiB); ITERS: FMA loop
// iterations per phase (1000: ~6 us here). Prints the copy's rate and the
// time of each phase per slice. SMAPS=1 shows whether B got huge pages.
// Zen 3, 2026-12-07 (README, fifth session): -1: 5-7 GB/s, 0: 6-9, 4: 32-37
// (but the loads take 2.8 us), 13: 28-42 with the FMA phase slower by about
// the time the copy saved at ITERS = 1000, not at 3000.
#include <immintrin.h>
#include <sys/mman.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <unistd.h>
static inline double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
template <int H> static inline void pf(const void* p) {
  if (H == 0) asm volatile("prefetcht0 %0" ::"m"(*(const char*)p));
  else if (H == 1) asm volatile("prefetcht1 %0" ::"m"(*(const char*)p));
  else if (H == 2) asm volatile("prefetcht2 %0" ::"m"(*(const char*)p));
  else if (H == 3) asm volatile("prefetchnta %0" ::"m"(*(const char*)p));
}
__attribute__((noinline)) float compute_pf(int iters, float x, const float* nxt, int64_t N, int rows, int lines, int gap) {
  __m256 a = _mm256_set1_ps(x), b0 = _mm256_set1_ps(1.0001f), acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_set1_ps(j);
  int r = 0, l = 0, g = 0;
  for (int i = 0; i < iters; ++i) {
    if (++g == gap) {
      g = 0;
      if (r < rows) {
        asm volatile("prefetcht0 %0" ::"m"(*(const char*)(nxt + r * N + l * 16)));
        if (++l == lines) { l = 0; ++r; }
      }
    }
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(a, b0, acc[j]);
  }
  __m256 s = acc[0];
  for (int j = 1; j < 8; ++j) s = _mm256_add_ps(s, acc[j]);
  return _mm256_cvtss_f32(s);
}
__attribute__((noinline)) float compute(int iters, float x) {
  __m256 a = _mm256_set1_ps(x), b0 = _mm256_set1_ps(1.0001f), acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_set1_ps(j);
  for (int i = 0; i < iters; ++i)
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(a, b0, acc[j]);
  __m256 s = acc[0];
  for (int j = 1; j < 8; ++j) s = _mm256_add_ps(s, acc[j]);
  return _mm256_cvtss_f32(s);
}
int main(int argc, char** argv) {
  const int mode = atoi(argv[1]);   // -1 none, 0..3 hint
  const int rows = atoi(argv[2]);   // rows per slice
  const int lines = atoi(argv[3]);  // lines per row
  const int iters = atoi(argv[4]);  // compute iterations per phase
  const int64_t N = 4096, K = 4096;
  float* b = (float*)aligned_alloc(2 << 20, N * K * 4);
  madvise(b, N * K * 4, MADV_HUGEPAGE);
  for (int64_t i = 0; i < N * K; ++i) b[i] = i & 255;
  float* buf = (float*)aligned_alloc(64, 1 << 20);
  memset(buf, 0, 1 << 20);
  double tcopy = 0, tpf = 0, tcomp = 0; float sink = 0;
  const int64_t cols = lines * 16;
  int64_t nslices = 0;
  for (int rep = 0; rep < 3; ++rep)
  for (int64_t c0 = 0; c0 + cols <= N; c0 += cols)
    for (int64_t r0 = 0; r0 + 2 * rows <= K; r0 += rows) {
      // prefetch slice r0 + rows, compute, copy slice r0 (prefetched last phase)
      double t0 = now();
      const float* nxt = b + (r0 + rows) * N + c0;
      for (int r = 0; r < rows; ++r)
        for (int l = 0; l < lines; ++l) {
          const float* p = nxt + r * N + l * 16;
          if (mode == 4) { sink += *(volatile const float*)p; continue; }
          switch (mode) { case 0: pf<0>(p); break; case 1: pf<1>(p); break; case 2: pf<2>(p); break; case 3: pf<3>(p); break; default: break; }
        }
      double t1 = now();
      if (mode >= 10) sink += compute_pf(iters, sink, nxt, N, rows, lines, mode - 10);
      else sink += compute(iters, sink);
      double t2 = now();
      const float* cur = b + r0 * N + c0;
      for (int r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; c += 8)
          _mm256_storeu_ps(buf + r * (cols + 16) + c, _mm256_loadu_ps(cur + r * N + c));
      double t3 = now();
      tpf += t1 - t0; tcomp += t2 - t1; tcopy += t3 - t2; ++nslices;
    }
  const double bytes = double(nslices) * rows * cols * 4;
  if (getenv("SMAPS")) { char cmd[128]; snprintf(cmd, sizeof cmd, "grep AnonHugePages /proc/%d/smaps | sort | uniq -c | tail -3", getpid()); system(cmd); }
  printf("mode %d rows %d lines %d iters %d: copy %.1f GB/s (%.2f us/slice), pf %.2f us, compute %.2f us (sink %g)\n", mode, rows, lines, iters,
         bytes / tcopy / 1e9, tcopy / nslices * 1e6, tpf / nslices * 1e6, tcomp / nslices * 1e6, sink);
}
