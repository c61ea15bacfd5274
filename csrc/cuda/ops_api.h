// The launchers of ops_conv.cu and ops_bn.cu that C++ callers outside their files use (the
// training unit, unit.cu): thin exported wrappers of the registered op implementations, same
// arguments and results as the ops' schemas (fastres/_opset.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastres {
namespace cuda {
namespace api {

using at::Tensor;
using OptT = std::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor> conv_stats(const Tensor& input, const Tensor& weight,
                                              const OptT& pre_scale, const OptT& pre_shift,
                                              bool pre_relu, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                              int64_t groups);
std::tuple<Tensor, Tensor> conv_bwd(const Tensor& grad_out, const Tensor& input,
                                    const Tensor& weight, const OptT& pre_scale,
                                    const OptT& pre_shift, bool pre_relu, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, std::array<bool, 2> output_mask);
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize(
    const Tensor& sum, const Tensor& sumsq, const OptT& weight, const OptT& bias,
    const OptT& running_mean, const OptT& running_var, const OptT& num_batches_tracked,
    int64_t count, std::optional<double> momentum, double eps);
Tensor bn_add_relu(const Tensor& input, const Tensor& scale, const Tensor& shift,
                   const OptT& residual, const OptT& res_scale, const OptT& res_shift,
                   int64_t res_channel_offset, bool relu);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd(
    const Tensor& grad_out, const OptT& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptT& weight, const OptT& res_input, const OptT& res_mean,
    const OptT& res_invstd, const OptT& res_weight);
std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean, const Tensor& invstd,
                                               const OptT& weight, const Tensor& scale,
                                               const Tensor& shift, bool relu);

}  // namespace api
}  // namespace cuda
}  // namespace fastres
