// What dnnl_conv.cpp (the forward primitives) and dnnl_conv_bwd.cpp (the backward ones) share: the
// engine, the type and dims conversions and the counters behind fastres_cpu::own_primitives_stats.
// Only in a build with oneDNN's headers (FASTRES_HAVE_DNNL).
#pragma once

#ifdef FASTRES_HAVE_DNNL
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <oneapi/dnnl/dnnl.hpp>

namespace fastres::cpu {

const dnnl::engine& dnnl_engine();

inline dnnl::memory::data_type dnnl_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
}

inline dnnl::memory::dims dims_of(at::IntArrayRef a) { return {a.begin(), a.end()}; }

// Primitives made, calls served by a kept one, weight reorders (dnnl_conv.cpp).
extern std::atomic<int64_t> g_created, g_reused, g_reorders;

}  // namespace fastres::cpu
#endif
