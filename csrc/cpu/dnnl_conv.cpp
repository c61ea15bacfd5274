// fastres' own oneDNN convolution primitives (dnnl_conv.h).
//
// Why: ATen's mkldnn::_convolution_pointwise builds a oneDNN primitive descriptor on every call
// (measured, torch 2.14.1, 2 threads on the 2-core EPYC: 21 us per call of a 1x1 conv + ReLU on
// 1x64x4x4 with a prepacked weight, where eager conv2d + relu_ take 5 us; ~2 ms per ResNet-50
// N=1 call). Here a primitive is made once per (shapes, strides, padding, dtypes, post-op chain,
// thread count) and executed from then on; its weight is reordered once into the layout the
// primitive asks for and kept in the packed-weight cache (weight_cache.h), so it is reordered
// again only when the weight changes (a weight the cache may not keep is reordered per call by a
// kept reorder primitive).
//
// The library is the system's oneDNN (Debian's libdnnl-dev 2.6.3, OpenMP runtime): libtorch
// carries its own oneDNN but exports none of its symbols. Both ask for libgomp.so.1, and the
// dynamic loader maps one library per soname: torch's bundled libgomp.so.1, loaded first with
// torch, serves libdnnl too, so there is one OpenMP thread pool (checked by
// tests/test_dnnl_conv.py through /proc/self/maps). oneDNN sizes its work split for
// omp_get_max_threads() when a primitive is made, so the thread count is part of the key.
//
// NaN: every ReLU-like post-op of oneDNN 2.6 maps NaN to 0 where torch.relu keeps it. Measured
// here (bench/dnnl_nan_probe.cpp, a 1x1 convolution whose pre-activations are NaN, fp32 and bf16,
// brgconv_1x1 on avx512_core / avx512_core_bf16): eltwise relu (alpha 0 and -0.0), clip(0, inf),
// clip_v2(0, inf), binary max with 0, and -min(-x, 0) all give 0; without a post-op the NaN
// stays. So the callers use the ReLU post-op only where the pre-activations are shown finite
// (conv_bias_act_finite) and otherwise run the ReLU as their own pass.

#include "dnnl_conv.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dnnl_internal.h"
#include "ops_common.h"
#include "weight_cache.h"

#ifdef FASTRES_HAVE_DNNL

#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#endif

