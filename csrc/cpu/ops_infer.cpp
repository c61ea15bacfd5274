// The CPU inference ops: conv_bias_act through oneDNN fused convolutions with prepacked weights
// (fastres' own primitives, dnnl_conv.cpp, where built and covered; else ATen's
// mkldnn::_convolution_pointwise), and the backward of its bias/ReLU epilogue.

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

#include "dnnl_conv.h"
#include "ops_common.h"
#include "weight_cache.h"

namespace fastres::cpu {

// ---------------------------------------------------------------------------------------------
// oneDNN fused convolutions (mkldnn::_convolution_pointwise): conv + bias + ReLU, or conv + bias
// + residual add + ReLU, in one write of the output.

using PointwiseFn = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                           c10::List<optional<at::Scalar>>, optional<c10::string_view>);
using PointwiseBinaryFn = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                 const optional<Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, int64_t, c10::string_view, optional<at::Scalar>,
                                 optional<c10::string_view>, c10::List<optional<at::Scalar>>,
                                 optional<c10::string_view>);

// The in-place binary variant: the result is written into `other` (the residual) and returned.
using PointwiseBinaryInplaceFn = Tensor&(Tensor&, const Tensor&, const Tensor&,
                                         const optional<Tensor>&, at::IntArrayRef,
                                         at::IntArrayRef, at::IntArrayRef, int64_t,
                                         c10::string_view, optional<at::Scalar>,
                                         optional<c10::string_view>,
                                         c10::List<optional<at::Scalar>>,
                                         optional<c10::string_view>);

struct Pointwise {
  optional<c10::TypedOperatorHandle<PointwiseFn>> unary;
  optional<c10::TypedOperatorHandle<PointwiseBinaryFn>> binary;
  optional<c10::TypedOperatorHandle<PointwiseBinaryInplaceFn>> binary_inplace;
};

const Pointwise& pointwise_ops() {
  static const Pointwise ops = [] {
    Pointwise p;
    if (!at::hasMKLDNN()) {
      return p;
    }
    auto& d = c10::Dispatcher::singleton();
    if (auto h = d.findSchema({"mkldnn::_convolution_pointwise", ""})) {
      p.unary = h->typed<PointwiseFn>();
    }
    if (auto h = d.findSchema({"mkldnn::_convolution_pointwise", "binary"})) {
      p.binary = h->typed<PointwiseBinaryFn>();
    }
    if (auto h = d.findSchema({"mkldnn::_convolution_pointwise_", "binary"})) {
      p.binary_inplace = h->typed<PointwiseBinaryInplaceFn>();
    }
    return p;
  }();
  return ops;
}

Tensor pointwise_conv(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      int64_t groups, bool relu) {
  return pointwise_ops().unary->call(input, weight, bias, padding, stride, dilation, groups,
                                     relu ? "relu" : "none", c10::List<optional<at::Scalar>>(),
                                     std::nullopt);
}

// Whether oneDNN runs convolutions of this dtype on this CPU (bfloat16 and float16 need AVX-512
// class hardware; the check lives in ATen internals, so a 1x1 convolution asks once per dtype).
bool onednn_supports(at::ScalarType dtype) {
  if (!at::globalContext().userEnabledMkldnn() || !pointwise_ops().unary.has_value()) {
    return false;
  }
  if (dtype == at::kFloat) {
    return true;
  }
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return false;
  }
  static std::atomic<int> state[2] = {-1, -1};  // -1 unknown, 0 no, 1 yes
  std::atomic<int>& s = state[dtype == at::kHalf];
  if (s.load() < 0) {
    bool ok = true;
    try {
      const auto opts = at::TensorOptions().dtype(dtype);
      const Tensor x = at::ones({1, 1, 1, 1}, opts).contiguous(at::MemoryFormat::ChannelsLast);
      (void)pointwise_conv(x, at::ones({1, 1, 1, 1}, opts), std::nullopt, {1, 1}, {0, 0}, {1, 1}, 1,
                           false);
    } catch (const c10::Error&) {
      ok = false;
    }
    s.store(ok ? 1 : 0);
  }
  return s.load() == 1;
}

