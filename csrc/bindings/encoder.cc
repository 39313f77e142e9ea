// Encoder-layer bindings (ragged batches): add_layer_norm, embed_layer_norm,
// varlen_attention, pool, and encoder_layer (one whole BERT layer). Shared argument checks: checks.h; the boundary:
// docs/kernels.md.
#include "bindings.h"
#include "checks.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pk::bind {
namespace {

// ---- encoder-layer kernels (ragged batches) ----------------------------------
// The Python layer (pykernels/_encoder.py) checks dtypes, shapes and offsets with
// its own messages first; these checks guard memory: every pointer, stride,
// offset, id and position a kernel will read is verified here before the GIL is
// released.

// A 1-D contiguous aligned array of T (dtype kind `kind`), length n (n < 0: any).
template <class T>
const T* as_vector(py::handle h, const char* name, int64_t n, char kind, int64_t* len = nullptr) {
  if (!py::isinstance<py::array>(h))
    throw py::type_error(std::string(name) + " must be a numpy array");
  auto a = py::reinterpret_borrow<py::array>(h);
  const py::dtype dt = a.dtype();
  if (dt.kind() != kind || dt.itemsize() != static_cast<py::ssize_t>(sizeof(T)) ||
      dt.byteorder() == '>')
    throw py::type_error(std::string(name) + " has dtype " + dtype_name(a) + ", expected " +
                         (kind == 'f' ? "float32" : "int64"));
  if (a.ndim() != 1 || (n >= 0 && a.shape(0) != n))
    throw py::value_error(std::string(name) + " has shape " + std::string(py::str(a.attr("shape"))) +
                          ", expected (" + (n >= 0 ? std::to_string(n) : std::string("n")) + ",)");
  if (!(a.flags() & py::array::c_style) || !is_aligned(a.data(), sizeof(T)))
    throw py::value_error(std::string(name) + " must be C-contiguous and aligned");
  if (len) *len = a.shape(0);
  return static_cast<const T*>(a.data());
}

// A float32 matrix of `cols` columns (cols < 0: any) with unit column stride.
Matrix as_rows(py::handle h, const char* name, int64_t cols) {
  Matrix m = as_matrix(h, name);
  if (!m.aligned) throw py::value_error(std::string(name) + " is not 4-byte aligned; pass a copy");
  if (cols >= 0 && m.cols != cols)
    throw py::value_error(std::string(name) + " has " + std::to_string(m.cols) + " columns, expected " +
                          std::to_string(cols));
  if (m.rows > 0 && m.cols > 1 && m.cs != 1)
    throw py::value_error(std::string(name) + " must have unit stride along its last axis");
  return m;
}

// cu (batch + 1,) int64: cu[0] = 0, non-decreasing, cu[batch] = tokens.
// Returns the longest sequence.
int64_t check_offsets(const int64_t* cu, int64_t batch, int64_t tokens) {
  if (cu[0] != 0 || cu[batch] != tokens)
    throw py::value_error("cu_seqlens must start at 0 and end at the token count " +
                          std::to_string(tokens));
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (cu[b + 1] < cu[b]) throw py::value_error("cu_seqlens must be non-decreasing");
    longest = std::max(longest, cu[b + 1] - cu[b]);
  }
  return longest;
}

// out must be another array, or `in` itself exactly (same address and row stride).
bool same_or_disjoint(const Matrix& out, const Matrix& in) {
  return !overlaps(out, in) || (out.data == in.data && out.rs == in.rs);
}

pk::ParallelPolicy encoder_parallel(int threads) {
  pk::ParallelPolicy p;
  p.threads = threads >= 1 ? threads : pk::default_num_threads();
  return p;
}

