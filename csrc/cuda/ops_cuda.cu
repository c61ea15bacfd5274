// The CUDA implementations of the fastres ops (schemas: csrc/ops.cpp; semantics:
// fastres/reference.py; output shapes, dtypes and memory formats: fastres/_meta.py).
//
// Each launcher checks every input (device, dtype, rank, shape), brings activations to dense
// NHWC with a 16-byte-aligned base (a copy only when they are not already), weights to KRSC,
// per-channel vectors to contiguous float32, fills the plain parameter struct of kernels.h and
// launches on the current stream under a device guard; every launch is checked. Outputs are
// allocated in the memory format the fake kernels report; when that is not NHWC the kernel
// writes an NHWC buffer that is copied into it.
//
// Only ATen core / c10 headers here (no torch/extension.h, no ATen/cuda/CUDAContext.h): this
// file compiles in ~30 s instead of ~100 s.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels.h"

// The device these launchers serve and where they register: CUDA tensors in torch.ops.fastres,
// or, under cudasim (csrc/cuda/cudasim/tu_ops.cpp), CPU tensors in torch.ops.fastres_cudasim:
// the same launchers and kernels executed on the CPU.
#ifndef FR_DISPATCH_KEY
#define FR_DEVICE_IS(x) (x).is_cuda()
#define FR_DISPATCH_KEY CUDA
#define FR_OPS_NAMESPACE fastres
#endif
#define FR_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

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

using at::Tensor;
using MF = at::MemoryFormat;
using OptTensor = std::optional<Tensor>;

// ---- checks (flash-attention style: the message names the tensor and the offending sizes) ----
#define CHECK_CUDA(x)                                                                   \
  TORCH_CHECK(FR_DEVICE_IS(x), "fastres CUDA: " #x " must be a CUDA tensor, got device ", \
              (x).device())
#define CHECK_SAME_DEVICE(x, ref)                                                          \
  TORCH_CHECK((x).device() == (ref).device(), "fastres CUDA: " #x " is on ", (x).device(), \
              " but " #ref " is on ", (ref).device())
#define CHECK_DIM(x, d) \
  TORCH_CHECK((x).dim() == (d), "fastres CUDA: " #x " must be " #d "-D, got shape ", (x).sizes())
#define CHECK_SHAPE(x, ...)                                                 \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}),                \
              "fastres CUDA: " #x " must have shape (" #__VA_ARGS__ ") = ", \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_DTYPE(x, ref)                                                                \
  TORCH_CHECK((x).scalar_type() == (ref).scalar_type(), "fastres CUDA: " #x " has dtype ", \
              (x).scalar_type(), " but " #ref " has ", (ref).scalar_type())

DType to_dtype(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastres CUDA ", op,
                  ": activations must be float32, float16 or bfloat16, got ", t.scalar_type(),
                  " (float64 runs on the cpu and reference backends)");
  }
  return DType::kFloat32;  // not reached
}

bool aligned16(const Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// The memory format the fakes give an output "like" t (fastres/_meta.py::_like_format).
MF like_format(const Tensor& t) {
  return (t.dim() == 4 && t.is_contiguous(MF::ChannelsLast) && !t.is_contiguous())
             ? MF::ChannelsLast
             : MF::Contiguous;
}

// t as dense NHWC (4-D; KRSC for weights) with a 16-byte-aligned base; copies only if needed.
Tensor nhwc(const Tensor& t) {
  if (t.is_contiguous(MF::ChannelsLast) && aligned16(t)) return t;
  Tensor r = at::empty(t.sizes(), t.options().memory_format(MF::ChannelsLast));
  r.copy_(t);
  return r;
}

// A per-channel vector of n elements as contiguous, aligned float32 on ref's device.
Tensor chan_vec(const Tensor& v, int64_t n, const char* name, const Tensor& ref) {
  TORCH_CHECK(v.device() == ref.device(), "fastres CUDA: ", name, " is on ", v.device(),
              " but the activations are on ", ref.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "fastres CUDA: ", name, " must be a vector of ", n,
              " elements (one per channel), got shape ", v.sizes());
  TORCH_CHECK(at::isFloatingType(v.scalar_type()), "fastres CUDA: ", name,
              " must be floating point, got ", v.scalar_type());
  if (v.scalar_type() == at::kFloat && v.is_contiguous() && aligned16(v)) return v;
  Tensor r = at::empty({n}, v.options().dtype(at::kFloat));
  r.copy_(v);
  return r;
}

// chan_vec of an optional vector; undefined when absent.
Tensor opt_chan_vec(const OptTensor& v, int64_t n, const char* name, const Tensor& ref) {
  return v.has_value() ? chan_vec(*v, n, name, ref) : Tensor();
}

// Output in `fmt` (what the fake returns) plus the NHWC buffer the kernel writes.
struct NhwcOut {
  Tensor ret;
  Tensor buf;
  void finish() {
    if (!buf.is_same(ret)) ret.copy_(buf);
  }
};
NhwcOut nhwc_out(at::IntArrayRef sizes, const at::TensorOptions& opts, MF fmt) {
  NhwcOut o;
  o.ret = at::empty(sizes, opts.memory_format(fmt));
  o.buf = o.ret.is_contiguous(MF::ChannelsLast)
              ? o.ret
              : at::empty(sizes, opts.memory_format(MF::ChannelsLast));
  return o;
}
// The output "like" t: t's shape, dtype, device and the format the fakes give it.
NhwcOut nhwc_out_like(const Tensor& t) { return nhwc_out(t.sizes(), t.options(), like_format(t)); }

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

int num_sms(const Tensor& t) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()));
  return n > 0 ? n : 1;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// fp32 convolutions follow cuDNN's TF32 switch (torch.backends.cudnn.allow_tf32).
