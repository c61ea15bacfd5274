// The training unit's forward and backward from C++ (unit.h): the op sequence of
// fastres._autograd._ResidualUnitFn (no SyncBatchNorm), each launcher called directly.
#include <ATen/record_function.h>

#include "../unit_layout.h"
#include "ops_api.h"
#include "ops_common.h"
#include "unit.h"

namespace fastres {
namespace cuda {

namespace {

// The dtype a BatchNorm's parameter gradients are wanted in (ops_api.h): its weight's, or
// Undefined without one (affine=False: none).
at::ScalarType grad_dtype(const OptTensor& gamma) {
  return gamma.has_value() && gamma->defined() ? gamma->scalar_type()
                                               : at::ScalarType::Undefined;
}

void keep_max(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (v > cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

}  // namespace

std::vector<Tensor> unit_forward(const UnitSpec& spec, const Tensor& x,
                                 const std::vector<OptTensor>& params) {
  RECORD_FUNCTION("fastres::unit_forward", std::vector<c10::IValue>({x}));
  const size_t n = static_cast<size_t>(spec.n);
  const bool ds = spec.shortcut == 2;
  check_unit_forward(spec, params.size());
  api::Scratch scratch;  // the convolutions' per-CTA partial sums, one after another
  scratch.hint = spec.fwd_scratch.load(std::memory_order_relaxed);
  int64_t stats_n = 0;  // every BatchNorm's (6, K) statistics in one allocation
  for (size_t i = 0; i < n + ds; ++i) {
    const OptTensor& w = params[6 * i];
    if (w.has_value() && w->defined() && w->dim() >= 1) stats_n += (6 * w->size(0) + 3) / 4 * 4;
  }
  scratch.stats_pool = at::empty({stats_n}, x.options().dtype(at::kFloat));
  // Each convolution's column sums are made by its BatchNorm's finalize (one launch), which
  // comes before the scratch's next use.
  api::PendingSums pending;
  const auto conv_stats = [&](size_t i, const Tensor& in, const OptTensor& sc,
                              const OptTensor& sh, bool pre_relu) {
    const UnitStage& s = spec.stages[i];
    return api::conv_stats(in, unit_need(params[6 * i], "a conv weight"), sc, sh, pre_relu,
                           s.stride, s.padding, s.dilation, s.groups, scratch, &pending);
  };
  const auto finalize = [&](size_t i, const Tensor& y, const Tensor& stats) {
    check_batch_count(y);
    const int64_t count = y.numel() / y.size(1);
    const UnitStage& s = spec.stages[i];
    const OptTensor* p = &params[6 * i];
    return api::bn_finalize(stats, p[1], p[2], p[3], p[4], p[5], count, s.momentum, s.eps,
                            pending);
  };
  std::vector<Tensor> ys, stats;
  Tensor inp = x;
  OptTensor sc, sh;
  bool pre_relu = false;
  for (size_t i = 0; i < n; ++i) {
    auto [y, st] = conv_stats(i, inp, sc, sh, pre_relu);
    ys.push_back(y);
    auto [mean, invstd, scale, shift] = finalize(i, y, st);
    stats.insert(stats.end(), {mean, invstd, scale, shift});
    inp = y;
    sc = scale;
    sh = shift;
    pre_relu = true;
  }
  const Tensor scale = stats[4 * (n - 1) + 2];
  const Tensor shift = stats[4 * (n - 1) + 3];
  Tensor yd, ystats;
  if (ds) std::tie(yd, ystats) = conv_stats(n, x, std::nullopt, std::nullopt, false);
  std::vector<Tensor> dstats;
  if (ds) {
    auto [dm, di, dsc, dsh] = finalize(n, yd, ystats);
    dstats = {dm, di, dsc, dsh};
  }
  const UnitResidual r = unit_residual(spec, x, yd, dstats);
  Tensor out = api::bn_add_relu(ys.back(), scale, shift, r.res, r.scale, r.shift, 0, spec.relu);
  keep_max(spec.fwd_scratch, scratch.size());
  return unit_outputs(out, yd, ys, stats, dstats);
}

std::vector<Tensor> unit_backward(const UnitSpec& spec, const Tensor& grad_out,
                                  const std::vector<OptTensor>& saved, bool need_x) {
  RECORD_FUNCTION("fastres::unit_backward", std::vector<c10::IValue>({grad_out}));
  const size_t n = static_cast<size_t>(spec.n);
  const bool ds = spec.shortcut == 2;
  const auto [x, out, yd, ys, st, res_mean, res_invstd, wd, gd, weights, gammas] =
      unpack_saved(spec, saved);
  api::Scratch scratch;  // partial sums and weight-gradient workspaces, one launch after another
  scratch.hint = spec.bwd_scratch.load(std::memory_order_relaxed);

  const Tensor go = grad_out.contiguous(like_format(ys.back()));
  // One dtype for the last BatchNorm's and the downsample's gradients; float32 sums (converted
  // by autograd) where the two differ.
  at::ScalarType last_dt = grad_dtype(gammas[n - 1]);
  if (ds && grad_dtype(gd) != last_dt) last_dt = at::kFloat;
  // Every BatchNorm's gradients in one allocation where they share a dtype (Scratch::grad_pool):
  // up to four rows of C for the last BatchNorm (with a residual's), two for the others.
  {
    bool one_dtype = last_dt != at::ScalarType::Undefined;
    int64_t pool_n = 4 * ((ys.back().size(1) + 7) / 8 * 8);
    for (size_t i = 0; i + 1 < n; ++i) {
      one_dtype = one_dtype && grad_dtype(gammas[i]) == last_dt;
      pool_n += (2 * ys[i].size(1) + 7) / 8 * 8;
    }
    if (one_dtype) scratch.grad_pool = at::empty({pool_n}, go.options().dtype(last_dt));
  }
  // An identity residual's gradient is only dx's.
  auto [dy, dgamma, dbeta, dres, dgd, dbd] = api::bn_add_relu_bwd(
      go, spec.relu ? out : std::nullopt, ys.back(), st[4 * (n - 1)], st[4 * (n - 1) + 1],
      gammas[n - 1], yd, res_mean, res_invstd, gd, scratch, last_dt,
      spec.shortcut == 1 && need_x);
  std::vector<Tensor> grads(3 * (n + ds));
  grads[3 * (n - 1) + 1] = gammas[n - 1].has_value() ? dgamma : Tensor();
  grads[3 * (n - 1) + 2] = dbeta;
  for (size_t i = n - 1; i >= 1; --i) {
    const UnitStage& s = spec.stages[i];
    const Tensor& scale_p = st[4 * (i - 1) + 2];
    const Tensor& shift_p = st[4 * (i - 1) + 3];
    auto [da, dw] = api::conv_bwd(dy, ys[i - 1], weights[i], scale_p, shift_p, true, s.stride,
                                  s.padding, s.dilation, s.groups, {true, true}, scratch);
    grads[3 * i] = dw;
    auto [dyp, dg, db] = api::bn_relu_bwd(da, ys[i - 1], st[4 * (i - 1)], st[4 * (i - 1) + 1],
                                          gammas[i - 1], scale_p, shift_p, true, scratch,
                                          grad_dtype(gammas[i - 1]), /*in_place=*/true);
    dy = dyp;
    grads[3 * (i - 1) + 1] = gammas[i - 1].has_value() ? dg : Tensor();
    grads[3 * (i - 1) + 2] = db;
  }
  const UnitStage& s0 = spec.stages[0];
  auto [dx, dw0] = api::conv_bwd(dy, x, weights[0], std::nullopt, std::nullopt, false, s0.stride,
                                 s0.padding, s0.dilation, s0.groups, {need_x, true}, scratch);
  grads[0] = dw0;
  if (ds) {
    const UnitStage& sd = spec.stages[n];
    auto [dxd, dwd] = api::conv_bwd(dres, x, unit_need(wd, "the downsample's weight"),
                                    std::nullopt, std::nullopt, false, sd.stride, sd.padding,
                                    sd.dilation, sd.groups, {need_x, true}, scratch);
    grads[3 * n] = dwd;
    grads[3 * n + 1] = gd.has_value() ? dgd : Tensor();
    grads[3 * n + 2] = dbd;
    if (need_x) dx.add_(dxd);  // dx is conv_bwd's fresh output: no new buffer
  } else if (spec.shortcut == 1 && need_x) {
    dx.add_(dres);
  }
  // The weight-gradient sums no BatchNorm backward ran (the first convolution's, the
  // downsample's), in one launch.
  C10_CUDA_CHECK(launch_wgrad_sums(scratch.pending, scratch.n_pending, stream()));
  scratch.n_pending = 0;
  scratch.launched();
  keep_max(spec.bwd_scratch, scratch.size());
  std::vector<Tensor> r{need_x ? dx : Tensor()};
  r.insert(r.end(), grads.begin(), grads.end());
  return r;
}

}  // namespace cuda
}  // namespace fastres