// Prepacked oneDNN weights (mkldnn::_reorder_convolution_weight) for channels_last inference,
// kept in the packed-weight cache (weight_cache.h: which weights, and why nothing goes stale).
// Without them every call copies the weight to channels_last and reorders it into oneDNN's
// blocked layout: two more parallel regions per convolution. Measured, Bottleneck(256, 64) N=8
// 56x56 fp32 CL, 2 threads, interleaved calls on the 2-core box under load average ~9 from other
// jobs: 134 ms (min) / 199 ms (p50) with plain weights vs 102 / 142 ms prepacked (one thread,
// same load: 112 vs 115 ms, no difference; the saving is the synchronisation).
optional<Tensor> aten_packed(const Tensor& weight, const Tensor& input, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const optional<c10::OperatorHandle> reorder =
      at::hasMKLDNN() ? c10::Dispatcher::singleton().findSchema(
                            {"mkldnn::_reorder_convolution_weight", ""})
                      : std::nullopt;
  if (!reorder.has_value()) {
    return std::nullopt;
  }
  std::vector<int64_t> key = {0};  // 0: ATen's packing
  for (auto list : {input.sizes(), stride, padding, dilation}) {
    key.insert(key.end(), list.begin(), list.end());
    key.push_back(-1);
  }
  key.push_back(groups);
  return WeightCache::get().lookup(weight, std::move(key), [&]() -> optional<Tensor> {
    torch::jit::Stack stack = {weight,         padding.vec(), stride.vec(),
                               dilation.vec(), groups,        input.sizes().vec()};
    try {
      reorder->callBoxed(stack);
    } catch (const c10::Error&) {
      return std::nullopt;  // this weight stays unpacked: oneDNN reorders it per call
    }
    return stack.at(0).toTensor();
  });
}

// conv(input, weight) + bias (+ residual), ReLU post-op when relu, in a new channels_last output
// by fastres' own oneDNN primitive; undefined when that path does not cover the call (not built,
// switched off, not channels_last, groups, dtype: the caller takes ATen's path). The residual is
// copied into the output first and accumulated into by oneDNN's sum post-op: the kernel and the
// summation order of conv_bias_act_finite_into, so an eval plan's in-place residual add gives
// bitwise the full path's output (tests/test_eval_plan.py). A binary add post-op reading the
// residual would save the copy, but oneDNN 2.6 then picks jit_1x1 over brgconv_1x1, other
// roundings: measured, Bottleneck(256, 64)'s conv3 (8x64x56x56 -> 256, 1x1), 1 thread, load
// average ~10 from other jobs, medians of 7 rounds: fp32 binary 80 ms, copy + sum 105, sum
// without the copy 63; bf16 binary 61, copy + sum 44, sum without the copy 27.
Tensor own_conv(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                const optional<Tensor>& residual, at::IntArrayRef out_sizes,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                int64_t groups, bool relu) {
  const auto dtype = input.scalar_type();
  if (!dnnl_enabled() || groups != 1 || (dtype != at::kFloat && dtype != at::kBFloat16) ||
      !nhwc_dense(input)) {
    return Tensor();
  }
  // In the input's format, as ATen's path gives it: an (N, C, 1, 1) input is contiguous by
  // format_of, and so is its output, which is the same NHWC buffer when it is (N, K, 1, 1) too.
  Tensor out = empty_act(out_sizes, input.options(), format_of(input));
  if (!nhwc_dense(out)) {
    return Tensor();
  }
  if (has(residual)) {
    out.copy_(*residual);
  }
  if (!dnnl_conv(input, weight, bias, out, has(residual), relu, stride, padding, dilation,
                 groups)) {
    return Tensor();
  }
  return out;
}