// add_layer_norm(x, residual, gamma, beta, eps, out, threads): out may be x or residual.
void add_layer_norm_fwd(py::handle x_h, py::handle res_h, py::handle gamma_h, py::handle beta_h,
                        float eps, py::handle out_h, int threads) {
  const Matrix x = as_rows(x_h, "x", -1);
  pk::LayerNormArgs g;
  g.rows = x.rows;
  g.n = x.cols;
  g.x = x.data;
  g.x_rs = x.rs;
  Matrix res;
  if (!res_h.is_none()) {
    res = as_rows(res_h, "residual", x.cols);
    if (res.rows != x.rows) throw py::value_error("residual and x differ in rows");
    g.res = res.data;
    g.res_rs = res.rs;
  }
  g.gamma = as_vector<float>(gamma_h, "gamma", x.cols, 'f');
  g.beta = as_vector<float>(beta_h, "beta", x.cols, 'f');
  g.eps = eps;
  Matrix o = as_out(out_h, x.rows, x.cols);
  if (!o.aligned) throw py::value_error("out is not 4-byte aligned");
  if (!same_or_disjoint(o, x) || (g.res && !same_or_disjoint(o, res)))
    throw py::value_error("out overlaps an input; pass out=x, out=residual or a separate array");
  g.out = const_cast<float*>(o.data);
  g.o_rs = o.rs;
  const pk::ParallelPolicy par = encoder_parallel(threads);
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  pk::dispatch().encoder->add_layer_norm(g, par);
}

// embed_layer_norm(ids, type_ids, cu, word, pos, type, gamma, beta, eps, out, threads)
void embed_layer_norm_fwd(py::handle ids_h, py::handle tt_h, py::handle cu_h, py::handle word_h,
                          py::handle pos_h, py::handle type_h, py::handle gamma_h,
                          py::handle beta_h, float eps, py::handle out_h, int threads) {
  pk::EmbedArgs g;
  g.ids = as_vector<int64_t>(ids_h, "ids", -1, 'i', &g.tokens);
  int64_t ncu = 0;
  g.cu = as_vector<int64_t>(cu_h, "cu_seqlens", -1, 'i', &ncu);
  if (ncu < 1) throw py::value_error("cu_seqlens must hold batch + 1 >= 1 offsets");
  g.batch = ncu - 1;
  const int64_t longest = check_offsets(g.cu, g.batch, g.tokens);
  const Matrix word = as_rows(word_h, "word", -1);
  g.n = word.cols;
  const Matrix pos = as_rows(pos_h, "pos", g.n);
  const Matrix type = as_rows(type_h, "type", g.n);
  if (longest > pos.rows)
    throw py::value_error("a sequence of " + std::to_string(longest) + " tokens exceeds the " +
                          std::to_string(pos.rows) + " position embeddings");
  for (int64_t t = 0; t < g.tokens; ++t)
    if (g.ids[t] < 0 || g.ids[t] >= word.rows)
      throw py::value_error("ids[" + std::to_string(t) + "] = " + std::to_string(g.ids[t]) +
                            " is outside [0, " + std::to_string(word.rows) + ")");
  if (!tt_h.is_none()) {
    g.type_ids = as_vector<int64_t>(tt_h, "token_type_ids", g.tokens, 'i');
    for (int64_t t = 0; t < g.tokens; ++t)
      if (g.type_ids[t] < 0 || g.type_ids[t] >= type.rows)
        throw py::value_error("token_type_ids[" + std::to_string(t) + "] is outside [0, " +
                              std::to_string(type.rows) + ")");
  } else if (type.rows < 1) {
    throw py::value_error("type embeddings are empty");
  }
  g.word = word.data; g.word_rs = word.rs;
  g.pos = pos.data; g.pos_rs = pos.rs;
  g.type = type.data; g.type_rs = type.rs;
  g.gamma = as_vector<float>(gamma_h, "gamma", g.n, 'f');
  g.beta = as_vector<float>(beta_h, "beta", g.n, 'f');
  g.eps = eps;
  Matrix o = as_out(out_h, g.tokens, g.n);
  if (!o.aligned) throw py::value_error("out is not 4-byte aligned");
  if (overlaps(o, word) || overlaps(o, pos) || overlaps(o, type))
    throw py::value_error("out overlaps an embedding table");
  g.out = const_cast<float*>(o.data);
  g.o_rs = o.rs;
  const pk::ParallelPolicy par = encoder_parallel(threads);
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  pk::dispatch().encoder->embed_layer_norm(g, par);
}

