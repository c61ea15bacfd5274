// The CPU training ops: the BN prologue, conv_stats, BatchNorm finalize, bn_add_relu and the
// convolution backward (the BatchNorm backwards: ops_train_bn_bwd.cpp).

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

namespace fastres::cpu {

// a = relu?(input * scale + shift) in the input's dtype and format, as reference._prologue.
Tensor apply_prologue(const Tensor& x, at::MemoryFormat fmt, const optional<Tensor>& scale,
                      const optional<Tensor>& shift, bool relu) {
  const auto dtype = x.scalar_type();
  const int64_t c = x.size(1);
  const Tensor s = opmath_vec(scale, dtype, c, 1.0);
  const Tensor b = opmath_vec(shift, dtype, c, 0.0);
  Tensor out = empty_act(x.sizes(), x.options(), fmt);
  PrologueArgs a;
  a.dtype = dtype;
  a.g = geom_of(x, fmt);
  a.out = out.data_ptr();
  a.in = x.data_ptr();
  a.scale = s.data_ptr();
  a.shift = b.data_ptr();
  a.relu = relu;
  kernels().prologue(a);
  return out;
}

bool has_prologue(const optional<Tensor>& scale, const optional<Tensor>& shift, bool relu) {
  return has(scale) || has(shift) || relu;
}

std::tuple<Tensor, Tensor, Tensor> conv_stats_cpu(const Tensor& input, const Tensor& weight,
                                                  const optional<Tensor>& pre_scale,
                                                  const optional<Tensor>& pre_shift, bool pre_relu,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv_stats";
  const auto out_sizes = check_conv(op, input, weight, stride, padding, dilation, groups);
  const int64_t c = input.size(1);
  check_opt_vec(op, "pre_scale", pre_scale, c, "one per channel of input");
  check_opt_vec(op, "pre_shift", pre_shift, c, "one per channel of input");
  const auto dtype = input.scalar_type();
  const auto fmt = format_of(input);
  // The prologue goes into a temporary in one vectorised pass (oneDNN has no input-side
  // fusion); the zero padding of the convolution then applies to the transformed tensor.
  const Tensor a = has_prologue(pre_scale, pre_shift, pre_relu)
                       ? apply_prologue(in_format(input, fmt), fmt, pre_scale, pre_shift, pre_relu)
                       : input;
  // The own primitive where it covers the call: made once per shape (ATen's builds a descriptor
  // per call), its output from the activation pool. The weight changes every step, so it is
  // reordered per call, as ATen does. Measured on the 2-CPU EPYC, 1 thread, ResNet-50's seven
  // distinct shapes at N=8 with the prologue, own and ATen's alternating in one process (thread
  // CPU time, medians of 7): summed 56.2 against 58.0 ms bf16, 115.2 against 125.9 ms fp32 (its
  // 1x1 convolutions 1.26-1.35x, one 3x3 at 7x7 0.95x).
  Tensor out = own_conv(a, weight, std::nullopt, std::nullopt, out_sizes, stride, padding,
                        dilation, groups, false);
  if (!out.defined()) {
    out = in_format(conv_nobias(a, weight, stride, padding, dilation, groups), fmt);
  }
  const int64_t k = weight.size(0);
  std::vector<double> sum(k), sumsq(k);
  StatsArgs s;
  s.dtype = dtype;
  s.g = geom_of(out, fmt);
  s.in = out.data_ptr();
  s.sum = sum.data();
  s.sumsq = sumsq.data();
  kernels().channel_stats(s);
  return {out, from_doubles(sum, acc_dtype(dtype)), from_doubles(sumsq, acc_dtype(dtype))};
}

// Checks shared by bn_finalize and bn_finalize_count; returns the number of channels.
int64_t check_finalize(const char* op, const Tensor& sum, const Tensor& sumsq,
                       const optional<Tensor>& weight, const optional<Tensor>& bias,
                       const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                       const optional<Tensor>& num_batches_tracked, optional<double> momentum) {
  check_cpu(op, "sum", sum);
  TORCH_CHECK(sum.dim() == 1, "fastres::", op,
              ": sum must be 1-D (one value per channel), got size ", sizes_str(sum));
  TORCH_CHECK(sum.scalar_type() == at::kFloat || sum.scalar_type() == at::kDouble, "fastres::", op,
              ": sum must be float32 or float64 (the accumulation dtype), got ", sum.scalar_type());
  const int64_t c = sum.size(0);
  check_vec(op, "sumsq", sumsq, c, "one per channel of sum");
  check_same_dtype(op, "sumsq", sumsq, "sum", sum);
  check_opt_vec(op, "weight", weight, c, "one per channel of sum");
  check_opt_vec(op, "bias", bias, c, "one per channel of sum");
  check_opt_vec(op, "running_mean", running_mean, c, "one per channel of sum");
  check_opt_vec(op, "running_var", running_var, c, "one per channel of sum");
  if (has(num_batches_tracked)) {
    check_cpu(op, "num_batches_tracked", *num_batches_tracked);
    TORCH_CHECK(num_batches_tracked->numel() == 1, "fastres::", op,
                ": num_batches_tracked must have one element, got size ",
                sizes_str(*num_batches_tracked));
  }
  const bool update = has(running_mean) || has(running_var);
  TORCH_CHECK_VALUE(!update || momentum.has_value() || has(num_batches_tracked), "fastres::", op,
                    ": momentum=None (cumulative average) needs num_batches_tracked");
  return c;
}

// bn_finalize's arithmetic over n values per channel (checked by the caller), in double.
std::tuple<Tensor, Tensor, Tensor, Tensor> finalize(
    const Tensor& sum, const Tensor& sumsq, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, double n,
    optional<double> momentum, double eps) {
  const int64_t c = sum.size(0);
  const auto s = double_vec(sum), ss = double_vec(sumsq);
  const auto w = has(weight) ? double_vec(*weight) : std::vector<double>(c, 1.0);
  const auto b = has(bias) ? double_vec(*bias) : std::vector<double>(c, 0.0);
  std::vector<double> mean(c), invstd(c), scale(c), shift(c), var(c);
  for (int64_t i = 0; i < c; ++i) {
    mean[i] = s[i] / n;
    var[i] = std::max(ss[i] / n - mean[i] * mean[i], 0.0);
    invstd[i] = 1.0 / std::sqrt(var[i] + eps);
    scale[i] = w[i] * invstd[i];
    shift[i] = b[i] - mean[i] * scale[i];
  }
  if (has(num_batches_tracked)) {
    num_batches_tracked->add_(1);
  }
  if (has(running_mean) || has(running_var)) {
    const double factor =
        momentum.has_value() ? *momentum : 1.0 / num_batches_tracked->item<double>();
    if (has(running_mean)) {
      auto rm = double_vec(*running_mean);
      for (int64_t i = 0; i < c; ++i) {
        rm[i] = (1.0 - factor) * rm[i] + factor * mean[i];
      }
      running_mean->copy_(from_doubles(rm, running_mean->scalar_type()));
    }
    if (has(running_var)) {
      auto rv = double_vec(*running_var);
      const double unbias = n / (n - 1.0);
      for (int64_t i = 0; i < c; ++i) {
        rv[i] = (1.0 - factor) * rv[i] + factor * var[i] * unbias;
      }
      running_var->copy_(from_doubles(rv, running_var->scalar_type()));
    }
  }
  const auto t = sum.scalar_type();
  return {from_doubles(mean, t), from_doubles(invstd, t), from_doubles(scale, t),
          from_doubles(shift, t)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_cpu(
    const Tensor& sum, const Tensor& sumsq, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, int64_t count,
    optional<double> momentum, double eps) {
  check_finalize("bn_finalize", sum, sumsq, weight, bias, running_mean, running_var,
                 num_batches_tracked, momentum);
  // nn.BatchNorm2d's message and exception type (ValueError).
  TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got ", count,
                    " values");
  return finalize(sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked,
                  static_cast<double>(count), momentum, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_count_cpu(
    const Tensor& sum, const Tensor& sumsq, const Tensor& count, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
    optional<double> momentum, double eps) {
  constexpr const char* op = "bn_finalize_count";
  check_finalize(op, sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked,
                 momentum);
  check_cpu(op, "count", count);
  TORCH_CHECK(count.numel() == 1 && count.is_floating_point(), "fastres::", op,
              ": count must be one floating-point value (the all-reduced count), got ",
              count.scalar_type(), " of size ", sizes_str(count));
  // On the CPU reading it costs nothing, so the contract's caller check is repeated here.
  const double n = count.item<double>();
  TORCH_CHECK_VALUE(n > 1, "Expected more than 1 value per channel when training, got ", n,
                    " values");
  return finalize(sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked, n,
                  momentum, eps);
}

Tensor bn_add_relu_cpu(const Tensor& input, const Tensor& scale, const Tensor& shift,
                       const optional<Tensor>& residual, const optional<Tensor>& res_scale,
                       const optional<Tensor>& res_shift, int64_t res_channel_offset, bool relu) {
  constexpr const char* op = "bn_add_relu";
  check_act(op, "input", input);
  const int64_t c = input.size(1);
  check_vec(op, "scale", scale, c, "one per channel of input");
  check_vec(op, "shift", shift, c, "one per channel of input");
  const auto dtype = input.scalar_type();
  const auto fmt = format_of(input);
  int64_t cr = 0;
  if (has(residual)) {
    check_act(op, "residual", *residual);
    check_same_dtype(op, "residual", *residual, "input", input);
    cr = residual->size(1);
    TORCH_CHECK(residual->size(0) == input.size(0) && residual->size(2) == input.size(2) &&
                    residual->size(3) == input.size(3),
                "fastres::", op, ": residual of size ", sizes_str(*residual),
                " must match input of size ", sizes_str(input), " in N, H and W");
    TORCH_CHECK(res_channel_offset >= 0 && res_channel_offset + cr <= c, "fastres::", op,
                ": residual's ", cr, " channels at res_channel_offset=", res_channel_offset,
                " do not fit in input's ", c, " channels (input ", sizes_str(input), ", residual ",
                sizes_str(*residual), ")");
    check_opt_vec(op, "res_scale", res_scale, cr, "one per channel of residual");
    check_opt_vec(op, "res_shift", res_shift, cr, "one per channel of residual");
  }
  const Tensor x = in_format(input, fmt);
  Tensor out = empty_act(input.sizes(), input.options(), fmt);
  run_epilogue(out, x, fmt, scale, shift, residual, res_scale, res_shift, res_channel_offset, relu);
  return out;
}

std::tuple<Tensor, Tensor> conv_bwd_cpu(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& weight, const optional<Tensor>& pre_scale,
                                        const optional<Tensor>& pre_shift, bool pre_relu,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups,
                                        std::array<bool, 2> output_mask) {
  constexpr const char* op = "conv_bwd";
  const auto out_sizes = check_conv(op, input, weight, stride, padding, dilation, groups);
  check_act(op, "grad_out", grad_out);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_sizes), "fastres::", op,
              ": grad_out must have the convolution's output size ", at::IntArrayRef(out_sizes),
              ", got ", sizes_str(grad_out));
  check_same_dtype(op, "grad_out", grad_out, "input", input);
  const int64_t c = input.size(1);
  check_opt_vec(op, "pre_scale", pre_scale, c, "one per channel of input");
  check_opt_vec(op, "pre_shift", pre_shift, c, "one per channel of input");
  const auto fmt = format_of(input);
  // The prologue's output is needed for grad_weight only (grad_input depends on the weight);
  // it is recomputed here rather than stored by the forward.
  const Tensor a = output_mask[1] && has_prologue(pre_scale, pre_shift, pre_relu)
                       ? apply_prologue(in_format(input, fmt), fmt, pre_scale, pre_shift, pre_relu)
                       : input;
  // fastres' own backward primitives where they cover the call (dnnl_conv_bwd.cpp): kept per
  // shape, grad_input from the activation pool; ATen's convolution_backward for the rest.
  Tensor grad_input = at::empty({0}, input.options());
  Tensor grad_weight = at::empty({0}, weight.options());
  bool need_in = output_mask[0], need_w = output_mask[1];
  if (need_in) {
    Tensor gi = empty_act(input.sizes(), input.options(), fmt);
    if (dnnl_conv_bwd_data(grad_out, weight, gi, stride, padding, dilation, groups)) {
      grad_input = gi;
      need_in = false;
    }
  }
  if (need_w) {
    // torch.empty_like(weight) in the fake: the weight's own strides when it is dense.
    Tensor gw = weight.is_non_overlapping_and_dense() ? at::empty_like(weight)
                                                      : at::empty(weight.sizes(), weight.options());
    if (dnnl_conv_bwd_weights(a, grad_out, gw, stride, padding, dilation, groups)) {
      grad_weight = gw;
      need_w = false;
    }
  }
  if (need_in || need_w) {
    auto [gi, gw, gb] =
        at::convolution_backward(grad_out, a, weight, std::nullopt, stride, padding, dilation,
                                 false, {0, 0}, groups, {need_in, need_w, false});
    if (need_in) {
      grad_input = in_format(gi, fmt);
    }
    if (need_w) {
      grad_weight = gw;
      if (weight.is_non_overlapping_and_dense() && gw.strides() != weight.strides()) {
        grad_weight = at::empty_like(weight).copy_(gw);
      }
    }
  }
  return {grad_input, grad_weight};
}


}  // namespace fastres::cpu
