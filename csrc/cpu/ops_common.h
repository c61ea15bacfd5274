// Shared by the CPU op files: argument checks, layout helpers and the epilogue pass
// (ops_common.cpp), and the ops each file implements, registered in ops_cpu.cpp.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace fastres::cpu {

using at::Tensor;
using std::optional;

// ---- Checks (every message names the op, the argument and the offending sizes) and layout
// helpers: ops_common.cpp.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
inline bool has(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

std::string sizes_str(const Tensor& t);
bool is_act_dtype(at::ScalarType t);
void check_cpu(const char* op, const char* name, const Tensor& t);
void check_act(const char* op, const char* name, const Tensor& t);
void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref);
void check_same_sizes(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref);
void check_vec(const char* op, const char* name, const Tensor& t, int64_t c, const char* what);
void check_opt_vec(const char* op, const char* name, const optional<Tensor>& t, int64_t c,
                   const char* what);
std::vector<int64_t> check_conv(const char* op, const Tensor& input, const Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups);
at::MemoryFormat format_of(const Tensor& ref);
std::vector<int64_t> dense_strides(at::IntArrayRef sizes, at::MemoryFormat fmt);
bool has_dense_strides(const Tensor& t, at::MemoryFormat fmt);
// Whether a 4-D tensor's elements lie in memory as a dense NHWC buffer from its first element,
// whatever its strides along dimensions of size 1: an (N, C, 1, 1) activation is both contiguous
// and channels_last (format_of calls it contiguous) and is one for oneDNN's nhwc descriptors.
bool nhwc_dense(const Tensor& t);
Tensor in_format(const Tensor& t, at::MemoryFormat fmt);
// An activation-sized output or temporary, as at::empty(sizes, opts.memory_format(fmt)); large
// ones come from fastres' CPU activation pool (act_pool.cpp).
Tensor empty_act(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat fmt);
// The pool's (cached bytes, hits, misses, cap bytes), and freeing its cached buffers (returns the
// bytes freed): fastres_cpu::act_pool_stats / act_pool_empty_cache.
std::vector<int64_t> act_pool_stats();
int64_t act_pool_empty_cache();
Geom geom_of(const Tensor& t, at::MemoryFormat fmt);
std::vector<double> double_vec(const Tensor& t);
Tensor from_doubles(const std::vector<double>& v, at::ScalarType dtype);
// conv(input, weight) + bias (+ residual) (ReLU post-op when relu) by fastres' own oneDNN
// primitive into an empty_act output (ops_infer.cpp); undefined where that path does not cover
// the call (the caller then takes ATen's).
Tensor own_conv(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                const optional<Tensor>& residual, at::IntArrayRef out_sizes,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                int64_t groups, bool relu);
Tensor conv_nobias(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
void run_epilogue(const Tensor& out, const Tensor& in, at::MemoryFormat fmt,
                  const optional<Tensor>& scale, const optional<Tensor>& shift,
                  const optional<Tensor>& residual, const optional<Tensor>& res_scale,
                  const optional<Tensor>& res_shift, int64_t res_c0, bool relu);
Tensor opmath_vec(const optional<Tensor>& t, at::ScalarType act, int64_t c, double fill);
Tensor opmath_vec(const Tensor& t, at::ScalarType act);

// ---- Inference (oneDNN fused convolutions, prepacked weights): ops_infer.cpp.
Tensor conv_bias_act_cpu(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                         const optional<Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         bool relu, const optional<Tensor>& scale,
                         const optional<Tensor>& bn_mean, const optional<Tensor>& bn_var,
                         double bn_eps);
Tensor conv_bias_act_finite_cpu(const Tensor& input, const Tensor& weight,
                                const optional<Tensor>& bias, const optional<Tensor>& residual,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups, bool relu);
Tensor& conv_bias_act_finite_into_cpu(Tensor& residual, const Tensor& input, const Tensor& weight,
                                      const optional<Tensor>& bias, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups, bool relu);
double absmax_cpu(const Tensor& x);
// fastres_cpu::fingerprint: a hash of the tensors' values, dtypes, sizes and strides (fingerprint.cpp).
int64_t fingerprint_cpu(const c10::List<std::optional<at::Tensor>>& tensors);
std::tuple<Tensor, Tensor> relu_bias_bwd_cpu(const Tensor& grad_out, const optional<Tensor>& out);

// ---- Training forward and backward (statistics, BatchNorm, convolution backward): ops_train.cpp.
std::tuple<Tensor, Tensor, Tensor> conv_stats_cpu(const Tensor& input, const Tensor& weight,
                                                  const optional<Tensor>& pre_scale,
                                                  const optional<Tensor>& pre_shift, bool pre_relu,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, int64_t groups);
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_cpu(
    const Tensor& sum, const Tensor& sumsq, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, int64_t count,
    optional<double> momentum, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_count_cpu(
    const Tensor& sum, const Tensor& sumsq, const Tensor& count, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
    optional<double> momentum, double eps);
Tensor bn_add_relu_cpu(const Tensor& input, const Tensor& scale, const Tensor& shift,
                       const optional<Tensor>& residual, const optional<Tensor>& res_scale,
                       const optional<Tensor>& res_shift, int64_t res_channel_offset, bool relu);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& weight, const optional<Tensor>& res_input,
    const optional<Tensor>& res_mean, const optional<Tensor>& res_invstd,
    const optional<Tensor>& res_weight);
std::tuple<Tensor, Tensor, Tensor> bn_add_relu_bwd_reduce_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& res_input, const optional<Tensor>& res_mean,
    const optional<Tensor>& res_invstd);
std::tuple<Tensor, Tensor> bn_add_relu_bwd_elemt_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& weight, const Tensor& mean_g,
    const Tensor& mean_g_xhat, const optional<Tensor>& res_input, const optional<Tensor>& res_mean,
    const optional<Tensor>& res_invstd, const optional<Tensor>& res_weight,
    const optional<Tensor>& res_mean_g_xhat);
std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd_cpu(const Tensor& grad_out, const Tensor& input,
                                                   const Tensor& mean, const Tensor& invstd,
                                                   const optional<Tensor>& weight,
                                                   const Tensor& scale, const Tensor& shift,
                                                   bool relu);
std::tuple<Tensor, Tensor> bn_relu_bwd_reduce_cpu(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& invstd,
                                                  const Tensor& scale, const Tensor& shift,
                                                  bool relu);
Tensor bn_relu_bwd_elemt_cpu(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                             const Tensor& invstd, const optional<Tensor>& weight,
                             const Tensor& scale, const Tensor& shift, bool relu,
                             const Tensor& mean_g, const Tensor& mean_g_xhat);
std::tuple<Tensor, Tensor> conv_bwd_cpu(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& weight, const optional<Tensor>& pre_scale,
                                        const optional<Tensor>& pre_shift, bool pre_relu,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups,
                                        std::array<bool, 2> output_mask);

}  // namespace fastres::cpu
