#include "pykernels/dispatch.h"

#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace pk {
namespace {

Dispatch g_dispatch;

// Cache blocking from the detected caches, for a register tile of mr x nr.
//  KC, L1 rule (AVX2 and generic tiles): the B strip (KC x nr) and one A
//      micro-panel (mr x KC) share 3/4 of L1d:
//      32 KiB L1d, 6x16 tile: 24576 / (4 * 22) = 279 -> 256 (B strip 16 KiB).
//  KC, L2 rule (strip_in_l2: the AVX-512 6x64 tile): the B strip takes 1/8
//      of L2 and the tile streams it from there. Each k step of that tile
//      loads 256 bytes of B for 24 FMAs (~10 bytes a cycle, well within L2's
//      rate), while every K block costs the 6x64 C tile a read and a write in
//      the epilogue: the L1 rule's KC = 64 on a 32 KiB L1 left fp32 at 67%
//      and bf16 (vdpbf16ps) at 55% of peak. Zen 4 (1 MiB L2), 2 threads,
//      interleaved in one process, fp32 / bf16 throughput GFLOP/s at KC 64 ->
//      512: 256x4096^2 154 -> 195 / 248 -> 373, 2048^3 157 -> 186 / 256 -> 373,
//      4096x384x1536 159 -> 204 / 257 -> 372 (flat from 512 to 1024): 1 MiB
//      / 8 / (4 * 64) = 512, capped there.
//  KC for the latency variant (kc_latency, divided there by the tile's
//      panels): the L1 value on the L1 rule; 2 x KC on the L2 rule (256 for
//      the 6x64 tile: 16-128 rows x 384-1536 gained 1.10-1.27x fp32 and bf16
//      over 64, one case lost: fp32 16x4096^2, 0.92x).
//  MC: the packed A block (MC x KC) fills half of L2, the rest holds B strips
//      and C: 512 KiB L2, KC=256: 262144 / 1024 = 256 -> 252 (a multiple of 6).
//      On the L2 rule the B strip is the only other tenant: A takes L2 less
//      two strips (the one the tiles read, the next one requested): 1 MiB,
//      KC = 512, 6x64: (1024 - 256) KiB / 2 KiB = 384 rows, where half of L2
//      gave 252. Zen 5, 2 threads, 6 alternated rounds in one process, % of
//      peak at MC 252 -> 384: fp32 2048^3 89 -> 90, 5120x1536x384 87 -> 88;
//      bf16 5120x384x384 75 -> 77, 5120x384x1152 82 -> 83, 256x4096^2 78 ->
//      78; int8 5120x384x1152 83 -> 84, 5120x1536x384 78 -> 78 (an earlier
//      sweep: MC 504-1008 no better than 384, and bf16 256x4096^2 lost 8
//      points at 504).
//      Capped at 384 rows so a 1024-row problem still splits into >= 3 blocks.
//  NC: the width of one parallel macro-tile; B is prepacked, so NC only sets the
//      granularity of work: 512 columns.
// Bounds of a blocking set by hand (the buffers are products of these with
// the tile sizes: kept far from int64 overflow).
static bool blocking_in_range(int64_t kc, int64_t kc_latency, int64_t mc, int64_t nc) {
  constexpr int64_t kMax = 65536;
  return kc >= 8 && kc <= kMax && kc_latency >= 8 && kc_latency <= kMax && mc >= 1 &&
         mc <= kMax && nc >= 16 && nc <= kMax;
}

Blocking blocking_for(const CpuFeatures& f, int mr, int nr, bool strip_in_l2) {
  Blocking b;
  int64_t kc = strip_in_l2 ? f.l2_bytes / 8 / (4 * nr) : (f.l1d_bytes * 3 / 4) / (4 * (mr + nr));
  kc = kc / 32 * 32;
  b.kc = kc < 64 ? 64 : (kc > (strip_in_l2 ? 512 : 1024) ? (strip_in_l2 ? 512 : 1024) : kc);
  b.kc_latency = strip_in_l2 ? 2 * b.kc : b.kc;
  const int64_t a_bytes = strip_in_l2 ? f.l2_bytes - 2 * (4 * b.kc * nr) : f.l2_bytes / 2;
  int64_t mc = a_bytes / (4 * b.kc);
  mc = mc > 384 ? 384 : mc;
  mc = mc / mr * mr;
  b.mc = mc < mr ? mr : mc;
  b.nc = 512;
  b.l2_bytes = f.l2_bytes;
  return b;
}

// Replaces a table's entries of one precision by a scheme's.
void use_pair(GemmKernels& table, Precision prec, const GemmPair& pair) {
  const int p = static_cast<int>(prec);
  table.meta[p] = pair.meta;
  for (int v = 0; v < 2; ++v) table.run[p][v] = pair.run[v];
}
void use_int8(GemmKernels& table, const GemmPair& int8) { use_pair(table, Precision::kI8, int8); }

GemmPair pair_of(const GemmKernels& table, Precision prec) {
  const int p = static_cast<int>(prec);
  GemmPair out;
  out.meta = table.meta[p];
  for (int v = 0; v < 2; ++v) out.run[v] = table.run[p][v];
  return out;
}

}  // namespace

