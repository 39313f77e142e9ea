// Encoder-layer building blocks over a ragged (packed) batch, shared by every ISA.
//
// A ragged batch packs the tokens of `batch` sequences densely, sequence b in
// rows [cu[b], cu[b+1]) (flash-attention's varlen `cu_seqlens`): cu[0] = 0,
// cu non-decreasing, cu[batch] = total tokens. Empty sequences are legal.
//
//   add_layer_norm:   out[r] = LN(x[r] + res[r]) * gamma + beta   (res may be null)
//   embed_layer_norm: out[t] = LN(word[ids[t]] + pos[t - cu[b]] + type[tt[t]]) * gamma + beta
//                     for t in sequence b; tt null means token type 0 everywhere
//   varlen_attention: out[t, h*D:(h+1)*D] = sum_j softmax_j(scale q_t . k_j) v_j over the
//                     keys j of t's own sequence (non-causal), with
//                     q_t = qkv[t, h*D:], k_j = qkv[j, H + h*D:], v_j = qkv[j, 2H + h*D:]
//   pool:             out[b] = mean / first / max of rows [cu[b], cu[b+1]), then
//                     optionally / max(||out[b]||_2, 1e-12); an empty sequence gives zeros
// LN(v) = (v - mean(v)) / sqrt(var(v) + eps), biased variance, fp32 throughout
// (mean first, then the variance of the centred row: two passes over a row in L1).
//
// Layout: every matrix is float32 with a row stride in elements and unit column
// stride; gamma, beta, ids, token types and cu are contiguous. Row strides of
// x / res / out may differ. Aliasing: add_layer_norm's out may be x or res
// exactly (element r, c is read before it is written); no other output aliases
// an input. The binding checks that every id, position and offset is in range
// before a kernel runs; the kernels trust this contract.
#pragma once
#include <cstdint>

#include "pykernels/attention.h"  // AttentionTiling
#include "pykernels/gemm.h"       // ParallelPolicy

