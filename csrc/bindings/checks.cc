// The argument checks shared by the binding files (declared in checks.h).
#include "checks.h"

#include <climits>
#include <cstdint>
#include <string>

namespace pk::bind {

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
Matrix as_matrix(py::handle h, const char* name, py::object* keep) {
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

// The table index (0 latency, 1 throughput) of a requested variant; auto
// without a policy follows pk::auto_variant (gemm.h) for a product of
// m x k x n on `threads` threads. (A py::enum_ can be built from any int, so
// the range is still checked.)
int parse_variant(pk::Variant variant, pk::Precision precision, bool packed_b, int64_t m,
                  int64_t k, int64_t n, int threads) {
  if (variant == pk::Variant::kAuto) return pk::auto_variant(precision, packed_b, m, k, n, threads);
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

}  // namespace pk::bind
