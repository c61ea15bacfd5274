// The training backward's convolutions on fastres' own oneDNN primitives (dnnl_conv.h): grad_input
// (backward data) and grad_weight (backward weights), each by a primitive made once per shape,
// dtype and thread count and kept, as the forward's are (dnnl_conv.cpp).
//
// Why: ATen's convolution_backward builds its oneDNN descriptors on every call and returns fresh
// outputs, which glibc serves with new page-faulted mappings above its mmap threshold; here the
// grad_input goes into the activation pool (empty_act). The weight changes every step, so it is
// reordered into the backward-data primitive's layout on every call (as ATen does); grad_weight is
// computed in float32 in the primitive's layout and reordered into the weight's own dtype and
// strides (one rounding, round to nearest even, for bfloat16).

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dnnl_conv.h"
#include "dnnl_internal.h"
#include "ops_common.h"

namespace fastres::cpu {

std::atomic<bool>& aten_spatial_bwd_data() {
  static std::atomic<bool> on{true};
  return on;
}

#ifdef FASTRES_HAVE_DNNL

namespace {

using dnnl::memory;
using dt = memory::data_type;

enum class Kind : int64_t { kData = 2, kWeights = 3 };  // key tags (the forward's keys have none)

struct BwdPrimitive {
  bool ok = false;  // false: no optimized implementation (remembered; ATen's path serves)
  dnnl::primitive prim;
  memory::desc weights_md;  // backward data: the weights it reads; backward weights: what it writes
  memory::desc scratch_md;
  std::string impl;
  std::mutex mu;  // guards reorders
  // backward data: user weight (strides) -> weights_md; backward weights: weights_md -> the
  // grad_weight's (dtype, strides)
  std::map<std::vector<int64_t>, dnnl::reorder> reorders;
};

PrimitiveCache<BwdPrimitive>& cache() {
  static auto* c = new PrimitiveCache<BwdPrimitive>();  // leaked: used until exit
  return *c;
}

// Whether the call is one the primitives cover: float32 or bfloat16 throughout, groups 1,
// activations dense channels_last from their first element, 4-D, non-empty.
bool covered(const at::Tensor& act, const at::Tensor& grad_out, const at::Tensor& weight,
             int64_t groups) {
  const auto dtype = act.scalar_type();
  return dnnl_enabled() && groups == 1 && (dtype == at::kFloat || dtype == at::kBFloat16) &&
         grad_out.scalar_type() == dtype && weight.scalar_type() == dtype && act.dim() == 4 &&
         weight.dim() == 4 && act.numel() > 0 && grad_out.numel() > 0 &&
         nhwc_dense(act) && nhwc_dense(grad_out) &&
         act.storage_offset() == 0 && grad_out.storage_offset() == 0;
}

std::vector<int64_t> key_of(Kind kind, at::IntArrayRef act_sizes, const at::Tensor& weight,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation) {
  std::vector<int64_t> key = {static_cast<int64_t>(kind)};
  key.reserve(32);
  for (auto list : {act_sizes, weight.sizes(), stride, padding, dilation}) {
    key.insert(key.end(), list.begin(), list.end());
  }
  key.push_back(static_cast<int64_t>(weight.scalar_type()));
  key.push_back(at::get_num_threads());
  return key;
}

// Whether ATen's path computes this weight's float32 backward data instead: a spatial kernel
// (3x3). For it oneDNN 2.6 has only its direct kernel (jit:avx512_core), while ATen's oneDNN 3.x
// runs it as a brgemm forward convolution over the flipped weights. ResNet-50's training
// convolutions at N=8, 2 threads, both paths alternating in one process (bench/own_primitives.py
// --cases train_convs, Xeon): backward data summed per step 418.8 ms on the own primitives against
// 371.4 on ATen's path, all of it the 3x3s (11.1-15.8 ms per call against 7.4-15.8), the 1x1s
// alike. bfloat16 keeps the own primitive (on that Xeon both pick the same jit_bf16 kernel).
bool aten_backward_data(const at::Tensor& weight) {
  return aten_spatial_bwd_data().load(std::memory_order_relaxed) &&
         weight.scalar_type() == at::kFloat &&
         (weight.size(2) > 1 || weight.size(3) > 1);
}

// The forward training primitive descriptor both backward descriptors take as their hint.
dnnl::convolution_forward::primitive_desc forward_hint(const memory::desc& src,
                                                       const memory::desc& wei,
                                                       const memory::desc& dst,
                                                       const memory::dims& st,
                                                       const memory::dims& dil,
                                                       const memory::dims& pad) {
  dnnl::convolution_forward::desc fd(dnnl::prop_kind::forward_training,
                                     dnnl::algorithm::convolution_direct, src, wei, dst, st, dil,
                                     pad, pad);
  return dnnl::convolution_forward::primitive_desc(fd, dnnl_engine());
}

std::shared_ptr<BwdPrimitive> make(Kind kind, at::IntArrayRef act_sizes,
                                   at::IntArrayRef out_sizes, const at::Tensor& weight,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation) {
  auto p = std::make_shared<BwdPrimitive>();
  const dt d = dnnl_dtype(weight.scalar_type());
  const memory::desc act(dims_of(act_sizes), d, memory::format_tag::nhwc);
  const memory::desc dst(dims_of(out_sizes), d, memory::format_tag::nhwc);
  memory::dims dil;
  for (int64_t v : dilation) dil.push_back(v - 1);  // oneDNN counts the gaps
  const memory::dims st = dims_of(stride), pad = dims_of(padding);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // torch's allocator, thread-safe
  // The primitive, the weights' layout it reads (data) or writes (weights), its scratchpad.
  auto keep = [&](dnnl::primitive prim, const auto& pd, const memory::desc& weights_md) {
    p->prim = std::move(prim);
    p->weights_md = weights_md;
    p->scratch_md = pd.scratchpad_desc();
    p->impl = pd.impl_info_str();
  };
  try {
    const auto hint = forward_hint(act, memory::desc(dims_of(weight.sizes()), d,
                                                     memory::format_tag::any),
                                   dst, st, dil, pad);
    if (kind == Kind::kData) {
      const memory::desc wei(dims_of(weight.sizes()), d, memory::format_tag::any);
      dnnl::convolution_backward_data::desc bd(dnnl::algorithm::convolution_direct, act, wei,
                                               dst, st, dil, pad, pad);
      dnnl::convolution_backward_data::primitive_desc pd(bd, attr, dnnl_engine(), hint);
      keep(dnnl::convolution_backward_data(pd), pd, pd.weights_desc());
    } else {
      // grad_weight accumulated and written in float32, then reordered into the weight's dtype
      const memory::desc wei(dims_of(weight.sizes()), dt::f32, memory::format_tag::any);
      dnnl::convolution_backward_weights::desc bw(dnnl::algorithm::convolution_direct, act, wei,
                                                  dst, st, dil, pad, pad);
      dnnl::convolution_backward_weights::primitive_desc pd(bw, attr, dnnl_engine(), hint);
      keep(dnnl::convolution_backward_weights(pd), pd, pd.diff_weights_desc());
    }
  } catch (const dnnl::error&) {
    return p;  // no implementation for this case: ATen's path
  }
  if (p->impl.rfind("ref", 0) == 0) {
    return p;  // oneDNN's reference loops: far slower than ATen's path
  }
  p->ok = true;
  ++g_created;
  return p;
}

std::shared_ptr<BwdPrimitive> lookup(Kind kind, at::IntArrayRef act_sizes,
                                     at::IntArrayRef out_sizes, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation) {
  return cache().get(key_of(kind, act_sizes, weight, stride, padding, dilation), [&] {
    return make(kind, act_sizes, out_sizes, weight, stride, padding, dilation);
  });
}

// The reorder between the user's tensor t (its dtype and strides) and p's weights_md, made once
// per strides and kept; to_user: from weights_md into t.
dnnl::reorder weight_reorder(BwdPrimitive& p, const at::Tensor& t, bool to_user) {
  std::vector<int64_t> k(t.strides().begin(), t.strides().end());
  k.push_back(static_cast<int64_t>(t.scalar_type()));
  std::lock_guard<std::mutex> lock(p.mu);
  auto it = p.reorders.find(k);
  if (it == p.reorders.end()) {
    const memory::desc user(dims_of(t.sizes()), dnnl_dtype(t.scalar_type()),
                            dims_of(t.strides()));
    auto pd = to_user ? dnnl::reorder::primitive_desc(dnnl_engine(), p.weights_md, dnnl_engine(),
                                                      user)
                      : dnnl::reorder::primitive_desc(dnnl_engine(), user, dnnl_engine(),
                                                      p.weights_md);
    it = p.reorders.emplace(std::move(k), dnnl::reorder(pd)).first;
  }
  return it->second;
}

at::Tensor bytes(size_t n, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(n)}, like.options().dtype(at::kByte));
}

