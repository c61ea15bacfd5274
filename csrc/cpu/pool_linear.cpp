// fastres_cpu::avg_pool_linear: a ResNet's head in eval, the global average pool of a
// channels_last activation and the fc layer, in one call (fastres/nn/resnet.py). Through ATen the
// head is adaptive_avg_pool2d (mean: a sum, a division, a copy) then addmm: measured on the 2-CPU
// AMX Xeon, ResNet-50's 2048 -> 1000 head, hot caches, 0.23 ms at bf16 N=1 where this takes
// 0.11 (float32 0.20 and 0.16-0.18); OpenVINO's fc took 0.2 ms in its ResNet-50 profile. The
// floor at N=1 is the fc weight's read: 4 MB in bf16, 0.2 ms from DRAM at the ~20 GB/s two
// cores read here, less from cache.
//
// Numbers: each channel's mean accumulated in float32 over the map in pixel order and divided by
// its size, rounded to the activation's dtype (adaptive_avg_pool2d's output); then each output
// the float32 dot product of that row with the weight's row plus the bias, rounded once to the
// dtype. The dot product adds in 16 lanes, then the lanes in a fixed order: not torch's order
// (within the tolerance rule, not bit for bit); NaN and Inf propagate as in any sum. Past
// kOwnFcMaxImages images the fc is at::linear on the pooled activation. The weight and bias are
// read as they are on every call: nothing is cached, so nothing can go stale.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "ops_common.h"

namespace fastres::cpu {
namespace {

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// float32 -> bfloat16 bits, round to nearest even, NaN kept quiet (c10::BFloat16's rounding).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (f != f) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void store(float* o, float v) { *o = v; }
inline void store(uint16_t* o, float v) { *o = to_bf16(v); }

// The mean of each channel of one image over its hw pixels (channels_last: pixel-major), rounded
// to T as the pooled activation torch makes (into pooled_t), and that value as float32 (pooled).
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void pool_image(
    const T* __restrict x, T* __restrict pooled_t, float* __restrict pooled,
    float* __restrict acc, int64_t hw, int64_t c) {
  for (int64_t q = 0; q < c; ++q) acc[q] = 0.f;
  for (int64_t i = 0; i < hw; ++i) {
    const T* __restrict v = x + i * c;
    for (int64_t q = 0; q < c; ++q) acc[q] += to_float(v[q]);
  }
  const float n = static_cast<float>(hw);
  for (int64_t q = 0; q < c; ++q) {
    store(&pooled_t[q], acc[q] / n);
    pooled[q] = to_float(pooled_t[q]);
  }
}

constexpr int kLanes = 16;
constexpr int kImages = 4;  // images per pass over a weight row: its loads shared by four dots

// Images [i0, i0 + M) against weight row wr: each image's 16 lanes, then the lanes added in a
// fixed order and the tail, plus the bias, stored rounded to T. The weight row's loads are shared
// by the M dot products.
template <int M, typename T>
inline void dot_rows(const float* __restrict pooled, const T* __restrict wr, float b,
                     T* __restrict out, int64_t i0, int64_t c, int64_t k_total, int64_t k) {
  const int64_t body = c / kLanes * kLanes;
  float lane[M][kLanes] = {};
  for (int64_t q = 0; q < body; q += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float wv = to_float(wr[q + j]);
      for (int i = 0; i < M; ++i) lane[i][j] += pooled[(i0 + i) * c + q + j] * wv;
    }
  }
  for (int i = 0; i < M; ++i) {
    const float* __restrict p = pooled + (i0 + i) * c;
    float s = 0.f;
    for (int j = 0; j < kLanes; ++j) s += lane[i][j];
    for (int64_t q = body; q < c; ++q) s += p[q] * to_float(wr[q]);
    store(out + (i0 + i) * k_total + k, s + b);
  }
}

// out[b, k] for k in [k0, k1) and every image b: dot(pooled[b], w[k]) + bias[k]. Each weight
// row is read once per kImages images (from L1 for the passes after the first).
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default"))) void linear_rows(
    const float* __restrict pooled, const T* __restrict w, const T* __restrict bias,
    T* __restrict out, int64_t n, int64_t c, int64_t k_total, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k) {
    const T* __restrict wr = w + k * c;
    const float b = bias != nullptr ? to_float(bias[k]) : 0.f;
    int64_t i0 = 0;
    for (; i0 + kImages <= n; i0 += kImages) {
      dot_rows<kImages>(pooled, wr, b, out, i0, c, k_total, k);
    }
    switch (n - i0) {
      case 3: dot_rows<3>(pooled, wr, b, out, i0, c, k_total, k); break;
      case 2: dot_rows<2>(pooled, wr, b, out, i0, c, k_total, k); break;
      case 1: dot_rows<1>(pooled, wr, b, out, i0, c, k_total, k); break;
      default: break;
    }
  }
}

