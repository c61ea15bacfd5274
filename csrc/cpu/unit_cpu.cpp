// The CPU training unit from C++ (unit_cpu.h): fastres._autograd._ResidualUnitFn's forward and
// backward (no SyncBatchNorm) over the CPU ops' C++ functions. Each op keeps its profiler name
// (RECORD_FUNCTION "fastres::<op>"), so profiles read as they do on the per-op path.
#include "unit_cpu.h"

#include <ATen/record_function.h>

#include "../unit_layout.h"
#include "ops_common.h"

namespace fastres::cpu {

using OptTensor = std::optional<Tensor>;

std::vector<Tensor> unit_forward(const UnitSpec& spec, const Tensor& x,
                                 const std::vector<OptTensor>& params) {
  RECORD_FUNCTION("fastres::unit_forward", std::vector<c10::IValue>({x}));
  const size_t n = static_cast<size_t>(spec.n);
  const bool ds = spec.shortcut == 2;
  check_unit_forward(spec, params.size());
  const auto conv_stats = [&](size_t i, const Tensor& in, const OptTensor& sc,
                              const OptTensor& sh, bool pre_relu) {
    RECORD_FUNCTION("fastres::conv_stats", std::vector<c10::IValue>({in}));
    const UnitStage& s = spec.stages[i];
    return conv_stats_cpu(in, unit_need(params[6 * i], "a conv weight"), sc, sh, pre_relu,
                          s.stride, s.padding, s.dilation, s.groups);
  };
  const auto finalize = [&](size_t i, const Tensor& y, const Tensor& sum, const Tensor& sumsq) {
    check_batch_count(y);
    RECORD_FUNCTION("fastres::bn_finalize", std::vector<c10::IValue>({sum}));
    const UnitStage& s = spec.stages[i];
    const OptTensor* p = &params[6 * i];
    return bn_finalize_cpu(sum, sumsq, p[1], p[2], p[3], p[4], p[5], y.numel() / y.size(1),
                           s.momentum, s.eps);
  };
  std::vector<Tensor> ys, stats;
  Tensor inp = x, last_sum, last_sumsq;
  OptTensor sc, sh;
  bool pre_relu = false;
  for (size_t i = 0; i < n; ++i) {
    auto [y, sum, sumsq] = conv_stats(i, inp, sc, sh, pre_relu);
    ys.push_back(y);
    if (i == n - 1) {  // finalized after the downsample's convolution, as the per-op path does
      last_sum = sum;
      last_sumsq = sumsq;
      break;
    }
    auto [mean, invstd, scale, shift] = finalize(i, y, sum, sumsq);
    stats.insert(stats.end(), {mean, invstd, scale, shift});
    inp = y;
    sc = scale;
    sh = shift;
    pre_relu = true;
  }
  Tensor yd, dsum, dsumsq;
  if (ds) std::tie(yd, dsum, dsumsq) = conv_stats(n, x, std::nullopt, std::nullopt, false);
  {
    auto [mean, invstd, scale, shift] = finalize(n - 1, ys.back(), last_sum, last_sumsq);
    stats.insert(stats.end(), {mean, invstd, scale, shift});
  }
  std::vector<Tensor> dstats;
  if (ds) {
    auto [dm, di, dsc, dsh] = finalize(n, yd, dsum, dsumsq);
    dstats = {dm, di, dsc, dsh};
  }
  const UnitResidual r = unit_residual(spec, x, yd, dstats);
  Tensor out;
  {
    RECORD_FUNCTION("fastres::bn_add_relu", std::vector<c10::IValue>({ys.back()}));
    out = bn_add_relu_cpu(ys.back(), stats[4 * (n - 1) + 2], stats[4 * (n - 1) + 3], r.res,
                          r.scale, r.shift, 0, spec.relu);
  }
  return unit_outputs(out, yd, ys, stats, dstats);
}

std::vector<Tensor> unit_backward(const UnitSpec& spec, const Tensor& grad_out,
                                  const std::vector<OptTensor>& saved, bool need_x) {
  RECORD_FUNCTION("fastres::unit_backward", std::vector<c10::IValue>({grad_out}));
  const size_t n = static_cast<size_t>(spec.n);
  const bool ds = spec.shortcut == 2;
  const auto [x, out, yd, ys, st, res_mean, res_invstd, wd, gd, weights, gammas] =
      unpack_saved(spec, saved);
  const auto has_gamma = [](const OptTensor& g) { return g.has_value() && g->defined(); };

  const Tensor go = grad_out.contiguous(format_of(ys.back()));
  std::vector<Tensor> grads(3 * (n + ds));
  Tensor dy, dres, dgd, dbd;
  {
    RECORD_FUNCTION("fastres::bn_add_relu_bwd", std::vector<c10::IValue>({go}));
    Tensor dgamma, dbeta;
    std::tie(dy, dgamma, dbeta, dres, dgd, dbd) =
        bn_add_relu_bwd_cpu(go, out, ys.back(), st[4 * (n - 1)], st[4 * (n - 1) + 1],
                            gammas[n - 1], yd, res_mean, res_invstd, gd);
    grads[3 * (n - 1) + 1] = has_gamma(gammas[n - 1]) ? dgamma : Tensor();
    grads[3 * (n - 1) + 2] = dbeta;
  }
  const auto conv_bwd = [&](size_t i, const Tensor& g, const Tensor& in, const Tensor& w,
                            const OptTensor& sc, const OptTensor& sh, bool pre_relu,
                            std::array<bool, 2> mask) {
    RECORD_FUNCTION("fastres::conv_bwd", std::vector<c10::IValue>({g}));
    const UnitStage& s = spec.stages[i];
    return conv_bwd_cpu(g, in, w, sc, sh, pre_relu, s.stride, s.padding, s.dilation, s.groups,
                        mask);
  };
  for (size_t i = n - 1; i >= 1; --i) {
    const Tensor& scale_p = st[4 * (i - 1) + 2];
    const Tensor& shift_p = st[4 * (i - 1) + 3];
    auto [da, dw] = conv_bwd(i, dy, ys[i - 1], weights[i], scale_p, shift_p, true, {true, true});
    grads[3 * i] = dw;
    RECORD_FUNCTION("fastres::bn_relu_bwd", std::vector<c10::IValue>({da}));
    auto [dyp, dg, db] = bn_relu_bwd_cpu(da, ys[i - 1], st[4 * (i - 1)], st[4 * (i - 1) + 1],
                                         gammas[i - 1], scale_p, shift_p, true);
    dy = dyp;
    grads[3 * (i - 1) + 1] = has_gamma(gammas[i - 1]) ? dg : Tensor();
    grads[3 * (i - 1) + 2] = db;
  }
  auto [dx, dw0] =
      conv_bwd(0, dy, x, weights[0], std::nullopt, std::nullopt, false, {need_x, true});
  grads[0] = dw0;
  if (ds) {
    auto [dxd, dwd] = conv_bwd(n, dres, x, unit_need(wd, "the downsample's weight"),
                               std::nullopt, std::nullopt, false, {need_x, true});
    grads[3 * n] = dwd;
    grads[3 * n + 1] = has_gamma(gd) ? dgd : Tensor();
    grads[3 * n + 2] = dbd;
    if (need_x) dx.add_(dxd);  // dx is conv_bwd's fresh output: no new buffer
  } else if (spec.shortcut == 1 && need_x) {
    dx.add_(dres);
  }
  std::vector<Tensor> r{need_x ? dx : Tensor()};
  r.insert(r.end(), grads.begin(), grads.end());
  return r;
}

}  // namespace fastres::cpu