void run(BwdPrimitive& p, std::unordered_map<int, memory> args, const at::Tensor& like) {
  at::Tensor scratch;
  if (p.scratch_md.get_size() > 0) {
    scratch = bytes(p.scratch_md.get_size(), like);
    args.emplace(DNNL_ARG_SCRATCHPAD, memory(p.scratch_md, dnnl_engine(), scratch.data_ptr()));
  }
  thread_local dnnl::stream s(dnnl_engine());
  p.prim.execute(s, args);
  s.wait();
}

}  // namespace

bool dnnl_conv_bwd_data(const at::Tensor& grad_out, const at::Tensor& weight,
                        const at::Tensor& grad_input, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!covered(grad_input, grad_out, weight, groups) || grad_input.is_alias_of(grad_out) ||
      grad_input.is_alias_of(weight) || aten_backward_data(weight)) {
    return false;
  }
  auto p = lookup(Kind::kData, grad_input.sizes(), grad_out.sizes(), weight, stride, padding,
                  dilation);
  if (!p->ok) {
    return false;
  }
  const dnnl::reorder r = weight_reorder(*p, weight, false);
  at::Tensor packed = bytes(p->weights_md.get_size(), weight);
  {
    const memory::desc user(dims_of(weight.sizes()), dnnl_dtype(weight.scalar_type()),
                            dims_of(weight.strides()));
    memory src(user, dnnl_engine(), weight.data_ptr());
    memory dst(p->weights_md, dnnl_engine(), packed.data_ptr());
    dnnl::stream s(dnnl_engine());
    r.execute(s, src, dst);
    s.wait();
    ++g_reorders;
  }
  const dt d = dnnl_dtype(weight.scalar_type());
  const memory::desc gi(dims_of(grad_input.sizes()), d, memory::format_tag::nhwc);
  const memory::desc go(dims_of(grad_out.sizes()), d, memory::format_tag::nhwc);
  run(*p,
      {{DNNL_ARG_DIFF_DST, memory(go, dnnl_engine(), grad_out.data_ptr())},
       {DNNL_ARG_WEIGHTS, memory(p->weights_md, dnnl_engine(), packed.data_ptr())},
       {DNNL_ARG_DIFF_SRC, memory(gi, dnnl_engine(), grad_input.data_ptr())}},
      grad_out);
  return true;
}