// Above this many images the fc is a GEMM that oneDNN's matmul (at::linear) runs faster than
// the dot products here: measured on the AMX Xeon, 2048 -> 1000, hot caches, at N=8 0.39 ms here
// against 0.57 for ATen's pool and fc (float32; bfloat16 0.35 against 0.37), at N=32 1.9 and 1.5
// against 1.1.
constexpr int64_t kOwnFcMaxImages = 8;

// The pooled activation (n, c) in T, computed here; the fc here for up to kOwnFcMaxImages
// images, else at::linear on the pooled activation (eager's own fc, on the same input).
template <typename T>
at::Tensor head(const T* x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const T* w, const T* b, int64_t n, int64_t hw, int64_t c, int64_t k,
                const at::TensorOptions& opts) {
  at::Tensor pooled_t = at::empty({n, c}, opts);
  T* pt = static_cast<T*>(pooled_t.mutable_data_ptr());
  std::vector<float> pooled(static_cast<size_t>(n * c));
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(static_cast<size_t>(c));
    for (int64_t i = lo; i < hi; ++i) {
      pool_image<T>(x + i * hw * c, pt + i * c, pooled.data() + i * c, acc.data(), hw, c);
    }
  });
  if (n > kOwnFcMaxImages) return at::linear(pooled_t, weight, bias);
  at::Tensor out = at::empty({n, k}, opts);
  T* o = static_cast<T*>(out.mutable_data_ptr());
  // Output columns in chunks of 16: ResNet-50's 1000 classes are 63 tasks.
  at::parallel_for(0, (k + 15) / 16, 1, [&](int64_t lo, int64_t hi) {
    linear_rows<T>(pooled.data(), w, b, o, n, c, k, lo * 16, std::min(hi * 16, k));
  });
  return out;
}

at::Tensor avg_pool_linear(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "avg_pool_linear";
  check_cpu(op, "x", x);
  check_cpu(op, "weight", weight);
  TORCH_CHECK(x.dim() == 4 && nhwc_dense(x), "fastres_cpu::", op,
              ": x must be a dense 4-D channels_last tensor, got size ", sizes_str(x),
              " and strides ", x.strides());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "fastres_cpu::", op, ": x has dtype ", dt,
              "; expected float32 or bfloat16");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == c && weight.is_contiguous() &&
                  weight.scalar_type() == dt,
              "fastres_cpu::", op, ": weight must be a contiguous (K, ", c,
              ") tensor of x's dtype ", dt, ", got size ", sizes_str(weight), ", dtype ",
              weight.scalar_type());
  const int64_t k = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_cpu(op, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == k && bias->is_contiguous() &&
                    bias->scalar_type() == dt,
                "fastres_cpu::", op, ": bias must be a contiguous (", k,
                ") tensor of x's dtype, got size ", sizes_str(*bias), ", dtype ",
                bias->scalar_type());
  }
  TORCH_CHECK(hw > 0 || n == 0, "fastres_cpu::", op, ": x has an empty map, size ",
              sizes_str(x));
  if (n == 0 || k == 0) return at::empty({n, k}, x.options());
  if (dt == at::kFloat) {
    return head<float>(x.const_data_ptr<float>(), weight, bias, weight.const_data_ptr<float>(),
                       has_bias ? bias->const_data_ptr<float>() : nullptr, n, hw, c, k,
                       x.options());
  }
  const auto u16 = [](const at::Tensor& t) {
    return static_cast<const uint16_t*>(t.const_data_ptr());
  };
  return head<uint16_t>(u16(x), weight, bias, u16(weight), has_bias ? u16(*bias) : nullptr, n,
                        hw, c, k, x.options());
}

}  // namespace
}  // namespace fastres::cpu

TORCH_LIBRARY_FRAGMENT(fastres_cpu, m) {
  // linear(flatten(adaptive_avg_pool2d(x, 1)), weight, bias) of a dense channels_last
  // float32/bfloat16 activation with weight and bias of its dtype: a ResNet's eval head.
  m.def("avg_pool_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
        &fastres::cpu::avg_pool_linear);
}
