// GEMM and packing bindings: matmul (plain or PackedWeight b), pack_lowp,
// pack_f32, and the bf16 scheme switch (set_bf16_scheme, bf16_dot_available,
// measure_probes: the two rates its "auto" choice reads when no peaks are
// cached). Shared argument checks: checks.h; the boundary: docs/kernels.md.
#include "bindings.h"
#include "checks.h"
#include "pykernels/peaks.h"

#include <climits>
#include <stdexcept>
#include <cstdint>
#include <string>
#include <vector>

namespace pk::bind {
namespace {

void run_gemm(const pk::GemmArgs& g, int variant, int threads) {
  const pk::Dispatch& d = pk::dispatch();
  const pk::ParallelPolicy par = parallel(variant, threads);
  const pk::GemmFn fn = d.gemm->run[static_cast<int>(g.precision)][variant];
  py::gil_scoped_release nogil;
  WorkspaceTrim trim;
  fn(g, par, d.gemm_blocking);
}

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

}  // namespace

// ---- PackedWeight internals ---------------------------------------------------
// A PackedWeight's arrays and shape are plain Python attributes (_data,
// _scale, _shape, _code) that a caller can replace, so nothing about them is
// trusted: each is checked for type, dtype, layout, alignment and an exact
// size before a kernel reads it. Every failure is ValueError: the weight is
// corrupted, and the fix is to pack it again.

[[noreturn]] static void corrupted_weight(const std::string& what, int64_t k, int64_t n) {
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

namespace {

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
    if (pk::is_int8(g.precision)) {
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
  const int nthreads = resolve_threads(threads, work_product({g.m, g.n, g.k}));
  run_gemm(g, parse_variant(variant, g.precision, g.b_packed != nullptr, g.m, g.k, g.n, nthreads),
           nthreads);
  return result;
}

// Packs w (K, N) float32 into bf16 or int8 panels in `out`; int8 also fills
// scale (N,). Returns (sum of squared errors, sum of squares).
py::tuple pack_lowp(const py::array& w_in, pk::Precision precision, py::array out,
                    py::handle scale_h) {
  if (precision != pk::Precision::kBF16 && !pk::is_int8(precision))
    throw py::value_error("internal: pack_lowp takes bf16 or int8");
  py::object keep;  // pack reads w through float*: a misaligned w is copied first
  const auto w = py::reinterpret_borrow<py::array>(aligned_input(w_in, sizeof(float), keep));
  const float* src = static_cast<const float*>(w.data());
  const int64_t k = w.shape(0), n = w.shape(1);
  const int64_t rs = elem_stride(w, 0), cs = elem_stride(w, 1);
  double err2 = 0, ref2 = 0;
  float* scale = pk::is_int8(precision)
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

// pk.gemm's entry point (pykernels._gemm binds `gemm` to what make_gemm
// returns). The common call -- ndarray a and b, out None or an ndarray, alpha
// and beta floats or ints, variant a known name, threads None or an int >= 1,
// no variant chooser installed -- is parsed here through the vectorcall
// protocol and run by matmul. Anything else, an `out` that overlaps an input,
// and any error go to the Python implementation (`gemm_fallback`:
// _gemm._gemm_py), which converts, checks and raises as the SPEC says (it
// runs the same checks again, so every message comes from one place).
// Why: a 32x32x32 product is ~1 us of work, and the Python wrapper plus
// pybind11's dispatch of matmul's 14 arguments cost ~0.2 us of a 1.22 us call
// on Zen 5 (pk.gemm 1.22 us, _core.matmul alone 1.02, NumPy 1.39) and ~0.4 us
// on Zen 4, where pk.gemm stayed at 0.83-0.90x NumPy at 32^3 and 64^3.
PyObject* g_gemm_fallback = nullptr;  // owned; set once by make_gemm
PyObject* g_ndarray_type = nullptr;   // owned
bool g_chooser_active = false;        // pykernels._chooser.active is not None

bool is_ndarray(PyObject* o) { return reinterpret_cast<PyObject*>(Py_TYPE(o)) == g_ndarray_type; }

// A float or an int as a C float (as pybind11 converts matmul's alpha and
// beta); false for anything else, with no Python error left set.
bool scalar_of(PyObject* o, float* v) {
  if (PyFloat_CheckExact(o)) {
    *v = static_cast<float>(PyFloat_AS_DOUBLE(o));
    return true;
  }
  if (PyLong_CheckExact(o)) {
    const double d = PyLong_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    *v = static_cast<float>(d);
    return true;
  }
  return false;
}

PyObject* gemm_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  auto fallback = [&] { return PyObject_Vectorcall(g_gemm_fallback, args, nargs, kwnames); };
  if (nargs != 2 || g_chooser_active || !is_ndarray(args[0]) || !is_ndarray(args[1]))
    return fallback();
  PyObject* out = Py_None;
  float alpha = 1.0f, beta = 0.0f;
  pk::Variant variant = pk::Variant::kAuto;
  long threads = 0;
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t i = 0; i < nkw; ++i) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, i);
    PyObject* value = args[nargs + i];
    if (PyUnicode_CompareWithASCIIString(name, "out") == 0) {
      if (value != Py_None && !is_ndarray(value)) return fallback();
      out = value;
    } else if (PyUnicode_CompareWithASCIIString(name, "alpha") == 0) {
      if (!scalar_of(value, &alpha)) return fallback();
    } else if (PyUnicode_CompareWithASCIIString(name, "beta") == 0) {
      if (!scalar_of(value, &beta)) return fallback();
    } else if (PyUnicode_CompareWithASCIIString(name, "variant") == 0) {
      if (!PyUnicode_CheckExact(value)) return fallback();
      if (PyUnicode_CompareWithASCIIString(value, "auto") == 0) {
        variant = pk::Variant::kAuto;
      } else if (PyUnicode_CompareWithASCIIString(value, "latency") == 0) {
        variant = pk::Variant::kLatency;
      } else if (PyUnicode_CompareWithASCIIString(value, "throughput") == 0) {
        variant = pk::Variant::kThroughput;
      } else {
        return fallback();
      }
    } else if (PyUnicode_CompareWithASCIIString(name, "threads") == 0) {
      if (value == Py_None) {
        threads = 0;
      } else {
        if (!PyLong_CheckExact(value)) return fallback();
        int overflow = 0;
        threads = PyLong_AsLongAndOverflow(value, &overflow);
        if (overflow != 0 || threads < 1) return fallback();
        if (threads > pk::kMaxThreads) threads = pk::kMaxThreads;
      }
    } else {
      return fallback();
    }
  }
  try {
    py::object res = matmul(args[0], args[1], out, alpha, beta, variant, static_cast<int>(threads),
                            py::none(), pk::Activation::kNone, py::none(), pk::Precision::kF32,
                            py::none(), 0, 0);
    if (res.is_none()) return fallback();  // out overlaps an input
    return res.release().ptr();
  } catch (...) {
    // (pybind11 moved any Python error into the exception: none is set now)
    return fallback();
  }
}

}  // namespace

