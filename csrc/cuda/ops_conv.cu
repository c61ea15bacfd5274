// The ATen launchers of the convolution ops and their registration: conv_bias_act, conv_stats
// (+ the column sums of its per-CTA statistics) and conv_bwd (dgrad and wgrad). The kernels are
// conv_igemm.cuh (instantiated per dtype in conv_fwd_*.cu) and conv_wgrad.cu; the checks and
// layout helpers shared with ops_bn.cu are in ops_common.h.
#include <ATen/record_function.h>

#include <vector>

#include "block.h"
#include "ops_api.h"
#include "ops_common.h"

namespace fastres {
namespace cuda {

cudaError_t launch_conv(ConvParams& p, DType dt, Math math, cudaStream_t stream) {
  switch (dt) {
    case DType::kBFloat16: return launch_conv_bf16(p, math, stream);
    case DType::kFloat16: return launch_conv_f16(p, math, stream);
    default: return launch_conv_f32(p, math, stream);
  }
}

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// t zero-padded along `dim` to `size` (channels that are not a multiple of the 16-byte chunk).
Tensor pad_dim(const Tensor& t, int64_t dim, int64_t size, MF fmt) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[dim] = size;
  // at::zeros ignores a memory format carried in TensorOptions (the buffer came back NCHW while
  // the kernels read it as NHWC): allocate in the format, then zero.
  Tensor r = at::empty(sizes, t.options().memory_format(fmt));
  r.zero_();
  r.narrow(dim, 0, t.size(dim)).copy_(t);
  return r;
}

void check_sm80(const Tensor& t, const char* op) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, t.get_device()));
  TORCH_CHECK(major >= 8, "fastres CUDA ", op,
              ": the convolution kernels need compute capability 8.0+ (cp.async, bf16 mma), "
              "this GPU is ",
              major, ".x");
}

// fp32 convolutions follow cuDNN's TF32 switch (torch.backends.cudnn.allow_tf32).
Math conv_math(DType dt) {
  if (dt != DType::kFloat32) return Math::kMma16;
  return at::globalContext().allowTF32CuDNN() ? Math::kTf32 : Math::kSimt;
}

struct ConvGeom {
  int64_t N, C, H, W, K, R, S, P, Q;
  int sh, sw, ph, pw, dh, dw;
};

ConvGeom conv_geom(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   const char* op) {
  CHECK_CUDA(input);
  CHECK_CUDA(weight);
  CHECK_SAME_DEVICE(weight, input);
  CHECK_DIM(input, 4);
  CHECK_DIM(weight, 4);
  to_dtype(input, op);
  CHECK_DTYPE(weight, input);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "fastres CUDA ",
              op, ": stride, padding and dilation must have 2 elements, got ", stride, ", ",
              padding, ", ", dilation);
  TORCH_CHECK(groups == 1, "fastres CUDA ", op, ": groups must be 1, got ", groups);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, "fastres CUDA ", op,
              ": stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "fastres CUDA ", op,
              ": padding must be non-negative, got ", padding);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, "fastres CUDA ", op,
              ": dilation must be positive, got ", dilation);
  ConvGeom g{};
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.K = weight.size(0);
  g.R = weight.size(2);
  g.S = weight.size(3);
  TORCH_CHECK(weight.size(1) == g.C, "fastres CUDA ", op, ": weight of shape ", weight.sizes(),
              " expects ", weight.size(1), " input channels, input of shape ", input.sizes(),
              " has ", g.C);
  TORCH_CHECK(g.C > 0 && g.K > 0 && g.R > 0 && g.S > 0, "fastres CUDA ", op,
              ": empty weight of shape ", weight.sizes());
  TORCH_CHECK(g.H > 0 && g.W > 0, "fastres CUDA ", op, ": input of shape ", input.sizes(),
              " has an empty image");
  const int64_t nh = g.H + 2 * padding[0] - dilation[0] * (g.R - 1) - 1;
  const int64_t nw = g.W + 2 * padding[1] - dilation[1] * (g.S - 1) - 1;
  g.P = nh >= 0 ? nh / stride[0] + 1 : 0;
  g.Q = nw >= 0 ? nw / stride[1] + 1 : 0;
  TORCH_CHECK(g.P > 0 && g.Q > 0, "fastres CUDA ", op, ": output size ", g.P, "x", g.Q,
              " is too small for input ", input.sizes(), ", kernel ", g.R, "x", g.S, ", padding ",
              padding, ", dilation ", dilation);
  TORCH_CHECK(g.N * g.P * g.Q <= kMaxRows && g.N * g.H * g.W <= kMaxRows, "fastres CUDA ", op,
              ": more than 2^31 pixels (N*H*W = ", g.N * g.H * g.W, ", N*P*Q = ", g.N * g.P * g.Q,
              ") is not supported");
  TORCH_CHECK(weight.numel() < (1LL << 31) && g.H < (1LL << 30) && g.W < (1LL << 30),
              "fastres CUDA ", op, ": weight or image too large: ", weight.sizes(), ", ",
              input.sizes());
  g.sh = static_cast<int>(stride[0]);
  g.sw = static_cast<int>(stride[1]);
  g.ph = static_cast<int>(padding[0]);
  g.pw = static_cast<int>(padding[1]);
  g.dh = static_cast<int>(dilation[0]);
  g.dw = static_cast<int>(dilation[1]);
  return g;
}

