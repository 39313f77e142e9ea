// Attention bindings: attention (prefill), decode_attention (contiguous or
// paged cache), attention_exp2, set_bf16_dtype. Shared argument checks:
// checks.h; the boundary: docs/kernels.md.
#include "bindings.h"
#include "checks.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

namespace pk::bind {
namespace {

// ---- attention ----------------------------------------------------------------
// Checked here, once, before any kernel reads memory: dtypes, shapes, strides,
// Hq % Hkv, kv_lens ranges, every block id a paged call will read, and `out`.

PyObject* g_bf16_descr = nullptr;  // ml_dtypes.bfloat16, registered by pykernels._attention
int g_bf16_num = -1;

void set_bf16_dtype(py::object dt) {
  py::dtype d = py::dtype::from_args(dt);
  if (d.itemsize() != 2)
    throw py::value_error("bfloat16 dtype must have itemsize 2, got " +
                          std::to_string(d.itemsize()));
  g_bf16_num = d.num();
  g_bf16_descr = d.release().ptr();  // kept alive for the life of the module
}

enum class Kind { kF32, kBF16, kOther };

Kind elem_kind(const py::array& a) {
  PyObject* d = reinterpret_cast<PyObject*>(py::detail::array_proxy(a.ptr())->descr);
  if (d == g_f32_descr) return Kind::kF32;
  if (g_bf16_descr != nullptr && d == g_bf16_descr) return Kind::kBF16;
  py::dtype dt = a.dtype();
  if (dt.num() == py::dtype::of<float>().num() && dt.byteorder() != '>') return Kind::kF32;
  if (g_bf16_num >= 0 && dt.num() == g_bf16_num) return Kind::kBF16;
  return Kind::kOther;
}

// An n-D view: pointer, shape, element strides and the bytes it spans.
struct Tensor {
  const char* data = nullptr;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};  // elements
  Kind kind = Kind::kF32;
  const char* lo = nullptr;
  const char* hi = nullptr;
  bool aligned = true;  // data on an item-size boundary
  int64_t size() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
};

std::string shape_of(const Tensor& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(t.shape[i]);
  }
  return s + (t.ndim == 1 ? ",)" : ")");
}

bool tensors_overlap(const Tensor& x, const Tensor& y) {
  return x.size() > 0 && y.size() > 0 && x.lo < y.hi && y.lo < x.hi;
}

// `layout` names the axes for messages, e.g. "(B, Hq, Sq, D)". With `keep`, a
// misaligned input is replaced by an aligned copy (see aligned_input);
// without (outputs), it is returned with aligned = false.
Tensor as_tensor(py::handle h, const char* name, int ndim, const char* layout,
                 py::object* keep = nullptr) {
  if (!py::isinstance<py::array>(h))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray of float32 or bfloat16, got " +
                         std::string(py::str(py::type::handle_of(h).attr("__name__"))) +
                         "; use np.asarray(" + name + ", dtype=np.float32)");
  auto a = py::reinterpret_borrow<py::array>(h);
  Tensor t;
  t.kind = elem_kind(a);
  if (t.kind == Kind::kOther)
    throw py::type_error(std::string(name) + " has dtype " + dtype_name(a) +
                         ", expected float32 or bfloat16 (ml_dtypes.bfloat16); convert with " +
                         name + ".astype(np.float32)");
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D " + layout +
                          ", got " + std::to_string(a.ndim()) + "-D shape " +
                          std::string(py::str(a.attr("shape"))));
  const int64_t item = t.kind == Kind::kF32 ? 4 : 2;
  if (keep != nullptr && !is_aligned(a.data(), static_cast<size_t>(item)))
    return as_tensor(aligned_input(h, static_cast<size_t>(item), *keep), name, ndim, layout);
  t.aligned = is_aligned(a.data(), static_cast<size_t>(item));
  t.ndim = ndim;
  t.data = static_cast<const char*>(a.data());
  int64_t lo = 0, hi = 0;
  bool empty = false;
  for (int d = 0; d < ndim; ++d) {
    t.shape[d] = a.shape(d);
    const int64_t s = a.strides(d);
    if (s % item != 0)
      throw py::value_error(std::string(name) + " has stride " + std::to_string(s) +
                            " bytes, not a multiple of its item size " + std::to_string(item) +
                            "; pass np.ascontiguousarray(" + name + ")");
    t.stride[d] = s / item;
    if (t.shape[d] == 0) empty = true;
    const int64_t extent = (t.shape[d] - 1) * s;
    (extent < 0 ? lo : hi) += extent;
  }
  if (!empty && t.shape[ndim - 1] > 1 && t.stride[ndim - 1] != 1)
    throw py::value_error(std::string(name) + " must have unit stride along its last axis (D); "
                          "strides are " + std::string(py::str(a.attr("strides"))) +
                          "; pass np.ascontiguousarray(" + name + ")");
  t.lo = t.data + lo;
  t.hi = t.data + hi + item;
  return t;
}

