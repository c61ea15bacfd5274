// A residual unit's training step on the CPU in C++: fastres._autograd._ResidualUnitFn's op
// sequence (no SyncBatchNorm) with each CPU op called as a C++ function instead of one torch.ops
// call each (~10-20 µs of Python and dispatch per op, 15-19 ops per unit): the same functions in
// the same order, so the same bits. Used by fastres._autograd_unit for eager calls; bound to
// Python as cpu_unit_forward / cpu_unit_backward (csrc/module.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "../unit_spec.h"

namespace fastres::cpu {

// The layouts of csrc/cuda/unit.h's unit_forward and unit_backward (params: six per stage;
// saved: csrc/unit_layout.h, fastres._autograd._Saved.flat()'s layout).
std::vector<at::Tensor> unit_forward(const UnitSpec& spec, const at::Tensor& x,
                                     const std::vector<std::optional<at::Tensor>>& params);
std::vector<at::Tensor> unit_backward(const UnitSpec& spec, const at::Tensor& grad_out,
                                      const std::vector<std::optional<at::Tensor>>& saved,
                                      bool need_x);

}  // namespace fastres::cpu