namespace pk {

struct LayerNormArgs {
  int64_t rows = 0, n = 0;
  const float* x = nullptr;
  int64_t x_rs = 0;
  const float* res = nullptr;  // null: plain LayerNorm
  int64_t res_rs = 0;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  float eps = 1e-12f;
  float* out = nullptr;
  int64_t o_rs = 0;
};

struct EmbedArgs {
  int64_t tokens = 0, batch = 0, n = 0;
  const int64_t* ids = nullptr;         // (tokens,), each in [0, vocab)
  const int64_t* type_ids = nullptr;    // (tokens,) or null (type 0)
  const int64_t* cu = nullptr;          // (batch + 1,)
  const float* word = nullptr;          // (vocab, n), row stride word_rs
  int64_t word_rs = 0;
  const float* pos = nullptr;           // (max_pos, n): every sequence length <= max_pos
  int64_t pos_rs = 0;
  const float* type = nullptr;          // (types, n)
  int64_t type_rs = 0;
  const float* gamma = nullptr;
  const float* beta = nullptr;
  float eps = 1e-12f;
  float* out = nullptr;                 // (tokens, n)
  int64_t o_rs = 0;
};

struct VarlenAttentionArgs {
  int64_t batch = 0, heads = 0, d = 0;  // hidden H = heads * d; d <= kMaxHeadDim
  int64_t max_len = 0;                  // max_b (cu[b+1] - cu[b]), sizes the tiles
  const float* qkv = nullptr;           // (tokens, 3H) row stride qkv_rs: [Q | K | V]
  int64_t qkv_rs = 0;
  const int64_t* cu = nullptr;          // (batch + 1,)
  float scale = 1.0f;
  float* out = nullptr;                 // (tokens, H), row stride o_rs; no overlap with qkv
  int64_t o_rs = 0;
};

enum class PoolMode : int { kMean = 0, kCls = 1, kMax = 2 };

struct PoolArgs {
  int64_t batch = 0, n = 0;
  const float* x = nullptr;             // (tokens, n), row stride x_rs
  int64_t x_rs = 0;
  const int64_t* cu = nullptr;          // (batch + 1,)
  PoolMode mode = PoolMode::kMean;
  bool normalize = true;
  float* out = nullptr;                 // (batch, n), row stride o_rs; no overlap with x
  int64_t o_rs = 0;
};

// ---- one encoder layer (post-LN BERT) -------------------------------------------
//   qkv = x Wqkv + bqkv;  ctx = varlen_attention(qkv)
//   x   = LN1(ctx Wo + bo + x);  x = LN2(act(x Wu + bu) Wd + bd + x)
// x (tokens, hidden) is the residual stream, read and overwritten in place.
// Every projection is a packed weight of its own precision, run through the
// GEMM entry points of the dispatch table (`run`, indexed by variant), so the
// layer adds no GEMM of its own and follows whatever kernels the table holds.
struct LayerProjection {
  int64_t k = 0, n = 0;
  Precision precision = Precision::kF32;
  const void* packed = nullptr;        // panels of `precision` (gemm.h)
  const float* col_scale = nullptr;    // int8: (n,)
  const float* bias = nullptr;         // (n,), never null here
  GemmFn run[2] = {nullptr, nullptr};  // latency, throughput
  Variant variant = Variant::kAuto;    // kAuto: latency up to 32 rows, else throughput
};

// The row chunks of the post-attention part: after attention every row is
// independent, so out-proj -> add+LN -> FFN up -> FFN down -> add+LN run per
// chunk of `rows` rows, the chunk's (rows, intermediate) activation and the
// rows being normalized staying in the core's L2 (64 x 1536 floats = 384 KiB
// for MiniLM, in a 512 KiB L2) instead of a (tokens, 1536) buffer that streams
// through DRAM between the two FFN projections. With `workers` > 1 each worker
// runs whole chunks with single-threaded GEMMs (no fork/join per GEMM, and the
// chunk never leaves its core); with workers == 1 the chunks run in order and
// each GEMM uses every thread (the one-query case: a few dozen tokens).
struct LayerChunks {
  int64_t rows = 0, count = 0;
  int workers = 1;
};
// 64 rows: the activation of the chunk fits L2 (above); a worker is worth
// starting from 32 rows each, where a single-threaded throughput GEMM already
// runs at its large-M rate (~55-60 GFLOP/s per Zen 3 core measured at M = 64
// for MiniLM's shapes vs ~37-59 at M = 5184).
constexpr int64_t kLayerChunkRows = 64;
constexpr int64_t kLayerMinRowsPerWorker = 32;
inline LayerChunks layer_chunks(int64_t tokens, int threads) {
  LayerChunks c;
  if (tokens <= 0) return c;
  c.workers = threads > 1 && tokens >= threads * kLayerMinRowsPerWorker ? threads : 1;
  // At least one chunk per worker, chunks of equal size (the pool schedules
  // them dynamically, so a remainder costs at most one short chunk).
  int64_t count = (tokens + kLayerChunkRows - 1) / kLayerChunkRows;
  if (count < c.workers) count = c.workers;
  c.rows = (tokens + count - 1) / count;
  c.count = (tokens + c.rows - 1) / c.rows;
  return c;
}
// Floats of the layer's scratch: qkv (tokens, 3H), ctx (tokens, H), and per
// worker a chunk's projection output (rows, H) and FFN activation (rows, F);
// each buffer starts on a 64-byte boundary (16 floats).
inline int64_t layer_scratch_floats(int64_t tokens, int64_t hidden, int64_t inter, int threads) {
  const LayerChunks c = layer_chunks(tokens, threads);
  auto up16 = [](int64_t v) { return (v + 15) / 16 * 16; };
  return up16(tokens * 3 * hidden) + up16(tokens * hidden) +
         c.workers * (up16(c.rows * hidden) + up16(c.rows * inter)) + 16;
}

struct EncoderLayerArgs {
  int64_t tokens = 0, batch = 0, hidden = 0, heads = 0, inter = 0;
  int64_t max_len = 0;                  // longest sequence (attention tiles)
  const int64_t* cu = nullptr;          // (batch + 1,)
  float* x = nullptr;                   // (tokens, hidden), row stride x_rs, in/out
  int64_t x_rs = 0;
  LayerProjection qkv, out, up, down;   // (H, 3H), (H, H), (H, F), (F, H)
  const float* ln1_gamma = nullptr;
  const float* ln1_beta = nullptr;
  const float* ln2_gamma = nullptr;
  const float* ln2_beta = nullptr;
  float eps = 1e-12f;
  float scale = 1.0f;                   // attention scale, 1/sqrt(head_dim)
  Activation act = Activation::kGelu;   // FFN activation (fused into the up GEMM)
  float* scratch = nullptr;             // layer_scratch_floats(...) floats, no overlap with x
  Blocking blocking;                    // the dispatch table's, for the GEMMs
};

// One ISA's encoder kernels. Plain data only crosses this boundary.
struct EncoderKernels {
  const char* isa;
  void (*add_layer_norm)(const LayerNormArgs&, const ParallelPolicy&);
  void (*embed_layer_norm)(const EmbedArgs&, const ParallelPolicy&);
  void (*varlen_attention)(const VarlenAttentionArgs&, const ParallelPolicy&,
                           const AttentionTiling&);
  void (*pool)(const PoolArgs&, const ParallelPolicy&);
  void (*encoder_layer)(const EncoderLayerArgs&, const ParallelPolicy&, const AttentionTiling&);
};

// varlen_attention is defined in each ISA's attention unit: it runs that
// unit's tile plan and task kernel (attention_impl.inc) once per sequence.
namespace generic {
void varlen_attention(const VarlenAttentionArgs&, const ParallelPolicy&, const AttentionTiling&);
extern const EncoderKernels kEncoder;
}
namespace avx2 {
void varlen_attention(const VarlenAttentionArgs&, const ParallelPolicy&, const AttentionTiling&);
extern const EncoderKernels kEncoder;
}
namespace avx512 {
void varlen_attention(const VarlenAttentionArgs&, const ParallelPolicy&, const AttentionTiling&);
extern const EncoderKernels kEncoder;
}

}  // namespace pk