pk::ElemType elem_type(Kind k) { return k == Kind::kBF16 ? pk::ElemType::kBF16 : pk::ElemType::kF32; }

// kv_lens: None, or a 1-D int32/int64 array of B entries in [0, cap].
void read_kv_lens(py::handle h, int64_t batch, int64_t cap, const char* cap_name,
                  pk::AttentionArgs& g, int64_t* max_len) {
  *max_len = cap;
  if (h.is_none()) return;
  if (!py::isinstance<py::array>(h))
    throw py::type_error("kv_lens must be a numpy array of int32 or int64");
  auto a = py::reinterpret_borrow<py::array>(h);
  const py::dtype dt = a.dtype();
  const bool i32 = dt.kind() == 'i' && dt.itemsize() == 4 && dt.byteorder() != '>';
  const bool i64 = dt.kind() == 'i' && dt.itemsize() == 8 && dt.byteorder() != '>';
  if (!i32 && !i64)
    throw py::type_error("kv_lens has dtype " + dtype_name(a) +
                         ", expected int32 or int64; convert with kv_lens.astype(np.int64)");
  if (a.ndim() != 1 || a.shape(0) != batch)
    throw py::value_error("kv_lens has shape " + std::string(py::str(a.attr("shape"))) +
                          ", expected (" + std::to_string(batch) + ",) (one length per batch item)");
  if (batch > 1 && a.strides(0) != dt.itemsize())
    throw py::value_error("kv_lens must be contiguous; pass np.ascontiguousarray(kv_lens)");
  if (batch > 0 && !is_aligned(a.data(), static_cast<size_t>(dt.itemsize())))  // pykernels passes a copy
    throw py::value_error("kv_lens is not aligned; pass kv_lens.copy()");
  int64_t mx = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t v = i32 ? static_cast<const int32_t*>(a.data())[b]
                          : static_cast<const int64_t*>(a.data())[b];
    if (v < 0 || v > cap)
      throw py::value_error("kv_lens[" + std::to_string(b) + "] = " + std::to_string(v) +
                            " is outside [0, " + std::to_string(cap) + "] (" + cap_name + ")");
    mx = std::max(mx, v);
  }
  *max_len = mx;
  if (i32) g.kv_lens32 = static_cast<const int32_t*>(a.data());
  else g.kv_lens64 = static_cast<const int64_t*>(a.data());
}

// `out`: float32 of the given shape, writeable, unit stride along D.
Tensor check_attention_out(py::handle h, const Tensor& like, int ndim, const char* layout) {
  std::string want = shape_of(like);
  if (!py::isinstance<py::array>(h))
    throw py::value_error("out must be a float32 numpy array of shape " + want);
  auto a = py::reinterpret_borrow<py::array>(h);
  if (elem_kind(a) != Kind::kF32)
    throw py::value_error("out has dtype " + dtype_name(a) + ", expected float32");
  bool same = a.ndim() == ndim;
  for (int d = 0; same && d < ndim; ++d) same = a.shape(d) == like.shape[d];
  if (!same)
    throw py::value_error("out has shape " + std::string(py::str(a.attr("shape"))) +
                          ", expected " + want);
  if (!a.writeable()) throw py::value_error("out is read-only");
  return as_tensor(h, "out", ndim, layout);
}

int attention_variant(pk::Variant variant, int64_t rows_per_kv_head) {
  // auto without a policy: split-KV when one KV head serves few query rows
  // (decode, speculative, short prompts): the rows alone cannot fill the cores.
  if (variant == pk::Variant::kAuto) return rows_per_kv_head <= 16 ? 0 : 1;
  return parse_variant(variant);
}

void run_attention(const pk::AttentionArgs& g, int variant, int threads) {
  const pk::Dispatch& d = pk::dispatch();
  const pk::ParallelPolicy par = parallel(variant, threads);
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  if (variant == 0) d.attention->latency(g, par, d.attention_tiling);
  else d.attention->throughput(g, par, d.attention_tiling);
}

