// fastres' own oneDNN convolution primitives (dnnl_conv.cpp): built when setup.py finds oneDNN's
// headers (FASTRES_HAVE_DNNL, Debian's libdnnl-dev); otherwise every call answers "not covered"
// and the ATen path (mkldnn::_convolution_pointwise) serves.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fastres::cpu {

// Whether this build has the own-primitive path and it is switched on (FASTRES_CPU_OWN_PRIMITIVES,
// default 1; fastres_cpu::set_own_primitives for A/B runs in one process).
bool dnnl_enabled();

// out = conv(input, weight) + bias (+ out's previous values when accumulate: oneDNN's sum
// post-op, the residual add) (ReLU post-op when relu: NaN becomes 0, see dnnl_conv.cpp), by a
// primitive made once per shape and kept. Covers float32 and bfloat16, input and out dense
// channels_last, groups 1, a bias of float32 or the input's dtype. Returns false (nothing
// written) for anything else, or where oneDNN has no optimized implementation.
bool dnnl_conv(const at::Tensor& input, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& out, bool accumulate,
               bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups);

// The training backward's convolutions (dnnl_conv_bwd.cpp), by primitives made once per shape
// and kept: grad_input = conv's data gradient of grad_out through weight, written into grad_input;
// grad_weight = its weight gradient from input and grad_out, written into grad_weight (any dense
// strides, the weight's dtype). Float32 or bfloat16, groups 1, input/grad_input and grad_out dense
// channels_last. false (nothing written) where they do not cover the call.
bool dnnl_conv_bwd_data(const at::Tensor& grad_out, const at::Tensor& weight,
                        const at::Tensor& grad_input, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
bool dnnl_conv_bwd_weights(const at::Tensor& input, const at::Tensor& grad_out,
                           const at::Tensor& grad_weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// Whether a float32 convolution with a spatial kernel (3x3) takes ATen's backward data instead of
// the own primitive (default on; why: dnnl_conv_bwd.cpp; fastres_cpu::set_aten_spatial_bwd_data
// for A/B runs in one process).
std::atomic<bool>& aten_spatial_bwd_data();

}  // namespace fastres::cpu
