// The launchers of ops_conv.cu and ops_bn.cu that C++ callers outside their files use (the
// training unit, unit.cu): the registered op implementations with the ops' arguments
// (fastres/_opset.py) and results, except that the unit's calls share one Scratch, results the
// unit discards (an empty tensor in the op) come back undefined, and a BatchNorm's statistics
// live in one (6, C) buffer: conv_stats writes sum and sumsq into its rows 0 and 1, bn_finalize
// mean, invstd, scale and shift into rows 2-5 (returned as views). Fewer allocations per training
// step; the same kernels and values as the ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/ArrayRef.h>

#include "kernels.h"

#include <array>
#include <vector>
#include <optional>
#include <tuple>

namespace fastres {
namespace cuda {
namespace api {

using at::Tensor;
using OptT = std::optional<Tensor>;

// The launches' scratch memory of one unit call (per-CTA partial sums, the weight gradient's split
// workspace): one buffer that each launch reuses after the one before it in stream order, grown
// when a launch needs more (the caching allocator hands a freed block only to later work on the
// stream). An op called alone allocates its own.
// hint: the bytes to allocate at the first get (the unit's largest need in its earlier calls:
// one allocation per call instead of one per growth).
//
// Deferred weight-gradient sums (conv_bwd's split sums, WgradSum in kernels.h): their split
// workspaces stay reserved at the buffer's start (or in a buffer held for them once it grew)
// until the launch that runs them, the next BatchNorm backward's reduction (take_wsum, then
// launched) or the unit's last launch (launch_wgrad_sums over `pending`): one launch fewer per
// weight gradient.
struct Scratch {
  Tensor buf;  // bytes
  int64_t hint = 0;
  int64_t reserved = 0;      // bytes at buf's start a deferred sum still reads
  std::vector<Tensor> held;  // earlier buffers a deferred sum still reads
  WgradSum pending[2];
  int n_pending = 0;
  int64_t peak = 0;  // the most bytes one get() needed, reserved ones included (the next hint)
  void* get(int64_t bytes, const Tensor& ref) {
    const int64_t off = (reserved + 255) / 256 * 256;
    if (off + bytes > peak) peak = off + bytes;
    if (!buf.defined() || buf.numel() < off + bytes) {
      if (reserved) held.push_back(buf);
      buf = at::empty({bytes > hint ? bytes : hint}, ref.options().dtype(at::kByte));
      reserved = 0;
      return buf.data_ptr();
    }
    return static_cast<unsigned char*>(buf.data_ptr()) + off;
  }
  // The workspace of a sum about to be deferred: the bytes get() just returned stay reserved.
  void reserve(const void* p, int64_t bytes) {
    if (buf.defined() && p >= buf.data_ptr())
      reserved = static_cast<const unsigned char*>(p) -
                 static_cast<const unsigned char*>(buf.data_ptr()) + bytes;
  }
  // The first deferred sum, for a launch of dtype dt to run (n 0: none); once that launch is
  // issued, launched() releases its workspace.
  WgradSum take_wsum(DType dt) {
    if (n_pending == 0 || pending[0].dt != dt) return {};
    const WgradSum s = pending[0];
    pending[0] = pending[1];
    --n_pending;
    return s;
  }
  void launched() {
    if (n_pending == 0) {
      reserved = 0;
      held.clear();
    }
  }
  int64_t size() const {
    const int64_t b = buf.defined() ? buf.numel() : 0;
    return peak > b ? peak : b;
  }
  // float32 statistics buffers of the unit's BatchNorms carved from one allocation (stats_pool,
  // made by the unit), or their own when it has no room left.
  Tensor stats_pool;
  int64_t stats_used = 0;
  // The same for the BatchNorm gradients of the unit's backward (in grad_pool's dtype).
  Tensor grad_pool;
  int64_t grad_used = 0;
};

// A convolution's per-CTA partial sums (in the unit's Scratch) whose column sums are left to the
// BatchNorm's finalize: one launch for both (launch_colsum_finalize). partial null: none left.
struct PendingSums {
  const double* partial = nullptr;
  int T = 0;
};

// (out, stats): stats the (6, K) buffer of the BatchNorm that follows (rows 0, 1: sum, sumsq).
// defer: the column sums are not made here but left in it for bn_finalize (which must come
// before the scratch's next use).
std::tuple<Tensor, Tensor> conv_stats(const Tensor& input, const Tensor& weight,
                                     const OptT& pre_scale, const OptT& pre_shift, bool pre_relu,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, Scratch& scratch,
                                     PendingSums* defer = nullptr);
std::tuple<Tensor, Tensor> conv_bwd(const Tensor& grad_out, const Tensor& input,
                                    const Tensor& weight, const OptT& pre_scale,
                                    const OptT& pre_shift, bool pre_relu, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, std::array<bool, 2> output_mask,
                                    Scratch& scratch);
// stats: conv_stats' (6, C) buffer; returns (mean, invstd, scale, shift), its rows 2-5. sums:
// conv_stats' deferred column sums, made into rows 0 and 1 first.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize(
    const Tensor& stats, const OptT& weight, const OptT& bias,
    const OptT& running_mean, const OptT& running_var, const OptT& num_batches_tracked,
    int64_t count, std::optional<double> momentum, double eps, const PendingSums& sums = {});
Tensor bn_add_relu(const Tensor& input, const Tensor& scale, const Tensor& shift,
                   const OptT& residual, const OptT& res_scale, const OptT& res_shift,
                   int64_t res_channel_offset, bool relu);
// The BatchNorm backwards: grad_dtype is the dtype the unit wants the parameter gradients in:
// float32 (the sums themselves), float16 or bfloat16 (a 16-bit model's: written by the reduction
// kernel, the float32 sums in the scratch, no conversion launches), or Undefined (none wanted,
// affine=False: undefined, the sums in the scratch). want_res: whether the unit needs an identity
// residual's gradient (only for the input's gradient; else undefined, never written). in_place:
// bn_relu_bwd writes the input's gradient over grad_out where their layouts allow (the caller
// gives up grad_out).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd(
    const Tensor& grad_out, const OptT& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptT& weight, const OptT& res_input, const OptT& res_mean,
    const OptT& res_invstd, const OptT& res_weight, Scratch& scratch, at::ScalarType grad_dtype,
    bool want_res);
std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean, const Tensor& invstd,
                                               const OptT& weight, const Tensor& scale,
                                               const Tensor& shift, bool relu, Scratch& scratch,
                                               at::ScalarType grad_dtype, bool in_place = false);

}  // namespace api
}  // namespace cuda
}  // namespace fastres