// Filter size, stride, padding and dilation (ConvParams and WgradParams name them alike).
template <typename Params>
void fill_geometry(Params& p, const ConvGeom& g) {
  p.R = static_cast<int>(g.R);
  p.S = static_cast<int>(g.S);
  p.stride_h = g.sh;
  p.stride_w = g.sw;
  p.pad_h = g.ph;
  p.pad_w = g.pw;
  p.dil_h = g.dh;
  p.dil_w = g.dw;
}

// The operands and GEMM shape of an implicit-GEMM launch, read from the NHWC tensors the kernel
// uses: x (N, XC, XH, XW) gathered, w, out (N, OC, OH, OW) written; M = N * OH * OW rows. The
// forward passes (input, weight, output), dgrad (grad_out, the KRSC weight, grad_input).
void fill_conv_io(ConvParams& p, const Tensor& x, const Tensor& w, const Tensor& out,
                  const ConvGeom& g) {
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.out = out.data_ptr();
  p.N = static_cast<int>(g.N);
  p.XH = static_cast<int>(x.size(2));
  p.XW = static_cast<int>(x.size(3));
  p.XC = static_cast<int>(x.size(1));
  p.OH = static_cast<int>(out.size(2));
  p.OW = static_cast<int>(out.size(3));
  p.OC = static_cast<int>(out.size(1));
  fill_geometry(p, g);
  p.M = static_cast<int>(g.N * out.size(2) * out.size(3));
}

// The activation operand of a convolution (forward and wgrad): x NHWC, zero-padded to a multiple
// of the 16-byte chunk in C, and the prologue vectors with it (scale 0, shift 0 -> a = 0 there).
struct ActOperand {
  Tensor x, scale, shift;
  int64_t Cp;
};
ActOperand act_operand(const Tensor& input, const ConvGeom& g, DType dt, const Tensor& scale,
                       const Tensor& shift) {
  ActOperand o;
  o.x = nhwc(input);
  o.scale = scale;
  o.shift = shift;
  o.Cp = round_up(g.C, chunk_elems(dt));
  if (o.Cp != g.C) {
    o.x = pad_dim(o.x, 1, o.Cp, MF::ChannelsLast);
    if (scale.defined()) o.scale = pad_dim(scale, 0, o.Cp, MF::Contiguous);
    if (shift.defined()) o.shift = pad_dim(shift, 0, o.Cp, MF::Contiguous);
  }
  return o;
}

// Forward convolution operands: the activation operand and w KRSC, padded to the same Cp.
struct FwdOperands : ActOperand {
  Tensor w;
};
FwdOperands fwd_operands(const Tensor& input, const Tensor& weight, const ConvGeom& g, DType dt,
                         const Tensor& scale, const Tensor& shift) {
  FwdOperands o{act_operand(input, g, dt, scale, shift)};
  o.w = nhwc(weight);
  if (o.Cp != g.C) o.w = pad_dim(o.w, 1, o.Cp, MF::ChannelsLast);
  return o;
}

