// The only file that includes pybind11. Each function checks the NumPy views
// it is given (dtype, shape, strides, overlap), reads pointers and strides,
// releases the GIL and runs the kernel: no conversion (arrays arrive as
// py::handle or noconvert), no copy except of a misaligned input. Arguments are
// named, and variant / precision / activation are the C++ enums exported below.
// The boundary and the reasons for it: docs/kernels.md.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "pykernels/dispatch.h"
#include "pykernels/gemm.h"
#include "pykernels/peaks.h"
#include "pykernels/runtime.h"

namespace py = pybind11;

namespace {

// ---- argument checks --------------------------------------------------------
// Validation of the hot path lives here rather than in Python: reading the
// NumPy struct costs nanoseconds, while the same checks in Python cost ~2 us,
// more than a whole 32x32x32 GEMM. Messages match the Python layer's style.

PyObject* g_f32_descr = nullptr;  // NumPy's float32 descriptor singleton

bool is_float32(const py::array& a) {
  PyObject* d = reinterpret_cast<PyObject*>(py::detail::array_proxy(a.ptr())->descr);
  if (d == g_f32_descr) return true;
  py::dtype dt = a.dtype();  // slow path: an equal but distinct descriptor
  return dt.num() == py::dtype::of<float>().num() && dt.byteorder() != '>';
}

// A 2-D float32 matrix view: pointer, sizes, element strides, byte bounds.
struct Matrix {
  const float* data = nullptr;
  int64_t rows = 0, cols = 0, rs = 0, cs = 0;
  const char* lo = nullptr;  // lowest and one-past-highest byte touched
  const char* hi = nullptr;
  bool aligned = true;       // data is on a 4-byte boundary
};

bool is_aligned(const void* p, size_t align) {
  return reinterpret_cast<uintptr_t>(p) % align == 0;
}

// NumPy accepts arrays at any byte address (a float32 view into a uint8 buffer
// at offset 1 has flags.aligned False), but reading one through float* is
// undefined behaviour and vector code may assume element alignment. Such an
// input is copied once into an aligned C-contiguous array, as NumPy's own
// ufuncs buffer unaligned data, rather than refused: to a NumPy user it is a
// valid array. `keep` owns the copy until the kernel has run. (The stride
// checks stay: a stride that is not a multiple of 4 is still an error.)
py::handle aligned_input(py::handle h, size_t align, py::object& keep) {
  auto a = py::reinterpret_borrow<py::array>(h);
  if (is_aligned(a.data(), align)) return h;
  keep = a.attr("copy")();  // order 'C': a fresh, aligned buffer (MemoryError if too big)
  return keep;
}

bool overlaps(const Matrix& x, const Matrix& y) {
  return x.rows > 0 && x.cols > 0 && y.rows > 0 && y.cols > 0 && x.lo < y.hi && y.lo < x.hi;
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// Element stride; NumPy strides are bytes and may, through as_strided, be a
// non-multiple of the item size.
int64_t elem_stride(const py::array& a, int dim) {
  const py::ssize_t s = a.strides(dim);
  if (s % static_cast<py::ssize_t>(sizeof(float)) != 0)
    throw py::value_error("array stride " + std::to_string(s) +
                          " bytes is not a multiple of 4; pass a copy (np.ascontiguousarray)");
  return s / static_cast<py::ssize_t>(sizeof(float));
}

// With `keep`, a misaligned input is replaced by an aligned copy held in
// *keep; without (outputs), it is returned with aligned = false.
Matrix as_matrix(py::handle h, const char* name, py::object* keep = nullptr) {
  if (!py::isinstance<py::array>(h))
    throw py::type_error(std::string(name) + " must be a numpy.ndarray of float32, got " +
                         std::string(py::str(py::type::handle_of(h).attr("__name__"))) +
                         "; use np.asarray(" + name + ", dtype=np.float32)");
  auto a = py::reinterpret_borrow<py::array>(h);
  if (!is_float32(a))
    throw py::type_error(std::string(name) + " has dtype " + dtype_name(a) +
                         ", expected float32; convert with " + name + ".astype(np.float32)");
  if (a.ndim() != 2)
    throw py::value_error(std::string(name) + " must be 2-D, got " + std::to_string(a.ndim()) +
                          "-D shape " + std::string(py::str(a.attr("shape"))));
  if (keep != nullptr && !is_aligned(a.data(), sizeof(float)))
    return as_matrix(aligned_input(h, sizeof(float), *keep), name);
  Matrix m;
  m.aligned = is_aligned(a.data(), sizeof(float));
  m.data = static_cast<const float*>(a.data());
  m.rows = a.shape(0);
  m.cols = a.shape(1);
  m.rs = elem_stride(a, 0);
  m.cs = elem_stride(a, 1);
  const char* base = reinterpret_cast<const char*>(m.data);
  int64_t lo = 0, hi = 0;
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = (a.shape(d) - 1) * a.strides(d);
    (extent < 0 ? lo : hi) += extent;
  }
  m.lo = base + lo;
  m.hi = base + hi + sizeof(float);
  return m;
}

std::string shape_str(int64_t r, int64_t c) {
  return "(" + std::to_string(r) + ", " + std::to_string(c) + ")";
}

// `out`: float32 (m, n), writeable, unit stride along the last axis.
Matrix as_out(py::handle h, int64_t m, int64_t n) {
  if (!py::isinstance<py::array>(h))
    throw py::value_error("out must be a float32 numpy array of shape " + shape_str(m, n));
  auto a = py::reinterpret_borrow<py::array>(h);
  if (!is_float32(a))
    throw py::value_error("out has dtype " + dtype_name(a) + ", expected float32");
  if (a.ndim() != 2 || a.shape(0) != m || a.shape(1) != n)
    throw py::value_error("out has shape " + std::string(py::str(a.attr("shape"))) +
                          ", expected " + shape_str(m, n));
  if (!a.writeable()) throw py::value_error("out is read-only");
  Matrix o = as_matrix(h, "out");
  if (m > 0 && n > 1 && o.cs != 1)
    throw py::value_error("out must have unit stride along its last axis (strides " +
                          std::string(py::str(a.attr("strides"))) +
                          "); pass a C-contiguous array");
  return o;
}

// The table index (0 latency, 1 throughput) of a requested variant. auto
// without a policy: the latency kernels (A read in place, B streamed once) win
// up to 32 rows here, blocking beyond. (A py::enum_ can be built from any int,
// so the range is still checked.)
int parse_variant(pk::Variant variant, int64_t m) {
  if (variant == pk::Variant::kAuto) return m <= 32 ? 0 : 1;
  if (variant != pk::Variant::kLatency && variant != pk::Variant::kThroughput)
    throw py::value_error("internal: bad variant code");
  return static_cast<int>(variant);
}

// The product of sizes, saturating at INT64_MAX: a work estimate is only
// compared with a threshold, and the sizes of broadcast views can make the
// exact product overflow int64 (undefined behaviour: UBSan reported
// 2^31 * 2^29 * 16 here).
int64_t work_product(std::initializer_list<int64_t> sizes) {
  int64_t r = 1;
  for (int64_t s : sizes) {
    if (s <= 0) return 0;
    if (__builtin_mul_overflow(r, s, &r)) return INT64_MAX;
  }
  return r;
}

// threads < 1 means "decide": below 64^3 multiply-adds a second thread costs
// more (fork/join ~1 us plus cache traffic) than it saves.
int resolve_threads(int threads, int64_t macs) {
  if (threads >= 1) return threads;
  return macs >= 64 * 64 * 64 ? pk::default_num_threads() : 1;
}

pk::ParallelPolicy parallel(int variant, int threads) {
  pk::ParallelPolicy p;
  p.threads = threads < 1 ? 1 : threads;
  p.spin = variant == 0;
  return p;
}

// Frees oversized scratch when a kernel call returns, also by exception (see
// pk::kWorkspaceRetainBytes): one huge call must not pin its buffers.
struct WorkspaceTrim {
  ~WorkspaceTrim() { pk::workspace_trim(); }
};

void run_gemm(const pk::GemmArgs& g, int variant, int threads) {
  const pk::Dispatch& d = pk::dispatch();
  const pk::ParallelPolicy par = parallel(variant, threads);
  const pk::GemmFn fn = d.gemm->run[static_cast<int>(g.precision)][variant];
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  fn(g, par, d.gemm_blocking);
}

// int32 accumulation of int8 products is exact while K * 127 * 127 < 2^31.
constexpr int64_t kMaxKInt8 = 131072;

void check_bias(py::handle bias_h, pk::GemmArgs& g, py::object& keep) {
  if (bias_h.is_none()) return;
  if (!py::isinstance<py::array>(bias_h))
    throw py::type_error("bias must be a float32 numpy array of shape (" + std::to_string(g.n) +
                         ",), got " + std::string(py::str(py::type::handle_of(bias_h).attr("__name__"))));
  auto bias = py::reinterpret_borrow<py::array>(bias_h);
  if (!is_float32(bias))
    throw py::type_error("bias has dtype " + dtype_name(bias) +
                         ", expected float32; convert with bias.astype(np.float32)");
  if (bias.ndim() != 1 || bias.shape(0) != g.n)
    throw py::value_error("bias has shape " + std::string(py::str(bias.attr("shape"))) +
                          ", expected (" + std::to_string(g.n) + ",)");
  if (g.n > 1 && bias.strides(0) != static_cast<py::ssize_t>(sizeof(float)))
    throw py::value_error("bias must be contiguous; pass np.ascontiguousarray(bias)");
  g.bias = static_cast<const float*>(
      py::reinterpret_borrow<py::array>(aligned_input(bias_h, sizeof(float), keep)).data());
}

// ---- PackedWeight internals ---------------------------------------------------
// A PackedWeight's arrays and shape are plain Python attributes (_data,
// _scale, _shape, _code) that a caller can replace, so nothing about them is
// trusted: each is checked for type, dtype, layout, alignment and an exact
// size before a kernel reads it. Every failure is ValueError: the weight is
// corrupted, and the fix is to pack it again.

[[noreturn]] void corrupted_weight(const std::string& what, int64_t k, int64_t n) {
  throw py::value_error("PackedWeight of shape (" + std::to_string(k) + ", " + std::to_string(n) +
                        ") is corrupted: " + what + "; pack the weight again");
}

// The packed panels of (k, n) at precision p: ceil(n/16) * pad_k(k) * 16
// elements of the precision's storage type (float32, uint16, int8),
// C-contiguous and aligned to the element size.
const void* checked_packed(py::handle h, pk::Precision p, int64_t k, int64_t n) {
  if (!py::isinstance<py::array>(h))
    corrupted_weight("its data is a " + std::string(py::str(py::type::handle_of(h).attr("__name__"))) +
                     ", not a numpy array", k, n);
  auto a = py::reinterpret_borrow<py::array>(h);
  if (k < 0 || n < 1) corrupted_weight("bad shape", k, n);
  // Overflow-safe size: a forged shape such as (2^60 + 8, 16) would otherwise
  // wrap to the size of a real 8-row buffer and pass the comparison below.
  const int64_t step = pk::k_step(p);
  int64_t expected = 0;
  if (k > INT64_MAX - step || __builtin_mul_overflow((n - 1) / pk::kPanelCols + 1,
                                                     pk::pad_k(k, p), &expected) ||
      __builtin_mul_overflow(expected, int64_t{pk::kPanelCols}, &expected))
    corrupted_weight("its shape is too large for any buffer", k, n);
  const py::dtype dt = a.dtype();
  const char kind = p == pk::Precision::kF32 ? 'f' : (p == pk::Precision::kBF16 ? 'u' : 'i');
  const int64_t itemsize = p == pk::Precision::kF32 ? 4 : (p == pk::Precision::kBF16 ? 2 : 1);
  const char* want = p == pk::Precision::kF32 ? "float32" : (p == pk::Precision::kBF16 ? "uint16" : "int8");
  if (dt.kind() != kind || dt.itemsize() != itemsize || dt.byteorder() == '>')
    corrupted_weight("its data has dtype " + dtype_name(a) + ", expected " + want, k, n);
  if (a.size() != expected)
    corrupted_weight("its data holds " + std::to_string(a.size()) + " elements, expected " +
                     std::to_string(expected), k, n);
  if (!(a.flags() & py::array::c_style) || !is_aligned(a.data(), static_cast<size_t>(itemsize)))
    corrupted_weight("its data is not a C-contiguous aligned array", k, n);
  return a.data();
}

// int8 per-column scales: float32 (n,), contiguous, aligned.
const float* checked_scales(py::handle h, int64_t n) {
  if (!py::isinstance<py::array>(h))
    throw py::value_error("int8 PackedWeight has no per-column scales for N=" + std::to_string(n) +
                          " (got " + std::string(py::str(py::type::handle_of(h).attr("__name__"))) +
                          "); pack the weight again");
  auto a = py::reinterpret_borrow<py::array>(h);
  if (!is_float32(a) || a.ndim() != 1 || a.shape(0) != n || !(a.flags() & py::array::c_style) ||
      !is_aligned(a.data(), sizeof(float)))
    throw py::value_error("int8 PackedWeight scales must be a contiguous float32 array of shape (" +
                          std::to_string(n) + ",), got " + dtype_name(a) + " " +
                          std::string(py::str(a.attr("shape"))) + "; pack the weight again");
  return static_cast<const float*>(a.data());
}

// matmul(a, b, out, alpha, beta, variant, threads, bias, activation,
//        packed, precision, col_scale, k, n)   (names and defaults: m.def below)
//   a (M, K) float32, any strides. Either b (K, N) float32 any strides, or b
//   is None and `packed` is a PackedWeight's panel array of `precision` for
//   shape (k, n), with col_scale (n,) for int8. out None -> a new (M, N)
//   array (beta ignored). threads < 1 -> decide by size. bias None or (N,)
//   float32 contiguous.
// Returns the result array, or None when `out` overlaps an input or is not
// 4-byte aligned: the caller then computes into a temporary (NumPy's
// semantics for overlapping out=) and copies it over. Misaligned inputs are
// copied here (aligned_input).
py::object matmul(py::handle a_h, py::handle b_h, py::handle out_h, float alpha, float beta,
                  pk::Variant variant, int threads, py::handle bias_h, pk::Activation act,
                  py::handle packed_h, pk::Precision precision, py::handle scale_h,
                  int64_t pk_k, int64_t pk_n) {
  py::object a_keep, b_keep, bias_keep;  // aligned copies of misaligned inputs
  const Matrix a = as_matrix(a_h, "a", &a_keep);
  pk::GemmArgs g;
  Matrix b;
  if (!b_h.is_none()) {
    b = as_matrix(b_h, "b", &b_keep);
    if (b.rows != a.cols)
      throw py::value_error("shapes " + shape_str(a.rows, a.cols) + " and " +
                            shape_str(b.rows, b.cols) + " are not aligned: a has " +
                            std::to_string(a.cols) + " columns but b has " +
                            std::to_string(b.rows) + " rows");
    g.b = b.data;
    g.b_rs = b.rs;
    g.b_cs = b.cs;
    g.n = b.cols;
  } else if (packed_h.is_none()) {
    throw py::type_error("b must be a numpy.ndarray of float32 or a PackedWeight, got None");
  } else {
    if (pk_k != a.cols)
      throw py::value_error("shapes " + shape_str(a.rows, a.cols) + " and " +
                            shape_str(pk_k, pk_n) + " are not aligned: a has " +
                            std::to_string(a.cols) + " columns but the packed weight has " +
                            std::to_string(pk_k) + " rows");
    if (static_cast<int>(precision) < 0 || static_cast<int>(precision) >= pk::kNumPrecisions)
      throw py::value_error("internal: bad precision code");
    g.precision = precision;
    g.b_packed = checked_packed(packed_h, g.precision, pk_k, pk_n);
    if (g.precision == pk::Precision::kI8) {
      g.col_scale = checked_scales(scale_h, pk_n);
      if (pk_k > kMaxKInt8)
        throw py::value_error("int8 supports K <= " + std::to_string(kMaxKInt8) +
                              " (exact int32 accumulation), got K=" + std::to_string(pk_k));
    }
    g.n = pk_n;
  }
  g.m = a.rows;
  g.k = a.cols;
  check_bias(bias_h, g, bias_keep);
  if (static_cast<int>(act) < 0 || act > pk::Activation::kSilu)
    throw py::value_error("internal: bad activation code");
  g.act = act;
  py::object result;
  Matrix c;
  if (out_h.is_none()) {
    result = py::array_t<float>({g.m, g.n});
    beta = 0.0f;
    c = as_matrix(result, "out");
  } else {
    c = as_out(out_h, g.m, g.n);
    if (!c.aligned || overlaps(c, a) || (g.b && overlaps(c, b))) return py::none();
    if (g.bias) {  // the K-blocked kernels read bias after writing partial sums
      Matrix bias_m;
      bias_m.rows = 1;
      bias_m.cols = g.n;
      bias_m.lo = reinterpret_cast<const char*>(g.bias);
      bias_m.hi = bias_m.lo + sizeof(float) * g.n;
      if (overlaps(c, bias_m)) return py::none();
    }
    result = py::reinterpret_borrow<py::object>(out_h);
  }
  if (g.m == 0 || g.n == 0) return result;
  g.c = const_cast<float*>(c.data);
  g.c_rs = c.rs;
  g.a = a.data;
  g.a_rs = a.rs;
  g.a_cs = a.cs;
  g.alpha = alpha;
  g.beta = beta;
  if (g.k == 0) {
    // Empty sum: act(beta * C + bias) (C not read when beta == 0). Run it as
    // a K=1 product of zeros so bias and activation take the kernels' path.
    static const float zero = 0.0f;
    std::vector<float> zb(static_cast<size_t>(g.n), 0.0f);
    g.k = 1;
    g.a = &zero;
    g.a_rs = 0;
    g.a_cs = 0;
    g.precision = pk::Precision::kF32;
    g.b_packed = nullptr;
    g.col_scale = nullptr;
    g.b = zb.data();
    g.b_rs = 0;
    g.b_cs = 1;
    run_gemm(g, 0, 1);
    return result;
  }
  run_gemm(g, parse_variant(variant, g.m), resolve_threads(threads, work_product({g.m, g.n, g.k})));
  return result;
}

// Packs w (K, N) float32 into bf16 or int8 panels in `out`; int8 also fills
// scale (N,). Returns (sum of squared errors, sum of squares).
py::tuple pack_lowp(const py::array& w_in, pk::Precision precision, py::array out,
                    py::handle scale_h) {
  if (precision != pk::Precision::kBF16 && precision != pk::Precision::kI8)
    throw py::value_error("internal: pack_lowp takes bf16 or int8");
  py::object keep;  // pack reads w through float*: a misaligned w is copied first
  const auto w = py::reinterpret_borrow<py::array>(aligned_input(w_in, sizeof(float), keep));
  const float* src = static_cast<const float*>(w.data());
  const int64_t k = w.shape(0), n = w.shape(1);
  const int64_t rs = elem_stride(w, 0), cs = elem_stride(w, 1);
  double err2 = 0, ref2 = 0;
  float* scale = precision == pk::Precision::kI8
      ? static_cast<float*>(py::reinterpret_borrow<py::array>(scale_h).mutable_data())
      : nullptr;
  {
    py::gil_scoped_release nogil;
    if (precision == pk::Precision::kBF16) {
      pk::pack_b_bf16(src, k, n, rs, cs, static_cast<uint16_t*>(out.mutable_data()), &err2, &ref2);
    } else {
      pk::pack_b_i8(src, k, n, rs, cs, static_cast<int8_t*>(out.mutable_data()), scale, &err2, &ref2);
    }
  }
  return py::make_tuple(err2, ref2);
}

// Packs w (K, N), any strides, into out (ceil(N/16), K, 16) float32 C-contiguous.
void pack_f32(const py::array& w_in, py::array out, int threads) {
  py::object keep;  // as in pack_lowp
  const auto w = py::reinterpret_borrow<py::array>(aligned_input(w_in, sizeof(float), keep));
  const float* src = static_cast<const float*>(w.data());
  const int64_t k = w.shape(0), n = w.shape(1);
  const int64_t rs = elem_stride(w, 0), cs = elem_stride(w, 1);
  float* dst = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release nogil;
  pk::pack_b_f32(src, k, n, rs, cs, dst, parallel(1, threads));
}

py::dict cpu_info() {
  const pk::CpuFeatures& f = pk::cpu_features();
  const pk::Dispatch& d = pk::dispatch();
  py::dict r;
  r["isa"] = pk::isa_name(d.isa);
  r["supported_isa"] = pk::isa_name(d.supported);
  r["capped"] = d.capped;
  r["features"] = f.names();
  r["cores"] = f.cores;
  r["l1d_bytes"] = f.l1d_bytes;
  r["l2_bytes"] = f.l2_bytes;
  r["l3_bytes"] = f.l3_bytes;
  r["vendor"] = f.vendor;
  r["model"] = f.model;
  py::dict blk;
  blk["kc"] = d.gemm_blocking.kc;
  blk["mc"] = d.gemm_blocking.mc;
  blk["nc"] = d.gemm_blocking.nc;
  r["gemm_blocking"] = blk;
  return r;
}

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
  return parse_variant(variant, 0);
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

// The Python names of the enums, indexed by value: the public API's strings
// (variant="auto", precision="int8", activation="gelu") and the registry's.
constexpr const char* kVariantNames[] = {"latency", "throughput", "auto"};
constexpr const char* kPrecisionNames[pk::kNumPrecisions] = {"fp32", "bf16", "int8"};
constexpr const char* kActivationNames[] = {"none", "relu", "gelu", "gelu_tanh", "silu"};

template <class E, size_t N>
void bind_enum(py::module_& m, const char* name, const char* const (&names)[N], const char* doc) {
  py::enum_<E> e(m, name, doc);
  for (size_t i = 0; i < N; ++i) e.value(names[i], static_cast<E>(i));
}

py::list kernel_table() {
  const pk::Dispatch& d = pk::dispatch();
  py::list out;
  // One structured entry per (op, variant, precision); the Python layer derives
  // the printed name from these fields. mr / nr / k_step are None where the
  // kernel has no fixed register tile (attention: its tiles follow the head dim).
  auto add = [&](const char* op, const char* kernel, const char* variant, const char* precision,
                 const char* scheme, py::object mr, py::object nr, py::object k_step) {
    py::dict e;
    e["op"] = op;
    e["kernel"] = kernel;
    e["variant"] = variant;
    e["precision"] = precision;
    e["isa"] = pk::isa_name(d.isa);
    e["scheme"] = scheme;
    e["mr"] = mr;
    e["nr"] = nr;
    e["k_step"] = k_step;
    out.append(e);
  };
  for (int p = 0; p < pk::kNumPrecisions; ++p) {
    const pk::KernelMeta& m = d.gemm->meta[p];
    for (int v = 0; v < 2; ++v) {
      // gemm runs the fp32 kernels; linear runs every precision with a fused
      // bias/activation epilogue. Same kernel, two public entry points.
      for (const char* op : {"gemm", "linear"}) {
        if (p != 0 && op[0] == 'g') continue;
        add(op, "gemm", kVariantNames[v], kPrecisionNames[p], m.scheme, py::int_(m.mr), py::int_(m.nr),
            py::int_(m.k_step));
      }
    }
  }
  // attention / decode_attention: the scheme is the algorithm (split-KV for
  // latency, flash for throughput); precision = the K/V dtype (softmax and
  // accumulation are fp32 in both).
  for (const char* op : {"attention", "decode_attention"})
    for (const char* prec : {"fp32", "bf16"}) {
      add(op, op, "latency", prec, "splitkv", py::none(), py::none(), py::none());
      add(op, op, "throughput", prec, "flash", py::none(), py::none(), py::none());
    }
  return out;
}

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

// measure_peaks(seconds) -> {"isa", "threads", "ops": [(name, one, all)],
// "read": [(level, one, all)]}: rates per second (see pykernels/_peaks.py).
py::dict measure_peaks_py(double seconds) {
  pk::PeakReport r;
  {
    py::gil_scoped_release nogil;
    r = pk::measure_peaks(seconds);
  }
  py::list ops, read;
  for (const auto& o : r.ops) ops.append(py::make_tuple(o.name, o.one, o.all));
  for (const auto& o : r.read) read.append(py::make_tuple(o.name, o.one, o.all));
  py::dict d;
  d["isa"] = r.isa;
  d["threads"] = r.threads;
  d["ops"] = ops;
  d["read"] = read;
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pykernels C++ kernels (internal; use the pykernels package)";
  // A bad PYKERNELS_ISA must reach the user as ValueError, but pybind11 turns
  // any exception escaping module init into ImportError: record it instead and
  // let pykernels/__init__.py raise it.
  const char* isa = std::getenv("PYKERNELS_ISA");
  std::string init_error;
  try {
    pk::init_dispatch(isa ? isa : "");
  } catch (const std::invalid_argument& e) {
    init_error = e.what();
  }
  m.attr("init_error") = init_error;
  g_f32_descr = py::dtype::of<float>().release().ptr();  // immortal singleton

  // The argument vocabulary, from the C++ enums (the Python layer maps its
  // strings through each enum's __members__) and the layout constants.
  bind_enum<pk::Variant>(m, "Variant", kVariantNames,
                         "Kernel variant; auto is resolved by size in the binding");
  bind_enum<pk::Precision>(m, "Precision", kPrecisionNames, "Packed weight precision");
  bind_enum<pk::Activation>(m, "Activation", kActivationNames, "Fused epilogue activation");
  static_assert(std::size(kVariantNames) == static_cast<size_t>(pk::Variant::kAuto) + 1);
  static_assert(std::size(kActivationNames) == static_cast<size_t>(pk::Activation::kSilu) + 1);
  m.attr("PANEL_COLS") = pk::kPanelCols;
  m.attr("MAX_THREADS") = pk::kMaxThreads;
  m.def("k_step", [](pk::Precision p) { return pk::k_step(p); }, py::arg("precision"),
        "Consecutive k per packed group (1 fp32, 2 bf16, 4 int8)");

  // Arrays are py::handle (checked in the functions, never converted); `out`,
  // `bias` and the packed fields default to None / unused.
  const auto none = py::none();
  m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("out") = none,
        py::arg("alpha") = 1.0f, py::arg("beta") = 0.0f, py::arg("variant") = pk::Variant::kAuto,
        py::arg("threads") = 0, py::arg("bias") = none,
        py::arg("activation") = pk::Activation::kNone, py::arg("packed") = none,
        py::arg("precision") = pk::Precision::kF32, py::arg("col_scale") = none,
        py::arg("k") = 0, py::arg("n") = 0);
  m.def("pack_lowp", &pack_lowp, py::arg("w").noconvert(), py::arg("precision"),
        py::arg("out").noconvert(), py::arg("scale") = none);
  m.def("pack_f32", &pack_f32, py::arg("w").noconvert(), py::arg("out").noconvert(),
        py::arg("threads"));
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
  m.def("cpu_info", &cpu_info);
  m.def("kernel_table", &kernel_table);
  m.def("get_num_threads", &pk::default_num_threads);
  m.def("set_num_threads", &pk::set_default_num_threads, py::arg("n"));
  // Scratch the calling thread holds between calls (tests: nothing oversized is kept).
  m.def("workspace_held_bytes", &pk::workspace_held_bytes);
  m.def("fork_join_ns", &pk::measure_fork_join_ns, py::arg("threads"), py::arg("spin"),
        py::arg("reps") = 2000, py::call_guard<py::gil_scoped_release>());
  m.def("add_layer_norm", &add_layer_norm_fwd, py::arg("x"), py::arg("residual"),
        py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("out"), py::arg("threads"));
  m.def("embed_layer_norm", &embed_layer_norm_fwd, py::arg("ids"), py::arg("token_type_ids"),
        py::arg("cu_seqlens"), py::arg("word"), py::arg("pos"), py::arg("type"),
        py::arg("gamma"), py::arg("beta"), py::arg("eps"), py::arg("out"), py::arg("threads"));
  m.def("varlen_attention", &varlen_attention_fwd, py::arg("qkv"), py::arg("cu_seqlens"),
        py::arg("heads"), py::arg("scale"), py::arg("out"), py::arg("threads"));
  m.def("pool", &pool_fwd, py::arg("x"), py::arg("cu_seqlens"), py::arg("mode"),
        py::arg("normalize"), py::arg("out"), py::arg("threads"));
  // std::invalid_argument reaches Python as ValueError.
  m.def("set_int8_scheme", &pk::set_int8_scheme, py::arg("scheme"));
  m.def("measure_peaks", &measure_peaks_py, py::arg("seconds"));
}
