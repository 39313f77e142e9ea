// Test driver: attention_impl.inc instantiated with the AVX-512 tile constants
// over a portable 16-lane vector (fused multiply-add per lane, as vfmadd does),
// so the W=16 control flow of the avx512 build (score tiles of 4 vectors of
// rows, D in 16-float vectors, its P.V and dot tables) runs on any x86-64.
// Built and driven by tests/test_attention.py::test_avx512_tiles_emulated.
//
// usage: attention_w16_emu B Hq Hkv Sq Skv D causal has_lens variant threads bf16 dir
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

namespace pk {
namespace emu16 {

struct AV {
  struct reg { float v[16]; };
  static constexpr int W = 16;
  template <class F> static reg map(F f) { reg r; for (int i = 0; i < W; ++i) r.v[i] = f(i); return r; }
  static reg zero() { return map([](int) { return 0.0f; }); }
  static reg load(const float* p) { return map([&](int i) { return p[i]; }); }
  static void store(float* p, reg x) { for (int i = 0; i < W; ++i) p[i] = x.v[i]; }
  static reg bcast(float x) { return map([&](int) { return x; }); }
  static reg fma(reg a, reg b, reg c) { return map([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); }); }
  static reg mul(reg a, reg b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
  static reg add(reg a, reg b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
  static reg sub(reg a, reg b) { return map([&](int i) { return a.v[i] - b.v[i]; }); }
  static reg max(reg a, reg b) { return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
  static reg select_lt(reg a, reg b, reg x, reg y) {
    return map([&](int i) { return a.v[i] < b.v[i] ? x.v[i] : y.v[i]; });
  }
  static reg load_bf16(const uint16_t* p) {
    return map([&](int i) {
      const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    });
  }
  static void keep(reg&) {}
  static float hsum(reg x) {  // pairwise, as the zmm reduction
    float s[16];
    for (int i = 0; i < 16; ++i) s[i] = x.v[i];
    for (int w = 8; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) s[i] += s[i + w];
    return s[0];
  }
  static reg round(reg x) { return map([&](int i) { return std::nearbyint(x.v[i]); }); }
  static reg pow2i(reg n) {
    return map([&](int i) {
      const int32_t e = n.v[i] == n.v[i] ? static_cast<int32_t>(n.v[i]) + 127 : 0;
      const uint32_t u = static_cast<uint32_t>(e) << 23;
      float f;
      std::memcpy(&f, &u, 4);
      return f;
    });
  }
};

#include "../../csrc/kernels/avx512/attention_avx512_tiles.h"
#include "../../csrc/kernels/common/attention_impl.inc"

}  // namespace emu16
}  // namespace pk

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
  if (variant == 0) pk::emu16::attention_latency(g, par, tl);
  else pk::emu16::attention_throughput(g, par, tl);
  FILE* f = std::fopen((dir + "/out.bin").c_str(), "wb");
  std::fwrite(out.data(), sizeof(float), nq, f);
  std::fclose(f);
  return 0;
}