// ---------------------------------------------------------------------------------------------
// conv_bias_act
// ---------------------------------------------------------------------------------------------
Tensor conv_bias_act_cuda(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                          const OptTensor& residual, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                          bool relu, const OptTensor& scale, const OptTensor& bn_mean,
                          const OptTensor& bn_var, double bn_eps) {
  const ConvGeom g = conv_geom(input, weight, stride, padding, dilation, groups, "conv_bias_act");
  c10::cuda::CUDAGuard guard(input.device());
  const DType dt = to_dtype(input, "conv_bias_act");
  // The BatchNorm scale in the epilogue (the weight is the live parameter, nothing folded), or
  // with bn_mean and bn_var the BatchNorm itself (its scale and shift computed there).
  TORCH_CHECK(bn_mean.has_value() == bn_var.has_value(), "fastres::conv_bias_act: bn_mean and "
              "bn_var are given together");
  const bool bn = bn_var.has_value();
  TORCH_CHECK(bn || !scale.has_value() || bias.has_value(), "fastres::conv_bias_act: scale is "
              "given only with bias");
  // With the BatchNorm, scale and bias are its weight and bias: read in their dtype with its
  // running statistics (no per-call conversion of a bf16 model's BatchNorm).
  const BnVecs bnv = bn ? bn_vecs({scale, bias, bn_mean, bn_var}, g.K, input) : BnVecs{};
  const Tensor b = bn ? Tensor() : opt_chan_vec(bias, g.K, "bias", input);
  const Tensor sc = bn ? Tensor() : opt_chan_vec(scale, g.K, "scale", input);
  Tensor res;
  if (residual.has_value()) {
    const Tensor& r = *residual;
    CHECK_CUDA(r);
    CHECK_SAME_DEVICE(r, input);
    CHECK_DTYPE(r, input);
    CHECK_SHAPE(r, g.N, g.K, g.P, g.Q);
    res = nhwc(r);
  }
  NhwcOut out = nhwc_out({g.N, g.K, g.P, g.Q}, input.options(), like_format(input));
  if (out.ret.numel() == 0) return out.ret;
  check_sm80(input, "conv_bias_act");
  const FwdOperands o = fwd_operands(input, weight, g, dt, Tensor(), Tensor());

  ConvParams p{};
  fill_conv_io(p, o.x, o.w, out.buf, g);
  p.bias = fptr(b);
  p.scale = fptr(sc);
  p.bn_weight = vptr(bnv.v[0]);
  p.bn_bias = vptr(bnv.v[1]);
  p.bn_mean = vptr(bnv.v[2]);
  p.bn_var = vptr(bnv.v[3]);
  p.bn_dtype = bnv.dtype;
  p.bn_eps = static_cast<float>(bn_eps);
  p.residual = res.defined() ? res.data_ptr() : nullptr;
  p.has_bias = b.defined() || bn;
  p.has_residual = res.defined();
  p.relu = relu;
  C10_CUDA_CHECK(launch_conv(p, dt, conv_math(dt), stream()));
  out.finish();
  return out.ret;
}

