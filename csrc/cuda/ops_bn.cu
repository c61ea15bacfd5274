// The ATen launchers of BatchNorm's forward ops and their registration: bn_finalize(_count) and
// bn_add_relu (the backward family is in ops_bn_bwd.cu). The kernels are in bn.cu; the checks and
// layout helpers shared with ops_conv.cu are in ops_common.h.
#include "ops_api.h"
#include "ops_common.h"

namespace fastres {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// bn_finalize, bn_finalize_count: one kernel; the count is an integer argument, or a one-element
// tensor read on the device (the all-reduced count of SyncBatchNorm: no host sync).
// ---------------------------------------------------------------------------------------------
// count_t: the count tensor, already checked and float32 on sum's device; undefined for `count`.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_impl(
    const Tensor& sum, const Tensor& sumsq, const Tensor& count_t, int64_t count,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    std::optional<double> momentum, double eps, const std::vector<Tensor>* into = nullptr,
    const api::PendingSums* sums = nullptr) {
  const int64_t C = sum.size(0);
  const bool has_running = running_mean.has_value() || running_var.has_value();
  TORCH_CHECK_VALUE(!has_running || momentum.has_value() || num_batches_tracked.has_value(),
                    "momentum=None (cumulative average) needs num_batches_tracked");
  c10::cuda::CUDAGuard guard(sum.device());
  // Read in their own dtype; the running statistics updated in place by the kernel (written back
  // here only from a working copy: non-contiguous, or dtypes that differ or are not a kernel's).
  static constexpr const char* names[4] = {"weight", "bias", "running_mean", "running_var"};
  const BnVecs v = bn_vecs({weight, bias, running_mean, running_var}, C, sum, names);
  const Tensor& rm = v.v[2];
  const Tensor& rv = v.v[3];
  int64_t* nbt = nullptr;
  if (num_batches_tracked.has_value()) {
    const Tensor& t = *num_batches_tracked;
    TORCH_CHECK(t.device() == sum.device() && t.scalar_type() == at::kLong && t.numel() == 1,
                "fastres CUDA: num_batches_tracked must be one int64 on ", sum.device(), ", got ",
                t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
    nbt = t.data_ptr<int64_t>();
  }
  // into (the training unit's call): rows 2-5 of its (6, C) statistics buffer; the op returns
  // four tensors of their own.
  Tensor mean, invstd, scale, shift;
  if (into) {
    mean = (*into)[2];
    invstd = (*into)[3];
    scale = (*into)[4];
    shift = (*into)[5];
  } else {
    mean = at::empty({C}, sum.options());
    invstd = at::empty({C}, sum.options());
    scale = at::empty({C}, sum.options());
    shift = at::empty({C}, sum.options());
  }
  // Deferred column sums (the unit's conv_stats) go into sum and sumsq themselves (rows 0 and 1
  // of its (6, C) buffer): with the finalize (launch_colsum_finalize, which decides whether one
  // launch can do both) when the kernel reads them there, else first, before the copies below.
  ColSumParams cp{};
  bool fuse = false;
  if (sums && sums->partial) {
    TORCH_CHECK(sum.scalar_type() == at::kFloat && sumsq.scalar_type() == at::kFloat &&
                    sum.is_contiguous() && sumsq.is_contiguous(),
                "fastres unit: deferred sums need dense float32 sum and sumsq rows");
    cp.partial = sums->partial;
    cp.out[0] = sum.data_ptr<float>();
    cp.out[1] = sumsq.data_ptr<float>();
    cp.nsum = 2;
    cp.T = sums->T;
    cp.C = static_cast<int>(C);
    fuse = aligned16(sum) && aligned16(sumsq);
    if (!fuse) C10_CUDA_CHECK(launch_colsum(cp, stream()));
  }
  // The kernel reads sum/sumsq as dense float arrays: a strided view (e.g. a column of a stacked
  // all-reduce buffer) is made dense first, never read through its raw pointer.
  const Tensor s = chan_vec(sum, C, "sum", sum);
  const Tensor ss = chan_vec(sumsq, C, "sumsq", sum);
  BnFinalizeParams p{};
  p.sum = s.data_ptr<float>();
  p.sumsq = ss.data_ptr<float>();
  p.weight = vptr(v.v[0]);
  p.bias = vptr(v.v[1]);
  p.running_mean = rm.defined() ? rm.data_ptr() : nullptr;
  p.running_var = rv.defined() ? rv.data_ptr() : nullptr;
  p.vec_dtype = v.dtype;
  p.num_batches_tracked = nbt;
  p.mean = mean.data_ptr<float>();
  p.invstd = invstd.data_ptr<float>();
  p.scale = scale.data_ptr<float>();
  p.shift = shift.data_ptr<float>();
  p.C = static_cast<int>(C);
  p.count = count;
  p.count_dev = count_t.defined() ? count_t.data_ptr<float>() : nullptr;
  p.has_momentum = momentum.has_value();
  p.momentum = momentum.value_or(0.0);
  p.eps = eps;
  if (fuse) {
    C10_CUDA_CHECK(launch_colsum_finalize(cp, p, stream()));
  } else {
    C10_CUDA_CHECK(launch_bn_finalize(p, stream()));
  }
  if (rm.defined() && !rm.is_same(*running_mean)) running_mean->copy_(rm);
  if (rv.defined() && !rv.is_same(*running_var)) running_var->copy_(rv);
  return {mean, invstd, scale, shift};
}

void check_sums(const Tensor& sum, const Tensor& sumsq) {
  CHECK_CUDA(sum);
  CHECK_DIM(sum, 1);
  check_stat(sum, sum.size(0), "sum", sum);
  check_stat(sumsq, sum.size(0), "sumsq", sum);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_counted(
    const Tensor& sum, const Tensor& sumsq, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, int64_t count, std::optional<double> momentum,
    double eps, const std::vector<Tensor>* into = nullptr,
    const api::PendingSums* sums = nullptr) {
  check_sums(sum, sumsq);
  TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got ", count,
                    " values");
  return bn_finalize_impl(sum, sumsq, Tensor(), count, weight, bias, running_mean, running_var,
                          num_batches_tracked, momentum, eps, into, sums);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_cuda(
    const Tensor& sum, const Tensor& sumsq, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, int64_t count, std::optional<double> momentum,
    double eps) {
  return bn_finalize_counted(sum, sumsq, weight, bias, running_mean, running_var,
                             num_batches_tracked, count, momentum, eps);
}

// The count cannot be checked here (> 1) without a host sync: the caller guarantees it.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_count_cuda(
    const Tensor& sum, const Tensor& sumsq, const Tensor& count, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps) {
  check_sums(sum, sumsq);
  TORCH_CHECK(count.device() == sum.device() && count.numel() == 1,
              "fastres CUDA: count must be one element on ", sum.device(),
              " (the number of values per channel), got shape ", count.sizes(), " on ",
              count.device());
  const at::ScalarType ct = count.scalar_type();
  TORCH_CHECK(at::isFloatingType(ct) || at::isIntegralType(ct, /*includeBool=*/false),
              "fastres CUDA: count must be a real number (float32, the accumulation dtype), got ",
              ct);
  c10::cuda::CUDAGuard guard(sum.device());
  // float32 as the reference's count.to(sum.dtype); a conversion on the device, never a read.
  Tensor n = count.reshape({});
  if (n.scalar_type() != at::kFloat) n = n.to(at::kFloat);
  return bn_finalize_impl(sum, sumsq, n, 0, weight, bias, running_mean, running_var,
                          num_batches_tracked, momentum, eps);
}

// ---------------------------------------------------------------------------------------------
// bn_add_relu
// ---------------------------------------------------------------------------------------------
Tensor bn_add_relu_cuda(const Tensor& input, const Tensor& scale, const Tensor& shift,
                        const OptTensor& residual, const OptTensor& res_scale,
                        const OptTensor& res_shift, int64_t res_channel_offset, bool relu) {
  CHECK_CUDA(input);
  CHECK_DIM(input, 4);
  const DType dt = to_dtype(input, "bn_add_relu");
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const Tensor sc = chan_vec(scale, C, "scale", input);
  const Tensor sh = chan_vec(shift, C, "shift", input);
  Tensor res, rsc, rsh;
  int64_t Cr = 0;
  if (residual.has_value()) {
    res = *residual;
    CHECK_CUDA(res);
    CHECK_SAME_DEVICE(res, input);
    CHECK_DTYPE(res, input);
    CHECK_DIM(res, 4);
    Cr = res.size(1);
    TORCH_CHECK(res.size(0) == N && res.size(2) == H && res.size(3) == W,
                "fastres CUDA bn_add_relu: residual of shape ", res.sizes(), " must match input ",
                input.sizes(), " in N, H and W");
    TORCH_CHECK(res_channel_offset >= 0 && res_channel_offset + Cr <= C,
                "fastres CUDA bn_add_relu: residual channels [", res_channel_offset, ", ",
                res_channel_offset + Cr, ") do not fit in the input's ", C, " channels");
    rsc = opt_chan_vec(res_scale, Cr, "res_scale", input);
    rsh = opt_chan_vec(res_shift, Cr, "res_shift", input);
  }
  Tensor out = at::empty(input.sizes(), input.options().memory_format(like_format(input)));
  if (out.numel() == 0) return out;
  TORCH_CHECK(N * H * W <= kMaxRows, "fastres CUDA bn_add_relu: too many pixels: ", input.sizes());

  BnAddReluParams p{};
  p.x = input.data_ptr();
  p.scale = sc.data_ptr<float>();
  p.shift = sh.data_ptr<float>();
  p.res = res.defined() ? res.data_ptr() : nullptr;
  p.res_scale = fptr(rsc);
  p.res_shift = fptr(rsh);
  p.out = out.data_ptr();
  p.N = static_cast<int>(N);
  p.C = static_cast<int>(C);
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.Cr = static_cast<int>(Cr);
  p.res_off = static_cast<int>(res_channel_offset);
  for (int d = 0; d < 4; ++d) {
    p.xs[d] = input.stride(d);
    p.os[d] = out.stride(d);
    p.rs[d] = res.defined() ? res.stride(d) : 0;
  }
  p.out_channels_last = out.is_contiguous(MF::ChannelsLast) && !out.is_contiguous();
  const int vec = chunk_elems(dt);
  p.dense = input.is_contiguous(MF::ChannelsLast) && aligned16(input) &&
            out.is_contiguous(MF::ChannelsLast) && C % vec == 0 &&
            (!res.defined() || (res.is_contiguous(MF::ChannelsLast) && aligned16(res) && Cr == C &&
                                res_channel_offset == 0));
  p.relu = relu;
  C10_CUDA_CHECK(launch_bn_add_relu(p, dt, stream()));
  return out;
}

}  // namespace

