// The CPU training ops' BatchNorm backwards: a reduction pass then an elementwise pass
// (bn_add_relu_bwd, bn_relu_bwd), and their SyncBatchNorm halves (_reduce, _elemt).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "ops_common.h"

namespace fastres::cpu {

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

}  // namespace fastres::cpu
