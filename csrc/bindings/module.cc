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

// Element stride of dimension `dim` of a float32 array; NumPy strides are in
// bytes and may, through as_strided, be a non-multiple of the item size.
int64_t elem_stride(const py::array& a, int dim) {
  const py::ssize_t s = a.strides(dim);
  if (s % static_cast<py::ssize_t>(sizeof(float)) != 0)
    throw py::value_error("array stride " + std::to_string(s) +
                          " bytes is not a multiple of 4; pass a copy (np.ascontiguousarray)");
  return s / static_cast<py::ssize_t>(sizeof(float));
}

const float* fdata(const py::array& a) { return static_cast<const float*>(a.data()); }

pk::ParallelPolicy parallel(int variant, int threads) {
  pk::ParallelPolicy p;
  p.threads = threads < 1 ? 1 : threads;
  p.spin = variant == 0;
  return p;
}

// gemm_f32(a, b, packed, out, alpha, beta, variant, threads, bias, act)
// a (M, K); exactly one of b (K, N) / packed (P, K, 16) is an array; out (M, N)
// with unit column stride; bias (N,) contiguous or None. variant 0 = latency,
// 1 = throughput.
void gemm_f32(const py::array& a, const py::object& b, const py::object& packed,
              py::array out, float alpha, float beta, int variant, int threads,
              const py::object& bias, int act) {
  pk::GemmF32Args g;
  g.m = a.shape(0);
  g.k = a.shape(1);
  g.n = out.shape(1);
  g.a = fdata(a);
  g.a_rs = elem_stride(a, 0);
  g.a_cs = elem_stride(a, 1);
  if (!packed.is_none()) {
    g.b_packed = fdata(py::reinterpret_borrow<py::array>(packed));
  } else {
    auto bb = py::reinterpret_borrow<py::array>(b);
    g.b = fdata(bb);
    g.b_rs = elem_stride(bb, 0);
    g.b_cs = elem_stride(bb, 1);
  }
  g.c = static_cast<float*>(out.mutable_data());
  g.c_rs = elem_stride(out, 0);
  g.alpha = alpha;
  g.beta = beta;
  if (!bias.is_none()) g.bias = fdata(py::reinterpret_borrow<py::array>(bias));
  g.act = static_cast<pk::Activation>(act);
  const pk::Dispatch& d = pk::dispatch();
  const pk::ParallelPolicy par = parallel(variant, threads);
  py::gil_scoped_release nogil;
  if (variant == 0) {
    d.gemm_f32->latency(g, par, d.gemm_f32_blocking);
  } else {
    d.gemm_f32->throughput(g, par, d.gemm_f32_blocking);
  }
}

// Packs w (K, N), any strides, into out (ceil(N/16), K, 16) float32 C-contiguous.
void pack_f32(const py::array& w, py::array out, int threads) {
  const float* src = fdata(w);
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
  m.def("gemm_f32", &gemm_f32);
  m.def("pack_f32", &pack_f32);
  m.def("cpu_info", &cpu_info);
  m.def("kernel_table", &kernel_table);
  m.def("get_num_threads", &pk::default_num_threads);
  m.def("set_num_threads", &pk::set_default_num_threads);
  m.def("fork_join_ns", &pk::measure_fork_join_ns, py::arg("threads"), py::arg("spin"),
        py::arg("reps") = 2000, py::call_guard<py::gil_scoped_release>());
}
