// The pybind11 module pykernels._core. The bindings live in this folder, the
// only C++ that knows Python: checks.h/.cc (argument checks shared by all),
// gemm.cc, attention.cc, encoder.cc (each registers its functions through
// bindings.h), and this file: module init (dispatch, init_error), the enums
// and constants, cpu_info, kernel_table, threads, peaks. Each function checks
// the NumPy views it is given (dtype, shape, strides, overlap), reads pointers
// and strides, releases the GIL and runs the kernel: no conversion (arrays
// arrive as py::handle or noconvert), no copy except of a misaligned input.
// Arguments are named, and variant / precision / activation are the C++ enums
// exported below. The boundary and the reasons for it: docs/kernels.md.
#include "bindings.h"
#include "checks.h"

#include <cstdlib>
#include <iterator>
#include <stdexcept>
#include <string>

#include "pykernels/peaks.h"

namespace {

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
  blk["kc_latency"] = d.gemm_blocking.kc_latency;
  blk["mc"] = d.gemm_blocking.mc;
  blk["nc"] = d.gemm_blocking.nc;
  r["gemm_blocking"] = blk;
  return r;
}

// The Python names of the enums, indexed by value: the public API's strings
// (variant="auto", precision="int8", activation="gelu") and the registry's.
constexpr const char* kVariantNames[] = {"latency", "throughput", "auto"};
constexpr const char* kPrecisionNames[pk::kNumPrecisions] = {"fp32", "bf16", "int8", "int8_7bit"};
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
  pk::bind::g_f32_descr = py::dtype::of<float>().release().ptr();  // immortal singleton

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
  pk::bind::bind_gemm(m);       // matmul, pack_lowp, pack_f32
  pk::bind::bind_attention(m);  // set_bf16_dtype, attention, decode_attention, attention_exp2
  m.def("cpu_info", &cpu_info);
  m.def("kernel_table", &kernel_table);
  m.def("get_num_threads", &pk::default_num_threads);
  m.def("set_num_threads", &pk::set_default_num_threads, py::arg("n"));
  // Scratch the calling thread holds between calls (tests: nothing oversized is kept).
  m.def("workspace_held_bytes", &pk::workspace_held_bytes);
  m.def("fork_join_ns", &pk::measure_fork_join_ns, py::arg("threads"), py::arg("spin"),
        py::arg("reps") = 2000, py::call_guard<py::gil_scoped_release>());
  pk::bind::bind_encoder(m);  // add_layer_norm, embed_layer_norm, varlen_attention, pool
  // std::invalid_argument reaches Python as ValueError.
  m.def("set_int8_scheme", &pk::set_int8_scheme, py::arg("scheme"));
  m.def("measure_peaks", &measure_peaks_py, py::arg("seconds"));
  m.def("_set_gemm_blocking", [](int64_t kc, int64_t kc_latency, int64_t mc, int64_t nc) {
    const pk::Blocking b = pk::set_gemm_blocking(kc, kc_latency, mc, nc);
    return py::make_tuple(b.kc, b.kc_latency, b.mc, b.nc);
  }, py::arg("kc"), py::arg("kc_latency"), py::arg("mc"), py::arg("nc"));
}