// The attention kernels' task list stores batch item, KV head and query tile
// indices as int32 (csrc/kernels/common/attention_impl.inc, Task).
void check_task_indices(int64_t batch, int64_t hkv, int64_t sq) {
  if (batch > INT32_MAX || hkv > INT32_MAX || sq > INT32_MAX)
    throw py::value_error("attention supports B, Hkv and Sq up to 2^31 - 1, got B=" +
                          std::to_string(batch) + ", Hkv=" + std::to_string(hkv) + ", Sq=" +
                          std::to_string(sq));
}

float resolve_scale(py::handle scale, int64_t d) {
  if (scale.is_none()) return d > 0 ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(d))) : 1.0f;
  return scale.cast<float>();
}

// attention(q, k, v, kv_lens, out, scale, causal, variant, threads)
//   q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D), float32 or bfloat16, unit stride
//   along D. Returns out, or None when `out` overlaps an input (the caller then
//   computes into a temporary).
py::object attention_fwd(py::handle q_h, py::handle k_h, py::handle v_h, py::handle lens_h,
                         py::handle out_h, py::handle scale_h, bool causal,
                         pk::Variant variant, int threads) {
  py::object q_keep, k_keep, v_keep;  // aligned copies of misaligned inputs
  const Tensor q = as_tensor(q_h, "q", 4, "(B, Hq, Sq, D)", &q_keep);
  const Tensor k = as_tensor(k_h, "k", 4, "(B, Hkv, Skv, D)", &k_keep);
  const Tensor v = as_tensor(v_h, "v", 4, "(B, Hkv, Skv, D)", &v_keep);
  if (k.kind != v.kind)
    throw py::type_error(std::string("k has dtype ") + (k.kind == Kind::kF32 ? "float32" : "bfloat16") +
                         " but v has " + (v.kind == Kind::kF32 ? "float32" : "bfloat16") +
                         "; k and v must share one dtype");
  for (int d = 0; d < 4; ++d)
    if (k.shape[d] != v.shape[d])
      throw py::value_error("k and v must have the same shape, got k " + shape_of(k) + " and v " +
                            shape_of(v));
  if (q.shape[0] != k.shape[0])
    throw py::value_error("q and k have different batch sizes: q " + shape_of(q) + " and k " +
                          shape_of(k));
  if (q.shape[3] != k.shape[3])
    throw py::value_error("q and k have different head dims (last axis): q " + shape_of(q) +
                          " and k " + shape_of(k));
  const int64_t batch = q.shape[0], hq = q.shape[1], sq = q.shape[2], dd = q.shape[3];
  const int64_t hkv = k.shape[1], skv = k.shape[2];
  if ((hkv == 0 && hq != 0) || (hkv != 0 && hq % hkv != 0))
    throw py::value_error("q has " + std::to_string(hq) + " heads, not a multiple of the " +
                          std::to_string(hkv) + " heads of k and v: q " + shape_of(q) + " and k " +
                          shape_of(k));
  if (dd > pk::kMaxHeadDim)
    throw py::value_error("head dim D = " + std::to_string(dd) + " is larger than the supported " +
                          std::to_string(pk::kMaxHeadDim));
  pk::AttentionArgs g;
  int64_t max_len = skv;
  read_kv_lens(lens_h, batch, skv, "Skv, the key length of k", g, &max_len);

  py::object result;
  Tensor o;
  if (out_h.is_none()) {
    result = py::array_t<float>({batch, hq, sq, dd});
    o = as_tensor(result, "out", 4, "(B, Hq, Sq, D)");
  } else {
    Tensor want = q;
    o = check_attention_out(out_h, want, 4, "(B, Hq, Sq, D)");
    if (!o.aligned || tensors_overlap(o, q) || tensors_overlap(o, k) || tensors_overlap(o, v))
      return py::none();
    result = py::reinterpret_borrow<py::object>(out_h);
  }
  if (batch == 0 || hq == 0 || sq == 0 || dd == 0) return result;
  check_task_indices(batch, hkv, sq);

  g.batch = batch; g.hq = hq; g.hkv = hkv; g.sq = sq; g.skv = skv; g.d = dd;
  g.q = q.data; g.q_dtype = elem_type(q.kind);
  g.q_bs = q.stride[0]; g.q_hs = q.stride[1]; g.q_ss = q.stride[2];
  g.kv.k = k.data; g.kv.v = v.data; g.kv.dtype = elem_type(k.kind);
  g.kv.k_bs = k.stride[0]; g.kv.k_hs = k.stride[1]; g.kv.k_ss = k.stride[2];
  g.kv.v_bs = v.stride[0]; g.kv.v_hs = v.stride[1]; g.kv.v_ss = v.stride[2];
  g.out = reinterpret_cast<float*>(const_cast<char*>(o.data));
  g.o_bs = o.stride[0]; g.o_hs = o.stride[1]; g.o_ss = o.stride[2];
  g.scale = resolve_scale(scale_h, dd);
  g.causal = causal;
  const int var = attention_variant(variant, sq * (hq / hkv));
  run_attention(g, var, resolve_threads(threads, work_product({batch, hq, sq, max_len, dd})));
  return result;
}