void init_dispatch(const std::string& requested) {
  const CpuFeatures& f = cpu_features();
  Dispatch d;
  d.supported = f.best_isa();
  d.isa = d.supported;
  if (!requested.empty()) {
    Isa want;
    if (requested == "generic") want = Isa::kGeneric;
    else if (requested == "avx2") want = Isa::kAvx2;
    else if (requested == "avx512") want = Isa::kAvx512;
    else
      throw std::invalid_argument("PYKERNELS_ISA='" + requested +
                                  "' is not one of generic, avx2, avx512");
    if (static_cast<int>(want) > static_cast<int>(d.supported))
      throw std::invalid_argument("PYKERNELS_ISA=" + requested + " is not supported by this CPU (best: " +
                                  isa_name(d.supported) + ")");
    d.capped = want != d.supported;
    d.isa = want;
  }
  switch (d.isa) {
    case Isa::kAvx512:
      d.gemm_table = avx512::kGemm;
      if (f.avx512_vnni) {
        use_int8(d.gemm_table, avx512::kI8Vnni);
        use_pair(d.gemm_table, Precision::kI8A7, avx512::kI8A7Vnni);
      }
      d.gemm_blocking = blocking_for(f, 6, 64, /*strip_in_l2=*/true);
      d.attention = &avx512::kAttention;
      d.encoder = &avx512::kEncoder;
      break;
    case Isa::kAvx2:
      d.gemm_table = avx2::kGemm;
      if (f.avx_vnni) {
        use_int8(d.gemm_table, avx2::kI8AvxVnni);
        use_pair(d.gemm_table, Precision::kI8A7, avx2::kI8A7AvxVnni);
      }
      d.gemm_blocking = blocking_for(f, 6, 16, false);
      d.attention = &avx2::kAttention;
      d.encoder = &avx2::kEncoder;
      break;
    default:
      d.gemm_table = generic::kGemm;
      d.gemm_blocking = blocking_for(f, 4, 16, false);
      d.attention = &generic::kAttention;
      d.encoder = &generic::kEncoder;
      break;
  }
  // Tuning override for experiments: PYKERNELS_BLOCKING="kc,mc,nc" (the
  // latency base keeps its ratio to kc); values out of range are ignored.
  if (const char* env = std::getenv("PYKERNELS_BLOCKING")) {
    long long kc = 0, mc = 0, nc = 0;
    if (std::sscanf(env, "%lld,%lld,%lld", &kc, &mc, &nc) == 3 && blocking_in_range(kc, kc, mc, nc)) {
      const int64_t ratio = d.gemm_blocking.kc_latency / d.gemm_blocking.kc;
      d.gemm_blocking.kc = kc / 8 * 8;
      d.gemm_blocking.kc_latency = ratio * kc / 8 * 8;
      d.gemm_blocking.mc = mc;
      d.gemm_blocking.nc = nc;
    }
  }
  d.int8_default = pair_of(d.gemm_table, Precision::kI8);
  d.bf16_default = pair_of(d.gemm_table, Precision::kBF16);
  d.attention_tiling.l1d_bytes = f.l1d_bytes;
  d.attention_tiling.l2_bytes = f.l2_bytes;
  g_dispatch = d;
  g_dispatch.gemm = &g_dispatch.gemm_table;
}

