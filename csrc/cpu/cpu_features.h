// Which instruction set the CPU kernels run with, decided as torch's own kernels decide it.
#pragma once

#include <cstdlib>
#include <string>

namespace fastmaml {

// Whether the AVX2 + FMA copies of the kernels run: the CPU has both, and ATEN_CPU_CAPABILITY is
// not "default" (which forces the baseline copies; read on every call, so that tests can run
// both copies in one process).
inline bool use_avx2_fma() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env != nullptr && std::string(env) == "default") return false;
  return supported;
#else
  return false;
#endif
}

}  // namespace fastmaml