Math conv_math(DType dt) {
  if (dt != DType::kFloat32) return Math::kMma16;
  return at::globalContext().allowTF32CuDNN() ? Math::kTf32 : Math::kSimt;
}

constexpr int64_t kMaxRows = (1LL << 31) - 1024;  // GEMM rows (pixels) are int32 in the kernels

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

const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The operands and GEMM shape of an implicit-GEMM launch, read from the NHWC tensors the kernel
// uses: x (N, XC, XH, XW) gathered, w, out (N, OC, OH, OW) written; M = N * OH * OW rows. The
// forward passes (input, weight, output), dgrad (grad_out, the transposed weight, grad_input).
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
                          bool relu) {
  const ConvGeom g = conv_geom(input, weight, stride, padding, dilation, groups, "conv_bias_act");
  c10::cuda::CUDAGuard guard(input.device());
  const DType dt = to_dtype(input, "conv_bias_act");
  const Tensor b = opt_chan_vec(bias, g.K, "bias", input);
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
  p.residual = res.defined() ? res.data_ptr() : nullptr;
  p.has_bias = b.defined();
  p.has_residual = res.defined();
  p.relu = relu;
  C10_CUDA_CHECK(launch_conv(p, dt, conv_math(dt), stream()));
  out.finish();
  return out.ret;
}

// ---------------------------------------------------------------------------------------------
// relu_bias_bwd and the BatchNorm backward family (one reduction + elementwise pipeline)
// ---------------------------------------------------------------------------------------------
// Plans the reduction, allocates its per-chunk partial sums and runs `launch`:
// launch_channel_bwd (reduction, then elementwise pass) or launch_channel_reduce (reduction only).
using ChannelLaunch = cudaError_t (*)(const ChannelBwdParams&, DType, cudaStream_t);
void run_channel(ChannelBwdParams& p, DType dt, const Tensor& ref, ChannelLaunch launch) {
  const int64_t n = plan_channel_bwd(p, dt, num_sms(ref));
  Tensor partial = at::empty({n}, ref.options().dtype(at::kDouble));
  p.partial = partial.data_ptr<double>();
  C10_CUDA_CHECK(launch(p, dt, stream()));
}

// The per-channel sums of a BatchNorm backward, zero-initialised (an empty batch sums to zero):
// sum g, sum g*xhat and, with a BN'd residual, the residual's sum g*xhat (else empty). `launch`
// runs the reduction alone (the _reduce ops) or the reduction and the elementwise pass.
struct ChannelSums {
  Tensor g, gx, gxr;
};

ChannelSums run_sums(ChannelBwdParams& p, DType dt, bool empty, int64_t C, bool res,
                     const at::TensorOptions& fopts, const Tensor& ref, ChannelLaunch launch) {
  ChannelSums s{at::zeros({C}, fopts), at::zeros({C}, fopts),
                res ? at::zeros({C}, fopts) : at::empty({0}, fopts)};
  if (!empty) {
    p.sum_g = s.g.data_ptr<float>();
    p.sum_gx = s.gx.data_ptr<float>();
    p.sum_gxr = res ? s.gxr.data_ptr<float>() : nullptr;
    p.nsum = res ? 3 : 2;
    run_channel(p, dt, ref, launch);
  }
  return s;
}

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

