// What both C++ training units (csrc/cpu/unit_cpu.cpp, csrc/cuda/unit.cu) do the same way: the
// forward's argument checks, nn.BatchNorm2d's one-value-per-channel error, the forward's residual
// and its outputs' order, and the backward's saved tensors in fastres._autograd._Saved.flat()'s
// layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <sstream>
#include <vector>

#include "unit_spec.h"

namespace fastres {

using UnitOptTensor = std::optional<at::Tensor>;

inline at::Tensor unit_need(const UnitOptTensor& t, const char* what) {
  TORCH_CHECK(t.has_value() && t->defined(), "fastres unit: ", what, " is missing");
  return *t;
}

// The spec's stages and the forward's parameters (six per stage) agree.
inline void check_unit_forward(const UnitSpec& spec, size_t n_params) {
  const size_t n = static_cast<size_t>(spec.n);
  const bool ds = spec.shortcut == 2;
  TORCH_CHECK(n >= 1 && spec.stages.size() == n + ds, "fastres unit_forward: a spec of ",
              spec.stages.size(), " stages for ", n, " convolutions",
              ds ? " and a downsample" : "");
  TORCH_CHECK(n_params == 6 * (n + ds), "fastres unit_forward: ", n_params, " parameters for ",
              n + ds, " stages (6 each)");
}

// A BatchNorm's training count: nn.BatchNorm2d's error (ValueError) for one value per channel.
inline void check_batch_count(const at::Tensor& y) {
  if (y.numel() / y.size(1) > 1) return;
  std::ostringstream shape;
  shape << "torch.Size([";
  for (int64_t d = 0; d < y.dim(); ++d) shape << (d ? ", " : "") << y.size(d);
  shape << "])";
  TORCH_CHECK_VALUE(false, "Expected more than 1 value per channel when training, got input size ",
                    shape.str());
}

// The forward's residual for its last BatchNorm-add-ReLU: the downsample's output with its
// BatchNorm's scale and shift (`dstats`: mean, invstd, scale, shift), the block input for an
// identity shortcut, or none.
struct UnitResidual {
  UnitOptTensor res, scale, shift;
};

inline UnitResidual unit_residual(const UnitSpec& spec, const at::Tensor& x, const at::Tensor& yd,
                                  const std::vector<at::Tensor>& dstats) {
  if (spec.shortcut == 2) return {yd, dstats.at(2), dstats.at(3)};
  if (spec.shortcut == 1) return {x, std::nullopt, std::nullopt};
  return {};
}

// The forward's outputs, in the order fastres._autograd_unit reads them: out, yd (undefined
// without a downsample), ys[n], stats[4n], then the downsample's four statistics.
inline std::vector<at::Tensor> unit_outputs(const at::Tensor& out, const at::Tensor& yd,
                                            const std::vector<at::Tensor>& ys,
                                            const std::vector<at::Tensor>& stats,
                                            const std::vector<at::Tensor>& dstats) {
  std::vector<at::Tensor> r{out, yd};
  r.insert(r.end(), ys.begin(), ys.end());
  r.insert(r.end(), stats.begin(), stats.end());
  r.insert(r.end(), dstats.begin(), dstats.end());
  return r;
}

// The backward's saved tensors: x, out (absent without the ReLU), yd, ys[n], stats[4n], then
// with a downsample its four statistics, its weight and BN weight; then weights[n] and BN
// weights[n].
struct UnitSaved {
  at::Tensor x;
  UnitOptTensor out, yd;
  std::vector<at::Tensor> ys;
  std::vector<at::Tensor> st;  // mean, invstd, scale, shift per stage
  UnitOptTensor res_mean, res_invstd, wd, gd;  // the downsample's
  std::vector<at::Tensor> weights;
  std::vector<UnitOptTensor> gammas;
};

inline UnitSaved unpack_saved(const UnitSpec& spec, const std::vector<UnitOptTensor>& saved) {
  const size_t n = static_cast<size_t>(spec.n);
  const bool ds = spec.shortcut == 2;
  const size_t expect = 3 + n + 4 * n + (ds ? 6 : 0) + 2 * n;
  TORCH_CHECK(saved.size() == expect, "fastres unit_backward: ", saved.size(),
              " saved tensors, expected ", expect);
  UnitSaved s;
  size_t k = 0;
  s.x = unit_need(saved[k++], "x");
  s.out = saved[k++];
  s.yd = saved[k++];
  for (size_t i = 0; i < n; ++i) s.ys.push_back(unit_need(saved[k++], "a conv output"));
  for (size_t i = 0; i < 4 * n; ++i) s.st.push_back(unit_need(saved[k++], "a statistic"));
  if (ds) {
    s.res_mean = saved[k++];
    s.res_invstd = saved[k++];
    k += 2;  // the downsample's scale and shift: not needed
    s.wd = saved[k++];
    s.gd = saved[k++];
  }
  for (size_t i = 0; i < n; ++i) s.weights.push_back(unit_need(saved[k++], "a conv weight"));
  for (size_t i = 0; i < n; ++i) s.gammas.push_back(saved[k++]);
  return s;
}

}  // namespace fastres
