// A residual unit's training step in C++: the forward (conv_stats, bn_finalize per BatchNorm,
// bn_add_relu) and the backward (bn_add_relu_bwd, conv_bwd, bn_relu_bwd) of
// fastres._autograd._ResidualUnitFn, each launcher called from C++ (ops_api.h) instead of one
// torch.ops call per op (~6 µs of Python argument parsing each, 15-19 per unit). Used by
// fastres._autograd_unit for eager calls; bound to Python in block_py.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "../unit_spec.h"

namespace fastres {
namespace cuda {

using fastres::UnitSpec;
using fastres::UnitStage;

// params: six per stage (conv weight, BN weight, BN bias, running mean, running var,
// num_batches_tracked; BN entries may be absent). Returns out, yd (the downsample's conv output;
// undefined without one), ys[n] (each convolution's output), then (mean, invstd, scale, shift)
// per main BatchNorm, then the downsample's four.
std::vector<at::Tensor> unit_forward(const UnitSpec& spec, const at::Tensor& x,
                                     const std::vector<std::optional<at::Tensor>>& params);

// saved: fastres._autograd._Saved.flat()'s layout: x, out (absent without the ReLU), yd, ys[n],
// stats[4n], then with a downsample its four statistics, its weight and BN weight; then the
// weights[n] and BN weights[n]. Returns dx (undefined unless need_x), then per stage (dw,
// dgamma, dbeta), the downsample's last.
std::vector<at::Tensor> unit_backward(const UnitSpec& spec, const at::Tensor& grad_out,
                                      const std::vector<std::optional<at::Tensor>>& saved,
                                      bool need_x);

}  // namespace cuda
}  // namespace fastres