namespace api {
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize(
    const Tensor& stats, const OptT& weight, const OptT& bias, const OptT& running_mean,
    const OptT& running_var, const OptT& num_batches_tracked, int64_t count,
    std::optional<double> momentum, double eps, const PendingSums& sums) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 6, "fastres unit: statistics of shape ",
              stats.sizes(), ", expected (6, C)");
  TORCH_CHECK(stats.is_contiguous(), "fastres unit: statistics must be contiguous");
  std::vector<Tensor> rows;
  rows.reserve(6);
  for (int64_t i = 0; i < 6; ++i) rows.push_back(row_of(stats, i));
  return bn_finalize_counted(rows[0], rows[1], weight, bias, running_mean, running_var,
                             num_batches_tracked, count, momentum, eps, &rows, &sums);
}
Tensor bn_add_relu(const Tensor& input, const Tensor& scale, const Tensor& shift,
                   const OptT& residual, const OptT& res_scale, const OptT& res_shift,
                   int64_t res_channel_offset, bool relu) {
  return bn_add_relu_cuda(input, scale, shift, residual, res_scale, res_shift, res_channel_offset,
                          relu);
}
}  // namespace api

}  // namespace cuda
}  // namespace fastres

FR_TORCH_LIBRARY_IMPL(FR_OPS_NAMESPACE, FR_DISPATCH_KEY, m) {
  m.impl("bn_finalize", &fastres::cuda::bn_finalize_cuda);
  m.impl("bn_add_relu", &fastres::cuda::bn_add_relu_cuda);
  m.impl("bn_finalize_count", &fastres::cuda::bn_finalize_count_cuda);
}
