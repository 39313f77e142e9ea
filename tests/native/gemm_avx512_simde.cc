// Test driver: the GEMM translation units whose instructions the development
// machines lack -- csrc/kernels/avx512/gemm_avx512.cc and csrc/kernels/avx2/
// gemm_avx2_vnni.cc -- compiled unchanged against SIMDe's portable
// implementations of the intrinsics (tests/native/simde_shim/immintrin.h), so
// every tile of them -- fp32, bf16, int8 by vpmaddwd, int8 by AVX512_VNNI
// vpdpbusd and by AVX-VNNI vpdpbusd -- runs on any x86-64. Every (precision,
// variant) entry of avx512::kGemm, of avx512::kI8Vnni and of avx2::kI8AvxVnni
// is checked against generic::kGemm on the same packed weights, over edge
// shapes, strided A, alpha/beta/bias/activation, one and two threads, and a
// small cache blocking that forces several K and M blocks:
//   int8 with alpha = 1, beta = 0, no bias, no activation: bit-identical (the
//        integer sums are exact and the epilogue is one rounding);
//   otherwise: |avx512 - generic| <= 2e-5 * (sum_k |a||b| + |beta c| + |bias| + 1)
//        (accumulation order and fused vs unfused multiply-add only).
// bf16 has two schemes on AVX-512, widen_fma (avx512::kGemm) and dpbf16ps
// (avx512::kBF16Dot, vdpbf16ps); both, and the generic path, are also checked
// against a float64 reference of the bf16-rounded inputs with the contract's
// bound (gemm.h): |got - ref| <= gamma_n * (|alpha| sum_k |a~ b~| + |beta c| +
// |bias|) + 1e-6 (|pre-activation| + 1), n = 2K + 8 roundings (K-block
// reloads of C and the epilogue included), times 1.2 for the activation's
// slope. SIMDe's vdpbf16ps does not flush denormals (the inputs here have
// none), so this checks the pairing and summation, not the FTZ/DAZ.
// Built and run by tests/test_avx512_simde.py.
// Prints one line per failing case; exit status 1 if any failed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace {

using pk::Activation;
using pk::Precision;

struct Case {
  int64_t m, k, n;
  int64_t a_cs;    // A column stride (1, or 3 for a strided view)
  float alpha, beta;
  bool bias;
  Activation act;
};

struct Packed {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  std::vector<int8_t> i8;
  std::vector<float> scale;
  const void* data(Precision p) const {
    return p == Precision::kF32 ? static_cast<const void*>(f32.data())
         : p == Precision::kBF16 ? static_cast<const void*>(bf16.data())
                                 : static_cast<const void*>(i8.data());
  }
};

Packed pack_all(const std::vector<float>& b, int64_t k, int64_t n) {
  Packed p;
  const int64_t np = (n + pk::kPanelCols - 1) / pk::kPanelCols;
  p.f32.resize(np * k * pk::kPanelCols);
  pk::pack_b_f32(b.data(), k, n, n, 1, p.f32.data(), pk::ParallelPolicy{});
  double e2, r2;
  p.bf16.resize(np * pk::pad_k(k, Precision::kBF16) * pk::kPanelCols);
  pk::pack_b_bf16(b.data(), k, n, n, 1, p.bf16.data(), &e2, &r2);
  p.i8.resize(np * pk::pad_k(k, Precision::kI8) * pk::kPanelCols);
  p.scale.resize(n);
  pk::pack_b_i8(b.data(), k, n, n, 1, p.i8.data(), p.scale.data(), &e2, &r2);
  return p;
}

std::vector<float> run(const pk::GemmKernels& t, Precision prec, int variant, const Case& c,
                       const std::vector<float>& a, const Packed& pw,
                       const std::vector<float>& bias, const std::vector<float>& c0,
                       int threads, const pk::Blocking& blk) {
  std::vector<float> out = c0;
  pk::GemmArgs g;
  g.m = c.m; g.n = c.n; g.k = c.k;
  g.precision = prec;
  g.a = a.data(); g.a_rs = c.k * c.a_cs; g.a_cs = c.a_cs;
  g.b_packed = pw.data(prec);
  g.col_scale = pk::is_int8(prec) ? pw.scale.data() : nullptr;
  g.c = out.data(); g.c_rs = c.n;
  g.alpha = c.alpha; g.beta = c.beta;
  g.bias = c.bias ? bias.data() : nullptr;
  g.act = c.act;
  t.run[static_cast<int>(prec)][variant](g, pk::ParallelPolicy{threads, false}, blk);
  return out;
}