void check_stat(const Tensor& t, int64_t C, const char* name, const Tensor& ref) {
  CHECK_CUDA(t);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastres CUDA: ", name,
              " must be float32 (the accumulation dtype), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device() && t.dim() == 1 && t.size(0) == C, "fastres CUDA: ", name,
              " must be a vector of ", C, " on ", ref.device(), ", got shape ", t.sizes(), " on ",
              t.device());
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
  void grads(ChannelBwdParams& p, const Tensor& grad_out, const Tensor& input,
             const OptTensor& res_input, const Tensor& w, const Tensor& wr) {
    gi = nhwc_out_like(input);
    gr = nhwc_out_like(bn_res ? *res_input : grad_out);
    if (empty) return;
    p.weight = fptr(w);
    p.grad_input = gi.buf.data_ptr();
    p.grad_res = gr.buf.data_ptr();
    if (bn_res) p.weight_r = fptr(wr);
    p.kind = bn_res ? BwdKind::kBnBn : BwdKind::kBnId;
  }
  void finish() {
    gi.finish();
    gr.finish();
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd_cuda(
    const Tensor& grad_out, const OptTensor& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const OptTensor& weight, const OptTensor& res_input,
    const OptTensor& res_mean, const OptTensor& res_invstd, const OptTensor& res_weight) {
  ChannelBwdParams p{};
  AddReluBwdIn a;
  a.init("bn_add_relu_bwd", p, grad_out, out, input, mean, invstd, res_input, res_mean, res_invstd);
  const int64_t C = a.C;
  const bool bn_res = a.bn_res;
  const at::TensorOptions fopts = mean.options();
  const Tensor w = opt_chan_vec(weight, C, "weight", input);
  const Tensor wr = bn_res ? opt_chan_vec(res_weight, C, "res_weight", input) : Tensor();
  a.grads(p, grad_out, input, res_input, w, wr);
  const ChannelSums s = run_sums(p, a.dt, a.empty, C, bn_res, fopts, grad_out, launch_channel_bwd);
  if (!a.empty) {
    a.finish();
  }
  // the residual branch sees the same g: its grad_bias is sum(g) (a distinct tensor: outputs
  // must not alias)
  Tensor grb = bn_res ? s.g.clone() : at::empty({0}, fopts);
  return {a.gi.ret, s.gx, s.g, a.gr.ret, s.gxr, grb};
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
  return {s.g, s.gx, s.gxr};
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
  const Tensor w = opt_chan_vec(weight, C, "weight", input);
  const Tensor mg = chan_vec(mean_g, C, "mean_g", input);
  const Tensor mgx = chan_vec(mean_g_xhat, C, "mean_g_xhat", input);
  Tensor wr, mgxr;
  if (bn_res) {
    wr = opt_chan_vec(res_weight, C, "res_weight", input);
    mgxr = chan_vec(*res_mean_g_xhat, C, "res_mean_g_xhat", input);
  }
  a.grads(p, grad_out, input, res_input, w, wr);
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
  void grad(ChannelBwdParams& p, const Tensor& input, const Tensor& w) {
    gi = nhwc_out_like(input);
    if (empty) return;
    p.weight = fptr(w);
    p.grad_input = gi.buf.data_ptr();
    p.kind = BwdKind::kBn;
  }
};

std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd_cuda(const Tensor& grad_out, const Tensor& input,
                                                    const Tensor& mean, const Tensor& invstd,
                                                    const OptTensor& weight, const Tensor& scale,
                                                    const Tensor& shift, bool relu) {
  ChannelBwdParams p{};
  ReluBwdIn a;
  a.init("bn_relu_bwd", p, grad_out, input, mean, invstd, scale, shift, relu);
  const at::TensorOptions fopts = mean.options();
  // Held until the launches are done: p.weight points into it (a temporary here was freed before
  // the kernel read it whenever the weight was not already float32, e.g. a bf16 model's BN
  // weight: the H200's bf16 grad.input errors of 1e5-1e8, found by cudasim).
  const Tensor w = opt_chan_vec(weight, a.C, "weight", input);
  a.grad(p, input, w);
  const ChannelSums s = run_sums(p, a.dt, a.empty, a.C, false, fopts, grad_out, launch_channel_bwd);
  if (!a.empty) {
    a.gi.finish();
  }
  return {a.gi.ret, s.gx, s.g};
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
  const Tensor w = opt_chan_vec(weight, a.C, "weight", input);
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

// ---------------------------------------------------------------------------------------------
// conv_stats
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> conv_stats_cuda(const Tensor& input, const Tensor& weight,
                                                   const OptTensor& pre_scale,
                                                   const OptTensor& pre_shift, bool pre_relu,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups) {
  const ConvGeom g = conv_geom(input, weight, stride, padding, dilation, groups, "conv_stats");
  c10::cuda::CUDAGuard guard(input.device());
  const DType dt = to_dtype(input, "conv_stats");
  const Tensor sc = opt_chan_vec(pre_scale, g.C, "pre_scale", input);
  const Tensor sh = opt_chan_vec(pre_shift, g.C, "pre_shift", input);
  NhwcOut out = nhwc_out({g.N, g.K, g.P, g.Q}, input.options(), like_format(input));
  const at::TensorOptions fopts = input.options().dtype(at::kFloat);
  Tensor sum = at::empty({g.K}, fopts);
  Tensor sumsq = at::empty({g.K}, fopts);
  if (out.ret.numel() == 0) {
    sum.zero_();
    sumsq.zero_();
    return {out.ret, sum, sumsq};
  }
  check_sm80(input, "conv_stats");
  const FwdOperands o = fwd_operands(input, weight, g, dt, sc, sh);
  const Math math = conv_math(dt);
  const int64_t M = g.N * g.P * g.Q;
  const int64_t m_tiles = (M + conv_block_m(math) - 1) / conv_block_m(math);
  Tensor partial = at::empty({2, m_tiles, g.K}, fopts.dtype(at::kDouble));

  ConvParams p{};
  fill_conv_io(p, o.x, o.w, out.buf, g);
  p.pre_scale = fptr(o.scale);
  p.pre_shift = fptr(o.shift);
  p.stats_partial = partial.data_ptr<double>();
  p.m_tiles = static_cast<int>(m_tiles);
  p.prologue = sc.defined() || sh.defined() || pre_relu;
  p.pre_relu = pre_relu;
  p.stats = true;
  C10_CUDA_CHECK(launch_conv(p, dt, math, stream()));

  ColSumParams cp{};
  cp.partial = partial.data_ptr<double>();
  cp.out[0] = sum.data_ptr<float>();
  cp.out[1] = sumsq.data_ptr<float>();
  cp.nsum = 2;
  cp.T = static_cast<int>(m_tiles);
  cp.C = static_cast<int>(g.K);
  C10_CUDA_CHECK(launch_colsum(cp, stream()));
  out.finish();
  return {out.ret, sum, sumsq};
}

// ---------------------------------------------------------------------------------------------
// bn_finalize, bn_finalize_count: one kernel; the count is an integer argument, or a one-element
// tensor read on the device (the all-reduced count of SyncBatchNorm: no host sync).
// ---------------------------------------------------------------------------------------------
// count_t: the count tensor, already checked and float32 on sum's device; undefined for `count`.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_impl(
    const Tensor& sum, const Tensor& sumsq, const Tensor& count_t, int64_t count,
    const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked,
    std::optional<double> momentum, double eps) {
  const int64_t C = sum.size(0);
  const bool has_running = running_mean.has_value() || running_var.has_value();
  TORCH_CHECK_VALUE(!has_running || momentum.has_value() || num_batches_tracked.has_value(),
                    "momentum=None (cumulative average) needs num_batches_tracked");
  c10::cuda::CUDAGuard guard(sum.device());
  const Tensor w = opt_chan_vec(weight, C, "weight", sum);
  const Tensor b = opt_chan_vec(bias, C, "bias", sum);
  // Running stats are updated in place; a float32 working copy when they are stored otherwise.
  const Tensor rm = opt_chan_vec(running_mean, C, "running_mean", sum);
  const Tensor rv = opt_chan_vec(running_var, C, "running_var", sum);
  int64_t* nbt = nullptr;
  if (num_batches_tracked.has_value()) {
    const Tensor& t = *num_batches_tracked;
    TORCH_CHECK(t.device() == sum.device() && t.scalar_type() == at::kLong && t.numel() == 1,
                "fastres CUDA: num_batches_tracked must be one int64 on ", sum.device(), ", got ",
                t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
    nbt = t.data_ptr<int64_t>();
  }
  Tensor mean = at::empty({C}, sum.options());
  Tensor invstd = at::empty({C}, sum.options());
  Tensor scale = at::empty({C}, sum.options());
  Tensor shift = at::empty({C}, sum.options());
  // The kernel reads sum/sumsq as dense float arrays: a strided view (e.g. a column of a stacked
  // all-reduce buffer) is made dense first, never read through its raw pointer.
  const Tensor s = chan_vec(sum, C, "sum", sum);
  const Tensor ss = chan_vec(sumsq, C, "sumsq", sum);
  BnFinalizeParams p{};
  p.sum = s.data_ptr<float>();
  p.sumsq = ss.data_ptr<float>();
  p.weight = fptr(w);
  p.bias = fptr(b);
  p.running_mean = rm.defined() ? rm.data_ptr<float>() : nullptr;
  p.running_var = rv.defined() ? rv.data_ptr<float>() : nullptr;
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
  C10_CUDA_CHECK(launch_bn_finalize(p, stream()));
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

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_cuda(
    const Tensor& sum, const Tensor& sumsq, const OptTensor& weight, const OptTensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var,
    const OptTensor& num_batches_tracked, int64_t count, std::optional<double> momentum,
    double eps) {
  check_sums(sum, sumsq);
  TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got ", count,
                    " values");
  return bn_finalize_impl(sum, sumsq, Tensor(), count, weight, bias, running_mean, running_var,
                          num_batches_tracked, momentum, eps);
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

// ---------------------------------------------------------------------------------------------
// conv_bwd: dgrad (implicit GEMM over grad_out with (C, R, S, K) weights) and wgrad.
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> conv_bwd_cuda(const Tensor& grad_out, const Tensor& input,
                                         const Tensor& weight, const OptTensor& pre_scale,
                                         const OptTensor& pre_shift, bool pre_relu,
                                         at::IntArrayRef stride, at::IntArrayRef padding,
                                         at::IntArrayRef dilation, int64_t groups,
                                         std::array<bool, 2> output_mask) {
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
      // with h = p * stride - pad + r * dil: the gather form with weights as (C, R, S, Kp).
      Tensor wk = weight;
      if (Kp != g.K) wk = pad_dim(weight, 0, Kp, MF::Contiguous);
      Tensor wt = wk.permute({1, 2, 3, 0}).contiguous();
      if (!aligned16(wt)) wt = wt.clone();
      ConvParams p{};
      fill_conv_io(p, go, wt, o.buf, g);
      p.dgrad = true;
      C10_CUDA_CHECK(launch_conv(p, dt, conv_math(dt), stream()));
      o.finish();
    }
    grad_input = o.ret;
  } else {
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
      Tensor ws = at::empty({ws_n}, input.options().dtype(at::kFloat));
      p.ws = ws.data_ptr<float>();
      C10_CUDA_CHECK(launch_wgrad(p, dt, stream()));
      if (!direct) grad_weight.copy_(dw.narrow(0, 0, g.K).narrow(1, 0, g.C));
    }
  } else {
    grad_weight = at::empty({0}, weight.options());
  }
  return {grad_input, grad_weight};
}

}  // namespace
}  // namespace cuda
}  // namespace fastres