// conv_bias_act; finite: the caller has shown that the pre-activation conv(input) + bias
// (+ residual) is finite at every output (conv_bias_act_finite below), so oneDNN's ReLU post-op
// gives torch.relu's values.
Tensor conv_bias_act_impl(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                          const optional<Tensor>& residual, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          bool relu, bool finite, const optional<Tensor>& scale = std::nullopt) {
  constexpr const char* op = "conv_bias_act";
  const auto out_sizes = check_conv(op, input, weight, stride, padding, dilation, groups);
  const auto dtype = input.scalar_type();
  const int64_t k = weight.size(0);
  if (has(bias)) {
    check_vec(op, "bias", *bias, k, "one per output channel of weight");
    TORCH_CHECK(bias->scalar_type() == dtype || bias->scalar_type() == acc_dtype(dtype),
                "fastres::", op, ": bias has dtype ", bias->scalar_type(), " but input has dtype ",
                dtype, " (bias must have the input's dtype or ", acc_dtype(dtype), ")");
  }
  if (has(residual)) {
    check_cpu(op, "residual", *residual);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_sizes), "fastres::", op,
                ": residual must have the output's size ", at::IntArrayRef(out_sizes), ", got ",
                sizes_str(*residual));
    check_same_dtype(op, "residual", *residual, "input", input);
  }
  const auto fmt = format_of(input);
  if (has(scale)) {
    // The BatchNorm scale in the epilogue (the weight is the live, unfolded parameter): the
    // convolution alone, then relu?(y * scale + bias + residual) in one pass over its output.
    TORCH_CHECK(has(bias), "fastres::", op, ": scale is given only with bias");
    check_vec(op, "scale", *scale, k, "one per output channel of weight");
    TORCH_CHECK(scale->scalar_type() == acc_dtype(dtype), "fastres::", op, ": scale has dtype ",
                scale->scalar_type(), "; expected ", acc_dtype(dtype));
    Tensor out = own_conv(input, weight, std::nullopt, std::nullopt, out_sizes, stride, padding,
                          dilation, groups, false);
    if (!out.defined()) {
      out = in_format(onednn_supports(dtype) ? pointwise_conv(input, weight, std::nullopt, stride,
                                                              padding, dilation, groups, false)
                                             : conv_nobias(input, weight, stride, padding,
                                                           dilation, groups),
                      fmt);
    }
    run_epilogue(out, out, fmt, scale, bias, residual, std::nullopt, std::nullopt, 0, relu);
    return out;
  }

  {
    // fastres' own primitive (dnnl_conv.cpp): the ReLU post-op only where finite (oneDNN's
    // ReLU maps NaN to 0), else the ReLU pass in place.
    const bool post_relu = relu && finite;
    Tensor out = own_conv(input, weight, bias, residual, out_sizes, stride, padding, dilation,
                          groups, post_relu);
    if (out.defined()) {
      if (relu && !post_relu) {
        run_epilogue(out, out, fmt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                     std::nullopt, 0, true);
      }
      return out;
    }
  }
  if (onednn_supports(dtype)) {
    // Measured on a 2-core Xeon (AVX-512), fp32 channels_last, torchvision Bottleneck(256, 64),
    // N=8, 56x56, eval with BN folded: 3 fused oneDNN convolutions take 13.4 ms; eager PyTorch
    // (conv + separate bias/ReLU/add passes) takes 30 ms. The binary post-op fuses only for
    // groups == 1 and channels_last (ATen falls back to conv + add_relu_ otherwise, which
    // asserts for bf16/fp16), and wants a bias of the input's dtype. NCHW fp32 (same block,
    // load ~7): oneDNN unary fusion + the epilogue pass for the residual 78 ms (min) vs
    // at::convolution + one fused pass 76 ms, a tie, so both layouts take this path. bf16 CL:
    // 11 ms (min) vs eager 40 ms.
    const bool binary = has(residual) && pointwise_ops().binary.has_value() && groups == 1 &&
                        fmt == at::MemoryFormat::ChannelsLast &&
                        (!has(bias) || bias->scalar_type() == dtype);
    // A prepacked weight makes oneDNN compute in channels_last: only for channels_last input.
    optional<Tensor> packed;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      packed = aten_packed(weight, input, stride, padding, dilation, groups);
    }
    const Tensor& w = packed.has_value() ? *packed : weight;
    // oneDNN's ReLU post-op returns 0 for NaN (measured, torch 2.14.1 on AVX-512: relu, and
    // leaky_relu / hardtanh with bound 0, all map NaN to 0; torch.relu keeps NaN), so the ReLU
    // runs in our epilogue pass (at::vec::clamp_min, which keeps NaN), in place: one more read
    // and write of the output than the fused post-op, the price of the non-finite rule. Unless
    // the caller has shown there is no NaN to keep (finite): then the post-op.
    const bool post_relu = relu && finite;
    if (binary) {
      const optional<c10::string_view> unary =
          post_relu ? optional<c10::string_view>("relu") : std::nullopt;
      Tensor out = in_format(
          pointwise_ops().binary->call(input, *residual, w, bias, padding, stride, dilation, groups,
                                       "add", std::nullopt, unary,
                                       c10::List<optional<at::Scalar>>(), std::nullopt),
          fmt);
      if (relu && !post_relu) {
        run_epilogue(out, out, fmt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                     std::nullopt, 0, true);
      }
      return out;
    }
    const bool fused_relu = post_relu && !has(residual);
    Tensor out = in_format(
        pointwise_conv(input, w, bias, stride, padding, dilation, groups, fused_relu), fmt);
    if (has(residual) || (relu && !fused_relu)) {
      // relu?(y + residual), in place, one pass
      run_epilogue(out, out, fmt, std::nullopt, std::nullopt, residual, std::nullopt, std::nullopt,
                   0, relu);
    }
    return out;
  }

  // float64, or no oneDNN for this dtype: ATen's convolution, then bias + residual + ReLU in one
  // pass over its output, in place.
  Tensor out = in_format(conv_nobias(input, weight, stride, padding, dilation, groups), fmt);
  run_epilogue(out, out, fmt, std::nullopt, bias, residual, std::nullopt, std::nullopt, 0, relu);
  return out;
}

