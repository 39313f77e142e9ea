// CPU feature detection: CPUID bits confirmed by XCR0 (the OS saves the
// registers), once per process. Never by model name.
#include <cpuid.h>
#include <sched.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "pykernels/runtime.h"

namespace pk {
namespace {

struct Regs { unsigned a = 0, b = 0, c = 0, d = 0; };

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  __cpuid_count(leaf, sub, r.a, r.b, r.c, r.d);
  return r;
}

uint64_t xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool bit(unsigned v, int i) { return (v >> i) & 1u; }

int64_t sysfs_cache_bytes(int index) {
  // /sys/devices/system/cpu/cpu0/cache/indexN/size, e.g. "48K" or "2048K".
  std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
  std::string s;
  if (!(f >> s) || s.empty()) return 0;
  int64_t v = std::atoll(s.c_str());
  char unit = s.back();
  if (unit == 'K') v *= 1024;
  if (unit == 'M') v *= 1024 * 1024;
  return v;
}

std::string sysfs_cache_type(int index) {
  std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/type");
  std::string s;
  f >> s;
  return s;
}

CpuFeatures detect() {
  CpuFeatures f;
  Regs r0 = cpuid(0, 0);
  char vendor[13] = {};
  std::memcpy(vendor + 0, &r0.b, 4);
  std::memcpy(vendor + 4, &r0.d, 4);
  std::memcpy(vendor + 8, &r0.c, 4);
  f.vendor = vendor;
  const unsigned max_leaf = r0.a;

  Regs r1 = cpuid(1, 0);
  const bool osxsave = bit(r1.c, 27);
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;            // XMM | YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask | ZMM_Hi256 | Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000;    // XTILECFG | XTILEDATA

  f.avx = os_avx && bit(r1.c, 28);
  f.fma = f.avx && bit(r1.c, 12);
  f.f16c = f.avx && bit(r1.c, 29);
  if (max_leaf >= 7) {
    Regs r7 = cpuid(7, 0);
    Regs r71 = cpuid(7, 1);
    f.avx2 = f.avx && bit(r7.b, 5);
    f.avx512f = os_avx512 && bit(r7.b, 16);
    f.avx512dq = f.avx512f && bit(r7.b, 17);
    f.avx512bw = f.avx512f && bit(r7.b, 30);
    f.avx512vl = f.avx512f && bit(r7.b, 31);
    f.avx512_vnni = f.avx512f && bit(r7.c, 11);
    f.avx512_fp16 = f.avx512f && bit(r7.d, 23);
    f.avx512_bf16 = f.avx512f && r7.a >= 1 && bit(r71.a, 5);
    f.avx_vnni = f.avx2 && r7.a >= 1 && bit(r71.a, 4);
    f.amx = os_amx && bit(r7.d, 24);
  }
  // Brand string (informational only; never used for decisions).
  if (cpuid(0x80000000u, 0).a >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      Regs r = cpuid(0x80000002u + i, 0);
      std::memcpy(brand + 16 * i + 0, &r.a, 4);
      std::memcpy(brand + 16 * i + 4, &r.b, 4);
      std::memcpy(brand + 16 * i + 8, &r.c, 4);
      std::memcpy(brand + 16 * i + 12, &r.d, 4);
    }
    f.model = brand;
    while (!f.model.empty() && f.model.back() == ' ') f.model.pop_back();
  }
  // Caches: sysfs is the most portable source under hypervisors (CPUID leaf 4
  // is Intel-only, 0x8000001D AMD-only). Keep the defaults if unreadable.
  for (int idx = 0; idx < 8; ++idx) {
    int64_t bytes = sysfs_cache_bytes(idx);
    if (bytes <= 0) continue;
    std::ifstream lf("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/level");
    int level = 0;
    lf >> level;
    std::string type = sysfs_cache_type(idx);
    if (level == 1 && type == "Data") f.l1d_bytes = bytes;
    if (level == 2) f.l2_bytes = bytes;
    if (level == 3) f.l3_bytes = bytes;
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    f.cores = CPU_COUNT(&set);
  } else {
    f.cores = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  }
  if (f.cores < 1) f.cores = 1;
  return f;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

Isa CpuFeatures::best_isa() const {
  if (avx512f && avx512bw && avx512vl && avx512dq && fma) return Isa::kAvx512;
  if (avx2 && fma) return Isa::kAvx2;
  return Isa::kGeneric;
}

std::vector<std::string> CpuFeatures::names() const {
  std::vector<std::string> out;
  auto add = [&](bool on, const char* n) { if (on) out.emplace_back(n); };
  add(avx, "avx"); add(avx2, "avx2"); add(fma, "fma"); add(f16c, "f16c");
  add(avx512f, "avx512f"); add(avx512bw, "avx512bw"); add(avx512vl, "avx512vl");
  add(avx512dq, "avx512dq"); add(avx512_bf16, "avx512_bf16");
  add(avx512_vnni, "avx512_vnni"); add(avx512_fp16, "avx512_fp16");
  add(avx_vnni, "avx_vnni"); add(amx, "amx");
  return out;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace pk
