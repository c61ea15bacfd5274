// The CPU training ops: the BN prologue, conv_stats, BatchNorm finalize, bn_add_relu, the
// BatchNorm backwards (a reduction pass and an elementwise pass) and the convolution backward.

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

// ---------------------------------------------------------------------------------------------
// BatchNorm backward: a reduction pass (sum g, sum g*(x - mean)) then an elementwise pass
// grad_x = a*g + b*(x - mean) + d. bn_add_relu_bwd / bn_relu_bwd run both; SyncBatchNorm runs
// them as separate ops (_reduce, _elemt) with an all-reduce of the sums in between.

// Per-channel coefficients of the elementwise pass from the means of g and g*xhat:
// a = weight*invstd, b = -a*invstd*mean_g_xhat, d = -a*mean_g.
struct BnCoef {
  Tensor a, b, d;
};

BnCoef bn_coef(const std::vector<double>& mean_g, const std::vector<double>& mean_g_xhat,
               const Tensor& invstd, const optional<Tensor>& weight, at::ScalarType opmath) {
  const int64_t c = static_cast<int64_t>(mean_g.size());
  const auto is = double_vec(invstd);
  const auto w = has(weight) ? double_vec(*weight) : std::vector<double>(c, 1.0);
  std::vector<double> a(c), b(c), d(c);
  for (int64_t i = 0; i < c; ++i) {
    a[i] = w[i] * is[i];
    b[i] = -a[i] * is[i] * mean_g_xhat[i];
    d[i] = -a[i] * mean_g[i];
  }
  return {from_doubles(a, opmath), from_doubles(b, opmath), from_doubles(d, opmath)};
}

// The identity map as coefficients: grad_x2 = g (exact: 1*g + 0 and 0*(x - mean)).
BnCoef identity_coef(int64_t c, at::ScalarType opmath) {
  return {from_doubles(std::vector<double>(c, 1.0), opmath),
          from_doubles(std::vector<double>(c, 0.0), opmath),
          from_doubles(std::vector<double>(c, 0.0), opmath)};
}

// sum g*xhat = invstd * sum g*(x - mean).
std::vector<double> times(const std::vector<double>& v, const Tensor& invstd) {
  const auto s = double_vec(invstd);
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    r[i] = v[i] * s[i];
  }
  return r;
}

std::vector<double> divided(const std::vector<double>& v, double div) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    r[i] = v[i] / div;
  }
  return r;
}

void check_bn_stats(const char* op, const char* prefix, const Tensor& input, const Tensor& mean,
                    const Tensor& invstd, const optional<Tensor>& weight) {
  const int64_t c = input.size(1);
  const std::string p(prefix);
  check_vec(op, (p + "mean").c_str(), mean, c, "one per channel");
  check_vec(op, (p + "invstd").c_str(), invstd, c, "one per channel");
  check_opt_vec(op, (p + "weight").c_str(), weight, c, "one per channel");
}

// The tensors of one BatchNorm backward in a single working format (the input's; others are
// copied to it) and the kernel arguments both passes share.
struct BnBwd {
  at::MemoryFormat fmt;
  at::TensorOptions opts;
  Tensor go, o, x, x2, m, m2, ps, pb;
  BnBwdArgs args;
  int64_t c = 0, count = 0;
  at::ScalarType opmath;
};

void check_grad_pair(const char* op, const Tensor& grad_out, const Tensor& input) {
  check_act(op, "grad_out", grad_out);
  check_act(op, "input", input);
  check_same_sizes(op, "input", input, "grad_out", grad_out);
  check_same_dtype(op, "input", input, "grad_out", grad_out);
}

