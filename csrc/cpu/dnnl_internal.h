// What dnnl_conv.cpp (the forward primitives) and dnnl_conv_bwd.cpp (the backward ones) share: the
// engine, the type and dims conversions, the kept-primitive cache and the counters behind
// fastres_cpu::own_primitives_stats.
// Only in a build with oneDNN's headers (FASTRES_HAVE_DNNL).
#pragma once

#ifdef FASTRES_HAVE_DNNL
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <vector>

namespace fastres::cpu {

const dnnl::engine& dnnl_engine();

inline dnnl::memory::data_type dnnl_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
}

inline dnnl::memory::dims dims_of(at::IntArrayRef a) { return {a.begin(), a.end()}; }

// Primitives made, calls served by a kept one, weight reorders (dnnl_conv.cpp).
extern std::atomic<int64_t> g_created, g_reused, g_reorders;

// Kept primitives (P: one per key, its `ok` false where oneDNN has no implementation, remembered
// and not asked again), at most kMax: ResNet-50 at one batch size and dtype needs 25 forward
// (measured), plus a few per post-op chain; past it a shape-changing workload starts over (calls
// in flight hold theirs).
template <typename P>
class PrimitiveCache {
 public:
  static constexpr size_t kMax = 1024;

  // The kept primitive of key, else make()'s, kept. A hit on a usable one counts in g_reused.
  template <typename Make>
  std::shared_ptr<P> get(std::vector<int64_t> key, Make&& make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = prims_.find(key);
    if (it != prims_.end()) {
      if (it->second->ok) ++g_reused;
      return it->second;
    }
    if (prims_.size() >= kMax) prims_.clear();
    std::shared_ptr<P> p = make();
    prims_.emplace(std::move(key), p);
    return p;
  }

  // Calls f(key, primitive) for each kept one under the lock until it returns true.
  template <typename F>
  void find_if(F&& f) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [k, p] : prims_) {
      if (f(k, *p)) return;
    }
  }

  int64_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(prims_.size());
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    prims_.clear();
  }

 private:
  std::mutex mu_;
  std::map<std::vector<int64_t>, std::shared_ptr<P>> prims_;
};

}  // namespace fastres::cpu
#endif
