// The ATen launchers of relu_bias_bwd and the BatchNorm backward family (fused, or split into
// *_reduce and *_elemt for SyncBatchNorm) and their registration; the forward ops are in
// ops_bn.cu. The kernels are in bn_bwd.cu; the checks and layout helpers are in ops_common.h.
#include "ops_api.h"
#include "ops_common.h"

namespace fastres {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// relu_bias_bwd and the BatchNorm backward family (one reduction + elementwise pipeline)
// ---------------------------------------------------------------------------------------------
// Plans the reduction, allocates its per-chunk partial sums (in the unit's scratch when called
// from the training unit: `unit` not null) and runs `launch`: launch_channel_bwd (reduction, then
// elementwise pass) or launch_channel_reduce (reduction only).
using ChannelLaunch = cudaError_t (*)(const ChannelBwdParams&, DType, cudaStream_t);
void run_channel(ChannelBwdParams& p, DType dt, const Tensor& ref, ChannelLaunch launch,
                 api::Scratch* unit = nullptr) {
  const int64_t n = plan_channel_bwd(p, dt, num_sms(ref));
  Tensor partial;
  if (unit) {
    p.partial = static_cast<double*>(unit->get(n * static_cast<int64_t>(sizeof(double)), ref));
  } else {
    partial = at::empty({n}, ref.options().dtype(at::kDouble));
    p.partial = partial.data_ptr<double>();
  }
  if (unit) p.wsum = unit->take_wsum(dt);  // the reduction's launch runs it too
  C10_CUDA_CHECK(launch(p, dt, stream()));
  if (unit) unit->launched();
}

// The per-channel sums of a BatchNorm backward: sum g, sum g*xhat and, with a BN'd residual,
// the residual's sum g*xhat (else undefined). The reduction's last level (colsum) writes every
// channel, so they are zeroed only for an empty batch (which sums to zero). `launch` runs the
// reduction alone (the _reduce ops) or the reduction and the elementwise pass.
struct ChannelSums {
  Tensor g, gx, gxr;
  Tensor g2;  // run_sums_cast with a residual: a second sum g (its grad_bias)
};

// A (k, C) buffer for a BatchNorm's gradients: carved from the unit's grad_pool when it has
// their dtype and room (one allocation for the unit's BatchNorms), else its own.
Tensor grad_rows(api::Scratch* unit, int64_t k, int64_t C, const at::TensorOptions& opts,
                 bool zero) {
  const int64_t need = (k * C + 7) / 8 * 8;  // the next one 16-byte aligned
  if (unit && unit->grad_pool.defined() && unit->grad_pool.dtype() == opts.dtype() &&
      unit->grad_pool.device() == opts.device() &&
      unit->grad_used + need <= unit->grad_pool.numel()) {
    Tensor t = carve(unit->grad_pool, unit->grad_used, {k, C});
    unit->grad_used += need;
    if (zero) t.zero_();
    return t;
  }
  return zero ? at::zeros({k, C}, opts) : at::empty({k, C}, opts);
}

// The training unit's sums when they are not the gradients themselves (api.h: grad_dtype): float32
// in the scratch after the partials, and, unless grad_dtype is Undefined, the gradients in
// grad_dtype written by colsum: sum g, sum g*xhat, and with a residual its sum g*xhat and a
// second sum g (g2).
ChannelSums run_sums_cast(ChannelBwdParams& p, DType dt, bool empty, int64_t C, bool res,
                          at::ScalarType grad_dtype, const Tensor& ref, ChannelLaunch launch,
                          api::Scratch& unit) {
  const bool want = grad_dtype != at::ScalarType::Undefined;
  const at::TensorOptions gopts = ref.options().dtype(want ? grad_dtype : at::kFloat);
  // One buffer for the gradients (one allocation): each a row of it.
  Tensor all;
  if (want) all = grad_rows(&unit, res ? 4 : 2, C, gopts, empty);
  const auto row = [&](int64_t i) { return want ? row_of(all, i) : Tensor(); };
  ChannelSums s{row(0), row(1), res ? row(2) : Tensor(), res ? row(3) : Tensor()};
  if (empty) return s;
  p.nsum = res ? 3 : 2;
  // an even number of doubles: the float sums after them 16-byte aligned (C % 4 == 0 wherever
  // the kernels read them 16 bytes at a time)
  const int64_t n = (plan_channel_bwd(p, dt, num_sms(ref)) + 1) / 2 * 2;
  auto* base = static_cast<unsigned char*>(unit.get(n * 8 + 3 * C * 4, ref));
  p.partial = reinterpret_cast<double*>(base);
  float* f = reinterpret_cast<float*>(base + n * 8);
  p.sum_g = f;
  p.sum_gx = f + C;
  p.sum_gxr = res ? f + 2 * C : nullptr;
  if (want) {
    p.cast_g = s.g.data_ptr();
    p.cast_gx = s.gx.data_ptr();
    p.cast_gxr = res ? s.gxr.data_ptr() : nullptr;
    p.cast_g2 = res ? s.g2.data_ptr() : nullptr;
    p.cast_dtype = to_dtype(s.g, "BatchNorm backward");
  }
  p.wsum = unit.take_wsum(dt);  // the reduction's launch runs it too
  C10_CUDA_CHECK(launch(p, dt, stream()));
  unit.launched();
  return s;
}

ChannelSums run_sums(ChannelBwdParams& p, DType dt, bool empty, int64_t C, bool res,
                     const at::TensorOptions& fopts, const Tensor& ref, ChannelLaunch launch,
                     api::Scratch* unit = nullptr, at::ScalarType grad_dtype = at::kFloat) {
  if (unit && (grad_dtype == at::ScalarType::Undefined || grad_dtype == at::kHalf ||
               grad_dtype == at::kBFloat16)) {
    return run_sums_cast(p, dt, empty, C, res, grad_dtype, ref, launch, *unit);
  }
  // The unit's sums (its gradients) in one buffer, each a row; an op's, tensors of their own.
  ChannelSums s;
  if (unit) {
    // With a residual, row 3 the residual's grad_bias: the same sum g, written by the column
    // sum's second copy (no clone launch).
    const Tensor all = grad_rows(unit, res ? 4 : 2, C, fopts, empty);
    s = {row_of(all, 0), row_of(all, 1), res ? row_of(all, 2) : Tensor(),
         res ? row_of(all, 3) : Tensor()};
    if (res && !empty) {
      p.cast_g2 = s.g2.data_ptr();
      p.cast_dtype = DType::kFloat32;
    }
  } else {
    const auto make = [&] { return empty ? at::zeros({C}, fopts) : at::empty({C}, fopts); };
    s = {make(), make(), res ? make() : Tensor()};
  }
  if (!empty) {
    p.sum_g = s.g.data_ptr<float>();
    p.sum_gx = s.gx.data_ptr<float>();
    p.sum_gxr = res ? s.gxr.data_ptr<float>() : nullptr;
    p.nsum = res ? 3 : 2;
    run_channel(p, dt, ref, launch, unit);
  }
  return s;
}

// An op's result that is absent: an empty tensor (the schema returns one), or undefined for the
// training unit, which discards it.
Tensor absent(const at::TensorOptions& opts, const api::Scratch* unit) {
  return unit ? Tensor() : at::empty({0}, opts);
}

constexpr const char* kWeightName[1] = {"weight"};
constexpr const char* kResWeightName[1] = {"res_weight"};

void check_like(const Tensor& t, const Tensor& ref, const char* name) {
  CHECK_CUDA(t);
  TORCH_CHECK(t.device() == ref.device(), "fastres CUDA: ", name, " is on ", t.device(),
              " but grad_out is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastres CUDA: ", name, " has dtype ",
              t.scalar_type(), " but grad_out has ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastres CUDA: ", name, " must have grad_out's shape ",
              ref.sizes(), ", got ", t.sizes());
}

std::tuple<Tensor, Tensor> relu_bias_bwd_cuda(const Tensor& grad_out, const OptTensor& out) {
  CHECK_CUDA(grad_out);
  CHECK_DIM(grad_out, 4);
  const DType dt = to_dtype(grad_out, "relu_bias_bwd");
  if (out.has_value()) check_like(*out, grad_out, "out");
  c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t C = grad_out.size(1);
  NhwcOut gz = nhwc_out_like(grad_out);
  Tensor gb = at::zeros({C}, grad_out.options().dtype(at::kFloat));
  if (grad_out.numel() == 0) return {gz.ret, gb};
  const Tensor go = nhwc(grad_out);
  const Tensor o = out.has_value() ? nhwc(*out) : Tensor();
  ChannelBwdParams p{};
  p.grad_out = go.data_ptr();
  p.mask_src = o.defined() ? o.data_ptr() : nullptr;
  p.mask_mode = o.defined() ? 1 : 0;
  p.sum_g = gb.data_ptr<float>();
  p.grad_res = gz.buf.data_ptr();
  p.rows = grad_out.numel() / C;
  p.C = static_cast<int>(C);
  p.nsum = 1;
  p.kind = BwdKind::kG;
  run_channel(p, dt, grad_out, launch_channel_bwd);
  gz.finish();
  return {gz.ret, gb};
}

// The BatchNorm backwards share one pipeline (reduction, then elementwise pass): the fused ops
// run both passes, the SyncBatchNorm split (*_reduce, *_elemt) one pass each, with the
// all-reduce of the sums in between. The two structs below check and prepare the inputs the three
// forms of each backward share and the outputs of the two forms with an elementwise pass, and hold
// the prepared tensors until the launches are done.

// grad_out, out, input, mean, invstd (and res_input, res_mean, res_invstd) of bn_add_relu_bwd and
// its split: checked, then (under a guard on grad_out's device) mean/invstd as float32 vectors
// and, when grad_out is not empty, the activations as NHWC, filled into `p` with the mask.
struct AddReluBwdIn {
  c10::cuda::OptionalCUDAGuard guard;
  DType dt = DType::kFloat32;
  int64_t C = 0;
  bool bn_res = false;
  bool empty = true;
  Tensor m, inv, mr, invr;  // float32 vectors
  Tensor go, o, x, xr;      // NHWC (when not empty)