// bn_add_relu_bwd and its split: checks, then the working tensors. weight/res_weight are
// checked when given (the reduce op has none).
BnBwd add_relu_bwd_tensors(const char* op, const Tensor& grad_out, const optional<Tensor>& out,
                           const Tensor& input, const Tensor& mean, const Tensor& invstd,
                           const optional<Tensor>& weight, const optional<Tensor>& res_input,
                           const optional<Tensor>& res_mean, const optional<Tensor>& res_invstd,
                           const optional<Tensor>& res_weight) {
  check_grad_pair(op, grad_out, input);
  if (has(out)) {
    check_cpu(op, "out", *out);
    check_same_sizes(op, "out", *out, "grad_out", grad_out);
    check_same_dtype(op, "out", *out, "grad_out", grad_out);
  }
  check_bn_stats(op, "", input, mean, invstd, weight);
  const bool res_bn = has(res_input);
  if (res_bn) {
    check_act(op, "res_input", *res_input);
    check_same_sizes(op, "res_input", *res_input, "grad_out", grad_out);
    check_same_dtype(op, "res_input", *res_input, "grad_out", grad_out);
    TORCH_CHECK_VALUE(has(res_mean) && has(res_invstd), "fastres::", op,
                      ": res_input needs res_mean and res_invstd");
    check_bn_stats(op, "res_", *res_input, *res_mean, *res_invstd, res_weight);
  }
  BnBwd t;
  const auto dtype = input.scalar_type();
  t.fmt = format_of(input);
  t.opts = input.options().memory_format(t.fmt);
  t.opmath = acc_dtype(dtype);
  t.c = input.size(1);
  t.count = input.numel() / std::max<int64_t>(t.c, 1);
  t.go = in_format(grad_out, t.fmt);
  t.x = in_format(input, t.fmt);
  t.m = opmath_vec(mean, dtype);
  t.args.dtype = dtype;
  t.args.g = geom_of(t.x, t.fmt);
  t.args.mask = has(out) ? Mask::kOut : Mask::kNone;
  t.args.grad_out = t.go.data_ptr();
  if (has(out)) {
    t.o = in_format(*out, t.fmt);
    t.args.out = t.o.data_ptr();
  }
  t.args.x = t.x.data_ptr();
  t.args.mean = t.m.data_ptr();
  if (res_bn) {
    t.x2 = in_format(*res_input, t.fmt);
    t.m2 = opmath_vec(*res_mean, dtype);
    t.args.x2 = t.x2.data_ptr();
    t.args.mean2 = t.m2.data_ptr();
  }
  return t;
}

// bn_relu_bwd and its split.
BnBwd relu_bwd_tensors(const char* op, const Tensor& grad_out, const Tensor& input,
                       const Tensor& mean, const Tensor& invstd, const optional<Tensor>& weight,
                       const Tensor& scale, const Tensor& shift, bool relu) {
  check_grad_pair(op, grad_out, input);
  check_bn_stats(op, "", input, mean, invstd, weight);
  const int64_t c = input.size(1);
  check_vec(op, "scale", scale, c, "one per channel");
  check_vec(op, "shift", shift, c, "one per channel");
  BnBwd t;
  const auto dtype = input.scalar_type();
  t.fmt = format_of(input);
  t.opts = input.options().memory_format(t.fmt);
  t.opmath = acc_dtype(dtype);
  t.c = c;
  t.count = input.numel() / std::max<int64_t>(c, 1);
  t.go = in_format(grad_out, t.fmt);
  t.x = in_format(input, t.fmt);
  t.m = opmath_vec(mean, dtype);
  t.ps = opmath_vec(scale, dtype);
  t.pb = opmath_vec(shift, dtype);
  t.args.dtype = dtype;
  t.args.g = geom_of(t.x, t.fmt);
  t.args.mask = relu ? Mask::kPre : Mask::kNone;
  t.args.grad_out = t.go.data_ptr();
  t.args.pre_scale = t.ps.data_ptr();
  t.args.pre_shift = t.pb.data_ptr();
  t.args.x = t.x.data_ptr();
  t.args.mean = t.m.data_ptr();
  return t;
}

// The reduction pass: sum_g, sum_g*(x - mean) (and with x2, sum_g*(x2 - mean2)) in double; g
// itself written to g_out when given (an identity residual's gradient).
struct BnSums {
  std::vector<double> g, gx, gx2;
};

BnSums reduce_pass(const BnBwd& t, void* g_out = nullptr) {
  BnSums s{std::vector<double>(t.c), std::vector<double>(t.c),
           std::vector<double>(t.x2.defined() ? t.c : 0)};
  BnBwdArgs a = t.args;
  a.sum_g = s.g.data();
  a.sum_gx = s.gx.data();
  a.sum_gx2 = t.x2.defined() ? s.gx2.data() : nullptr;
  a.g_out = g_out;
  kernels().bn_bwd_reduce(a);
  return s;
}