// varlen_attention(qkv, cu, heads, scale, out, threads)
void varlen_attention_fwd(py::handle qkv_h, py::handle cu_h, int64_t heads, float scale,
                          py::handle out_h, int threads) {
  const Matrix qkv = as_rows(qkv_h, "qkv", -1);
  if (qkv.cols % 3 != 0) throw py::value_error("qkv must have 3 * hidden columns");
  const int64_t hidden = qkv.cols / 3;
  if (heads < 1 || hidden % heads != 0)
    throw py::value_error("heads must divide hidden = " + std::to_string(hidden));
  pk::VarlenAttentionArgs g;
  g.heads = heads;
  g.d = hidden / heads;
  if (g.d > pk::kMaxHeadDim)
    throw py::value_error("head_dim " + std::to_string(g.d) + " exceeds " +
                          std::to_string(pk::kMaxHeadDim));
  int64_t ncu = 0;
  g.cu = as_vector<int64_t>(cu_h, "cu_seqlens", -1, 'i', &ncu);
  if (ncu < 1) throw py::value_error("cu_seqlens must hold batch + 1 >= 1 offsets");
  g.batch = ncu - 1;
  // The task list stores sequence, head and query tile as int32 (attention_impl.inc, Task).
  if (g.batch > INT32_MAX || heads > INT32_MAX)
    throw py::value_error("varlen_attention supports up to 2^31 - 1 sequences and heads");
  g.max_len = check_offsets(g.cu, g.batch, qkv.rows);
  g.qkv = qkv.data;
  g.qkv_rs = qkv.rs;
  g.scale = scale;
  Matrix o = as_out(out_h, qkv.rows, hidden);
  if (!o.aligned) throw py::value_error("out is not 4-byte aligned");
  if (overlaps(o, qkv)) throw py::value_error("out overlaps qkv");
  g.out = const_cast<float*>(o.data);
  g.o_rs = o.rs;
  const pk::ParallelPolicy par = encoder_parallel(threads);
  const pk::Dispatch& d = pk::dispatch();
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  d.encoder->varlen_attention(g, par, d.attention_tiling);
}

// pool(x, cu, mode, normalize, out, threads): mode 0 mean, 1 cls, 2 max.
void pool_fwd(py::handle x_h, py::handle cu_h, int mode, bool normalize, py::handle out_h,
              int threads) {
  const Matrix x = as_rows(x_h, "x", -1);
  if (mode < 0 || mode > 2) throw py::value_error("internal: bad pooling mode");
  pk::PoolArgs g;
  int64_t ncu = 0;
  g.cu = as_vector<int64_t>(cu_h, "cu_seqlens", -1, 'i', &ncu);
  if (ncu < 1) throw py::value_error("cu_seqlens must hold batch + 1 >= 1 offsets");
  g.batch = ncu - 1;
  check_offsets(g.cu, g.batch, x.rows);
  g.n = x.cols;
  g.x = x.data;
  g.x_rs = x.rs;
  g.mode = static_cast<pk::PoolMode>(mode);
  g.normalize = normalize;
  Matrix o = as_out(out_h, g.batch, g.n);
  if (!o.aligned) throw py::value_error("out is not 4-byte aligned");
  if (overlaps(o, x)) throw py::value_error("out overlaps x");
  g.out = const_cast<float*>(o.data);
  g.o_rs = o.rs;
  const pk::ParallelPolicy par = encoder_parallel(threads);
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  pk::dispatch().encoder->pool(g, par);
}

// ---- one encoder layer ----------------------------------------------------------
// The byte range of a 1-D float array already checked by as_vector.
Matrix vector_range(const float* p, int64_t n) {
  Matrix r;
  r.rows = 1;
  r.cols = n;
  r.lo = reinterpret_cast<const char*>(p);
  r.hi = r.lo + sizeof(float) * n;
  return r;
}

