// The packed-weight cache (weight_cache.h): entries, validity and the fastres_cpu ops that inspect
// it.

#include "weight_cache.h"

#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>

namespace fastres::cpu {

namespace {

constexpr size_t kMaxPacked = 256;

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> owner{c10::intrusive_ptr<c10::TensorImpl>()};
  const c10::TensorImpl* impl = nullptr;
  const void* data = nullptr;
  int64_t version = 0;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;  // weight sizes, strides, then the caller's key
  at::Tensor packed;
  uint64_t used = 0;

  // The same values as `k` had when it was packed: another key of them is still valid.
  bool same_values(const Entry& k) const {
    return impl == k.impl && data == k.data && version == k.version && dtype == k.dtype;
  }
  bool same_as(const Entry& k) const { return same_values(k) && shape == k.shape; }
};

Entry make_entry(const at::Tensor& weight, std::vector<int64_t> key) {
  Entry e;
  e.owner = c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr());
  e.impl = weight.unsafeGetTensorImpl();
  e.data = weight.data_ptr();
  e.version =
      static_cast<int64_t>(weight.unsafeGetTensorImpl()->version_counter().current_version());
  e.dtype = weight.scalar_type();
  for (auto list : {weight.sizes(), weight.strides()}) {
    e.shape.insert(e.shape.end(), list.begin(), list.end());
    e.shape.push_back(-1);
  }
  e.shape.insert(e.shape.end(), key.begin(), key.end());
  return e;
}

}  // namespace

struct WeightCache::Impl {
  bool enabled = true;
  std::mutex mu;
  std::vector<Entry> entries;
  std::vector<std::pair<c10::weak_intrusive_ptr<c10::TensorImpl>, const c10::TensorImpl*>>
      allowed;
  uint64_t clock = 0;
  int64_t packs = 0;

  // Drops dead entries of `allowed` on the way (a dead impl's address may be reused).
  bool is_allowed_locked(const at::Tensor& weight) {
    const c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    bool found = false;
    for (size_t i = 0; i < allowed.size();) {
      if (allowed[i].first.expired()) {
        allowed.erase(allowed.begin() + static_cast<std::ptrdiff_t>(i));
        continue;
      }
      found = found || allowed[i].second == impl;
      ++i;
    }
    return found;
  }
};

WeightCache::WeightCache() : impl_(new Impl()) {
  const char* env = std::getenv("FASTRES_CPU_WEIGHT_CACHE");
  impl_->enabled = env == nullptr || std::string(env) != "0";
}

WeightCache& WeightCache::get() {
  static WeightCache* cache = new WeightCache();  // leaked: used until exit
  return *cache;
}

bool WeightCache::cacheable(const at::Tensor& weight) {
  if (!impl_->enabled || weight.is_inference() || !weight.is_non_overlapping_and_dense()) {
    return false;
  }
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->is_allowed_locked(weight);
}

std::optional<at::Tensor> WeightCache::lookup(
    const at::Tensor& weight, std::vector<int64_t> key,
    const std::function<std::optional<at::Tensor>()>& pack) {
  if (!impl_->enabled || weight.is_inference() || !weight.is_non_overlapping_and_dense()) {
    return std::nullopt;
  }
  Entry k = make_entry(weight, std::move(key));
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (!impl_->is_allowed_locked(weight)) {
      return std::nullopt;
    }
    auto& entries = impl_->entries;
    for (size_t i = 0; i < entries.size();) {
      Entry& e = entries[i];
      if (e.owner.expired()) {
        entries.erase(entries.begin() + static_cast<std::ptrdiff_t>(i));
        continue;
      }
      if (e.same_as(k)) {
        e.used = ++impl_->clock;
        return e.packed;
      }
      ++i;
    }
  }
  std::optional<at::Tensor> packed = pack();
  if (!packed.has_value()) {
    return std::nullopt;
  }
  k.packed = *packed;
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto& entries = impl_->entries;
  ++impl_->packs;
  k.used = ++impl_->clock;
  // Packings of an older state of this same weight (before an in-place update) can never match
  // again; packings of its current values under other keys (another batch size) stay.
  const auto stale = [&](const Entry& e) { return e.impl == k.impl && !e.same_values(k); };
  entries.erase(std::remove_if(entries.begin(), entries.end(), stale), entries.end());
  if (entries.size() >= kMaxPacked) {
    auto lru = std::min_element(entries.begin(), entries.end(),
                                [](const Entry& a, const Entry& b) { return a.used < b.used; });
    entries.erase(lru);
  }
  entries.push_back(std::move(k));
  return entries.back().packed;
}

int64_t WeightCache::size() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int64_t>(impl_->entries.size());
}

int64_t WeightCache::packs() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->packs;
}

void WeightCache::clear() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->entries.clear();
  impl_->allowed.clear();
}

void WeightCache::allow(const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->is_allowed_locked(weight)) {
    return;
  }
  impl_->allowed.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()),
                            weight.unsafeGetTensorImpl()});
}

}  // namespace fastres::cpu

// Introspection of the packed-weight cache (tests, fastres.info); not part of the op contract.
TORCH_LIBRARY_FRAGMENT(fastres_cpu, m) {
  // Entries of the packed-weight cache of conv_bias_act, and a way to empty it.
  m.def("weight_cache_size() -> int", [] { return fastres::cpu::WeightCache::get().size(); });
  m.def("weight_cache_clear() -> ()", [] { fastres::cpu::WeightCache::get().clear(); });
  // Weights packed since the process started (a written weight is packed again).
  m.def("weight_cache_packs() -> int", [] { return fastres::cpu::WeightCache::get().packs(); });
  // Mark a weight as safe to prepack: only its owner writes it, never in place (weight_cache.h).
  m.def("weight_cache_allow(Tensor weight) -> ()",
        [](const at::Tensor& w) { fastres::cpu::WeightCache::get().allow(w); });
}