// The elementwise pass: grad_x from (x, k) and, when k2 is given, grad_x2 from (x2 or, for an
// identity residual, x with identity coefficients, k2). Returns them in the working format.
std::pair<Tensor, Tensor> apply_pass(const BnBwd& t, const BnCoef& k, const BnCoef* k2) {
  Tensor grad_x = empty_act(t.x.sizes(), t.opts, t.fmt);
  BnBwdArgs p = t.args;
  p.a = k.a.data_ptr();
  p.b = k.b.data_ptr();
  p.d = k.d.data_ptr();
  p.grad_x = grad_x.data_ptr();
  Tensor grad_x2;
  if (k2 != nullptr) {
    grad_x2 = empty_act(t.x.sizes(), t.opts, t.fmt);
    if (!t.x2.defined()) {
      p.x2 = p.x;
      p.mean2 = p.mean;
    }
    p.a2 = k2->a.data_ptr();
    p.b2 = k2->b.data_ptr();
    p.d2 = k2->d.data_ptr();
    p.grad_x2 = grad_x2.data_ptr();
  } else {
    p.x2 = nullptr;
  }
  kernels().bn_bwd_apply(p);
  return {grad_x, grad_x2};
}

// Two distinct empty tensors when needed: outputs of an op must not alias each other (opcheck).
Tensor empty_vec(const Tensor& like) { return at::empty({0}, like.options()); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& weight, const optional<Tensor>& res_input,
    const optional<Tensor>& res_mean, const optional<Tensor>& res_invstd,
    const optional<Tensor>& res_weight) {
  const BnBwd t = add_relu_bwd_tensors("bn_add_relu_bwd", grad_out, out, input, mean, invstd,
                                       weight, res_input, res_mean, res_invstd, res_weight);
  const auto vdtype = mean.scalar_type();
  const double n = static_cast<double>(std::max<int64_t>(t.count, 1));
  if (!has(res_input)) {
    // Identity residual: grad_res = g, written by the reduction and read by the apply pass.
    Tensor g = empty_act(input.sizes(), t.opts, t.fmt);
    const BnSums s = reduce_pass(t, g.data_ptr());
    const auto gw = times(s.gx, invstd);
    const BnCoef k = bn_coef(divided(s.g, n), divided(gw, n), invstd, weight, t.opmath);
    BnBwd ti = t;
    ti.args.mask = Mask::kNone;
    ti.args.grad_out = g.data_ptr();
    auto [grad_input, unused] = apply_pass(ti, k, nullptr);
    return {grad_input,
            from_doubles(gw, vdtype),
            from_doubles(s.g, vdtype),
            in_format(g, format_of(grad_out)),
            empty_vec(mean),
            empty_vec(mean)};
  }
  const BnSums s = reduce_pass(t);
  const auto gw = times(s.gx, invstd), gw2 = times(s.gx2, *res_invstd);
  const auto mg = divided(s.g, n);
  const BnCoef k = bn_coef(mg, divided(gw, n), invstd, weight, t.opmath);
  const BnCoef k2 = bn_coef(mg, divided(gw2, n), *res_invstd, res_weight, t.opmath);
  auto [grad_input, grad_res] = apply_pass(t, k, &k2);
  const auto rdtype = res_mean->scalar_type();
  return {grad_input,
          from_doubles(gw, vdtype),
          from_doubles(s.g, vdtype),
          in_format(grad_res, format_of(*res_input)),
          from_doubles(gw2, rdtype),
          from_doubles(s.g, rdtype)};
}

std::tuple<Tensor, Tensor, Tensor> bn_add_relu_bwd_reduce_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& res_input, const optional<Tensor>& res_mean,
    const optional<Tensor>& res_invstd) {
  const BnBwd t = add_relu_bwd_tensors("bn_add_relu_bwd_reduce", grad_out, out, input, mean, invstd,
                                       std::nullopt, res_input, res_mean, res_invstd, std::nullopt);
  const BnSums s = reduce_pass(t);
  const auto vdtype = mean.scalar_type();
  return {from_doubles(s.g, vdtype), from_doubles(times(s.gx, invstd), vdtype),
          has(res_input) ? from_doubles(times(s.gx2, *res_invstd), vdtype) : empty_vec(mean)};
}