// A PackedWeight (its _data, _code, _scale and _shape attributes, none of them
// trusted: checks as matmul's) of shape (k, n) with its bias (n,).
pk::LayerProjection as_projection(py::handle w_h, py::handle bias_h, const char* name, int64_t k,
                                  int64_t n, pk::Variant variant, const pk::Dispatch& d,
                                  std::vector<Matrix>& inputs) {
  if (!py::hasattr(w_h, "_data") || !py::hasattr(w_h, "_code") || !py::hasattr(w_h, "_shape"))
    throw py::type_error(std::string(name) + " must be a PackedWeight (pykernels.pack)");
  const auto shape = w_h.attr("_shape").cast<std::pair<int64_t, int64_t>>();
  if (shape.first != k || shape.second != n)
    throw py::value_error(std::string(name) + " has shape (" + std::to_string(shape.first) + ", " +
                          std::to_string(shape.second) + "), expected " + shape_str(k, n));
  pk::LayerProjection p;
  p.k = k;
  p.n = n;
  p.precision = w_h.attr("_code").cast<pk::Precision>();
  if (static_cast<int>(p.precision) < 0 || static_cast<int>(p.precision) >= pk::kNumPrecisions)
    throw py::value_error("internal: bad precision code");
  p.packed = checked_packed(w_h.attr("_data"), p.precision, k, n);
  if (pk::is_int8(p.precision)) {
    p.col_scale = checked_scales(w_h.attr("_scale"), n);
    if (k > kMaxKInt8)
      throw py::value_error("int8 supports K <= " + std::to_string(kMaxKInt8) + ", got K=" +
                            std::to_string(k));
  }
  p.bias = as_vector<float>(bias_h, (std::string(name) + " bias").c_str(), n, 'f');
  inputs.push_back(vector_range(p.bias, n));
  for (int v = 0; v < 2; ++v) p.run[v] = d.gemm->run[static_cast<int>(p.precision)][v];
  p.variant = variant;
  return p;
}

int64_t layer_scratch(int64_t tokens, int64_t hidden, int64_t inter, int threads) {
  if (tokens < 0 || hidden < 1 || inter < 1) throw py::value_error("bad layer shape");
  return pk::layer_scratch_floats(tokens, hidden, inter, encoder_parallel(threads).threads);
}

// encoder_layer(x, cu, heads, scale, eps, activation, variant, threads, scratch,
//               qkv, qkv_bias, out, out_bias, ln1_gamma, ln1_beta,
//               up, up_bias, down, down_bias, ln2_gamma, ln2_beta)
// x (tokens, H) is overwritten with the layer's output; scratch is a float32
// (>= layer_scratch(tokens, H, F, threads),) array.
void encoder_layer_fwd(py::handle x_h, py::handle cu_h, int64_t heads, float scale, float eps,
                       pk::Activation act, pk::Variant variant, int threads, py::handle scratch_h,
                       py::handle qkv_h, py::handle qkv_b, py::handle out_h, py::handle out_b,
                       py::handle ln1_g, py::handle ln1_b, py::handle up_h, py::handle up_b,
                       py::handle down_h, py::handle down_b, py::handle ln2_g, py::handle ln2_b) {
  const Matrix x0 = as_rows(x_h, "x", -1);
  const Matrix x = as_out(x_h, x0.rows, x0.cols);  // writeable, unit column stride
  if (!x.aligned) throw py::value_error("x is not 4-byte aligned");
  pk::EncoderLayerArgs g;
  g.tokens = x.rows;
  g.hidden = x.cols;
  const int64_t H = g.hidden;
  if (heads < 1 || H % heads != 0)
    throw py::value_error("heads must divide hidden = " + std::to_string(H));
  if (H / heads > pk::kMaxHeadDim)
    throw py::value_error("head_dim " + std::to_string(H / heads) + " exceeds " +
                          std::to_string(pk::kMaxHeadDim));
  g.heads = heads;
  int64_t ncu = 0;
  g.cu = as_vector<int64_t>(cu_h, "cu_seqlens", -1, 'i', &ncu);
  if (ncu < 1) throw py::value_error("cu_seqlens must hold batch + 1 >= 1 offsets");
  g.batch = ncu - 1;
  if (g.batch > INT32_MAX || heads > INT32_MAX)  // the attention task list's int32 fields
    throw py::value_error("encoder_layer supports up to 2^31 - 1 sequences and heads");
  g.max_len = check_offsets(g.cu, g.batch, g.tokens);
  if (static_cast<int>(act) < 0 || act > pk::Activation::kSilu)
    throw py::value_error("internal: bad activation code");
  if (variant != pk::Variant::kLatency && variant != pk::Variant::kThroughput &&
      variant != pk::Variant::kAuto)
    throw py::value_error("internal: bad variant code");
  const pk::Dispatch& d = pk::dispatch();
  std::vector<Matrix> inputs;  // what the layer reads and never writes
  if (!py::hasattr(up_h, "_shape")) throw py::type_error("up must be a PackedWeight");
  const int64_t F = up_h.attr("_shape").cast<std::pair<int64_t, int64_t>>().second;
  if (F < 1) throw py::value_error("up has no columns");
  g.inter = F;
  g.qkv = as_projection(qkv_h, qkv_b, "qkv", H, 3 * H, variant, d, inputs);
  g.out = as_projection(out_h, out_b, "out", H, H, variant, d, inputs);
  g.up = as_projection(up_h, up_b, "up", H, F, variant, d, inputs);
  g.down = as_projection(down_h, down_b, "down", F, H, variant, d, inputs);
  g.ln1_gamma = as_vector<float>(ln1_g, "ln1 gamma", H, 'f');
  g.ln1_beta = as_vector<float>(ln1_b, "ln1 beta", H, 'f');
  g.ln2_gamma = as_vector<float>(ln2_g, "ln2 gamma", H, 'f');
  g.ln2_beta = as_vector<float>(ln2_b, "ln2 beta", H, 'f');
  for (const float* v : {g.ln1_gamma, g.ln1_beta, g.ln2_gamma, g.ln2_beta})
    inputs.push_back(vector_range(v, H));
  g.eps = eps;
  g.scale = scale;
  g.act = act;
  pk::ParallelPolicy par = encoder_parallel(threads);
  // One query (a few dozen tokens): workers spin between the layer's short
  // parallel regions instead of parking, as the latency GEMMs do.
  par.spin = g.tokens <= 32;
  int64_t nscratch = 0;
  const float* scratch = as_vector<float>(scratch_h, "scratch", -1, 'f', &nscratch);
  if (!py::reinterpret_borrow<py::array>(scratch_h).writeable())
    throw py::value_error("scratch is read-only");
  // The scratch size below multiplies tokens by 4H + F: refuse shapes whose
  // product would wrap int64 (a writeable zero-stride view can claim 2^62 rows).
  if (g.tokens > (int64_t{1} << 40) / (4 * H + F + 1))
    throw py::value_error("x has " + std::to_string(g.tokens) + " rows: too many for one layer call");
  const int64_t need = pk::layer_scratch_floats(g.tokens, H, F, par.threads);
  if (nscratch < need)
    throw py::value_error("scratch holds " + std::to_string(nscratch) + " floats, the layer needs " +
                          std::to_string(need));
  const Matrix srange = vector_range(scratch, nscratch);
  if (overlaps(srange, x)) throw py::value_error("scratch overlaps x");
  for (const Matrix& in : inputs)
    if (overlaps(in, x) || overlaps(in, srange))
      throw py::value_error("x or scratch overlaps a bias or LayerNorm parameter");
  g.x = const_cast<float*>(x.data);
  g.x_rs = x.rs;
  g.scratch = const_cast<float*>(scratch);
  g.blocking = d.gemm_blocking;
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  d.encoder->encoder_layer(g, par, d.attention_tiling);
}

}  // namespace