namespace fastres::cpu {

namespace {

std::atomic<bool>& own_switch() {
  static std::atomic<bool> on = [] {
    const char* env = std::getenv("FASTRES_CPU_OWN_PRIMITIVES");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

}  // namespace

// Counters for the tests and benchmarks: primitives made, calls served by a kept one, weight
// reorders (into the cache or per call); the backward's primitives (dnnl_conv_bwd.cpp) count here
// too.
std::atomic<int64_t> g_created{0}, g_reused{0}, g_reorders{0};

#ifdef FASTRES_HAVE_DNNL

const dnnl::engine& dnnl_engine() {
  static const dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

namespace {

using dnnl::memory;
using dt = memory::data_type;

const dnnl::engine& engine() { return dnnl_engine(); }

struct Primitive {
  bool ok = false;  // false: oneDNN has no implementation (remembered, not asked again)
  uint64_t id = 0;  // unique per primitive made (Bound's key: an address can be reused)
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  memory::desc weights_md;
  // The packed-weight cache's key of this primitive's packing (see dnnl_conv): every byte of
  // weights_md, tagged 1 (this file's packing).
  std::vector<int64_t> wkey;
  bool has_bias = false;
  size_t scratch_bytes = 0;
  std::string impl;
  std::mutex mu;  // guards reorders
  // user weight strides -> the reorder into weights_md
  std::map<std::vector<int64_t>, dnnl::reorder> reorders;
};

std::atomic<uint64_t> g_next_id{1};

// A kept primitive's memory objects and execution arguments on one thread, made on the thread's
// first call of it and reused with this call's data pointers: creating four dnnl::memory objects
// and an argument map per call was part of the ~10 us of C++ around each convolution's kernel.
struct Bound {
  memory src, wei, dst, bias, scratch;
  std::unordered_map<int, memory> args;
};

Bound& bound_for(const Primitive& p) {
  // Keyed by the primitive's id; a thread keeps at most kMaxBound (then starts over).
  constexpr size_t kMaxBound = 2048;
  thread_local std::unordered_map<uint64_t, Bound> bound;
  auto it = bound.find(p.id);
  if (it != bound.end()) return it->second;
  if (bound.size() >= kMaxBound) bound.clear();
  Bound b;
  const auto& pd = p.pd;
  b.src = memory(pd.src_desc(), engine(), DNNL_MEMORY_NONE);
  b.wei = memory(p.weights_md, engine(), DNNL_MEMORY_NONE);
  b.dst = memory(pd.dst_desc(), engine(), DNNL_MEMORY_NONE);
  b.args = {{DNNL_ARG_SRC, b.src}, {DNNL_ARG_WEIGHTS, b.wei}, {DNNL_ARG_DST, b.dst}};
  if (p.has_bias) {
    b.bias = memory(pd.bias_desc(), engine(), DNNL_MEMORY_NONE);
    b.args.emplace(DNNL_ARG_BIAS, b.bias);
  }
  if (p.scratch_bytes > 0) {
    b.scratch = memory(pd.scratchpad_desc(), engine(), DNNL_MEMORY_NONE);
    b.args.emplace(DNNL_ARG_SCRATCHPAD, b.scratch);
  }
  return bound.emplace(p.id, std::move(b)).first->second;
}

PrimitiveCache<Primitive>& cache() {
  static auto* c = new PrimitiveCache<Primitive>();  // leaked: used until exit
  return *c;
}


std::shared_ptr<Primitive> make_primitive(const at::Tensor& input, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const at::Tensor& out, bool accumulate, bool relu,
                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                          at::IntArrayRef dilation) {
  auto p = std::make_shared<Primitive>();
  const dt d = dnnl_dtype(input.scalar_type());
  const memory::desc src(dims_of(input.sizes()), d, memory::format_tag::nhwc);
  const memory::desc dst(dims_of(out.sizes()), d, memory::format_tag::nhwc);
  const memory::desc wei(dims_of(weight.sizes()), d, memory::format_tag::any);
  memory::dims dil;
  for (int64_t v : dilation) dil.push_back(v - 1);  // oneDNN counts the gaps
  const memory::dims st = dims_of(stride), pad = dims_of(padding);
  dnnl::post_ops po;
  if (accumulate) po.append_sum(1.f);
  if (relu) po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(po);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // torch's allocator, thread-safe
  try {
    if (bias.has_value()) {
      const memory::desc b({weight.size(0)}, dnnl_dtype(bias->scalar_type()),
                           memory::format_tag::x);
      dnnl::convolution_forward::desc cd(dnnl::prop_kind::forward_inference,
                                         dnnl::algorithm::convolution_direct, src, wei, b, dst, st,
                                         dil, pad, pad);
      p->pd = dnnl::convolution_forward::primitive_desc(cd, attr, engine());
    } else {
      dnnl::convolution_forward::desc cd(dnnl::prop_kind::forward_inference,
                                         dnnl::algorithm::convolution_direct, src, wei, dst, st,
                                         dil, pad, pad);
      p->pd = dnnl::convolution_forward::primitive_desc(cd, attr, engine());
    }
    p->prim = dnnl::convolution_forward(p->pd);
  } catch (const dnnl::error&) {
    return p;  // no implementation for this case: ATen's path
  }
  p->impl = p->pd.impl_info_str();
  if (p->impl.rfind("ref", 0) == 0) {
    // oneDNN's reference loops (bf16 on a CPU without AVX-512, for one): orders of magnitude
    // slower than ATen's path, which then serves.
    return p;
  }
  p->weights_md = p->pd.weights_desc();
  // A packing is keyed by the layout it is in: every byte of the primitive's weights descriptor
  // (oneDNN picks the blocking per primitive: on an AVX10/AMX Xeon, ResNet-50 layer4's 1x1
  // 512x1024 weight is Acdb64a for a batch of 1 and Acdb48a for 8; served the other one, the
  // convolution reads past the packing, silently wrong).
  const dnnl_memory_desc_t& wmd = p->weights_md.data;
  p->wkey.assign(1 + (sizeof(wmd) + 7) / 8, 0);
  p->wkey[0] = 1;  // 1: this file's packing
  std::memcpy(p->wkey.data() + 1, &wmd, sizeof(wmd));
  p->has_bias = bias.has_value();
  p->scratch_bytes = p->pd.scratchpad_desc().get_size();
  p->id = g_next_id++;
  p->ok = true;
  ++g_created;
  return p;
}

// weight (any strides) reordered into p's layout, into a new byte tensor.
at::Tensor reorder_weight(Primitive& p, const at::Tensor& weight) {
  const std::vector<int64_t> strides(weight.strides().begin(), weight.strides().end());
  dnnl::reorder r;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.reorders.find(strides);
    if (it == p.reorders.end()) {
      const memory::desc user(dims_of(weight.sizes()), dnnl_dtype(weight.scalar_type()),
                              dims_of(weight.strides()));
      it = p.reorders
               .emplace(strides, dnnl::reorder(dnnl::reorder::primitive_desc(
                                     engine(), user, engine(), p.weights_md)))
               .first;
    }
    r = it->second;
  }
  at::Tensor packed = at::empty({static_cast<int64_t>(p.weights_md.get_size())},
                                weight.options().dtype(at::kByte));
  const memory::desc user(dims_of(weight.sizes()), dnnl_dtype(weight.scalar_type()),
                          dims_of(weight.strides()));
  memory src(user, engine(), weight.data_ptr());
  memory dst(p.weights_md, engine(), packed.data_ptr());
  dnnl::stream s(engine());
  r.execute(s, src, dst);
  s.wait();
  ++g_reorders;
  return packed;
}

}  // namespace

bool dnnl_enabled() { return own_switch().load(); }

bool dnnl_conv(const at::Tensor& input, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, const at::Tensor& out, bool accumulate,
               bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups) {
  const auto dtype = input.scalar_type();
  if (!dnnl_enabled() || groups != 1 || (dtype != at::kFloat && dtype != at::kBFloat16) ||
      weight.scalar_type() != dtype || out.scalar_type() != dtype || input.dim() != 4 ||
      weight.dim() != 4 || input.numel() == 0 || out.numel() == 0 ||
      !nhwc_dense(input) || !nhwc_dense(out) ||
      input.storage_offset() != 0 || out.storage_offset() != 0 || input.is_alias_of(out) ||
      weight.is_alias_of(out)) {
    return false;
  }
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) {
    if (bias->scalar_type() != dtype && bias->scalar_type() != at::kFloat) {
      return false;
    }
    b = bias->contiguous();
  }
  std::vector<int64_t> key;
  key.reserve(32);
  for (auto list : {input.sizes(), weight.sizes(), stride, padding, dilation}) {
    key.insert(key.end(), list.begin(), list.end());
  }
  key.push_back(static_cast<int64_t>(dtype));
  key.push_back(b.has_value() ? static_cast<int64_t>(b->scalar_type()) : -1);
  key.push_back(accumulate);
  key.push_back(relu);
  key.push_back(at::get_num_threads());
  const std::shared_ptr<Primitive> p = cache().get(std::move(key), [&] {
    return make_primitive(input, weight, b, out, accumulate, relu, stride, padding, dilation);
  });
  if (!p->ok) {
    return false;
  }
  // The weight in the primitive's layout: kept while the weight is unchanged (weight_cache.h),
  // else reordered for this call; p->wkey names the layout.
  std::optional<at::Tensor> packed =
      WeightCache::get().lookup(weight, p->wkey, [&]() -> std::optional<at::Tensor> {
        return reorder_weight(*p, weight);
      });
  const at::Tensor w = packed.has_value() ? *packed : reorder_weight(*p, weight);
  Bound& bd = bound_for(*p);
  bd.src.set_data_handle(input.data_ptr());
  bd.dst.set_data_handle(out.data_ptr());
  if (bd.wei.get_data_handle() != w.data_ptr()) {
    bd.wei.set_data_handle(w.data_ptr());
  }
  if (p->has_bias) {
    bd.bias.set_data_handle(b->data_ptr());
  }
  at::Tensor scratch;
  if (p->scratch_bytes > 0) {
    scratch = at::empty({static_cast<int64_t>(p->scratch_bytes)}, input.options().dtype(at::kByte));
    bd.scratch.set_data_handle(scratch.data_ptr());
  }
  const auto& args = bd.args;
  thread_local dnnl::stream s(engine());
  p->prim.execute(s, args);
  s.wait();
  return true;
}

std::string dnnl_version_str() {
  const dnnl_version_t* v = dnnl_version();
  return "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
         std::to_string(v->patch) + " (system library, " +
         (v->cpu_runtime == DNNL_RUNTIME_OMP ? "OpenMP" : "other runtime") + ")";
}

std::string dnnl_impl_of(const std::vector<int64_t>& key_prefix) {
  std::string impl;
  cache().find_if([&](const std::vector<int64_t>& k, const Primitive& p) {
    if (p.ok && k.size() >= key_prefix.size() &&
        std::equal(key_prefix.begin(), key_prefix.end(), k.begin())) {
      impl = p.impl;
      return true;
    }
    return false;
  });
  return impl;
}

int64_t dnnl_cache_size() { return cache().size(); }

void dnnl_cache_clear() { cache().clear(); }

#else  // no oneDNN headers at build time: the ATen path serves every call

bool dnnl_enabled() { return false; }

bool dnnl_conv(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
               const at::Tensor&, bool, bool, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
               int64_t) {
  return false;
}

std::string dnnl_version_str() { return ""; }
std::string dnnl_impl_of(const std::vector<int64_t>&) { return ""; }
int64_t dnnl_cache_size() { return 0; }
void dnnl_cache_clear() {}

#endif

}  // namespace fastres::cpu

// Introspection and switches of the own-primitive path (tests, benchmarks, fastres.info).
TORCH_LIBRARY_FRAGMENT(fastres_cpu, m) {
  // "" when fastres was built without oneDNN's headers, else the library's version and runtime.
  m.def("own_primitives_built() -> str", [] { return fastres::cpu::dnnl_version_str(); });
  // Turn the own-primitive path on or off (returns the previous setting; off: ATen's path).
  m.def("set_own_primitives(bool on) -> bool", [](bool on) {
    return fastres::cpu::own_switch().exchange(on && !fastres::cpu::dnnl_version_str().empty());
  });
  // Whether float32 3x3 backward data takes ATen's path (returns the previous setting).
  m.def("set_aten_spatial_bwd_data(bool on) -> bool",
        [](bool on) { return fastres::cpu::aten_spatial_bwd_data().exchange(on); });
  // (primitives made, calls served by a kept primitive, weight reorders) since the process began.
  m.def("own_primitives_stats() -> int[]", [] {
    return std::vector<int64_t>{fastres::cpu::g_created.load(), fastres::cpu::g_reused.load(),
                                fastres::cpu::g_reorders.load()};
  });
  m.def("own_primitives_cache_size() -> int", [] { return fastres::cpu::dnnl_cache_size(); });
  m.def("own_primitives_cache_clear() -> ()", [] { fastres::cpu::dnnl_cache_clear(); });
  // The oneDNN implementation of the first kept primitive whose key starts with these input
  // sizes (then weight sizes, stride, padding, dilation): "brgconv:avx512_core", ...
  m.def("own_primitives_impl(int[] key_prefix) -> str",
        [](std::vector<int64_t> k) { return fastres::cpu::dnnl_impl_of(k); });
}