  void init(const char* op, ChannelBwdParams& p, const Tensor& grad_out, const OptTensor& out,
            const Tensor& input, const Tensor& mean, const Tensor& invstd,
            const OptTensor& res_input, const OptTensor& res_mean, const OptTensor& res_invstd) {
    CHECK_CUDA(grad_out);
    CHECK_DIM(grad_out, 4);
    dt = to_dtype(grad_out, op);
    check_like(input, grad_out, "input");
    if (out.has_value()) check_like(*out, grad_out, "out");
    C = input.size(1);
    check_stat(mean, C, "mean", input);
    check_stat(invstd, C, "invstd", input);
    bn_res = res_input.has_value();
    if (bn_res) {
      TORCH_CHECK_VALUE(res_mean.has_value() && res_invstd.has_value(), op,
                        ": res_input needs res_mean and res_invstd");
      check_like(*res_input, grad_out, "res_input");
      check_stat(*res_mean, C, "res_mean", input);
      check_stat(*res_invstd, C, "res_invstd", input);
    }
    guard.set_device(grad_out.device());
    m = chan_vec(mean, C, "mean", input);
    inv = chan_vec(invstd, C, "invstd", input);
    if (bn_res) {
      mr = chan_vec(*res_mean, C, "res_mean", input);
      invr = chan_vec(*res_invstd, C, "res_invstd", input);
    }
    empty = grad_out.numel() == 0;
    if (empty) return;
    go = nhwc(grad_out);
    o = out.has_value() ? nhwc(*out) : Tensor();
    x = nhwc(input);
    xr = bn_res ? nhwc(*res_input) : Tensor();
    p.grad_out = go.data_ptr();
    p.mask_src = o.defined() ? o.data_ptr() : nullptr;
    p.mask_mode = o.defined() ? 1 : 0;
    p.x = x.data_ptr();
    p.mean = m.data_ptr<float>();
    p.invstd = inv.data_ptr<float>();
    if (bn_res) {
      p.xr = xr.data_ptr();
      p.mean_r = mr.data_ptr<float>();
      p.invstd_r = invr.data_ptr<float>();
    }
    p.rows = grad_out.numel() / C;
    p.C = static_cast<int>(C);
  }

