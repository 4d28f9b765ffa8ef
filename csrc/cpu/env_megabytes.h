// A size limit read from the environment, in megabytes (the CPU caches' FASTMAML_*_MB settings).
#pragma once

#include <cstddef>
#include <cstdlib>

namespace fastmaml {

// `name`'s value as a non-negative integer number of megabytes, in bytes; `default_mb` when it
// is unset, empty or not such a number.
inline size_t megabytes_from_env(const char* name, long long default_mb) {
  long long mb = default_mb;
  const char* env = std::getenv(name);
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long parsed = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && parsed >= 0) mb = parsed;
  }
  return static_cast<size_t>(mb) << 20;
}

}  // namespace fastmaml
