// fastres_cpu::max_pool2d_cl: max-pooling of a channels_last activation without indices, the
// ResNet stem's 3x3 stride-2 pool in eval (fastres/nn/resnet.py). ATen's CPU max-pool computes
// the argmax indices as well and, measured on the 2-CPU AMX Xeon (bf16, N=1, 64x112x112 ->
// 64x56x56, in a ResNet-50 call profile), took 0.33 ms where OpenVINO's pool took 0.07.
//
// Each output pixel reads its window's channel vectors (C contiguous) and keeps the largest per
// channel: a NaN anywhere in the window gives NaN, as torch.nn.functional.max_pool2d does;
// padding is never a candidate. No arithmetic: the result is torch's bit for bit (the sign of
// a zero may differ where +0 and -0 tie, as any order of comparisons may).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ops_common.h"

namespace fastres::cpu {
namespace {

// m = max(m, v) per element, NaN winning; float32 values, or bfloat16 ones compared as float32
// (exact: a bfloat16 is the top half of its float32).
template <typename T>
inline float as_float(T v);
template <>
inline float as_float<float>(float v) {
  return v;
}
template <>
inline float as_float<uint16_t>(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// -inf in T's bits: what torch gives a window with no element (none here: padding is at most
// half the kernel).
template <typename T>
inline T minus_inf();
template <>
inline float minus_inf<float>() {
  return -std::numeric_limits<float>::infinity();
}
template <>
inline uint16_t minus_inf<uint16_t>() {
  return 0xFF80;
}

struct Geometry {
  int64_t n, c, h, w, oh, ow;
  std::array<int64_t, 2> k, s, p;
};

// Output row r (image r / oh, row r % oh): per output pixel the first valid tap copied, every
// other one maxed in per channel (a larger value or a NaN wins; a NaN already kept stays: v >
// NaN and v != v are false). One clone per ISA for the whole row, so the channel loop is
// vectorised and no call is paid per tap.
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void pool_row(
    const T* __restrict in, T* __restrict out, const Geometry& g, int64_t r) {
  const int64_t b = r / g.oh, y = r % g.oh, c = g.c;
  const int64_t y0 = y * g.s[0] - g.p[0];
  for (int64_t xo = 0; xo < g.ow; ++xo) {
    T* __restrict o = out + ((b * g.oh + y) * g.ow + xo) * c;
    const int64_t x0 = xo * g.s[1] - g.p[1];
    bool first = true;
    for (int64_t i = 0; i < g.k[0]; ++i) {
      const int64_t yi = y0 + i;
      if (yi < 0 || yi >= g.h) continue;
      for (int64_t j = 0; j < g.k[1]; ++j) {
        const int64_t xi = x0 + j;
        if (xi < 0 || xi >= g.w) continue;
        const T* __restrict v = in + ((b * g.h + yi) * g.w + xi) * c;
        if (first) {
          for (int64_t q = 0; q < c; ++q) o[q] = v[q];
          first = false;
          continue;
        }
        for (int64_t q = 0; q < c; ++q) {
          const float a = as_float<T>(v[q]), m = as_float<T>(o[q]);
          o[q] = (a > m || a != a) ? v[q] : o[q];
        }
      }
    }
    if (first) std::fill(o, o + c, minus_inf<T>());
  }
}

template <typename T>
void pool(const T* in, T* out, const Geometry& g) {
  // One task per output row of one image: a 56x56 map at N=1 is 56 tasks.
  at::parallel_for(0, g.n * g.oh, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) pool_row<T>(in, out, g, r);
  });
}

at::Tensor max_pool2d_cl(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                         at::IntArrayRef padding) {
  constexpr const char* op = "max_pool2d_cl";
  check_cpu(op, "x", x);
  TORCH_CHECK(x.dim() == 4 && nhwc_dense(x), "fastres_cpu::", op,
              ": x must be a dense 4-D channels_last tensor, got size ", sizes_str(x),
              " and strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "fastres_cpu::",
              op, ": x has dtype ", x.scalar_type(), "; expected float32 or bfloat16");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2, "fastres_cpu::",
              op, ": kernel, stride and padding are pairs");
  const std::array<int64_t, 2> k{kernel[0], kernel[1]}, s{stride[0], stride[1]},
      p{padding[0], padding[1]};
  TORCH_CHECK(k[0] > 0 && k[1] > 0 && s[0] > 0 && s[1] > 0 && p[0] >= 0 && p[1] >= 0 &&
                  2 * p[0] <= k[0] && 2 * p[1] <= k[1],
              "fastres_cpu::", op, ": kernel ", kernel, ", stride ", stride, " and padding ",
              padding, " are not a max-pool (positive kernel and stride, padding at most half "
              "the kernel)");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t oh = (h + 2 * p[0] - k[0]) / s[0] + 1, ow = (w + 2 * p[1] - k[1]) / s[1] + 1;
  TORCH_CHECK(h + 2 * p[0] >= k[0] && w + 2 * p[1] >= k[1], "fastres_cpu::", op, ": input ",
              sizes_str(x), " is smaller than the kernel ", kernel);
  at::Tensor out = empty_act({n, c, oh, ow}, x.options(), format_of(x));
  if (out.numel() == 0) return out;
  const Geometry g{n, c, h, w, oh, ow, k, s, p};
  if (x.scalar_type() == at::kFloat) {
    pool<float>(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), g);
  } else {
    pool<uint16_t>(static_cast<const uint16_t*>(x.const_data_ptr()),
                   static_cast<uint16_t*>(out.mutable_data_ptr()), g);
  }
  return out;
}

}  // namespace
}  // namespace fastres::cpu

TORCH_LIBRARY_FRAGMENT(fastres_cpu, m) {
  // max_pool2d of a dense channels_last float32/bfloat16 activation, no indices, dilation 1,
  // floor mode: torch.nn.functional.max_pool2d's values (NaN propagates).
  m.def("max_pool2d_cl(Tensor x, int[2] kernel, int[2] stride, int[2] padding) -> Tensor",
        &fastres::cpu::max_pool2d_cl);
}