  NhwcOut gi, gr;  // grad_input, grad_res (set by grads)

  // The elementwise pass's outputs grad_input and grad_res (grad_out's shape without res_input:
  // grad_res = g there) in the formats the fakes report and, when grad_out is not empty, their
  // buffers, the weights and the kind filled into `p`.
  // Without res_input and want_res false, no grad_res (kBn: the elementwise pass writes only
  // grad_input).
  void grads(ChannelBwdParams& p, const Tensor& grad_out, const Tensor& input,
             const OptTensor& res_input, const BnVecs& w, const BnVecs& wr, bool want_res) {
    gi = nhwc_out_like(input);
    want_res = want_res || bn_res;
    if (want_res) gr = nhwc_out_like(bn_res ? *res_input : grad_out);
    if (empty) return;
    p.weight = vptr(w.v[0]);
    p.weight_dtype = w.dtype;
    p.grad_input = gi.buf.data_ptr();
    p.grad_res = want_res ? gr.buf.data_ptr() : nullptr;
    if (bn_res) {
      p.weight_r = vptr(wr.v[0]);
      p.weight_r_dtype = wr.dtype;
    }
    p.kind = bn_res ? BwdKind::kBnBn : want_res ? BwdKind::kBnId : BwdKind::kBn;
  }
  void finish() {
    gi.finish();
    gr.finish();
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd_impl(
    const Tensor& grad_out, const OptTensor& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptTensor& weight, const OptTensor& res_input,
    const OptTensor& res_mean, const OptTensor& res_invstd, const OptTensor& res_weight,
    api::Scratch* unit, at::ScalarType grad_dtype = at::kFloat, bool want_res = true) {
  ChannelBwdParams p{};
  AddReluBwdIn a;
  a.init("bn_add_relu_bwd", p, grad_out, out, input, mean, invstd, res_input, res_mean, res_invstd);
  const int64_t C = a.C;
  const bool bn_res = a.bn_res;
  const at::TensorOptions fopts = mean.options();
  const BnVecs w = bn_vecs({weight}, C, input, kWeightName);
  const BnVecs wr = bn_res ? bn_vecs({res_weight}, C, input, kResWeightName) : BnVecs{};
  a.grads(p, grad_out, input, res_input, w, wr, want_res);
  const ChannelSums s = run_sums(p, a.dt, a.empty, C, bn_res, fopts, grad_out, launch_channel_bwd,
                                 unit, grad_dtype);
  if (!a.empty) {
    a.finish();
  }
  // the residual branch sees the same g: its grad_bias is sum(g) (a distinct tensor: outputs
  // must not alias)
  Tensor grb = s.g2.defined()                  ? s.g2
               : bn_res && s.g.defined()       ? s.g.clone()
                                               : absent(fopts, unit);
  return {a.gi.ret, s.gx, s.g, a.gr.ret, bn_res ? s.gxr : absent(fopts, unit), grb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd_cuda(
    const Tensor& grad_out, const OptTensor& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptTensor& weight, const OptTensor& res_input,
    const OptTensor& res_mean, const OptTensor& res_invstd, const OptTensor& res_weight) {
  return bn_add_relu_bwd_impl(grad_out, out, input, mean, invstd, weight, res_input, res_mean,
                              res_invstd, res_weight, nullptr);
}

std::tuple<Tensor, Tensor, Tensor> bn_add_relu_bwd_reduce_cuda(
    const Tensor& grad_out, const OptTensor& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptTensor& res_input, const OptTensor& res_mean,
    const OptTensor& res_invstd) {
  ChannelBwdParams p{};
  AddReluBwdIn a;
  a.init("bn_add_relu_bwd_reduce", p, grad_out, out, input, mean, invstd, res_input, res_mean,
         res_invstd);
  const ChannelSums s =
      run_sums(p, a.dt, a.empty, a.C, a.bn_res, mean.options(), grad_out, launch_channel_reduce);
  return {s.g, s.gx, a.bn_res ? s.gxr : at::empty({0}, mean.options())};
}

std::tuple<Tensor, Tensor> bn_add_relu_bwd_elemt_cuda(
    const Tensor& grad_out, const OptTensor& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptTensor& weight, const Tensor& mean_g, const Tensor& mean_g_xhat,
    const OptTensor& res_input, const OptTensor& res_mean, const OptTensor& res_invstd,
    const OptTensor& res_weight, const OptTensor& res_mean_g_xhat) {
  TORCH_CHECK_VALUE(!res_input.has_value() || (res_mean.has_value() && res_invstd.has_value() &&
                                               res_mean_g_xhat.has_value()),
                    "bn_add_relu_bwd_elemt: res_input needs res_mean, res_invstd and "
                    "res_mean_g_xhat");
  ChannelBwdParams p{};
  AddReluBwdIn a;
  a.init("bn_add_relu_bwd_elemt", p, grad_out, out, input, mean, invstd, res_input, res_mean,
         res_invstd);
  const int64_t C = a.C;
  const bool bn_res = a.bn_res;
  const BnVecs w = bn_vecs({weight}, C, input, kWeightName);
  const Tensor mg = chan_vec(mean_g, C, "mean_g", input);
  const Tensor mgx = chan_vec(mean_g_xhat, C, "mean_g_xhat", input);
  BnVecs wr;
  Tensor mgxr;
  if (bn_res) {
    wr = bn_vecs({res_weight}, C, input, kResWeightName);
    mgxr = chan_vec(*res_mean_g_xhat, C, "res_mean_g_xhat", input);
  }
  a.grads(p, grad_out, input, res_input, w, wr, true);
  if (!a.empty) {
    p.mean_g = mg.data_ptr<float>();
    p.mean_gx = mgx.data_ptr<float>();
    if (bn_res) p.mean_gxr = mgxr.data_ptr<float>();
    C10_CUDA_CHECK(launch_channel_elementwise(p, a.dt, stream()));
    a.finish();
  }
  return {a.gi.ret, a.gr.ret};
}

// grad_out, input, mean, invstd, scale, shift of bn_relu_bwd and its split, as AddReluBwdIn.
struct ReluBwdIn {
  c10::cuda::OptionalCUDAGuard guard;
  DType dt = DType::kFloat32;
  int64_t C = 0;
  bool empty = true;
  Tensor m, inv, sc, sh;  // float32 vectors
  Tensor go, x;           // NHWC (when not empty)

  void init(const char* op, ChannelBwdParams& p, const Tensor& grad_out, const Tensor& input,
            const Tensor& mean, const Tensor& invstd, const Tensor& scale, const Tensor& shift,
            bool relu) {
    CHECK_CUDA(grad_out);
    CHECK_DIM(grad_out, 4);
    dt = to_dtype(grad_out, op);
    check_like(input, grad_out, "input");
    C = input.size(1);
    check_stat(mean, C, "mean", input);
    check_stat(invstd, C, "invstd", input);
    guard.set_device(grad_out.device());
    m = chan_vec(mean, C, "mean", input);
    inv = chan_vec(invstd, C, "invstd", input);
    sc = chan_vec(scale, C, "scale", input);
    sh = chan_vec(shift, C, "shift", input);
    empty = grad_out.numel() == 0;
    if (empty) return;
    go = nhwc(grad_out);
    x = nhwc(input);
    p.grad_out = go.data_ptr();
    p.mask_mode = relu ? 2 : 0;
    p.mask_src = relu ? x.data_ptr() : nullptr;
    p.m_scale = sc.data_ptr<float>();
    p.m_shift = sh.data_ptr<float>();
    p.x = x.data_ptr();
    p.mean = m.data_ptr<float>();
    p.invstd = inv.data_ptr<float>();
    p.rows = grad_out.numel() / C;
    p.C = static_cast<int>(C);
  }

  NhwcOut gi;  // grad_input (set by grad)

  // The elementwise pass's output grad_input in the format the fakes report and, when grad_out
  // is not empty, its buffer, the weight and the kind filled into `p`.
  // into: a channels_last tensor like input to write in place of a new one (the unit's: its
  // grad_out, each element read before it is written by the same thread), or null.
  void grad(ChannelBwdParams& p, const Tensor& input, const BnVecs& w,
            const Tensor* into = nullptr) {
    if (into && into->sizes() == input.sizes() && into->scalar_type() == input.scalar_type() &&
        into->is_contiguous(MF::ChannelsLast) && like_format(input) == MF::ChannelsLast) {
      gi = NhwcOut{*into, *into};
    } else {
      gi = nhwc_out_like(input);
    }
    if (empty) return;
    p.weight = vptr(w.v[0]);
    p.weight_dtype = w.dtype;
    p.grad_input = gi.buf.data_ptr();
    p.kind = BwdKind::kBn;
  }
};

std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd_impl(const Tensor& grad_out, const Tensor& input,
                                                    const Tensor& mean, const Tensor& invstd,
                                                    const OptTensor& weight, const Tensor& scale,
                                                    const Tensor& shift, bool relu,
                                                    api::Scratch* unit,
                                                    at::ScalarType grad_dtype = at::kFloat,
                                                    bool in_place = false) {
  ChannelBwdParams p{};
  ReluBwdIn a;
  a.init("bn_relu_bwd", p, grad_out, input, mean, invstd, scale, shift, relu);
  const at::TensorOptions fopts = mean.options();
  // Held until the launches are done: p.weight points into it (a converted copy when the
  // weight is not float32, float16 or bfloat16; a temporary here was freed before the kernel
  // read it: the H200's bf16 grad.input errors of 1e5-1e8, found by cudasim).
  const BnVecs w = bn_vecs({weight}, a.C, input, kWeightName);
  a.grad(p, input, w, in_place ? &a.go : nullptr);
  const ChannelSums s = run_sums(p, a.dt, a.empty, a.C, false, fopts, grad_out,
                                 launch_channel_bwd, unit, grad_dtype);
  if (!a.empty) {
    a.gi.finish();
  }
  return {a.gi.ret, s.gx, s.g};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd_cuda(const Tensor& grad_out, const Tensor& input,
                                                    const Tensor& mean, const Tensor& invstd,
                                                    const OptTensor& weight, const Tensor& scale,
                                                    const Tensor& shift, bool relu) {
  return bn_relu_bwd_impl(grad_out, input, mean, invstd, weight, scale, shift, relu, nullptr);
}

std::tuple<Tensor, Tensor> bn_relu_bwd_reduce_cuda(const Tensor& grad_out, const Tensor& input,
                                                   const Tensor& mean, const Tensor& invstd,
                                                   const Tensor& scale, const Tensor& shift,
                                                   bool relu) {
  ChannelBwdParams p{};
  ReluBwdIn a;
  a.init("bn_relu_bwd_reduce", p, grad_out, input, mean, invstd, scale, shift, relu);
  const ChannelSums s =
      run_sums(p, a.dt, a.empty, a.C, false, mean.options(), grad_out, launch_channel_reduce);
  return {s.g, s.gx};
}

Tensor bn_relu_bwd_elemt_cuda(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                              const Tensor& invstd, const OptTensor& weight, const Tensor& scale,
                              const Tensor& shift, bool relu, const Tensor& mean_g,
                              const Tensor& mean_g_xhat) {
  ChannelBwdParams p{};
  ReluBwdIn a;
  a.init("bn_relu_bwd_elemt", p, grad_out, input, mean, invstd, scale, shift, relu);
  const BnVecs w = bn_vecs({weight}, a.C, input, kWeightName);
  const Tensor mg = chan_vec(mean_g, a.C, "mean_g", input);
  const Tensor mgx = chan_vec(mean_g_xhat, a.C, "mean_g_xhat", input);
  a.grad(p, input, w);
  if (!a.empty) {
    p.mean_g = mg.data_ptr<float>();
    p.mean_gx = mgx.data_ptr<float>();
    C10_CUDA_CHECK(launch_channel_elementwise(p, a.dt, stream()));
    a.gi.finish();
  }
  return a.gi.ret;
}

}  // namespace

namespace api {
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd(
    const Tensor& grad_out, const OptT& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptT& weight, const OptT& res_input, const OptT& res_mean,
    const OptT& res_invstd, const OptT& res_weight, Scratch& scratch, at::ScalarType grad_dtype,
    bool want_res) {
  return bn_add_relu_bwd_impl(grad_out, out, input, mean, invstd, weight, res_input, res_mean,
                              res_invstd, res_weight, &scratch, grad_dtype, want_res);
}
std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean, const Tensor& invstd,
                                               const OptT& weight, const Tensor& scale,
                                               const Tensor& shift, bool relu, Scratch& scratch,
                                               at::ScalarType grad_dtype, bool in_place) {
  return bn_relu_bwd_impl(grad_out, input, mean, invstd, weight, scale, shift, relu, &scratch,
                          grad_dtype, in_place);
}
}  // namespace api

}  // namespace cuda
}  // namespace fastres

FR_TORCH_LIBRARY_IMPL(FR_OPS_NAMESPACE, FR_DISPATCH_KEY, m) {
  m.impl("relu_bias_bwd", &fastres::cuda::relu_bias_bwd_cuda);
  m.impl("bn_add_relu_bwd", &fastres::cuda::bn_add_relu_bwd_cuda);
  m.impl("bn_relu_bwd", &fastres::cuda::bn_relu_bwd_cuda);
  m.impl("bn_add_relu_bwd_reduce", &fastres::cuda::bn_add_relu_bwd_reduce_cuda);
  m.impl("bn_add_relu_bwd_elemt", &fastres::cuda::bn_add_relu_bwd_elemt_cuda);
  m.impl("bn_relu_bwd_reduce", &fastres::cuda::bn_relu_bwd_reduce_cuda);
  m.impl("bn_relu_bwd_elemt", &fastres::cuda::bn_relu_bwd_elemt_cuda);
}
