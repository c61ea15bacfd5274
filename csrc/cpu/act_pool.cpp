// Large activation buffers of the CPU ops, kept for reuse instead of handed back to the C library
// (ops_common.h: empty_act).
//
// glibc serves an allocation above its mmap threshold (adaptive, at most 32 MiB) with a fresh
// mapping and unmaps it on free, so every call that writes such an output first pays the kernel's
// page faults and page zeroing. Measured on this project's 2-CPU EPYC, bf16 32x256x56x56 (51 MiB
// per tensor): bn_add_relu 21.5 ms into a fresh buffer against 3.3 ms into a reused one. A
// training step allocates and frees the same sizes every step, so an exact-size free list turns
// those faults into a list look-up.

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "ops_common.h"

namespace fastres::cpu {
namespace {

// Below this the C library's heap reuses memory by itself. Above it glibc's reuse depends on its
// adaptive thresholds and on what else was freed: measured on the 2-CPU EPYC, 1 thread,
// bn_add_relu_bwd on bf16 8x256x56x56 (12.8 MB per tensor, two outputs): 20.1 ms per call with a
// 16 MiB minimum (fresh mappings, page-faulted every call), 5.4-5.6 ms with this one.
constexpr size_t kPoolMin = size_t(256) << 10;

size_t cap_from_env() {
  // FASTRES_CPU_POOL_MB: most bytes of free buffers kept (default 1024; 0 turns the pool off).
  const char* v = std::getenv("FASTRES_CPU_POOL_MB");
  if (v == nullptr || *v == '\0') {
    return size_t(1024) << 20;
  }
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && mb >= 0, "FASTRES_CPU_POOL_MB must be a whole number "
              "of MiB >= 0 (0 turns the activation pool off), got '", v, "'");
  return static_cast<size_t>(mb) << 20;
}

class ActPool final : public c10::Allocator {
 public:
  static ActPool& get() {
    static ActPool* pool = new ActPool();  // never destroyed: tensors may outlive static teardown
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= n;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      p = c10::alloc_cpu(n);
    }
    report(p, static_cast<int64_t>(n));
    return {p, new Block{p, n}, &ActPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cap() const { return cap_; }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {static_cast<int64_t>(cached_), hits_, misses_, static_cast<int64_t>(cap_)};
  }

  int64_t empty_cache() {
    std::vector<void*> drop;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& [n, ptrs] : free_) {
        drop.insert(drop.end(), ptrs.begin(), ptrs.end());
      }
      free_.clear();
      bytes = static_cast<int64_t>(cached_);
      cached_ = 0;
    }
    for (void* p : drop) {
      c10::free_cpu(p);
    }
    return bytes;
  }

 private:
  struct Block {
    void* ptr;
    size_t n;
  };

  ActPool() : cap_(cap_from_env()) {}

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    get().report(b->ptr, -static_cast<int64_t>(b->n));
    get().put(b->ptr, b->n);
    delete b;
  }

  // torch.profiler(profile_memory=True) sees pooled tensors as it sees ATen's CPU allocations:
  // +n when one is handed out, -n when it is freed (into the pool or back to the C library).
  void report(void* p, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) {
      return;
    }
    size_t live = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      live_ += delta;
      live = static_cast<size_t>(live_);
      reserved = live + cached_;
    }
    c10::reportMemoryUsageToProfiler(p, delta, live, reserved,
                                     c10::Device(c10::DeviceType::CPU));
  }

  void put(void* p, size_t n) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cached_ + n <= cap_) {
        free_[n].push_back(p);
        cached_ += n;
        return;
      }
    }
    c10::free_cpu(p);
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  int64_t live_ = 0;  // bytes handed out while the profiler recorded memory (for its totals)
  const size_t cap_;
};

}  // namespace

Tensor empty_act(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt) {
  ActPool& pool = ActPool::get();
  const size_t n = c10::multiply_integers(sizes) * c10::elementSize(opts.dtype().toScalarType());
  if (pool.cap() == 0 || n < kPoolMin || opts.device().type() != c10::DeviceType::CPU) {
    return at::empty(sizes, opts.memory_format(fmt));
  }
  return at::detail::empty_generic(sizes, &pool, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), fmt);
}

std::vector<int64_t> act_pool_stats() { return ActPool::get().stats(); }
int64_t act_pool_empty_cache() { return ActPool::get().empty_cache(); }

}  // namespace fastres::cpu
