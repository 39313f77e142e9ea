// Test driver: the AVX-512 attention unit, csrc/kernels/avx512/
// attention_avx512.cc, compiled unchanged against SIMDe's portable
// implementations of the AVX-512 intrinsics (tests/native/simde_shim/
// immintrin.h), so its W=16 tiles (score tiles of 4 vectors of rows, D in
// 16-float vectors, its P.V and dot tables, the 48 KiB / 2 MiB tile plan) run on
// any x86-64. Built and driven by tests/test_attention.py::test_avx512_unit_under_simde.
//
// usage: attention_avx512_simde B Hq Hkv Sq Skv D causal has_lens variant threads bf16 dir
//   reads dir/{q,k,v}.bin (float32, or uint16 bf16 when bf16=1, C order) and
//   dir/lens.bin (int64, when has_lens), writes dir/out.bin (float32).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "pykernels/attention.h"
#include "pykernels/runtime.h"

template <class T>
static std::vector<T> read_file(const std::string& path, size_t n) {
  std::vector<T> v(n);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {
    std::fprintf(stderr, "cannot read %zu items from %s\n", n, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

int main(int argc, char** argv) {
  if (argc != 13) {
    std::fprintf(stderr, "usage: %s B Hq Hkv Sq Skv D causal has_lens variant threads bf16 dir\n", argv[0]);
    return 2;
  }
  int64_t a[11];
  for (int i = 0; i < 11; ++i) a[i] = std::atoll(argv[i + 1]);
  const int64_t B = a[0], Hq = a[1], Hkv = a[2], Sq = a[3], Skv = a[4], D = a[5];
  const bool causal = a[6], has_lens = a[7], bf16 = a[10];
  const int variant = static_cast<int>(a[8]), threads = static_cast<int>(a[9]);
  const std::string dir = argv[12];
  const size_t nq = B * Hq * Sq * D, nk = B * Hkv * Skv * D;
  std::vector<float> qf, kf, vf;
  std::vector<uint16_t> qh, kh, vh;
  pk::AttentionArgs g;
  if (bf16) {
    qh = read_file<uint16_t>(dir + "/q.bin", nq);
    kh = read_file<uint16_t>(dir + "/k.bin", nk);
    vh = read_file<uint16_t>(dir + "/v.bin", nk);
    g.q = qh.data(); g.kv.k = kh.data(); g.kv.v = vh.data();
    g.q_dtype = g.kv.dtype = pk::ElemType::kBF16;
  } else {
    qf = read_file<float>(dir + "/q.bin", nq);
    kf = read_file<float>(dir + "/k.bin", nk);
    vf = read_file<float>(dir + "/v.bin", nk);
    g.q = qf.data(); g.kv.k = kf.data(); g.kv.v = vf.data();
  }
  std::vector<int64_t> lens;
  if (has_lens) {
    lens = read_file<int64_t>(dir + "/lens.bin", B);
    g.kv_lens64 = lens.data();
  }
  std::vector<float> out(nq, -1.0f);
  g.batch = B; g.hq = Hq; g.hkv = Hkv; g.sq = Sq; g.skv = Skv; g.d = D;
  g.q_bs = Hq * Sq * D; g.q_hs = Sq * D; g.q_ss = D;
  g.kv.k_bs = g.kv.v_bs = Hkv * Skv * D;
  g.kv.k_hs = g.kv.v_hs = Skv * D;
  g.kv.k_ss = g.kv.v_ss = D;
  g.out = out.data(); g.o_bs = Hq * Sq * D; g.o_hs = Sq * D; g.o_ss = D;
  g.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  g.causal = causal;
  pk::ParallelPolicy par;
  par.threads = threads;
  par.spin = variant == 0;
  pk::AttentionTiling tl;  // 32 KiB / 512 KiB: also try the 48 KiB / 2 MiB plan
  if (std::getenv("EMU_BIG_CACHES")) { tl.l1d_bytes = 48 * 1024; tl.l2_bytes = 2 * 1024 * 1024; }
  if (variant == 0) pk::avx512::kAttention.latency(g, par, tl);
  else pk::avx512::kAttention.throughput(g, par, tl);
  FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
  std::fwrite(out.data(), sizeof(float), nq, f);
  std::fclose(f);
  return 0;
}