Tensor conv_bias_act_cpu(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                         const optional<Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         bool relu, const optional<Tensor>& scale,
                         const optional<Tensor>& bn_mean, const optional<Tensor>& bn_var,
                         double bn_eps) {
  constexpr const char* op = "conv_bias_act";
  TORCH_CHECK(has(bn_mean) == has(bn_var), "fastres::", op,
              ": bn_mean and bn_var are given together");
  if (!has(bn_var)) {
    return conv_bias_act_impl(input, weight, bias, residual, stride, padding, dilation, groups,
                              relu, false, scale);
  }
  // The BatchNorm from its live tensors: s = gamma / sqrt(var + eps), t = beta - mean * s in the
  // accumulation dtype (a few per-channel ops; the CPU's eval plans fold and cache instead).
  check_cpu(op, "input", input);
  const int64_t k = weight.dim() > 0 ? weight.size(0) : 0;
  for (const auto& [name, t] : {std::pair<const char*, const optional<Tensor>*>{"scale", &scale},
                                {"bias", &bias}, {"bn_mean", &bn_mean}, {"bn_var", &bn_var}})
    check_opt_vec(op, name, *t, k, "one per output channel of weight");
  const auto acc = acc_dtype(input.scalar_type());
  Tensor s = at::empty({k}, input.options().dtype(acc));
  Tensor t = at::empty({k}, input.options().dtype(acc));
  const auto vec = [&](const optional<Tensor>& v) {
    return has(v) ? v->to(acc).contiguous() : Tensor();
  };
  const Tensor g = vec(scale), b = vec(bias), m = vec(bn_mean), v = vec(bn_var);
  const auto fill = [&](auto zero) {
    using A = decltype(zero);
    const A* gp = g.defined() ? g.data_ptr<A>() : nullptr;
    const A* bp = b.defined() ? b.data_ptr<A>() : nullptr;
    const A* mp = m.data_ptr<A>();
    const A* vp = v.data_ptr<A>();
    A* sp = s.data_ptr<A>();
    A* tp = t.data_ptr<A>();
    const A eps = static_cast<A>(bn_eps);
    for (int64_t i = 0; i < k; ++i) {  // one rounding per operation, as the reference
      A si = A(1) / std::sqrt(vp[i] + eps);
      if (gp) si = si * gp[i];
      const A ms = mp[i] * si;
      sp[i] = si;
      tp[i] = bp ? bp[i] - ms : -ms;
    }
  };
  if (acc == at::kDouble) {
    fill(0.0);
  } else {
    fill(0.0f);
  }
  return conv_bias_act_impl(input, weight, t, residual, stride, padding, dilation, groups, relu,
                            false, s);
}

Tensor conv_bias_act_finite_cpu(const Tensor& input, const Tensor& weight,
                                const optional<Tensor>& bias, const optional<Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, bool relu) {
  check_cpu("conv_bias_act_finite", "input", input);
  return conv_bias_act_impl(input, weight, bias, residual, stride, padding, dilation, groups, relu,
                            true);
}

// conv_bias_act_finite with the result written into `residual` (which the caller no longer
// needs): oneDNN accumulates the convolution into the residual's buffer, where the out-of-place
// add first copies the residual into a new output (measured, layer1's conv3 at N=8: 2.37 vs
// 2.87 ms bf16, 5.85 vs 6.70 ms fp32, bitwise the same values). Where the in-place kernel does
// not apply (not channels_last, groups, a float32 bias with bf16 activations, no oneDNN), the
// out-of-place result is copied into `residual`.
Tensor& conv_bias_act_finite_into_cpu(Tensor& residual, const Tensor& input, const Tensor& weight,
                                      const optional<Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, bool relu) {
  constexpr const char* op = "conv_bias_act_finite_into";
  check_cpu(op, "input", input);
  const auto out_sizes = check_conv(op, input, weight, stride, padding, dilation, groups);
  check_cpu(op, "residual", residual);
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(out_sizes), "fastres_cpu::", op,
              ": residual must have the output's size ", at::IntArrayRef(out_sizes), ", got ",
              sizes_str(residual));
  check_same_dtype(op, "residual", residual, "input", input);
  const auto dtype = input.scalar_type();
  const auto cl = at::MemoryFormat::ChannelsLast;
  // A residual sharing memory with the input or weight would be read while it is written.
  const bool inplace = onednn_supports(dtype) && pointwise_ops().binary_inplace.has_value() &&
                       groups == 1 && format_of(input) == cl && has_dense_strides(residual, cl) &&
                       (!has(bias) || bias->scalar_type() == dtype) &&
                       !residual.is_alias_of(input) && !residual.is_alias_of(weight);
  if (nhwc_dense(input) && !residual.is_alias_of(input) && !residual.is_alias_of(weight) &&
      dnnl_conv(input, weight, bias, residual, true, relu, stride, padding, dilation, groups)) {
    return residual;  // fastres' own primitive, accumulating into the residual in place
  }
  if (inplace) {
    optional<Tensor> packed = aten_packed(weight, input, stride, padding, dilation, groups);
    const Tensor& w = packed.has_value() ? *packed : weight;
    const optional<c10::string_view> unary =
        relu ? optional<c10::string_view>("relu") : std::nullopt;
    pointwise_ops().binary_inplace->call(residual, input, w, bias, padding, stride, dilation,
                                         groups, "add", std::nullopt, unary,
                                         c10::List<optional<at::Scalar>>(), std::nullopt);
    return residual;
  }
  const Tensor out = conv_bias_act_impl(input, weight, bias, residual, stride, padding, dilation,
                                        groups, relu, true);
  residual.copy_(out);
  return residual;
}

