// The CPU implementation of the fastres op set (fastres/_opset.py), registered for the CPU dispatch key:
// the kernel table in use (kernels.h) and the registrations. The ops live in ops_infer.cpp
// (oneDNN fused convolutions; fastres' own primitives in dnnl_conv.cpp, packed weights in
// weight_cache.cpp), ops_train.cpp (statistics, BatchNorm, backward) and
// ops_common.cpp (checks, layout helpers, the epilogue pass).
//
// Memory formats follow the fakes (fastres/_meta.py): an output takes its reference tensor's
// format (channels_last when that tensor is channels_last-contiguous and not contiguous), with
// exactly the dense strides of that format. Inputs in any other layout are first copied to it
// (correct, one extra pass).
// Per-operator headers rather than ATen/ATen.h: 9 s instead of 13 s of parsing for this file.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "ops_common.h"

namespace fastres::cpu {

namespace {

const Kernels* auto_kernels() {
  static const Kernels* table = [] {
    // ATen's own choice, so ATEN_CPU_CAPABILITY=default|avx2|avx512 steers both.
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && kernels_avx512() != nullptr) {
      return kernels_avx512();
    }
    if ((cap == "AVX512" || cap == "AVX2") && kernels_avx2() != nullptr) {
      return kernels_avx2();
    }
    return kernels_base();
  }();
  return table;
}

// Set by fastres_cpu::set_kernel_isa (tests): a narrower instruction set than the automatic one.
std::atomic<const Kernels*> g_forced{nullptr};

}  // namespace

const Kernels& kernels() {
  const Kernels* forced = g_forced.load(std::memory_order_acquire);
  return forced != nullptr ? *forced : *auto_kernels();
}

}  // namespace fastres::cpu

// Introspection for the tests and fastres.info; not part of the op contract (fastres/_opset.py).
TORCH_LIBRARY(fastres_cpu, m) {
  // The instruction set of the kernels in use: "avx512", "avx2" or "base".
  m.def("kernel_isa() -> str", [] { return std::string(fastres::cpu::kernels().isa); });
  // Run the kernels of a narrower instruction set than the automatic choice ("base", "avx2"), or
  // go back to it ("auto"); returns the previous one. For testing every ISA in one process.
  m.def("set_kernel_isa(str isa) -> str", [](c10::string_view isa) {
    const std::string previous = fastres::cpu::kernels().isa;
    const fastres::cpu::Kernels* order[] = {
        fastres::cpu::kernels_base(), fastres::cpu::kernels_avx2(), fastres::cpu::kernels_avx512()};
    const fastres::cpu::Kernels* chosen = nullptr;
    if (isa != "auto") {
      for (const auto* k : order) {
        if (k != nullptr && isa == k->isa) {
          chosen = k;
        }
        if (k == fastres::cpu::auto_kernels()) {
          break;  // nothing wider than what ATen found this CPU runs
        }
      }
      TORCH_CHECK(chosen != nullptr, "fastres_cpu::set_kernel_isa: '", isa,
                  "' is not available; this build and CPU run '", fastres::cpu::auto_kernels()->isa,
                  "' and narrower ones");
    }
    fastres::cpu::g_forced.store(chosen, std::memory_order_release);
    return previous;
  });
  // The activation pool (act_pool.cpp): [cached bytes, hits, misses, cap bytes]; and freeing
  // its cached buffers, returning the bytes freed.
  m.def("act_pool_stats() -> int[]", [] { return fastres::cpu::act_pool_stats(); });
  m.def("act_pool_empty_cache() -> int", [] { return fastres::cpu::act_pool_empty_cache(); });
  // How many distinct threads an at::parallel_for over n one-element chunks ran on: proves the
  // extension's OpenMP regions really fork (compiled with -fopenmp, torch's libgomp).
  m.def("parallel_threads(int n) -> int", [](int64_t n) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(std::max(at::get_num_threads(), 1)));
    at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
      const int t = at::get_thread_num();
      if (t >= 0 && t < static_cast<int>(seen.size())) {
        seen[t].store(1);
      }
      // Keep each chunk busy for a moment so one thread cannot drain them all.
      volatile double x = 0;
      for (int i = 0; i < 200000; ++i) {
        x = x + 1.0;
      }
    });
    int64_t used = 0;
    for (auto& s : seen) {
      used += s.load();
    }
    return used;
  });
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("conv_bias_act", &fastres::cpu::conv_bias_act_cpu);
  m.impl("relu_bias_bwd", &fastres::cpu::relu_bias_bwd_cpu);
  m.impl("conv_stats", &fastres::cpu::conv_stats_cpu);
  m.impl("bn_finalize", &fastres::cpu::bn_finalize_cpu);
  m.impl("bn_add_relu", &fastres::cpu::bn_add_relu_cpu);
  m.impl("bn_add_relu_bwd", &fastres::cpu::bn_add_relu_bwd_cpu);
  m.impl("bn_relu_bwd", &fastres::cpu::bn_relu_bwd_cpu);
  m.impl("conv_bwd", &fastres::cpu::conv_bwd_cpu);
  m.impl("bn_finalize_count", &fastres::cpu::bn_finalize_count_cpu);
  m.impl("bn_add_relu_bwd_reduce", &fastres::cpu::bn_add_relu_bwd_reduce_cpu);
  m.impl("bn_add_relu_bwd_elemt", &fastres::cpu::bn_add_relu_bwd_elemt_cpu);
  m.impl("bn_relu_bwd_reduce", &fastres::cpu::bn_relu_bwd_reduce_cpu);
  m.impl("bn_relu_bwd_elemt", &fastres::cpu::bn_relu_bwd_elemt_cpu);
}