const Dispatch& dispatch() { return g_dispatch; }

std::string set_int8_scheme(const std::string& scheme) {
  const int p = static_cast<int>(Precision::kI8);
  const std::string previous = g_dispatch.gemm_table.meta[p].scheme;
  if (scheme == "default" || scheme == g_dispatch.int8_default.meta.scheme) {
    use_int8(g_dispatch.gemm_table, g_dispatch.int8_default);
  } else if (scheme == "vpmaddubsw" && g_dispatch.isa == Isa::kAvx2) {
    use_int8(g_dispatch.gemm_table, avx2::kI8Maddubs);
  } else if (scheme == "vpmaddubsw" && g_dispatch.isa == Isa::kGeneric) {
    use_int8(g_dispatch.gemm_table, generic::kI8Maddubs);
  } else {
    throw std::invalid_argument("int8 scheme '" + scheme + "' is not available on isa " +
                                isa_name(g_dispatch.isa) + " (choose 'default'" +
                                (g_dispatch.isa == Isa::kAvx512 ? "" : " or 'vpmaddubsw'") + ")");
  }
  return previous;
}

Blocking set_gemm_blocking(int64_t kc, int64_t kc_latency, int64_t mc, int64_t nc) {
  if (!blocking_in_range(kc, kc_latency, mc, nc))
    throw std::invalid_argument("gemm blocking needs 8 <= kc, kc_latency <= 65536, "
                                "1 <= mc <= 65536, 16 <= nc <= 65536");
  const Blocking previous = g_dispatch.gemm_blocking;
  g_dispatch.gemm_blocking.kc = kc / 8 * 8;
  g_dispatch.gemm_blocking.kc_latency = kc_latency / 8 * 8;
  g_dispatch.gemm_blocking.mc = mc;
  g_dispatch.gemm_blocking.nc = nc;
  return previous;
}

bool bf16_dot_available() {
  return g_dispatch.isa == Isa::kAvx512 && cpu_features().avx512_bf16;
}

std::string set_bf16_scheme(const std::string& scheme) {
  const std::string previous = g_dispatch.gemm_table.meta[static_cast<int>(Precision::kBF16)].scheme;
  const std::string widen = g_dispatch.bf16_default.meta.scheme;  // widen_fma, widen_scalar
  if (scheme == "widen" || scheme == widen) {
    use_pair(g_dispatch.gemm_table, Precision::kBF16, g_dispatch.bf16_default);
  } else if (scheme == "dpbf16ps" && bf16_dot_available()) {
    use_pair(g_dispatch.gemm_table, Precision::kBF16, avx512::kBF16Dot);
  } else if (scheme == "dpbf16ps") {
    throw std::invalid_argument(
        std::string("bf16 scheme 'dpbf16ps' is not available on isa ") + isa_name(g_dispatch.isa) +
        (g_dispatch.isa == Isa::kAvx512 ? " (this CPU lacks AVX512_BF16)"
                                        : " (it needs the avx512 path and AVX512_BF16)") +
        "; choose 'widen' (" + widen + ")");
  } else {
    throw std::invalid_argument("bf16 scheme '" + scheme + "' is not available (choose 'widen' (" +
                                widen + ")" + (bf16_dot_available() ? " or 'dpbf16ps'" : "") + ")");
  }
  return previous;
}

}  // namespace pk
