// Test driver: the AVX-512 encoder unit (csrc/kernels/avx512/encoder_avx512.cc)
// and the varlen attention of the AVX-512 attention unit, compiled unchanged
// against SIMDe (tests/native/simde_shim/immintrin.h), checked against the
// generic units on the same ragged batches, and the AVX-512 encoder_layer
// (its chunking and fused add+LN) against the generic one, both running the
// generic fp32 GEMM entry points (the projections are the same code on both
// sides; the layer's own work is what differs). Built and driven by
// tests/test_encoder_kernels.py::test_avx512_encoder_unit_under_simde.
// Prints "encoder_avx512_simde: N cases, F failures" last.
//
// Tolerance: both paths compute the same formulas in fp32 with a different
// summation order (16 vs 4 lanes) and rounding (FMA vs two roundings), each
// within c sqrt(K) eps of the float64 value (tests/test_encoder_kernels.py
// derives those bounds; measured at < 5% of them), so their difference is
// bounded by 2 c sqrt(K) eps times the error scale of the output: with
// c = 8 (the LayerNorm/attention sketches' constants) and unit-scale data
// (N(0,1) inputs, outputs of order 1-4), 16 sqrt(K) eps (1 + |ref|).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "pykernels/encoder.h"
#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace {

int g_cases = 0, g_fail = 0;

void compare(const std::string& what, const std::vector<float>& got,
             const std::vector<float>& ref, int64_t k) {
  ++g_cases;
  const double eps = 1.0 / (1 << 23);
  for (size_t i = 0; i < ref.size(); ++i) {
    const double tol = 16.0 * std::sqrt(static_cast<double>(k)) * eps * (1.0 + std::fabs(ref[i]));
    if (!(std::fabs(static_cast<double>(got[i]) - ref[i]) <= tol)) {
      ++g_fail;
      std::printf("FAIL %s at %zu: avx512 %.9g generic %.9g tol %.3g\n", what.c_str(), i,
                  got[i], ref[i], tol);
      return;
    }
  }
}

