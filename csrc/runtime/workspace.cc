// Per-thread scratch buffers: grown on demand, reused across calls, freed at
// thread exit, or when the call returns if larger than kWorkspaceRetainBytes
// (workspace_trim). A warm call of ordinary size therefore allocates nothing.
#include <cstdlib>
#include <new>

#include "pykernels/runtime.h"

namespace pk {
namespace {

struct Buffer {
  float* ptr = nullptr;
  size_t capacity = 0;  // floats
  ~Buffer() { std::free(ptr); }
  void release() {
    std::free(ptr);
    ptr = nullptr;
    capacity = 0;
  }
};

thread_local Buffer t_buffers[kWorkspaceSlots];

}  // namespace

float* workspace_floats(int slot, size_t count) {
  Buffer& b = t_buffers[slot];
  if (count <= b.capacity) return b.ptr;
  // Grow geometrically; 64-byte alignment for aligned vector loads of panels.
  size_t want = count + count / 4 + 16;
  // The headroom never takes a buffer that fits under the retain cap over it:
  // it would then be freed after every call (workspace_trim).
  constexpr size_t kCap = kWorkspaceRetainBytes / sizeof(float);
  if (count <= kCap && want > kCap) want = kCap;
  if (want > (SIZE_MAX - 63) / sizeof(float)) throw std::bad_alloc();
  size_t bytes = (want * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::free(b.ptr);
  b.ptr = static_cast<float*>(p);
  b.capacity = want;
  return b.ptr;
}

void workspace_trim() {
  for (Buffer& b : t_buffers)
    if (b.capacity > kWorkspaceRetainBytes / sizeof(float)) b.release();
}

size_t workspace_held_bytes() {
  size_t total = 0;
  for (const Buffer& b : t_buffers) total += b.capacity * sizeof(float);
  return total;
}

}  // namespace pk