// fp32 on a plain row-major B (b_packed null): rows b_rs floats apart.
std::vector<float> run_plain(const pk::GemmKernels& t, int variant, const Case& c,
                             const std::vector<float>& a, const std::vector<float>& b,
                             int64_t b_rs, const std::vector<float>& bias,
                             const std::vector<float>& c0, int threads, const pk::Blocking& blk) {
  std::vector<float> out = c0;
  pk::GemmArgs g;
  g.m = c.m; g.n = c.n; g.k = c.k;
  g.precision = Precision::kF32;
  g.a = a.data(); g.a_rs = c.k * c.a_cs; g.a_cs = c.a_cs;
  g.b = b.data(); g.b_rs = b_rs; g.b_cs = 1;
  g.c = out.data(); g.c_rs = c.n;
  g.alpha = c.alpha; g.beta = c.beta;
  g.bias = c.bias ? bias.data() : nullptr;
  g.act = c.act;
  t.run[static_cast<int>(Precision::kF32)][variant](g, pk::ParallelPolicy{threads, false}, blk);
  return out;
}

}  // namespace

namespace {

// A table under test: the entries of `rows` precisions only.
struct Table {
  pk::GemmKernels t;
  bool rows[pk::kNumPrecisions];
};

// `base` with one precision's entries replaced by a scheme's; only that row is tested.
Table with_pair(const pk::GemmKernels& base, Precision prec, const pk::GemmPair& pair) {
  const int p = static_cast<int>(prec);
  Table out{base, {false, false, false, false}};
  out.rows[p] = true;
  out.t.meta[p] = pair.meta;
  for (int v = 0; v < 2; ++v) out.t.run[p][v] = pair.run[v];
  return out;
}

uint16_t bf16_bits(float x) {  // round to nearest even, as pack_b_bf16 (finite inputs)
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
double bf16_value(float x) {
  const uint32_t u = static_cast<uint32_t>(bf16_bits(x)) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

double act64(double z, Activation act) {
  switch (act) {
    case Activation::kRelu: return z > 0 ? z : 0.0;
    case Activation::kGelu: return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case Activation::kGeluTanh:
      return 0.5 * z * (1.0 + std::tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)));
    case Activation::kSilu: return z / (1.0 + std::exp(-z));
    default: return z;
  }
}

// Elements of `got` outside the bf16 contract's bound around the float64
// product of the bf16-rounded inputs (see the top of this file); prints the first.
int bf16_contract_failures(const char* what, const Case& c, const std::vector<float>& got,
                           const std::vector<float>& a, const std::vector<float>& b,
                           const std::vector<float>& bias, const std::vector<float>& c0) {
  const double u = std::ldexp(1.0, -24);
  const double nu = (2.0 * c.k + 8) * u;
  const double gamma = nu / (1.0 - nu);
  for (int64_t i = 0; i < c.m; ++i)
    for (int64_t j = 0; j < c.n; ++j) {
      double s = 0.0, mag = 0.0;
      for (int64_t kk = 0; kk < c.k; ++kk) {
        const double p = bf16_value(a[(i * c.k + kk) * c.a_cs]) * bf16_value(b[kk * c.n + j]);
        s += p;
        mag += std::fabs(p);
      }
      const double beta_c = c.beta != 0.0f ? c.beta * static_cast<double>(c0[i * c.n + j]) : 0.0;
      const double bj = c.bias ? bias[j] : 0.0;
      const double z = c.alpha * s + beta_c + bj;
      const double want = act64(z, c.act);
      const double bound = 1.2 * gamma * (std::fabs(c.alpha) * mag + std::fabs(beta_c) + std::fabs(bj)) +
                           1e-6 * (std::fabs(z) + 1.0);
      const double got_ij = got[i * c.n + j];
      if (!(std::fabs(got_ij - want) <= bound)) {
        std::printf("FAIL %s bf16 contract m=%lld k=%lld n=%lld alpha=%g beta=%g bias=%d act=%d: "
                    "element (%lld, %lld) got %.9g want %.9g bound %.3g\n",
                    what, (long long)c.m, (long long)c.k, (long long)c.n, c.alpha, c.beta, c.bias,
                    static_cast<int>(c.act), (long long)i, (long long)j, got_ij, want, bound);
        return 1;
      }
    }
  return 0;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<Case> cases;
  const int64_t ms[] = {1, 2, 3, 5, 6, 7, 13, 33};
  const int64_t ks[] = {1, 3, 17, 64, 301};
  const int64_t ns[] = {1, 16, 17, 64, 100, 130};
  int pick = 0;
  for (int64_t m : ms)
    for (int64_t k : ks)
      for (int64_t n : ns) {
        if (++pick % 3 != 0 && !(m == 33 && k == 301)) continue;  // a third of the grid
        const bool plain = pick % 2 == 0;
        cases.push_back(Case{m, k, n, plain ? 1 : 3, plain ? 1.0f : 0.5f, plain ? 0.0f : 0.75f,
                             !plain, plain ? Activation::kNone
                                           : static_cast<Activation>(1 + pick % 4)});
      }
  // Blockings: what dispatch derives for a 48 KiB L1d / 2 MiB L2 machine with
  // the 6x64 tile (KC = 128, MC = 384), and a small one that makes even these
  // shapes span several K and M blocks.
  const pk::Blocking blockings[] = {{128, 384, 512, 2 << 20}, {32, 12, 64, 64 << 10}};
  const Table tables[] = {
      {pk::avx512::kGemm, {true, true, true, true}},
      with_pair(pk::avx512::kGemm, Precision::kI8, pk::avx512::kI8Vnni),
      with_pair(pk::avx512::kGemm, Precision::kI8A7, pk::avx512::kI8A7Vnni),
      with_pair(pk::generic::kGemm, Precision::kI8, pk::avx2::kI8AvxVnni),
      with_pair(pk::generic::kGemm, Precision::kI8A7, pk::avx2::kI8A7AvxVnni),
      with_pair(pk::avx512::kGemm, Precision::kBF16, pk::avx512::kBF16Dot)};
  int failures = 0, checks = 0;
  for (const Case& c : cases) {
    std::vector<float> a(c.m * c.k * c.a_cs), b(c.k * c.n), bias(c.n), c0(c.m * c.n);
    for (float& x : a) x = normal(rng);
    for (float& x : b) x = normal(rng);
    for (float& x : bias) x = normal(rng);
    for (float& x : c0) x = normal(rng);
    const Packed pw = pack_all(b, c.k, c.n);
    // Error scale per element: sum_k |a||b| (+ |beta c| + |bias| + 1).
    std::vector<double> scale(c.m * c.n);
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t j = 0; j < c.n; ++j) {
        double s = 1.0 + std::fabs(c.beta * c0[i * c.n + j]) + (c.bias ? std::fabs(bias[j]) : 0.0);
        for (int64_t kk = 0; kk < c.k; ++kk)
          s += std::fabs(static_cast<double>(a[(i * c.k + kk) * c.a_cs]) * b[kk * c.n + j]);
        scale[i * c.n + j] = s;
      }
    // fp32 on a plain row-major B, as NumPy hands it over (rows n apart) and as
    // a column slice of a wider array (rows n + 5 apart): the throughput
    // variant copies B chunk by chunk or packs it whole (by the number of row
    // blocks per thread), either way the values and order of the packed B, so
    // its result must be bit-identical to the same call on the packed weight;
    // the latency variant reads B in place, checked against generic.
    for (const int64_t extra : {int64_t{0}, int64_t{5}}) {
      std::vector<float> wide(c.k * (c.n + extra));
      for (int64_t kk = 0; kk < c.k; ++kk)
        std::memcpy(wide.data() + kk * (c.n + extra), b.data() + kk * c.n, sizeof(float) * c.n);
      const std::vector<float> ref = run(pk::generic::kGemm, Precision::kF32, 0, c, a, pw, bias,
                                         c0, 1, blockings[0]);
      for (const pk::Blocking& blk : blockings)
        for (int threads = 1; threads <= 2; ++threads) {
          const std::vector<float> packed =
              run(pk::avx512::kGemm, Precision::kF32, 1, c, a, pw, bias, c0, threads, blk);
          const std::vector<float> plain =
              run_plain(pk::avx512::kGemm, 1, c, a, wide, c.n + extra, bias, c0, threads, blk);
          ++checks;
          if (std::memcmp(packed.data(), plain.data(), sizeof(float) * packed.size()) != 0) {
            ++failures;
            std::printf("FAIL avx512 fp32 throughput plain B (b_rs=%lld) != packed: m=%lld k=%lld "
                        "n=%lld kc=%lld threads=%d\n", (long long)(c.n + extra), (long long)c.m,
                        (long long)c.k, (long long)c.n, (long long)blk.kc, threads);
          }
          const std::vector<float> lat =
              run_plain(pk::avx512::kGemm, 0, c, a, wide, c.n + extra, bias, c0, threads, blk);
          ++checks;
          for (int64_t e = 0; e < c.m * c.n; ++e) {
            const double d = std::fabs(static_cast<double>(lat[e]) - ref[e]);
            if (std::isnan(d) || d > 2e-5 * scale[e]) {
              ++failures;
              std::printf("FAIL avx512 fp32 latency plain B: m=%lld k=%lld n=%lld element %lld "
                          "got %.9g want %.9g\n", (long long)c.m, (long long)c.k, (long long)c.n,
                          (long long)e, lat[e], ref[e]);
              break;
            }
          }
        }
    }
    for (int p = 0; p < pk::kNumPrecisions; ++p) {
      const Precision prec = static_cast<Precision>(p);
      const bool exact = pk::is_int8(prec) && c.alpha == 1.0f && c.beta == 0.0f && !c.bias &&
                         c.act == Activation::kNone;
      for (int variant = 0; variant < 2; ++variant) {
        const std::vector<float> ref = run(pk::generic::kGemm, prec, variant, c, a, pw, bias, c0,
                                           1, blockings[0]);
        if (prec == Precision::kBF16) {
          ++checks;
          failures += bf16_contract_failures("generic widen_fma", c, ref, a, b, bias, c0);
        }
        for (const Table& table : tables) {
          if (!table.rows[p]) continue;
          const pk::GemmKernels* t = &table.t;
          for (const pk::Blocking& blk : blockings)
            for (int threads = 1; threads <= 2; ++threads) {
              const std::vector<float> got = run(*t, prec, variant, c, a, pw, bias, c0, threads, blk);
              ++checks;
              if (prec == Precision::kBF16)
                failures += bf16_contract_failures(t->meta[p].scheme, c, got, a, b, bias, c0);
              double worst = 0.0;
              int64_t at = 0;
              for (int64_t e = 0; e < c.m * c.n; ++e) {
                const double d = std::fabs(static_cast<double>(got[e]) - ref[e]);
                const double r = exact ? (d > 0.0 || std::isnan(got[e]) ? 1e30 : 0.0)
                                       : (std::isnan(d) ? 1e30 : d / (2e-5 * scale[e]));
                if (r > worst) { worst = r; at = e; }
              }
              if (worst > 1.0) {
                ++failures;
                std::printf("FAIL %s %s %dx%d p=%d variant=%d m=%lld k=%lld n=%lld a_cs=%lld alpha=%g beta=%g "
                            "bias=%d act=%d kc=%lld threads=%d: element %lld got %.9g want %.9g%s\n",
                            t->isa, t->meta[p].scheme, t->meta[p].mr, t->meta[p].nr, p, variant, (long long)c.m, (long long)c.k,
                            (long long)c.n, (long long)c.a_cs, c.alpha, c.beta, c.bias,
                            static_cast<int>(c.act), (long long)blk.kc, threads, (long long)at,
                            got[at], ref[at], exact ? " (must be bit-identical)" : "");
              }
            }
        }
      }
    }
  }
  std::printf("%d cases, %d checks, %d failures\n", static_cast<int>(cases.size()), checks, failures);
  return failures ? 1 : 0;
}