std::vector<float> randn(std::mt19937& rng, size_t n, float mean = 0.0f) {
  std::normal_distribution<float> d(mean, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const std::vector<std::vector<int64_t>> length_sets = {
      {1}, {133}, {1, 200, 5, 17, 0, 64, 65}};
  pk::AttentionTiling tl;
  for (const auto& lens : length_sets) {
    std::vector<int64_t> cu(lens.size() + 1, 0);
    int64_t longest = 0;
    for (size_t b = 0; b < lens.size(); ++b) {
      cu[b + 1] = cu[b] + lens[b];
      longest = std::max(longest, lens[b]);
    }
    const int64_t tokens = cu.back(), batch = static_cast<int64_t>(lens.size());
    for (int threads = 1; threads <= 2; ++threads) {
      pk::ParallelPolicy par;
      par.threads = threads;
      const std::string tag = "tokens=" + std::to_string(tokens) + " t=" + std::to_string(threads);
      for (int64_t n : {384, 37, 16}) {
        auto x = randn(rng, tokens * n, 3.0f), r = randn(rng, tokens * n);
        auto gamma = randn(rng, n, 1.0f), beta = randn(rng, n);
        std::vector<float> o512(tokens * n), ogen(tokens * n);
        pk::LayerNormArgs a;
        a.rows = tokens; a.n = n; a.x = x.data(); a.x_rs = n; a.res = r.data(); a.res_rs = n;
        a.gamma = gamma.data(); a.beta = beta.data(); a.eps = 1e-12f; a.o_rs = n;
        a.out = o512.data();
        pk::avx512::kEncoder.add_layer_norm(a, par);
        a.out = ogen.data();
        pk::generic::kEncoder.add_layer_norm(a, par);
        compare("add_layer_norm n=" + std::to_string(n) + " " + tag, o512, ogen, n);

        const int64_t vocab = 50, max_pos = 256;
        auto word = randn(rng, vocab * n), pos = randn(rng, max_pos * n), type = randn(rng, 2 * n);
        std::vector<int64_t> ids(tokens), tt(tokens);
        for (int64_t t = 0; t < tokens; ++t) {
          ids[t] = static_cast<int64_t>(rng() % vocab);
          tt[t] = static_cast<int64_t>(rng() % 2);
        }
        pk::EmbedArgs e;
        e.tokens = tokens; e.batch = batch; e.n = n; e.ids = ids.data(); e.type_ids = tt.data();
        e.cu = cu.data(); e.word = word.data(); e.word_rs = n; e.pos = pos.data(); e.pos_rs = n;
        e.type = type.data(); e.type_rs = n; e.gamma = gamma.data(); e.beta = beta.data();
        e.o_rs = n;
        e.out = o512.data();
        pk::avx512::kEncoder.embed_layer_norm(e, par);
        e.out = ogen.data();
        pk::generic::kEncoder.embed_layer_norm(e, par);
        compare("embed_layer_norm n=" + std::to_string(n) + " " + tag, o512, ogen, n);

        for (int mode = 0; mode < 3; ++mode)
          for (int norm = 0; norm < 2; ++norm) {
            std::vector<float> p512(batch * n), pgen(batch * n);
            pk::PoolArgs p;
            p.batch = batch; p.n = n; p.x = x.data(); p.x_rs = n; p.cu = cu.data();
            p.mode = static_cast<pk::PoolMode>(mode); p.normalize = norm; p.o_rs = n;
            p.out = p512.data();
            pk::avx512::kEncoder.pool(p, par);
            p.out = pgen.data();
            pk::generic::kEncoder.pool(p, par);
            // the mean sums up to `longest` rows one by one: K = longest
            compare("pool mode=" + std::to_string(mode) + " norm=" + std::to_string(norm) +
                        " n=" + std::to_string(n) + " " + tag,
                    p512, pgen, std::max<int64_t>(n, longest));
          }
      }
      {
        // One layer, H = 48 (3 heads of 16), F = 80: N(0,1) weights / sqrt(K)
        // keep the activations O(1); K of the tolerance = F, the longest sum.
        const int64_t H = 48, F = 80;
        auto weight = [&](int64_t k, int64_t n) {
          auto w = randn(rng, k * n);
          for (auto& v : w) v /= std::sqrt(static_cast<float>(k));
          std::vector<float> packed(((n + 15) / 16) * k * 16);
          pk::ParallelPolicy one;
          pk::pack_b_f32(w.data(), k, n, n, 1, packed.data(), one);
          return packed;
        };
        auto wqkv = weight(H, 3 * H), wo = weight(H, H), wu = weight(H, F), wd = weight(F, H);
        auto bqkv = randn(rng, 3 * H), bo = randn(rng, H), bu = randn(rng, F), bd = randn(rng, H);
        auto g1 = randn(rng, H, 1.0f), b1 = randn(rng, H), g2 = randn(rng, H, 1.0f),
             b2 = randn(rng, H);
        auto proj = [&](const std::vector<float>& w, const std::vector<float>& b, int64_t k,
                        int64_t n) {
          pk::LayerProjection p;
          p.k = k;
          p.n = n;
          p.packed = w.data();
          p.bias = b.data();
          p.run[0] = pk::generic::kGemm.run[0][0];
          p.run[1] = pk::generic::kGemm.run[0][1];
          return p;
        };
        pk::EncoderLayerArgs la;
        la.tokens = tokens; la.batch = batch; la.hidden = H; la.heads = 3; la.inter = F;
        la.max_len = longest; la.cu = cu.data(); la.x_rs = H;
        la.qkv = proj(wqkv, bqkv, H, 3 * H); la.out = proj(wo, bo, H, H);
        la.up = proj(wu, bu, H, F); la.down = proj(wd, bd, F, H);
        la.ln1_gamma = g1.data(); la.ln1_beta = b1.data();
        la.ln2_gamma = g2.data(); la.ln2_beta = b2.data();
        la.scale = 0.25f;
        std::vector<float> scratch(pk::layer_scratch_floats(tokens, H, F, threads));
        la.scratch = scratch.data();
        auto x0 = randn(rng, tokens * H);
        std::vector<float> l512 = x0, lgen = x0;
        la.x = l512.data();
        pk::avx512::kEncoder.encoder_layer(la, par, tl);
        la.x = lgen.data();
        pk::generic::kEncoder.encoder_layer(la, par, tl);
        compare("encoder_layer " + tag, l512, lgen, F);
      }
      for (auto hd : {std::pair<int64_t, int64_t>{12, 32}, {3, 20}, {2, 64}}) {
        const int64_t heads = hd.first, d = hd.second, hidden = heads * d, rs = 3 * hidden + 5;
        auto qkv = randn(rng, tokens * rs);
        std::vector<float> o512(tokens * hidden), ogen(tokens * hidden);
        pk::VarlenAttentionArgs v;
        v.batch = batch; v.heads = heads; v.d = d; v.max_len = longest; v.qkv = qkv.data() + 2;
        v.qkv_rs = rs; v.cu = cu.data(); v.scale = 1.0f / std::sqrt(static_cast<float>(d));
        v.o_rs = hidden;
        v.out = o512.data();
        pk::avx512::kEncoder.varlen_attention(v, par, tl);
        v.out = ogen.data();
        pk::generic::kEncoder.varlen_attention(v, par, tl);
        compare("varlen_attention h=" + std::to_string(heads) + " d=" + std::to_string(d) + " " +
                    tag,
                o512, ogen, std::max<int64_t>(d, longest));
      }
    }
  }
  std::printf("encoder_avx512_simde: %d cases, %d failures\n", g_cases, g_fail);
  return g_fail ? 1 : 0;
}