// ---------------------------------------------------------------------------------------------
// conv_stats
// ---------------------------------------------------------------------------------------------
// unit: the training unit's scratch (null for the op): the per-CTA partials go there, and sum and
// sumsq are rows 0 and 1 of one (6, K) buffer, returned in place of sum (sumsq undefined), whose
// other four rows bn_finalize fills (api.h).
std::tuple<Tensor, Tensor, Tensor> conv_stats_impl(const Tensor& input, const Tensor& weight,
                                                   const OptTensor& pre_scale,
                                                   const OptTensor& pre_shift, bool pre_relu,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups,
                                                   api::Scratch* unit,
                                                   api::PendingSums* defer = nullptr) {
  const ConvGeom g = conv_geom(input, weight, stride, padding, dilation, groups, "conv_stats");
  c10::cuda::CUDAGuard guard(input.device());
  const DType dt = to_dtype(input, "conv_stats");
  const Tensor sc = opt_chan_vec(pre_scale, g.C, "pre_scale", input);
  const Tensor sh = opt_chan_vec(pre_shift, g.C, "pre_shift", input);
  NhwcOut out = nhwc_out({g.N, g.K, g.P, g.Q}, input.options(), like_format(input));
  const at::TensorOptions fopts = input.options().dtype(at::kFloat);
  Tensor sum, sumsq, stats;
  float *sum_p, *sumsq_p;
  if (unit) {
    if (unit->stats_pool.defined() &&
        unit->stats_used + round_up(6 * g.K, 4) <= unit->stats_pool.numel() &&
        unit->stats_pool.device() == input.device()) {
      stats = carve(unit->stats_pool, unit->stats_used, {6, g.K});
      unit->stats_used += round_up(6 * g.K, 4);  // the next one 16-byte aligned too
    } else {
      stats = at::empty({6, g.K}, fopts);
    }
    sum_p = stats.data_ptr<float>();
    sumsq_p = sum_p + g.K;
  } else {
    sum = at::empty({g.K}, fopts);
    sumsq = at::empty({g.K}, fopts);
    sum_p = sum.data_ptr<float>();
    sumsq_p = sumsq.data_ptr<float>();
  }
  if (out.ret.numel() == 0) {
    if (unit) {
      stats.narrow(0, 0, 2).zero_();
      return {out.ret, stats, Tensor()};
    }
    sum.zero_();
    sumsq.zero_();
    return {out.ret, sum, sumsq};
  }
  check_sm80(input, "conv_stats");
  const FwdOperands o = fwd_operands(input, weight, g, dt, sc, sh);
  const Math math = conv_math(dt);
  const int64_t M = g.N * g.P * g.Q;
  const int64_t m_tiles = (M + conv_block_m(math) - 1) / conv_block_m(math);
  Tensor partial;
  double* part = nullptr;
  if (unit) {
    part = static_cast<double*>(
        unit->get(2 * m_tiles * g.K * static_cast<int64_t>(sizeof(double)), input));
  } else {
    partial = at::empty({2, m_tiles, g.K}, fopts.dtype(at::kDouble));
    part = partial.data_ptr<double>();
  }

  ConvParams p{};
  fill_conv_io(p, o.x, o.w, out.buf, g);
  p.pre_scale = fptr(o.scale);
  p.pre_shift = fptr(o.shift);
  p.stats_partial = part;
  p.m_tiles = static_cast<int>(m_tiles);
  p.prologue = sc.defined() || sh.defined() || pre_relu;
  p.pre_relu = pre_relu;
  p.stats = true;
  C10_CUDA_CHECK(launch_conv(p, dt, math, stream()));
  if (defer) {
    TORCH_CHECK(unit, "fastres conv_stats: deferred sums need the unit's scratch");
    *defer = {part, static_cast<int>(m_tiles)};
    out.finish();
    return {out.ret, stats, Tensor()};
  }

  ColSumParams cp{};
  cp.partial = part;
  cp.out[0] = sum_p;
  cp.out[1] = sumsq_p;
  cp.nsum = 2;
  cp.T = static_cast<int>(m_tiles);
  cp.C = static_cast<int>(g.K);
  C10_CUDA_CHECK(launch_colsum(cp, stream()));
  out.finish();
  if (unit) return {out.ret, stats, Tensor()};
  return {out.ret, sum, sumsq};
}

std::tuple<Tensor, Tensor, Tensor> conv_stats_cuda(const Tensor& input, const Tensor& weight,
                                                   const OptTensor& pre_scale,
                                                   const OptTensor& pre_shift, bool pre_relu,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups) {
  return conv_stats_impl(input, weight, pre_scale, pre_shift, pre_relu, stride, padding, dilation,
                         groups, nullptr);
}

