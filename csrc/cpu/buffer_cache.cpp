// A cache of large CPU buffers for the few-shot heads' gradient outputs.
//
// Why: the heads return gradients as large as their inputs ([T, q, d] query features: 38 MB at
// T = 8, q = 75, d = 16000). PyTorch's CPU allocator takes such blocks from the OS (mmap) and
// gives them back when the tensor dies, so every call writes into fresh pages that the kernel
// must fault in and zero first: measured here, writing a [256, 75, 1600] float32 gradient took
// 60 ms into a fresh buffer and 12 ms into a reused one. This cache keeps the blocks of dead
// buffers and hands them out again, as PyTorch's CUDA caching allocator does on GPUs.
//
// A buffer is a tensor whose storage frees into the cache: its deleter runs when the last
// reference dies (the user's .grad, the backbone's backward), never while the memory is in use.
// Blocks are matched by size class (rounded up to 64 KB; a block up to 1/8 larger is accepted),
// and the cache holds at most `limit` bytes (FASTMAML_CPU_BUFFER_CACHE_MB, default 2048; 0 turns
// it off); blocks beyond it go back to the OS.
#include <torch/python.h>

#include "env_megabytes.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace fastmaml {
namespace {

constexpr size_t kGranule = size_t(1) << 16;
constexpr size_t kAlignment = 64;

struct BufferCache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // bytes -> block
  size_t cached_bytes = 0;
  size_t limit_bytes = 0;
  size_t hits = 0, misses = 0;

  BufferCache() : limit_bytes(megabytes_from_env("FASTMAML_CPU_BUFFER_CACHE_MB", 2048)) {}

  // A free block of at least `bytes` (and at most 1/8 more), or nullptr; its size in *block_bytes.
  void* take(size_t bytes, size_t* block_bytes) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = free_blocks.lower_bound(bytes);
    if (it == free_blocks.end() || it->first > bytes + bytes / 8) {
      ++misses;
      return nullptr;
    }
    void* block = it->second;
    *block_bytes = it->first;
    cached_bytes -= it->first;
    free_blocks.erase(it);
    ++hits;
    return block;
  }

  void give_back(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (cached_bytes + bytes <= limit_bytes) {
        free_blocks.emplace(bytes, block);
        cached_bytes += bytes;
        return;
      }
    }
    std::free(block);
  }

  size_t clear() {
    std::lock_guard<std::mutex> lock(mu);
    const size_t freed = cached_bytes;
    for (auto& kv : free_blocks) std::free(kv.second);
    free_blocks.clear();
    cached_bytes = 0;
    return freed;
  }
};

// Never destroyed: a buffer may die after static destructors have run (at interpreter exit).
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

// Uninitialised tensor of `sizes` with `like`'s dtype on the CPU, backed by a cached block when
// one fits (callers check: CPU `like`, sizes >= 0; nothing here throws for valid input).
at::Tensor cached_empty(const at::Tensor& like, const std::vector<int64_t>& sizes) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t want = static_cast<size_t>(numel) * like.element_size();
  BufferCache& c = cache();
  size_t limit;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    limit = c.limit_bytes;
  }
  if (want < kGranule || limit == 0) return at::empty(sizes, like.options());
  const size_t rounded = (want + kGranule - 1) / kGranule * kGranule;
  size_t bytes = rounded;
  void* block = c.take(rounded, &bytes);
  if (block == nullptr) {
    block = std::aligned_alloc(kAlignment, rounded);
    if (block == nullptr) return at::empty(sizes, like.options());
  }
  return at::from_blob(
      block, sizes, [bytes](void* p) { cache().give_back(p, bytes); },
      like.options().device(at::kCPU));
}

}  // namespace

void register_buffer_cache(pybind11::module_& m) {
  m.def("cached_empty", &cached_empty, "uninitialised CPU tensor backed by the buffer cache");
  m.def("buffer_cache_clear", []() { return cache().clear(); }, "frees the cached blocks; returns their bytes");
  m.def("buffer_cache_stats", []() {
    BufferCache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    pybind11::dict d;
    d["cached_bytes"] = c.cached_bytes;
    d["cached_blocks"] = c.free_blocks.size();
    d["limit_bytes"] = c.limit_bytes;
    d["hits"] = c.hits;
    d["misses"] = c.misses;
    return d;
  });
  m.def("buffer_cache_set_limit", [](size_t bytes) {
    BufferCache& c = cache();
    bool over;
    {
      std::lock_guard<std::mutex> lock(c.mu);
      c.limit_bytes = bytes;
      over = c.cached_bytes > bytes;
    }
    if (over) c.clear();
  });
}

}  // namespace fastmaml
