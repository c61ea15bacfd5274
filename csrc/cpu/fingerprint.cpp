// fastres_cpu::fingerprint: a 64-bit hash of the values of a list of CPU tensors, the check that
// keeps the eval path's folded and prepacked weights current (fastres/modules.py).
//
// Why the values and not the version counter: `p.data.mul_(2)`, `p.data.copy_(ema)` (EMA,
// pruning, weight surgery) and writes through `.numpy()` change a parameter without bumping its
// version (`.data` is a new TensorImpl with a counter of its own), so a cache keyed on
// (data_ptr, _version) serves the old fold silently. Any check that no write can slip past must
// read every byte; this is one read pass, parallel over both cores, DRAM-bound (ResNet-50's conv
// weights are 102 MB in float32, 51 MB in bfloat16).
//
// The hash: each 8-byte word w at position i (counted across the whole list) adds
// mix(w + i * kStep) to a 64-bit sum; mix (xorshift, multiply by an odd constant, xorshift) is a
// bijection of 64-bit words, so changing any one word always changes the sum, and a change of
// several words leaves it equal with probability ~2^-64. A sum is order-free, so chunks are
// hashed in parallel. Each tensor's dtype, sizes and strides are hashed too; a tensor that is not
// on the CPU gets a new value on every call (never a match: it is never cached).
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "ops_common.h"

namespace fastres::cpu {
namespace {

constexpr uint64_t kStep = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio, odd
constexpr uint64_t kMul = 0xBF58476D1CE4E5B9ull;   // splitmix64's multipliers (odd)
constexpr uint64_t kMul2 = 0x94D049BB133111EBull;

inline uint64_t mix(uint64_t v) {
  v ^= v >> 31;
  v *= kMul;
  v ^= v >> 29;
  return v;
}

// Sum of mix(word + (first + i) * kStep) over the whole words of [p, p + 8 * words). Eight lanes
// that GCC vectorizes (vpmullq) in the AVX-512 clone: measured on the Zen 5 box, one thread,
// ResNet-50's float32 weights (102 MB), the scalar loop took 13.9 ms, torch.sum of the same bytes
// 3.5 ms; the clones are chosen at load time by the CPU (ifunc).
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) uint64_t hash_words(
    const unsigned char* p, int64_t words, uint64_t first) {
  constexpr int kLanes = 8;
  uint64_t s[kLanes] = {};
  uint64_t pos[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    pos[j] = (first + static_cast<uint64_t>(j)) * kStep;
  }
  int64_t i = 0;
  for (; i + kLanes <= words; i += kLanes) {
    uint64_t w[kLanes];
    std::memcpy(w, p + 8 * i, sizeof(w));
    for (int j = 0; j < kLanes; ++j) {
      s[j] += mix(w[j] + pos[j]);
      pos[j] += kLanes * kStep;
    }
  }
  uint64_t total = 0;
  for (int j = 0; j < kLanes; ++j) {
    total += s[j];
  }
  uint64_t tail = pos[0];
  for (; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, p + 8 * i, sizeof(w));
    total += mix(w + tail);
    tail += kStep;
  }
  return total;
}

// One tensor's whole words: where, how many, and their position in the list.
struct Span {
  const unsigned char* p;
  int64_t words;
  uint64_t first;
};

// Below this many words (256 KiB) a list is hashed on the calling thread: a parallel region's
// fork and join would cost more than the second thread saves.
constexpr int64_t kParallelWords = int64_t{1} << 15;

// The sum over [lo, hi) of the list's words counted without the per-tensor gaps (`starts`: each
// span's first word on that count, ascending).
uint64_t hash_range(const std::vector<Span>& spans, const std::vector<int64_t>& starts,
                    int64_t lo, int64_t hi) {
  uint64_t s = 0;
  if (spans.empty()) return s;
  size_t k = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), lo) -
                                 starts.begin()) - 1;
  for (; k < spans.size() && starts[k] < hi; ++k) {
    const int64_t a = std::max(lo, starts[k]) - starts[k];
    const int64_t b = std::min(hi, starts[k] + spans[k].words) - starts[k];
    if (b > a) s += hash_words(spans[k].p + 8 * a, b - a, spans[k].first + static_cast<uint64_t>(a));
  }
  return s;
}

}  // namespace