void bind_gemm(py::module_& m) {
  const auto none = py::none();
  // make_gemm(fallback) -> the builtin pk.gemm (see gemm_entry), with
  // fallback's docstring and gemm's signature. Called once, at import.
  m.def("make_gemm", [](py::object fallback) {
    if (g_gemm_fallback != nullptr) throw std::runtime_error("make_gemm: already made");
    static PyMethodDef def{};
    static std::string doc;
    doc = "gemm(a, b, *, out=None, alpha=1.0, beta=0.0, variant='auto', threads=None)\n--\n\n" +
          std::string(py::str(fallback.attr("__doc__")));
    def.ml_name = "gemm";
    def.ml_meth = reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&gemm_entry));
    def.ml_flags = METH_FASTCALL | METH_KEYWORDS;
    def.ml_doc = doc.c_str();
    g_ndarray_type = py::object(py::module_::import("numpy").attr("ndarray")).release().ptr();
    py::str module_name("pykernels");
    PyObject* fn = PyCFunction_NewEx(&def, nullptr, module_name.ptr());
    if (fn == nullptr) throw py::error_already_set();
    g_gemm_fallback = fallback.release().ptr();
    return py::reinterpret_steal<py::object>(fn);
  }, py::arg("fallback"));
  // pykernels._chooser tells the entry point whether a chooser is installed.
  m.def("set_chooser_active", [](bool on) { g_chooser_active = on; }, py::arg("on"));
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
  // std::invalid_argument reaches Python as ValueError.
  m.def("set_bf16_scheme", &pk::set_bf16_scheme, py::arg("scheme"));
  m.def("bf16_dot_available", &pk::bf16_dot_available);
  // measure_probes(names, seconds) -> [(name, ops/s on one thread)]
  m.def("measure_probes", [](const py::list& names, double seconds) {
    std::vector<std::string> want;
    for (py::handle h : names) want.push_back(py::cast<std::string>(h));
    std::vector<pk::PeakRate> r;
    {
      py::gil_scoped_release nogil;
      r = pk::measure_probes(want, seconds);
    }
    py::list out;
    for (const pk::PeakRate& p : r) out.append(py::make_tuple(p.name, p.one));
    return out;
  }, py::arg("names"), py::arg("seconds"));
}

}  // namespace pk::bind