std::tuple<Tensor, Tensor> bn_add_relu_bwd_elemt_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& weight, const Tensor& mean_g,
    const Tensor& mean_g_xhat, const optional<Tensor>& res_input, const optional<Tensor>& res_mean,
    const optional<Tensor>& res_invstd, const optional<Tensor>& res_weight,
    const optional<Tensor>& res_mean_g_xhat) {
  constexpr const char* op = "bn_add_relu_bwd_elemt";
  const BnBwd t = add_relu_bwd_tensors(op, grad_out, out, input, mean, invstd, weight, res_input,
                                       res_mean, res_invstd, res_weight);
  check_vec(op, "mean_g", mean_g, t.c, "one per channel");
  check_vec(op, "mean_g_xhat", mean_g_xhat, t.c, "one per channel");
  const auto mg = double_vec(mean_g);
  const BnCoef k = bn_coef(mg, double_vec(mean_g_xhat), invstd, weight, t.opmath);
  if (!has(res_input)) {
    const BnCoef id = identity_coef(t.c, t.opmath);
    auto [grad_input, g] = apply_pass(t, k, &id);
    return {grad_input, in_format(g, format_of(grad_out))};
  }
  TORCH_CHECK_VALUE(has(res_mean_g_xhat), "fastres::", op, ": res_input needs res_mean_g_xhat");
  check_vec(op, "res_mean_g_xhat", *res_mean_g_xhat, t.c, "one per channel");
  const BnCoef k2 = bn_coef(mg, double_vec(*res_mean_g_xhat), *res_invstd, res_weight, t.opmath);
  auto [grad_input, grad_res] = apply_pass(t, k, &k2);
  return {grad_input, in_format(grad_res, format_of(*res_input))};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd_cpu(const Tensor& grad_out, const Tensor& input,
                                                   const Tensor& mean, const Tensor& invstd,
                                                   const optional<Tensor>& weight,
                                                   const Tensor& scale, const Tensor& shift,
                                                   bool relu) {
  const BnBwd t =
      relu_bwd_tensors("bn_relu_bwd", grad_out, input, mean, invstd, weight, scale, shift, relu);
  const BnSums s = reduce_pass(t);
  const double n = static_cast<double>(std::max<int64_t>(t.count, 1));
  const auto gw = times(s.gx, invstd);
  const BnCoef k = bn_coef(divided(s.g, n), divided(gw, n), invstd, weight, t.opmath);
  auto [grad_input, unused] = apply_pass(t, k, nullptr);
  return {grad_input, from_doubles(gw, mean.scalar_type()), from_doubles(s.g, mean.scalar_type())};
}

std::tuple<Tensor, Tensor> bn_relu_bwd_reduce_cpu(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& invstd,
                                                  const Tensor& scale, const Tensor& shift,
                                                  bool relu) {
  const BnBwd t = relu_bwd_tensors("bn_relu_bwd_reduce", grad_out, input, mean, invstd,
                                   std::nullopt, scale, shift, relu);
  const BnSums s = reduce_pass(t);
  return {from_doubles(s.g, mean.scalar_type()),
          from_doubles(times(s.gx, invstd), mean.scalar_type())};
}

Tensor bn_relu_bwd_elemt_cpu(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                             const Tensor& invstd, const optional<Tensor>& weight,
                             const Tensor& scale, const Tensor& shift, bool relu,
                             const Tensor& mean_g, const Tensor& mean_g_xhat) {
  constexpr const char* op = "bn_relu_bwd_elemt";
  const BnBwd t = relu_bwd_tensors(op, grad_out, input, mean, invstd, weight, scale, shift, relu);
  check_vec(op, "mean_g", mean_g, t.c, "one per channel");
  check_vec(op, "mean_g_xhat", mean_g_xhat, t.c, "one per channel");
  const BnCoef k = bn_coef(double_vec(mean_g), double_vec(mean_g_xhat), invstd, weight, t.opmath);
  return apply_pass(t, k, nullptr).first;
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
  auto [gi, gw, gb] =
      at::convolution_backward(grad_out, a, weight, std::nullopt, stride, padding, dilation, false,
                               {0, 0}, groups, {output_mask[0], output_mask[1], false});
  Tensor grad_input = output_mask[0] ? in_format(gi, fmt) : at::empty({0}, input.options());
  Tensor grad_weight;
  if (output_mask[1]) {
    // torch.empty_like(weight) in the fake: the weight's own strides when it is dense.
    grad_weight = gw;
    if (weight.is_non_overlapping_and_dense() && gw.strides() != weight.strides()) {
      grad_weight = at::empty_like(weight).copy_(gw);
    }
  } else {
    grad_weight = at::empty({0}, weight.options());
  }
  return {grad_input, grad_weight};
}


}  // namespace fastres::cpu
