// Per-thread scratch buffers: grown on demand, reused across calls, freed at
// thread exit. A warm call therefore allocates nothing.
#include <cstdlib>
#include <new>

#include "pykernels/runtime.h"

namespace pk {
namespace {

struct Buffer {
  float* ptr = nullptr;
  size_t capacity = 0;  // floats
  ~Buffer() { std::free(ptr); }
};

thread_local Buffer t_buffers[kWorkspaceSlots];

}  // namespace

float* workspace_floats(int slot, size_t count) {
  Buffer& b = t_buffers[slot];
  if (count <= b.capacity) return b.ptr;
  // Grow geometrically; 64-byte alignment for aligned vector loads of panels.
  size_t want = count + count / 4 + 16;
  if (want > (SIZE_MAX - 63) / sizeof(float)) throw std::bad_alloc();
  size_t bytes = (want * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::free(b.ptr);
  b.ptr = static_cast<float*>(p);
  b.capacity = want;
  return b.ptr;
}

}  // namespace pk