int64_t fingerprint_cpu(const c10::List<std::optional<at::Tensor>>& tensors) {
  static std::atomic<uint64_t> fresh{1};
  uint64_t h = mix(tensors.size() * kMul2);
  uint64_t first = 0;  // word position across the list (with a gap after each tensor)
  std::vector<Span> spans;
  std::vector<int64_t> starts;  // each span's first word, gaps left out
  int64_t total = 0;
  std::vector<at::Tensor> copies;  // keeps contiguous copies alive until hashed
  for (size_t k = 0; k < tensors.size(); ++k) {
    const std::optional<at::Tensor> opt = tensors.get(k);
    uint64_t meta = k * kMul2;
    if (!opt.has_value() || !opt->defined()) {
      h += mix(meta ^ 0x6E6F6E65ull);  // "none"
      continue;
    }
    const at::Tensor& t = *opt;
    if (!t.device().is_cpu()) {
      h += mix(meta ^ (fresh.fetch_add(1) * kMul));
      continue;
    }
    meta = mix(meta + static_cast<uint64_t>(t.scalar_type()));
    for (int64_t s : t.sizes()) {
      meta = mix(meta + static_cast<uint64_t>(s) * kStep);
    }
    for (int64_t s : t.strides()) {
      meta = mix(meta + static_cast<uint64_t>(s) * kMul2);
    }
    h += meta;
    // Dense tensors (parameters and buffers always are) are read where they lie; anything else
    // through a contiguous copy. A dense tensor's values fill [data_ptr, data_ptr + bytes).
    at::Tensor d = t.is_non_overlapping_and_dense() ? t : t.contiguous();
    const int64_t bytes = static_cast<int64_t>(d.numel()) * static_cast<int64_t>(d.element_size());
    const auto* base = static_cast<const unsigned char*>(d.const_data_ptr());
    const int64_t words = bytes / 8;
    if (words > 0) {
      spans.push_back({base, words, first});
      starts.push_back(total);
      total += words;
    }
    const int64_t rest = bytes - 8 * words;
    if (rest > 0) {
      uint64_t w = 0;
      std::memcpy(&w, base + 8 * words, static_cast<size_t>(rest));
      h += mix((w ^ (static_cast<uint64_t>(rest) << 56)) + (first + words) * kStep);
    }
    if (!d.is_same(t)) {
      copies.push_back(std::move(d));
    }
    first += static_cast<uint64_t>(words) + 2;
  }
  // The words split evenly over the threads, whatever the tensors' sizes (a share per tensor, or
  // per fixed-size piece, would follow the tensor count: a thread handed ResNet-50's BatchNorm
  // vectors would wait for the one handed its layer4 weights).
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), total / kParallelWords));
  std::atomic<uint64_t> sum{0};
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    uint64_t s = 0;
    for (int64_t i = b; i < e; ++i) {
      s += hash_range(spans, starts, total * i / parts, total * (i + 1) / parts);
    }
    sum.fetch_add(s, std::memory_order_relaxed);  // sums are order-free
  });
  return static_cast<int64_t>(mix(h + sum.load()));
}

}  // namespace fastres::cpu

TORCH_LIBRARY_FRAGMENT(fastres_cpu, m) {
  // A 64-bit hash of the tensors' values, dtypes, sizes and strides (see the top of this file);
  // a non-CPU tensor makes it new on every call.
  m.def("fingerprint(Tensor?[] tensors) -> int", &fastres::cpu::fingerprint_cpu);
}