// decode_attention(q, k_cache, v_cache, kv_lens, block_table, out, scale, variant, threads)
//   q (B, Hq, D). Contiguous cache (B, Hkv, S_max, D), or paged cache
//   (num_blocks, Hkv, block_size, D) with block_table (B, max_blocks) int32.
py::object decode_attention_fwd(py::handle q_h, py::handle k_h, py::handle v_h,
                                py::handle lens_h, py::handle table_h, py::handle out_h,
                                py::handle scale_h, pk::Variant variant, int threads) {
  py::object q_keep, k_keep, v_keep;  // aligned copies of misaligned inputs
  const Tensor q = as_tensor(q_h, "q", 3, "(B, Hq, D)", &q_keep);
  const bool paged = !table_h.is_none();
  const char* cache_layout = paged ? "(num_blocks, Hkv, block_size, D)" : "(B, Hkv, S_max, D)";
  const Tensor k = as_tensor(k_h, "k_cache", 4, cache_layout, &k_keep);
  const Tensor v = as_tensor(v_h, "v_cache", 4, cache_layout, &v_keep);
  if (k.kind != v.kind)
    throw py::type_error("k_cache and v_cache must share one dtype (float32 or bfloat16)");
  for (int d = 0; d < 4; ++d)
    if (k.shape[d] != v.shape[d])
      throw py::value_error("k_cache and v_cache must have the same shape, got " + shape_of(k) +
                            " and " + shape_of(v));
  const int64_t batch = q.shape[0], hq = q.shape[1], dd = q.shape[2];
  const int64_t hkv = k.shape[1];
  if (q.shape[2] != k.shape[3])
    throw py::value_error("q and k_cache have different head dims (last axis): q " + shape_of(q) +
                          " and k_cache " + shape_of(k));
  if (!paged && q.shape[0] != k.shape[0])
    throw py::value_error("q and k_cache have different batch sizes: q " + shape_of(q) +
                          " and k_cache " + shape_of(k));
  if ((hkv == 0 && hq != 0) || (hkv != 0 && hq % hkv != 0))
    throw py::value_error("q has " + std::to_string(hq) + " heads, not a multiple of the " +
                          std::to_string(hkv) + " heads of the cache: q " + shape_of(q) +
                          " and k_cache " + shape_of(k));
  if (dd > pk::kMaxHeadDim)
    throw py::value_error("head dim D = " + std::to_string(dd) + " is larger than the supported " +
                          std::to_string(pk::kMaxHeadDim));
  pk::AttentionArgs g;
  int64_t cap = k.shape[2];
  std::string cap_name = "S_max, the cache length";
  const int32_t* table = nullptr;
  int64_t bt_stride = 0, max_blocks = 0;
  const int64_t num_blocks = paged ? k.shape[0] : 0, block_size = k.shape[2];
  if (paged) {
    if (!py::isinstance<py::array>(table_h))
      throw py::type_error("block_table must be a numpy array of int32");
    auto t = py::reinterpret_borrow<py::array>(table_h);
    const py::dtype dt = t.dtype();
    if (!(dt.kind() == 'i' && dt.itemsize() == 4 && dt.byteorder() != '>'))
      throw py::type_error("block_table has dtype " + dtype_name(t) +
                           ", expected int32; convert with block_table.astype(np.int32)");
    if (t.ndim() != 2 || t.shape(0) != batch)
      throw py::value_error("block_table has shape " + std::string(py::str(t.attr("shape"))) +
                            ", expected (B, max_blocks) with B = " + std::to_string(batch) +
                            " (q " + shape_of(q) + ")");
    max_blocks = t.shape(1);
    // An empty table is never read, and NumPy gives an empty array strides
    // (0, 0): its layout is checked only when it holds entries (as for out).
    if (t.size() > 0) {
      if (max_blocks > 1 && t.strides(1) != 4)
        throw py::value_error("block_table rows must be contiguous; pass np.ascontiguousarray(block_table)");
      if (t.strides(0) % 4 != 0)
        throw py::value_error("block_table stride is not a multiple of 4 bytes");
      if (!is_aligned(t.data(), 4))  // pykernels passes a copy
        throw py::value_error("block_table is not aligned; pass block_table.copy()");
    }
    table = static_cast<const int32_t*>(t.data());
    bt_stride = t.strides(0) / 4;
    cap = max_blocks * block_size;
    cap_name = "max_blocks * block_size = " + std::to_string(max_blocks) + " * " +
               std::to_string(block_size);
  }
  if (paged && lens_h.is_none())
    throw py::value_error("kv_lens is required with a paged cache (block_table)");
  int64_t max_len = cap;
  read_kv_lens(lens_h, batch, cap, cap_name.c_str(), g, &max_len);
  if (paged) {
    // Every block id that covers a key the kernel will read: [0, kv_lens[b]).
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t len = g.kv_len(b);
      const int64_t nblk = block_size > 0 ? (len + block_size - 1) / block_size : 0;
      for (int64_t i = 0; i < nblk; ++i) {
        const int64_t id = table[b * bt_stride + i];
        if (id < 0 || id >= num_blocks)
          throw py::value_error("block_table[" + std::to_string(b) + ", " + std::to_string(i) +
                                "] = " + std::to_string(id) + " is not a block of the cache: "
                                "valid ids are [0, " + std::to_string(num_blocks) + ") (k_cache " +
                                shape_of(k) + ")");
      }
    }
  }

  py::object result;
  Tensor o;
  if (out_h.is_none()) {
    result = py::array_t<float>({batch, hq, dd});
    o = as_tensor(result, "out", 3, "(B, Hq, D)");
  } else {
    o = check_attention_out(out_h, q, 3, "(B, Hq, D)");
    if (!o.aligned || tensors_overlap(o, q) || tensors_overlap(o, k) || tensors_overlap(o, v))
      return py::none();
    result = py::reinterpret_borrow<py::object>(out_h);
  }
  if (batch == 0 || hq == 0 || dd == 0) return result;
  check_task_indices(batch, hkv, 1);

  g.batch = batch; g.hq = hq; g.hkv = hkv; g.sq = 1; g.skv = cap; g.d = dd;
  g.q = q.data; g.q_dtype = elem_type(q.kind);
  g.q_bs = q.stride[0]; g.q_hs = q.stride[1]; g.q_ss = 0;
  g.kv.k = k.data; g.kv.v = v.data; g.kv.dtype = elem_type(k.kind);
  g.kv.k_bs = k.stride[0]; g.kv.k_hs = k.stride[1]; g.kv.k_ss = k.stride[2];
  g.kv.v_bs = v.stride[0]; g.kv.v_hs = v.stride[1]; g.kv.v_ss = v.stride[2];
  g.kv.block_table = table; g.kv.bt_stride = bt_stride; g.kv.block_size = paged ? block_size : 0;
  g.out = reinterpret_cast<float*>(const_cast<char*>(o.data));
  g.o_bs = o.stride[0]; g.o_hs = o.stride[1]; g.o_ss = 0;
  g.scale = resolve_scale(scale_h, dd);
  g.causal = false;
  const int var = attention_variant(variant, hq / hkv);
  run_attention(g, var, resolve_threads(threads, work_product({batch, hq, max_len, dd})));
  return result;
}

// The active ISA's vectorized 2^x (x <= 0) on a float32 array, for the tests.
// C-contiguous float32 only (noconvert in m.def): no silent copy.
py::array_t<float> attention_exp2(py::array_t<float, py::array::c_style> x) {
  py::array_t<float> y(x.size());
  const float* src = x.data();
  float* dst = y.mutable_data();
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  pk::dispatch().attention->exp2(src, dst, n);
  return y;
}

}  // namespace

void bind_attention(py::module_& m) {
  const auto none = py::none();
  m.def("set_bf16_dtype", &set_bf16_dtype, py::arg("dtype"));
  m.def("attention", &attention_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("kv_lens") = none, py::arg("out") = none, py::arg("scale") = none,
        py::arg("causal") = false, py::arg("variant") = pk::Variant::kAuto,
        py::arg("threads") = 0);
  m.def("decode_attention", &decode_attention_fwd, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("kv_lens") = none, py::arg("block_table") = none,
        py::arg("out") = none, py::arg("scale") = none, py::arg("variant") = pk::Variant::kAuto,
        py::arg("threads") = 0);
  m.def("attention_exp2", &attention_exp2, py::arg("x").noconvert());
}

}  // namespace pk::bind
