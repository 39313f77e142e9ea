// The only file that includes pybind11. Each binding takes NumPy views that the
// Python layer has already validated (dtype, shape, layout), reads pointers and
// strides, releases the GIL and runs the kernel: no conversion, no copy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <string>

#include "pykernels/dispatch.h"
#include "pykernels/gemm.h"
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
};

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

Matrix as_matrix(py::handle h, const char* name) {
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
  Matrix m;
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
  if (n > 1 && o.cs != 1)
    throw py::value_error("out must have unit stride along its last axis (strides " +
                          std::string(py::str(a.attr("strides"))) +
                          "); pass a C-contiguous array");
  return o;
}

// 0 latency, 1 throughput, 2 auto without a policy: the latency kernels (A
// read in place, B streamed once) win up to 32 rows here, blocking beyond.
int parse_variant(int variant, int64_t m) {
  if (variant == 2) return m <= 32 ? 0 : 1;
  if (variant != 0 && variant != 1) throw py::value_error("internal: bad variant code");
  return variant;
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

void run_gemm(const pk::GemmF32Args& g, int variant, int threads) {
  const pk::Dispatch& d = pk::dispatch();
  const pk::ParallelPolicy par = parallel(variant, threads);
  py::gil_scoped_release nogil;
  if (variant == 0) {
    d.gemm_f32->latency(g, par, d.gemm_f32_blocking);
  } else {
    d.gemm_f32->throughput(g, par, d.gemm_f32_blocking);
  }
}

// gemm_f32(a, b, packed, k, n, out, alpha, beta, variant, threads)
//   a (M, K) float32, any strides. Either b (K, N) float32 any strides, or
//   b is None and packed is the PackedWeight's panel array for shape (k, n).
//   out None -> a new (M, N) array (beta ignored). variant 0 latency,
//   1 throughput; threads < 1 -> decide by size.
// Returns the result array, or None when `out` overlaps an input: the caller
// then computes into a temporary (NumPy's semantics for overlapping out=).
py::object gemm_f32(py::handle a_h, py::handle b_h, py::handle packed_h, int64_t pk_k,
                    int64_t pk_n, py::handle out_h, float alpha, float beta, int variant,
                    int threads) {
  const Matrix a = as_matrix(a_h, "a");
  pk::GemmF32Args g;
  Matrix b;
  if (!b_h.is_none()) {
    b = as_matrix(b_h, "b");
    if (b.rows != a.cols)
      throw py::value_error("shapes " + shape_str(a.rows, a.cols) + " and " +
                            shape_str(b.rows, b.cols) + " are not aligned: a has " +
                            std::to_string(a.cols) + " columns but b has " +
                            std::to_string(b.rows) + " rows");
    g.b = b.data;
    g.b_rs = b.rs;
    g.b_cs = b.cs;
    g.n = b.cols;
  } else {
    if (pk_k != a.cols)
      throw py::value_error("shapes " + shape_str(a.rows, a.cols) + " and " +
                            shape_str(pk_k, pk_n) + " are not aligned: a has " +
                            std::to_string(a.cols) + " columns but the packed weight has " +
                            std::to_string(pk_k) + " rows");
    g.b_packed = static_cast<const float*>(py::reinterpret_borrow<py::array>(packed_h).data());
    g.n = pk_n;
  }
  g.m = a.rows;
  g.k = a.cols;
  py::object result;
  Matrix c;
  if (out_h.is_none()) {
    result = py::array_t<float>({g.m, g.n});
    beta = 0.0f;
    c = as_matrix(result, "out");
  } else {
    c = as_out(out_h, g.m, g.n);
    if (overlaps(c, a) || (g.b && overlaps(c, b))) return py::none();
    result = py::reinterpret_borrow<py::object>(out_h);
  }
  if (g.m == 0 || g.n == 0) return result;
  g.c = const_cast<float*>(c.data);
  g.c_rs = c.rs;
  if (g.k == 0) {  // empty sum: C = beta * C (or zeros; C is not read when beta == 0)
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) {
        float* p = g.c + i * g.c_rs + j;
        *p = beta == 0.0f ? 0.0f : beta * *p;
      }
    return result;
  }
  g.a = a.data;
  g.a_rs = a.rs;
  g.a_cs = a.cs;
  g.alpha = alpha;
  g.beta = beta;
  run_gemm(g, parse_variant(variant, g.m), resolve_threads(threads, g.m * g.n * g.k));
  return result;
}

// Packs w (K, N), any strides, into out (ceil(N/16), K, 16) float32 C-contiguous.
void pack_f32(const py::array& w, py::array out, int threads) {
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
  blk["kc"] = d.gemm_f32_blocking.kc;
  blk["mc"] = d.gemm_f32_blocking.mc;
  blk["nc"] = d.gemm_f32_blocking.nc;
  r["gemm_f32_blocking"] = blk;
  return r;
}

py::list kernel_table() {
  const pk::Dispatch& d = pk::dispatch();
  py::list out;
  auto add = [&](const char* op, const char* variant, const char* precision, const char* name) {
    py::dict e;
    e["op"] = op;
    e["variant"] = variant;
    e["precision"] = precision;
    e["isa"] = pk::isa_name(d.isa);
    e["name"] = name;
    out.append(e);
  };
  add("gemm", "latency", "fp32", d.gemm_f32->latency_name);
  add("gemm", "throughput", "fp32", d.gemm_f32->throughput_name);
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pykernels C++ kernels (internal; use the pykernels package)";
  const char* isa = std::getenv("PYKERNELS_ISA");
  try {
    pk::init_dispatch(isa ? isa : "");
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  g_f32_descr = py::dtype::of<float>().release().ptr();  // immortal singleton
  m.def("gemm_f32", &gemm_f32);
  m.def("pack_f32", &pack_f32);
  m.def("cpu_info", &cpu_info);
  m.def("kernel_table", &kernel_table);
  m.def("get_num_threads", &pk::default_num_threads);
  m.def("set_num_threads", &pk::set_default_num_threads);
  m.def("fork_join_ns", &pk::measure_fork_join_ns, py::arg("threads"), py::arg("spin"),
        py::arg("reps") = 2000, py::call_guard<py::gil_scoped_release>());
}