FR_TORCH_LIBRARY_IMPL(FR_OPS_NAMESPACE, FR_DISPATCH_KEY, m) {
  m.impl("conv_bias_act", &fastres::cuda::conv_bias_act_cuda);
  m.impl("relu_bias_bwd", &fastres::cuda::relu_bias_bwd_cuda);
  m.impl("conv_stats", &fastres::cuda::conv_stats_cuda);
  m.impl("bn_finalize", &fastres::cuda::bn_finalize_cuda);
  m.impl("bn_add_relu", &fastres::cuda::bn_add_relu_cuda);
  m.impl("bn_add_relu_bwd", &fastres::cuda::bn_add_relu_bwd_cuda);
  m.impl("bn_relu_bwd", &fastres::cuda::bn_relu_bwd_cuda);
  m.impl("bn_finalize_count", &fastres::cuda::bn_finalize_count_cuda);
  m.impl("bn_add_relu_bwd_reduce", &fastres::cuda::bn_add_relu_bwd_reduce_cuda);
  m.impl("bn_add_relu_bwd_elemt", &fastres::cuda::bn_add_relu_bwd_elemt_cuda);
  m.impl("bn_relu_bwd_reduce", &fastres::cuda::bn_relu_bwd_reduce_cuda);
  m.impl("bn_relu_bwd_elemt", &fastres::cuda::bn_relu_bwd_elemt_cuda);
  m.impl("conv_bwd", &fastres::cuda::conv_bwd_cuda);
}
