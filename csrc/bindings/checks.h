// Argument checks shared by the binding files (gemm.cc, attention.cc,
// encoder.cc): a NumPy view read into plain pointers, sizes and element
// strides, overlap and alignment, variant and thread resolution. Definitions
// and their reasons: checks.cc.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // in every binding unit: pybind11's casters must agree across them

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "pykernels/dispatch.h"
#include "pykernels/gemm.h"
#include "pykernels/runtime.h"

namespace py = pybind11;

namespace pk::bind {

extern PyObject* g_f32_descr;  // NumPy's float32 descriptor singleton, set at module init

bool is_float32(const py::array& a);

// A 2-D float32 matrix view: pointer, sizes, element strides, byte bounds.
struct Matrix {
  const float* data = nullptr;
  int64_t rows = 0, cols = 0, rs = 0, cs = 0;
  const char* lo = nullptr;  // lowest and one-past-highest byte touched
  const char* hi = nullptr;
  bool aligned = true;       // data is on a 4-byte boundary
};

bool is_aligned(const void* p, size_t align);
py::handle aligned_input(py::handle h, size_t align, py::object& keep);
bool overlaps(const Matrix& x, const Matrix& y);
std::string dtype_name(const py::array& a);
int64_t elem_stride(const py::array& a, int dim);
Matrix as_matrix(py::handle h, const char* name, py::object* keep = nullptr);
std::string shape_str(int64_t r, int64_t c);
Matrix as_out(py::handle h, int64_t m, int64_t n);
// The table index of a requested variant; auto resolved by pk::auto_variant
// for a product of m x k x n (callers that resolve auto themselves, like
// attention, pass only the variant).
int parse_variant(pk::Variant variant, pk::Precision precision = pk::Precision::kF32,
                  bool packed_b = false, int64_t m = 0, int64_t k = 0, int64_t n = 0,
                  int threads = 1);
int64_t work_product(std::initializer_list<int64_t> sizes);
int resolve_threads(int threads, int64_t macs);
pk::ParallelPolicy parallel(int variant, int threads);

// int32 accumulation of int8 products is exact while K * 127 * 127 < 2^31.
constexpr int64_t kMaxKInt8 = 131072;
// A PackedWeight's panel array of precision p for shape (k, n), and an int8
// weight's per-column scales (n,), checked for type, dtype, layout, alignment
// and exact size (gemm.cc): ValueError "... is corrupted ...; pack the weight again".
const void* checked_packed(py::handle h, pk::Precision p, int64_t k, int64_t n);
const float* checked_scales(py::handle h, int64_t n);

// Frees oversized scratch when a kernel call returns, also by exception (see
// pk::kWorkspaceRetainBytes): one huge call must not pin its buffers.
struct WorkspaceTrim {
  ~WorkspaceTrim() { pk::workspace_trim(); }
};

}  // namespace pk::bind
