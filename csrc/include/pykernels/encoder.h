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

// One ISA's encoder kernels. Plain data only crosses this boundary.
struct EncoderKernels {
  const char* isa;
  void (*add_layer_norm)(const LayerNormArgs&, const ParallelPolicy&);
  void (*embed_layer_norm)(const EmbedArgs&, const ParallelPolicy&);
  void (*varlen_attention)(const VarlenAttentionArgs&, const ParallelPolicy&,
                           const AttentionTiling&);
  void (*pool)(const PoolArgs&, const ParallelPolicy&);
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
