#include "backend/cpu/cpu_features.h"

#include <cpuid.h>

#include <cstdint>
#include <utility>

namespace kestrel::cpu {

namespace {

// XCR0: which register state the OS saves on context switches. Read with inline asm so that no
// -mxsave flag is needed.
uint64_t read_xcr0() {
  uint32_t lo = 0;
  uint32_t hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

bool bit(uint32_t reg, int b) {
  return (reg >> b) & 1u;
}

// CPUID feature bits (Intel SDM vol. 2, CPUID), gated on the OS saving the wider registers: a
// CPU can report AVX-512 while the kernel or hypervisor has not enabled its state.
CpuFeatures detect() {
  CpuFeatures f;
  uint32_t a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = bit(c, 27);
  const uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;                 // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool avx = os_avx && bit(c, 28);
  f.fma = avx && bit(c, 12);
  f.f16c = avx && bit(c, 29);

  uint32_t max_leaf = 0;
  __get_cpuid(0, &max_leaf, &b, &c, &d);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const uint32_t max_subleaf = a;
  f.avx2 = avx && bit(b, 5);
  f.bmi2 = bit(b, 8);
  f.avx512f = os_avx512 && bit(b, 16);
  f.avx512dq = f.avx512f && bit(b, 17);
  f.avx512bw = f.avx512f && bit(b, 30);
  f.avx512vl = f.avx512f && bit(b, 31);
  f.avx512vnni = f.avx512f && bit(c, 11);
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512bf16 = f.avx512f && bit(a, 5);
  }
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

bool has_baseline_features() {
  const CpuFeatures& f = cpu_features();
  return f.avx2 && f.fma && f.f16c && f.bmi2;
}

bool has_avx512_kernels() {
  const CpuFeatures& f = cpu_features();
  return has_baseline_features() && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq &&
         f.avx512vnni && f.avx512bf16;
}

std::string describe_cpu_features() {
  const CpuFeatures& f = cpu_features();
  const std::pair<bool, const char*> flags[] = {{f.avx2, "avx2"},
                                                {f.fma, "fma"},
                                                {f.f16c, "f16c"},
                                                {f.bmi2, "bmi2"},
                                                {f.avx512f, "avx512f"},
                                                {f.avx512bw, "avx512bw"},
                                                {f.avx512vl, "avx512vl"},
                                                {f.avx512dq, "avx512dq"},
                                                {f.avx512vnni, "avx512vnni"},
                                                {f.avx512bf16, "avx512bf16"}};
  std::string out;
  for (const auto& [present, name] : flags) {
    if (!present) continue;
    if (!out.empty()) out += ' ';
    out += name;
  }
  return out.empty() ? "none" : out;
}

}  // namespace kestrel::cpu