bool dnnl_conv_bwd_weights(const at::Tensor& input, const at::Tensor& grad_out,
                           const at::Tensor& grad_weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!covered(input, grad_out, grad_weight, groups) ||
      !grad_weight.is_non_overlapping_and_dense()) {
    return false;
  }
  auto p = lookup(Kind::kWeights, input.sizes(), grad_out.sizes(), grad_weight, stride, padding,
                  dilation);
  if (!p->ok) {
    return false;
  }
  at::Tensor acc = bytes(p->weights_md.get_size(), grad_out);
  const dt d = dnnl_dtype(input.scalar_type());
  const memory::desc src(dims_of(input.sizes()), d, memory::format_tag::nhwc);
  const memory::desc go(dims_of(grad_out.sizes()), d, memory::format_tag::nhwc);
  run(*p,
      {{DNNL_ARG_SRC, memory(src, dnnl_engine(), input.data_ptr())},
       {DNNL_ARG_DIFF_DST, memory(go, dnnl_engine(), grad_out.data_ptr())},
       {DNNL_ARG_DIFF_WEIGHTS, memory(p->weights_md, dnnl_engine(), acc.data_ptr())}},
      grad_out);
  const dnnl::reorder r = weight_reorder(*p, grad_weight, true);
  const memory::desc user(dims_of(grad_weight.sizes()), dnnl_dtype(grad_weight.scalar_type()),
                          dims_of(grad_weight.strides()));
  memory from(p->weights_md, dnnl_engine(), acc.data_ptr());
  memory to(user, dnnl_engine(), grad_weight.data_ptr());
  dnnl::stream s(dnnl_engine());
  r.execute(s, from, to);
  s.wait();
  return true;
}

#else  // no oneDNN headers at build time: ATen's convolution_backward serves every call

bool dnnl_conv_bwd_data(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                        at::IntArrayRef, at::IntArrayRef, int64_t) {
  return false;
}

bool dnnl_conv_bwd_weights(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t) {
  return false;
}

#endif

}  // namespace fastres::cpu