// ---------------------------------------------------------------------------------------------
// conv_bwd: dgrad (implicit GEMM over grad_out, the KRSC weight read transposed) and wgrad.
// ---------------------------------------------------------------------------------------------
// unit: the training unit's scratch (null for the op): the weight gradient's split workspace goes
// there, and a gradient not asked for comes back undefined instead of empty.
std::tuple<Tensor, Tensor> conv_bwd_impl(const Tensor& grad_out, const Tensor& input,
                                         const Tensor& weight, const OptTensor& pre_scale,
                                         const OptTensor& pre_shift, bool pre_relu,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups,
                                         std::array<bool, 2> output_mask, api::Scratch* unit) {
  const ConvGeom g = conv_geom(input, weight, stride, padding, dilation, groups, "conv_bwd");
  CHECK_CUDA(grad_out);
  CHECK_SAME_DEVICE(grad_out, input);
  CHECK_DTYPE(grad_out, input);
  CHECK_SHAPE(grad_out, g.N, g.K, g.P, g.Q);
  c10::cuda::CUDAGuard guard(input.device());
  const DType dt = to_dtype(input, "conv_bwd");
  const Tensor sc = opt_chan_vec(pre_scale, g.C, "pre_scale", input);
  const Tensor sh = opt_chan_vec(pre_shift, g.C, "pre_shift", input);
  const int64_t epc = chunk_elems(dt);
  const int64_t Kp = round_up(g.K, epc);
  // N == 0 is the only empty case left (conv_geom rejects empty images and weights).
  const bool any = (output_mask[0] || output_mask[1]) && grad_out.numel() > 0;
  if (any) check_sm80(input, "conv_bwd");
  // grad_out NHWC, zero-padded to Kp channels (the reduction of dgrad, the rows of wgrad).
  Tensor go;
  if (any) {
    go = nhwc(grad_out);
    if (Kp != g.K) go = pad_dim(go, 1, Kp, MF::ChannelsLast);
  }

  Tensor grad_input;
  if (output_mask[0]) {
    NhwcOut o = nhwc_out_like(input);
    if (o.ret.numel() > 0) {
      // dL/da[n, h, w, c] = sum over (r, s, k) of grad_out[n, p, q, k] * weight[k, c, r, s]
      // with h = p * stride - pad + r * dil: the gather form, the kernel reading the KRSC weight
      // as it is stored (a channels_last model's: no copy); only a C that is not a multiple of
      // the 16-byte chunk is zero-padded (a copy).
      Tensor wk = nhwc(weight);
      const int64_t Cp = round_up(g.C, epc);
      if (Cp != g.C) wk = pad_dim(wk, 1, Cp, MF::ChannelsLast);
      ConvParams p{};
      fill_conv_io(p, go, wk, o.buf, g);
      p.w_k = static_cast<int>(g.K);
      p.w_c = static_cast<int>(Cp);
      p.dgrad = true;
      C10_CUDA_CHECK(launch_conv(p, dt, conv_math(dt), stream()));
      o.finish();
    }
    grad_input = o.ret;
  } else if (!unit) {
    grad_input = at::empty({0}, input.options());
  }

  Tensor grad_weight;
  if (output_mask[1]) {
    grad_weight = at::empty_like(weight);
    const int64_t npq = g.N * g.P * g.Q;
    if (npq == 0) {
      grad_weight.zero_();
    } else {
      const ActOperand a = act_operand(input, g, dt, sc, sh);
      const int64_t Cp = a.Cp;
      const bool direct = Kp == g.K && Cp == g.C && grad_weight.is_contiguous(MF::ChannelsLast) &&
                          aligned16(grad_weight);
      // (Kp, Cp, R, S) in channels_last = (Kp, R, S, Cp) in memory: what the kernel writes.
      Tensor dw =
          direct ? grad_weight
                 : at::empty({Kp, Cp, g.R, g.S}, weight.options().memory_format(MF::ChannelsLast));
      WgradParams p{};
      p.grad_out = go.data_ptr();
      p.x = a.x.data_ptr();
      p.pre_scale = fptr(a.scale);
      p.pre_shift = fptr(a.shift);
      p.dw = dw.data_ptr();
      p.N = static_cast<int>(g.N);
      p.H = static_cast<int>(g.H);
      p.W = static_cast<int>(g.W);
      p.C = static_cast<int>(Cp);
      p.P = static_cast<int>(g.P);
      p.Q = static_cast<int>(g.Q);
      p.K = static_cast<int>(Kp);
      fill_geometry(p, g);
      p.NPQ = npq;
      p.prologue = sc.defined() || sh.defined() || pre_relu;
      p.pre_relu = pre_relu;
      const int64_t ws_n = plan_wgrad(p, dt, num_sms(input));
      const int64_t ws_bytes = ws_n * static_cast<int64_t>(sizeof(float));
      Tensor ws;
      if (unit) {
        p.ws = static_cast<float*>(unit->get(ws_bytes, input));
      } else {
        ws = at::empty({ws_n}, input.options().dtype(at::kFloat));
        p.ws = ws.data_ptr<float>();
      }
      // The unit's split sum is left to a later launch (Scratch) where dw is the gradient itself.
      WgradSum* defer = unit && direct && unit->n_pending < 2 ? &unit->pending[unit->n_pending]
                                                              : nullptr;
      C10_CUDA_CHECK(launch_wgrad(p, dt, stream(), defer));
      if (defer) {
        ++unit->n_pending;
        unit->reserve(p.ws, ws_bytes);
      }
      if (!direct) grad_weight.copy_(dw.narrow(0, 0, g.K).narrow(1, 0, g.C));
    }
  } else if (!unit) {
    grad_weight = at::empty({0}, weight.options());
  }
  return {grad_input, grad_weight};
}

