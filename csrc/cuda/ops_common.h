// What the ATen launchers of the fastres ops share: ops_conv.cu (the convolutions) and ops_bn.cu
// (BatchNorm and the per-channel reductions) each launch their kernels and register their ops with
// the helpers here: the device they serve, the input checks and the layout helpers. Schemas:
// fastres/_opset.py; semantics: fastres/reference.py; output shapes, dtypes and memory formats:
// fastres/_meta.py.
//
// Each launcher checks every input (device, dtype, rank, shape), brings activations to dense
// NHWC with a 16-byte-aligned base (a copy only when they are not already), weights to KRSC,
// computed per-channel vectors to contiguous float32 (a model's BatchNorm parameters and running
// statistics stay in their dtype: bn_vecs), fills the plain parameter struct of kernels.h and
// launches on the current stream under a device guard; every launch is checked. Outputs are
// allocated in the memory format the fake kernels report; when that is not NHWC the kernel
// writes an NHWC buffer that is copied into it.
//
// Only ATen core / c10 headers here (no torch/extension.h, no ATen/cuda/CUDAContext.h): a
// launcher file compiles in ~30 s instead of ~100 s.
#pragma once

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
// or, under cudasim (csrc/cuda/cudasim/tu_ops.h), CPU tensors in torch.ops.fastres_cudasim:
// the same launchers and kernels executed on the CPU.
#ifndef FR_DISPATCH_KEY
#define FR_DEVICE_IS(x) (x).is_cuda()
#define FR_DISPATCH_KEY CUDA
#define FR_OPS_NAMESPACE fastres
#endif
// TORCH_LIBRARY_IMPL with its arguments macro-expanded first (FR_OPS_NAMESPACE, FR_DISPATCH_KEY).
#define FR_TORCH_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace fastres {
namespace cuda {

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

// A per-channel statistic (mean, invstd, a sum): float32, C elements on ref's device.
inline void check_stat(const Tensor& t, int64_t C, const char* name, const Tensor& ref) {
  CHECK_CUDA(t);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastres CUDA: ", name,
              " must be float32 (the accumulation dtype), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device() && t.dim() == 1 && t.size(0) == C, "fastres CUDA: ", name,
              " must be a vector of ", C, " on ", ref.device(), ", got shape ", t.sizes(), " on ",
              t.device());
}

