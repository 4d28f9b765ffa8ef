// A CPU allocator that reuses the blocks freed within a scope (the meta-gradient engine's call).
//
// Why: PyTorch's CPU allocator hands large blocks to glibc, which serves them by mmap or trims
// them off its heap, and gives them back to the OS when the tensor dies. The engine allocates the
// same activation-sized blocks once per task, inner step and pass, so many land in fresh pages
// that the kernel must fault in and zero first: one second-order call on workload A (K = 10)
// took 40-60k minor page faults. Inside a scope, freed blocks of at least kMinBytes are kept and
// handed out again to requests of their size class, as PyTorch's CUDA caching allocator does on
// GPUs. When the outermost scope ends, the previous allocator is restored and the kept blocks go
// back to the OS: nothing is held between calls. A block that is freed after the scope goes
// straight back.
//
// Memory: kept and live blocks together never exceed the scope's peak of live blocks (what the
// call holds without reuse): a request that finds no block first gives back as few kept bytes
// as make the new one fit under that peak (one block or the smallest ones). Blocks are matched by size class (rounded up
// to 4 KB; a block up to 1/8 larger is accepted); at most `limit` bytes are kept
// (FASTMAML_CPU_BLOCK_REUSE_MB, default 1024; 0 turns scopes off). Smaller requests are served
// by c10::alloc_cpu, as PyTorch's default allocator serves them.
//
// Unlike buffer_cache.cpp (the heads' gradient buffers, which outlive the call that makes them
// and are kept across calls), this serves every CPU allocation inside a scope and keeps nothing
// after it.
#include <torch/python.h>

#include "env_megabytes.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <map>
#include <mutex>
#include <unordered_map>

namespace fastmaml {
namespace {

constexpr size_t kMinBytes = size_t(1) << 15;  // below: glibc's heap, no page faults to save
constexpr size_t kGranule = size_t(1) << 12;
constexpr size_t kHugePage = size_t(1) << 21;
constexpr size_t kHugeMin = size_t(1) << 23;

// A new block. One of 8 MB or more is 2 MB-aligned and asks the kernel for transparent huge
// pages (where THP is in "madvise" mode, as on the development VM): its first touch then faults
// 2 MB at a time instead of 4 KB. Workload B's first block has 68 MB activations, and with the
// kept blocks capped at the scope's peak some are still new on each task: B, K = 5 went from
// 2126-2285 ms to 1762-1991 with torch's own huge-page switch (THP_MEM_ALLOC_ENABLE=1), and to
// 1644-1698 with glibc keeping everything (no new pages at all, but a resident set that never
// shrinks). The rounding to whole huge pages costs at most 1/4 of a block of that size. Freed
// by c10::free_cpu (free) like the others.
void* alloc_block(size_t bytes) {
#if defined(__linux__)
  if (bytes >= kHugeMin) {
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) == 0 && p != nullptr) {
      madvise(p, bytes, MADV_HUGEPAGE);  // advice only: ignored where THP is off
      return p;
    }
  }
#endif
  return c10::alloc_cpu(bytes);
}

void free_block(void* ptr);

class BlockReuseAllocator final : public c10::Allocator {
 public:
  std::mutex mu;
  int depth = 0;                                 // nesting of open scopes
  c10::Allocator* previous = nullptr;            // what the outermost scope replaced
  // Free blocks kept while depth > 0, by size (for reuse) and by age (the oldest go first when
  // the limit is reached: blocks of a finished phase, e.g. the query pass, stop holding memory).
  std::multimap<size_t, std::pair<uint64_t, void*>> free_blocks;  // bytes -> (age, block)
  std::map<uint64_t, std::multimap<size_t, std::pair<uint64_t, void*>>::iterator> by_age;
  uint64_t next_age = 0;
  std::unordered_map<void*, size_t> live;        // blocks of this allocator in use -> bytes
  size_t cached_bytes = 0, peak_cached_bytes = 0, limit_bytes = 0;
  size_t live_bytes = 0, peak_live_bytes = 0;  // blocks of at least kMinBytes in use; peak in the scope
  size_t hits = 0, misses = 0;