std::tuple<Tensor, Tensor> conv_bwd_cuda(const Tensor& grad_out, const Tensor& input,
                                         const Tensor& weight, const OptTensor& pre_scale,
                                         const OptTensor& pre_shift, bool pre_relu,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups,
                                         std::array<bool, 2> output_mask) {
  return conv_bwd_impl(grad_out, input, weight, pre_scale, pre_shift, pre_relu, stride, padding,
                       dilation, groups, output_mask, nullptr);
}

}  // namespace

std::vector<Tensor> block_eval(const BlockSpec& spec, const Tensor& x,
                               const std::vector<OptTensor>& t, bool keep) {
  RECORD_FUNCTION("fastres::block_eval", std::vector<c10::IValue>({x}));
  const size_t n = spec.convs.size();
  TORCH_CHECK(spec.n_main >= 1 && n == static_cast<size_t>(spec.n_main) + spec.has_ds,
              "fastres block_eval: a spec of ", n, " convolutions for ", spec.n_main,
              " main ones", spec.has_ds ? " and a downsample" : "");
  TORCH_CHECK(t.size() == 5 * n, "fastres block_eval: ", t.size(), " tensors for ", n,
              " convolutions (5 each: weight, BN bias, BN weight, running mean, running var)");
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(t[5 * i].has_value() && t[5 * i + 3].has_value() && t[5 * i + 4].has_value(),
                "fastres block_eval: convolution ", i, " needs its weight and running statistics");
  const auto conv = [&](size_t i, const Tensor& in, const OptTensor& res, bool relu) {
    const BlockConv& c = spec.convs[i];
    const OptTensor* v = &t[5 * i];
    return conv_bias_act_cuda(in, *v[0], v[1], res, c.stride, c.padding, c.dilation, c.groups,
                              relu, v[2], v[3], v[4], c.eps);
  };
  std::vector<Tensor> kept;
  Tensor h = x;
  const size_t last = static_cast<size_t>(spec.n_main) - 1;
  for (size_t i = 0; i < last; ++i) {
    h = conv(i, h, std::nullopt, true);
    if (keep) kept.push_back(h);
  }
  const Tensor identity = spec.has_ds ? conv(last + 1, x, std::nullopt, false) : x;
  if (keep && spec.has_ds) kept.push_back(identity);
  kept.push_back(conv(last, h, identity, true));
  return kept;
}

namespace api {
std::tuple<Tensor, Tensor> conv_stats(const Tensor& input, const Tensor& weight,
                                     const OptT& pre_scale, const OptT& pre_shift, bool pre_relu,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups, Scratch& scratch,
                                     PendingSums* defer) {
  if (defer) *defer = {};
  auto [out, stats, unused] = conv_stats_impl(input, weight, pre_scale, pre_shift, pre_relu,
                                              stride, padding, dilation, groups, &scratch, defer);
  return {out, stats};
}
std::tuple<Tensor, Tensor> conv_bwd(const Tensor& grad_out, const Tensor& input,
                                    const Tensor& weight, const OptT& pre_scale,
                                    const OptT& pre_shift, bool pre_relu, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups, std::array<bool, 2> output_mask,
                                    Scratch& scratch) {
  return conv_bwd_impl(grad_out, input, weight, pre_scale, pre_shift, pre_relu, stride, padding,
                       dilation, groups, output_mask, &scratch);
}
}  // namespace api

}  // namespace cuda
}  // namespace fastres

FR_TORCH_LIBRARY_IMPL(FR_OPS_NAMESPACE, FR_DISPATCH_KEY, m) {
  m.impl("conv_bias_act", &fastres::cuda::conv_bias_act_cuda);
  m.impl("conv_stats", &fastres::cuda::conv_stats_cuda);
  m.impl("conv_bwd", &fastres::cuda::conv_bwd_cuda);
}
