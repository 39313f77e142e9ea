// Attention contract shared by every ISA implementation.
//
// One entry point serves both public ops: `attention` (prefill, Sq >= 1) and
// `decode_attention` (Sq = 1 over a contiguous or paged KV cache).
//
//   out[b, h, i, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, g, j, :]) v[b, g, j, :]
//   g = h / (Hq / Hkv)                         (grouped-query attention)
//
// Masks, with L_b = kv_lens[b] (or Skv when kv_lens is null):
//   * padding: keys j >= L_b are masked, and never read;
//   * causal (aligned to the end of the sequence, so chunked prefill works):
//     row i sees j <= i + L_b - Sq.
// A row that sees no key is written as zeros (never NaN).
//
// Layout (all strides in *elements* of the array's own type, any sign):
//   q:   element (b, h, i, d) at q[b*q_bs + h*q_hs + i*q_ss + d]  (unit stride along D)
//   K/V: see KvCache; unit stride along D.
//   out: float32, (b, h, i, d) at out[b*o_bs + h*o_hs + i*o_ss + d]. `out` aliases
//        no input (the binding computes into a temporary when it would).
// Element types: float32, or bfloat16 stored as uint16 (converted to fp32 in
// registers by a 16-bit left shift). Q and K/V may differ; K and V share one.
// Softmax and accumulation are always fp32, with the same algorithm on every ISA.
//
// Preconditions (checked once, in the binding): batch, hq, sq, d >= 1;
// hkv >= 1 and hq % hkv == 0; d <= kMaxHeadDim; 0 <= L_b <= Skv (contiguous) or
// <= max_blocks * block_size (paged), and every block id that covers [0, L_b)
// is in [0, num_blocks). Skv may be 0.
#pragma once
#include <cstdint>

#include "pykernels/gemm.h"  // ParallelPolicy

namespace pk {

constexpr int64_t kMaxHeadDim = 256;

enum class ElemType : int { kF32 = 0, kBF16 = 1 };

// Where the key and value of (batch b, kv head g, position j) live.
//   contiguous (block_table == nullptr): k[b*k_bs + g*k_hs + j*k_ss + d]
//   paged (vLLM): blk = block_table[b*bt_stride + j / block_size],
//                 k[blk*k_bs + g*k_hs + (j % block_size)*k_ss + d]
// (and the same with the v_* strides for V).
struct KvCache {
  const void* k = nullptr;
  const void* v = nullptr;
  ElemType dtype = ElemType::kF32;
  int64_t k_bs = 0, k_hs = 0, k_ss = 0;
  int64_t v_bs = 0, v_hs = 0, v_ss = 0;
  const int32_t* block_table = nullptr;
  int64_t bt_stride = 0;
  int64_t block_size = 0;
};

struct AttentionArgs {
  int64_t batch = 0, hq = 0, hkv = 0, sq = 0, skv = 0, d = 0;
  const void* q = nullptr;
  ElemType q_dtype = ElemType::kF32;
  int64_t q_bs = 0, q_hs = 0, q_ss = 0;
  KvCache kv;
  float* out = nullptr;
  int64_t o_bs = 0, o_hs = 0, o_ss = 0;
  // Per-batch key counts, one of the two (or neither: every L_b = skv).
  const int32_t* kv_lens32 = nullptr;
  const int64_t* kv_lens64 = nullptr;
  float scale = 1.0f;
  bool causal = false;

  int64_t kv_len(int64_t b) const {
    return kv_lens64 ? kv_lens64[b] : (kv_lens32 ? kv_lens32[b] : skv);
  }
};

// Cache sizes the tiles are derived from (see attention_impl.inc).
struct AttentionTiling {
  int64_t l1d_bytes = 32 * 1024;
  int64_t l2_bytes = 512 * 1024;
};

// One ISA's attention kernels. Plain data only crosses this boundary.
//  latency:    split-KV (flash-decoding): every (batch, kv head, query tile) is
//              cut along the KV length so one sequence keeps every core busy;
//              partial (max, sum, O) merged with log-sum-exp weights.
//  throughput: one task per (batch, kv head, query tile), tiled online softmax,
//              tasks ordered longest first (balanced under causal masks).
//  exp2:       the vectorized 2^x the softmax uses (x <= 0), exposed for tests.
struct AttentionKernels {
  const char* isa;
  void (*latency)(const AttentionArgs&, const ParallelPolicy&, const AttentionTiling&);
  void (*throughput)(const AttentionArgs&, const ParallelPolicy&, const AttentionTiling&);
  void (*exp2)(const float* x, float* y, int64_t n);
};

namespace generic { extern const AttentionKernels kAttention; }
namespace avx2 { extern const AttentionKernels kAttention; }
namespace avx512 { extern const AttentionKernels kAttention; }

}  // namespace pk
