// The cache of convolution weights packed into oneDNN's blocked layouts (weight_cache.cpp), shared
// by the ATen path (mkldnn::_reorder_convolution_weight) and fastres' own oneDNN primitives
// (dnnl_conv.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

namespace fastres::cpu {

// A packed weight is kept while the weight's TensorImpl is alive (held weakly, so the cache never
// keeps a model alive and a dead impl's address cannot be reused while the entry exists), its
// version counter, data pointer, sizes, strides and dtype are unchanged, and the caller's key (what
// the packing is: the blocked layout of an own primitive's weights, dnnl_conv.cpp; the
// convolution and input sizes ATen packs for, ops_infer.cpp) is the same. FASTRES_CPU_WEIGHT_CACHE=0 turns the
// cache off. Inference tensors have no version counter and are never cached. At most kMaxPacked
// entries (least recently used evicted); memory cost: one blocked copy of each cached weight.
//
// Only tensors registered with allow() are cached: fastres' modules register the BN-folded
// weights of their fold cache, which nobody else can reach and which are replaced, never
// written, when the fold changes (the modules check the conv and BN values on every call,
// fastres_cpu::fingerprint). Any other tensor may be written without a version bump: a
// parameter through `.data` (`p.data.mul_(2)`, an EMA's `p.data.copy_(...)`: `.data` has a
// version counter of its own), or a buffer that torch.compile's Inductor reuses for the next
// convolution's weight (the same TensorImpl, data pointer, version and sizes with other values;
// measured: a converted BasicBlock(64, 64) under torch.compile ran conv2 with conv1's packed
// weight, max error 2.09 against eager, Inductor's `buf3 = buf0; del buf0  # reuse`).
class WeightCache {
 public:
  static WeightCache& get();

  // Whether lookup() may keep a packing of `weight` (allowed, dense, not an inference tensor,
  // the cache on).
  bool cacheable(const at::Tensor& weight);

  // The packing of `weight` under `key` (the caller's exact description of what `pack` makes:
  // two calls with one key must be able to read each other's packing), made by `pack` on a miss and kept; nullopt when
  // the weight is not cacheable or `pack` returns nullopt.
  std::optional<at::Tensor> lookup(const at::Tensor& weight, std::vector<int64_t> key,
                                   const std::function<std::optional<at::Tensor>()>& pack);

  int64_t size();
  // Packings made since the process started (tests: a weight written is packed again).
  int64_t packs();
  void clear();
  // Let lookup() cache `weight`: its owner promises that nobody writes it without bumping its
  // version counter. Held weakly (a dead tensor drops out).
  void allow(const at::Tensor& weight);

 private:
  WeightCache();
  struct Impl;
  Impl* impl_;
};

}  // namespace fastres::cpu