double absmax_cpu(const Tensor& x) {
  constexpr const char* op = "absmax";
  check_cpu(op, "x", x);
  TORCH_CHECK(is_act_dtype(x.scalar_type()), "fastres_cpu::", op, ": x has dtype ",
              x.scalar_type(), "; expected float32, float64, bfloat16 or float16");
  const Tensor d = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  AbsMaxArgs a;
  a.dtype = d.scalar_type();
  a.in = d.data_ptr();
  a.n = d.numel();
  return kernels().absmax(a);
}

std::tuple<Tensor, Tensor> relu_bias_bwd_cpu(const Tensor& grad_out, const optional<Tensor>& out) {
  constexpr const char* op = "relu_bias_bwd";
  check_act(op, "grad_out", grad_out);
  if (has(out)) {
    check_cpu(op, "out", *out);
    check_same_sizes(op, "out", *out, "grad_out", grad_out);
    check_same_dtype(op, "out", *out, "grad_out", grad_out);
  }
  const auto dtype = grad_out.scalar_type();
  const auto fmt = format_of(grad_out);
  const Tensor go = in_format(grad_out, fmt);
  const Tensor o = has(out) ? in_format(*out, fmt) : Tensor();
  Tensor grad_z = empty_act(grad_out.sizes(), grad_out.options(), fmt);
  const int64_t c = grad_out.size(1);
  std::vector<double> sum_g(c);
  BnBwdArgs a;
  a.dtype = dtype;
  a.g = geom_of(go, fmt);
  a.mask = has(out) ? Mask::kOut : Mask::kNone;
  a.grad_out = go.data_ptr();
  a.out = has(out) ? o.data_ptr() : nullptr;
  a.sum_g = sum_g.data();
  a.g_out = grad_z.data_ptr();
  kernels().bn_bwd_reduce(a);
  return {grad_z, from_doubles(sum_g, acc_dtype(dtype))};
}


}  // namespace fastres::cpu

TORCH_LIBRARY_FRAGMENT(fastres_cpu, m) {
  // max |x|, NaN when x holds a NaN, +Inf when it holds +-Inf: one read pass (fastres.eval_plan
  // bounds a block's pre-activations with it).
  m.def("absmax(Tensor x) -> float", &fastres::cpu::absmax_cpu);
  // conv_bias_act for a caller that has shown conv(input) + bias (+ residual) to be finite at
  // every output (fastres.eval_plan: a bound from absmax and the folded weights' norms). Then
  // no NaN exists for oneDNN's ReLU post-op to map to 0, and the ReLU is fused into the
  // convolution's output write instead of a separate pass. Called otherwise, a NaN
  // pre-activation gives 0 where torch.relu gives NaN.
  m.def("conv_bias_act_finite(Tensor input, Tensor weight, Tensor? bias, Tensor? residual, "
        "int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) -> Tensor",
        &fastres::cpu::conv_bias_act_finite_cpu);
  // conv_bias_act_finite with its residual overwritten by the result (returned): for a caller
  // that owns the residual and no longer needs it.
  m.def("conv_bias_act_finite_into(Tensor(a!) residual, Tensor input, Tensor weight, "
        "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, bool relu) "
        "-> Tensor(a!)",
        &fastres::cpu::conv_bias_act_finite_into_cpu);
}
