// Which x86 instruction set extensions this CPU (and OS) offers, detected once at run time.
// Kernels are compiled for the AVX2/FMA/F16C baseline plus AVX-512 variants in *_avx512.cpp;
// dispatch uses has_avx512_kernels() to pick.
#pragma once

#include <string>

namespace kestrel::cpu {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool bmi2 = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;
};

const CpuFeatures& cpu_features();

// True when the CPU has everything the baseline kernels are compiled for (AVX2, FMA, F16C,
// BMI2); the engine refuses to run CPU kernels otherwise.
bool has_baseline_features();

// True when the CPU has every extension the *_avx512.cpp files are compiled with.
bool has_avx512_kernels();

// "avx2 fma f16c bmi2 avx512f ..." — the detected extensions, for logs and benchmark headers.
std::string describe_cpu_features();

}  // namespace kestrel::cpu