  BlockReuseAllocator() : limit_bytes(megabytes_from_env("FASTMAML_CPU_BLOCK_REUSE_MB", 1024)) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (nbytes < kMinBytes) {
      void* p = c10::alloc_cpu(nbytes);
      if (p != nullptr) c10::profiledCPUMemoryReporter().New(p, nbytes);
      return {p, p, &free_block, cpu};
    }
    // Blocks of kHugeMin bytes or more are whole huge pages (see alloc_block).
    const size_t granule = nbytes >= kHugeMin ? kHugePage : kGranule;
    const size_t rounded = (nbytes + granule - 1) / granule * granule;
    void* p = nullptr;
    size_t bytes = rounded;
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free_blocks.lower_bound(rounded);
      if (it != free_blocks.end() && it->first <= rounded + rounded / 8) {
        p = it->second.second;
        bytes = it->first;
        cached_bytes -= bytes;
        by_age.erase(it->second.first);
        free_blocks.erase(it);
        ++hits;
      } else {
        ++misses;
        // Kept and live blocks together stay within the scope's peak of live blocks, what the
        // call holds without reuse: a new block first pushes out kept ones, as few bytes as
        // possible. Oldest-first had a small request at the start of a task push out a 68 MB
        // activation block that the same task asked for again later (workload B's query pass).
        if (live_bytes + rounded > peak_live_bytes) peak_live_bytes = live_bytes + rounded;
        if (live_bytes + rounded + cached_bytes > peak_live_bytes) {
          make_room_locked(live_bytes + rounded + cached_bytes - peak_live_bytes);
        }
      }
    }
    if (p == nullptr) p = alloc_block(rounded);  // throws on out-of-memory, as torch's does
    {
      std::lock_guard<std::mutex> lock(mu);
      live.emplace(p, bytes);
      live_bytes += bytes;
    }
    c10::profiledCPUMemoryReporter().New(p, nbytes);
    return {p, p, &free_block, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release(void* p) {
    c10::profiledCPUMemoryReporter().Delete(p);
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = live.find(p);
      if (it != live.end()) {
        const size_t bytes = it->second;
        live.erase(it);
        live_bytes -= bytes;
        if (depth > 0 && bytes <= limit_bytes) {
          while (cached_bytes + bytes > limit_bytes) drop_oldest_locked();
          const uint64_t age = next_age++;
          by_age.emplace(age, free_blocks.emplace(bytes, std::make_pair(age, p)));
          cached_bytes += bytes;
          if (cached_bytes > peak_cached_bytes) peak_cached_bytes = cached_bytes;
          return;
        }
      }
    }
    c10::free_cpu(p);
  }

  // Frees kept blocks worth at least `deficit` bytes, as few bytes as it can: the smallest block
  // that covers the deficit alone, or the smallest blocks in turn when their total is lower (a
  // 17 MB request must not push out a 68 MB block if 17 MB of small ones do). Every freed byte
  // is a page to fault in again when its size is asked for next. Caller holds `mu`.
  void make_room_locked(size_t deficit) {
    auto single = free_blocks.lower_bound(deficit);
    size_t small_total = 0;
    auto stop = free_blocks.begin();
    while (stop != free_blocks.end() && small_total < deficit) small_total += (stop++)->first;
    if (single != free_blocks.end() && (small_total < deficit || single->first <= small_total)) {
      drop_block_locked(single);
      return;
    }
    while (free_blocks.begin() != stop) drop_block_locked(free_blocks.begin());
  }

  void drop_block_locked(std::multimap<size_t, std::pair<uint64_t, void*>>::iterator it) {
    cached_bytes -= it->first;
    c10::free_cpu(it->second.second);
    by_age.erase(it->second.first);
    free_blocks.erase(it);
  }

  // Frees the oldest kept block; returns its bytes. Caller holds `mu`, by_age is not empty.
  size_t drop_oldest_locked() {
    auto oldest = by_age.begin();
    const size_t bytes = oldest->second->first;
    cached_bytes -= bytes;
    c10::free_cpu(oldest->second->second.second);
    free_blocks.erase(oldest->second);
    by_age.erase(oldest);
    return bytes;
  }

  // Caller holds `mu`.
  void drop_cached_locked() {
    for (auto& kv : free_blocks) c10::free_cpu(kv.second.second);
    free_blocks.clear();
    by_age.clear();
    cached_bytes = 0;
  }
};

// Never destroyed: a tensor may die after static destructors have run (at interpreter exit).
BlockReuseAllocator& instance() {
  static BlockReuseAllocator* a = new BlockReuseAllocator();
  return *a;
}

void free_block(void* ptr) {
  if (ptr != nullptr) instance().release(ptr);
}

// Opens a scope; returns whether this allocator now serves CPU allocations (false: the limit is
// 0, or another allocator registered with a higher priority keeps its place). Always paired with
// exit_scope().
bool enter() {
  BlockReuseAllocator& a = instance();
  std::lock_guard<std::mutex> lock(a.mu);
  if (a.depth++ == 0 && a.limit_bytes > 0) {
    a.peak_live_bytes = a.live_bytes;
    a.previous = c10::GetCPUAllocator();
    // Priority 0, PyTorch's own: an allocator registered above it keeps its place.
    c10::SetCPUAllocator(&a, 0);
  }
  return c10::GetCPUAllocator() == &a;
}

void exit_scope() {
  BlockReuseAllocator& a = instance();
  std::lock_guard<std::mutex> lock(a.mu);
  if (a.depth == 0) return;
  if (--a.depth == 0) {
    if (a.previous != nullptr && c10::GetCPUAllocator() == &a) c10::SetCPUAllocator(a.previous, 0);
    a.previous = nullptr;
    a.drop_cached_locked();
  }
}

}  // namespace

void register_block_reuse(pybind11::module_& m) {
  m.def("block_reuse_enter", &enter, "open a block-reuse scope (returns whether it is active)");
  m.def("block_reuse_exit", &exit_scope, "close a block-reuse scope");
  m.def("block_reuse_stats", []() {
    BlockReuseAllocator& a = instance();
    std::lock_guard<std::mutex> lock(a.mu);
    pybind11::dict d;
    d["depth"] = a.depth;
    d["active"] = a.depth > 0 && c10::GetCPUAllocator() == &a;
    d["cached_bytes"] = a.cached_bytes;
    d["cached_blocks"] = a.free_blocks.size();
    d["peak_cached_bytes"] = a.peak_cached_bytes;
    d["live_blocks"] = a.live.size();
    d["live_bytes"] = a.live_bytes;
    d["peak_live_bytes"] = a.peak_live_bytes;
    d["limit_bytes"] = a.limit_bytes;
    d["hits"] = a.hits;
    d["misses"] = a.misses;
    return d;
  });
  m.def("block_reuse_set_limit", [](size_t bytes) {
    BlockReuseAllocator& a = instance();
    std::lock_guard<std::mutex> lock(a.mu);
    a.limit_bytes = bytes;
    if (a.cached_bytes > bytes) a.drop_cached_locked();
    a.peak_cached_bytes = a.cached_bytes;
  });
}

}  // namespace fastmaml