inline DType to_dtype(const Tensor& t, const char* op) {
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

inline bool aligned16(const Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
}

// The memory format the fakes give an output "like" t (fastres/_meta.py::_like_format).
inline MF like_format(const Tensor& t) {
  return (t.dim() == 4 && t.is_contiguous(MF::ChannelsLast) && !t.is_contiguous())
             ? MF::ChannelsLast
             : MF::Contiguous;
}

// t as dense NHWC (4-D; KRSC for weights) with a 16-byte-aligned base; copies only if needed.
inline Tensor nhwc(const Tensor& t) {
  if (t.is_contiguous(MF::ChannelsLast) && aligned16(t)) return t;
  Tensor r = at::empty(t.sizes(), t.options().memory_format(MF::ChannelsLast));
  r.copy_(t);
  return r;
}

// A per-channel vector of n elements as contiguous, aligned float32 on ref's device.
inline Tensor chan_vec(const Tensor& v, int64_t n, const char* name, const Tensor& ref) {
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
inline Tensor opt_chan_vec(const OptTensor& v, int64_t n, const char* name, const Tensor& ref) {
  return v.has_value() ? chan_vec(*v, n, name, ref) : Tensor();
}

// A BatchNorm's per-channel vectors (weight, bias, running_mean, running_var, or a prefix of
// them; each undefined when absent) as the kernels read them: contiguous, in their own dtype when
// all present ones share one of float32, float16, bfloat16 (a model's parameters and running
// statistics: no per-call conversion, the kernels read and write that dtype), else all converted
// to float32. A vector that had to be made contiguous or converted is a copy (v[i] is not the
// argument): a caller that updates it in place writes it back.
struct BnVecs {
  Tensor v[4];
  DType dtype = DType::kFloat32;
};
inline constexpr const char* kBnVecNames[4] = {"BatchNorm weight", "BatchNorm bias", "bn_mean",
                                               "bn_var"};
inline BnVecs bn_vecs(std::initializer_list<OptTensor> vs, int64_t n, const Tensor& ref,
                      const char* const* names = kBnVecNames) {
  BnVecs r;
  int i = 0;
  std::optional<at::ScalarType> common;
  bool same = true;
  for (const OptTensor& o : vs) {
    if (o.has_value()) {
      const Tensor& v = *o;
      TORCH_CHECK(v.device() == ref.device(), "fastres CUDA: ", names[i], " is on ", v.device(),
                  " but the activations are on ", ref.device());
      TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "fastres CUDA: ", names[i],
                  " must be a vector of ", n, " elements (one per channel), got shape ",
                  v.sizes());
      const auto st = v.scalar_type();
      TORCH_CHECK(at::isFloatingType(st), "fastres CUDA: ", names[i],
                  " must be floating point, got ", st);
      same = same && (!common || *common == st);
      common = st;
      r.v[i] = v.is_contiguous() ? v : v.contiguous();
    }
    ++i;
  }
  const auto st = common.value_or(at::kFloat);
  if (same && (st == at::kFloat || st == at::kHalf || st == at::kBFloat16)) {
    r.dtype = st == at::kFloat ? DType::kFloat32
              : st == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
    return r;
  }
  for (Tensor& v : r.v)
    if (v.defined()) v = v.to(at::kFloat).contiguous();
  return r;
}

// Row i of a contiguous 2-D buffer as a 1-D tensor on the same storage, made without the
// dispatcher (the training unit's statistics rows: unbind's six views cost ~6.5 µs per BatchNorm
// on the CPU proxy, these ~1 µs). Not an autograd view: its own version counter, no _base.
// A dense tensor of `sizes` in buf's storage from element `offset` of buf on (buf contiguous):
// one allocation for several of a unit's small buffers.
inline Tensor carve(const Tensor& buf, int64_t offset, at::IntArrayRef sizes) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(buf.storage()), buf.key_set(),
                                                   buf.dtype());
  impl->set_storage_offset(buf.storage_offset() + offset);
  impl->set_sizes_contiguous(sizes);
  return Tensor(std::move(impl));
}

inline Tensor row_of(const Tensor& buf, int64_t i) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(buf.storage()), buf.key_set(),
                                                   buf.dtype());
  impl->set_storage_offset(buf.storage_offset() + i * buf.size(1));
  impl->set_sizes_contiguous({buf.size(1)});
  return Tensor(std::move(impl));
}

// A per-channel vector the kernels read in its own dtype (BnVecs), or null.
inline const void* vptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Output in `fmt` (what the fake returns) plus the NHWC buffer the kernel writes.
struct NhwcOut {
  Tensor ret;
  Tensor buf;
  void finish() {
    if (!buf.is_same(ret)) ret.copy_(buf);
  }
};
inline NhwcOut nhwc_out(at::IntArrayRef sizes, const at::TensorOptions& opts, MF fmt) {
  NhwcOut o;
  o.ret = at::empty(sizes, opts.memory_format(fmt));
  o.buf = o.ret.is_contiguous(MF::ChannelsLast)
              ? o.ret
              : at::empty(sizes, opts.memory_format(MF::ChannelsLast));
  return o;
}
// The output "like" t: t's shape, dtype, device and the format the fakes give it.
inline NhwcOut nhwc_out_like(const Tensor& t) {
  return nhwc_out(t.sizes(), t.options(), like_format(t));
}

inline int num_sms(const Tensor& t) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device()));
  return n > 0 ? n : 1;
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline const float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

constexpr int64_t kMaxRows = (1LL << 31) - 1024;  // GEMM rows (pixels) are int32 in the kernels

}  // namespace cuda
}  // namespace fastres