void bind_encoder(py::module_& m) {
  m.def("add_layer_norm", &add_layer_norm_fwd, py::arg("x"), py::arg("residual"),
        py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("out"), py::arg("threads"));
  m.def("embed_layer_norm", &embed_layer_norm_fwd, py::arg("ids"), py::arg("token_type_ids"),
        py::arg("cu_seqlens"), py::arg("word"), py::arg("pos"), py::arg("type"),
        py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("out"), py::arg("threads"));
  m.def("varlen_attention", &varlen_attention_fwd, py::arg("qkv"), py::arg("cu_seqlens"),
        py::arg("heads"), py::arg("scale"), py::arg("out"), py::arg("threads"));
  m.def("pool", &pool_fwd, py::arg("x"), py::arg("cu_seqlens"), py::arg("mode"),
        py::arg("normalize"), py::arg("out"), py::arg("threads"));
  m.def("encoder_layer_scratch", &layer_scratch, py::arg("tokens"), py::arg("hidden"),
        py::arg("intermediate"), py::arg("threads"));
  m.def("encoder_layer", &encoder_layer_fwd, py::arg("x"), py::arg("cu_seqlens"),
        py::arg("heads"), py::arg("scale"), py::arg("eps"), py::arg("activation"),
        py::arg("variant"), py::arg("threads"), py::arg("scratch"), py::arg("qkv"),
        py::arg("qkv_bias"), py::arg("out"), py::arg("out_bias"), py::arg("ln1_gamma"),
        py::arg("ln1_beta"), py::arg("up"), py::arg("up_bias"), py::arg("down"),
        py::arg("down_bias"), py::arg("ln2_gamma"), py::arg("ln2_beta"));
}

}  // namespace pk::bind
