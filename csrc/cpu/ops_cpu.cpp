// The CPU implementation of the fastres op set (csrc/ops.cpp): argument checks, the convolutions
// (ATen / oneDNN) and the single-pass fusions (kernels.h), registered for the CPU dispatch key.
//
// Memory formats follow the fakes (fastres/_meta.py): an output takes its reference tensor's
// format (channels_last when that tensor is channels_last-contiguous and not contiguous), with
// exactly the dense strides of that format. Inputs in any other layout are first copied to it
// (correct, one extra pass).
// Per-operator headers rather than ATen/ATen.h: 9 s instead of 13 s of parsing for this file.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"

namespace fastres::cpu {

namespace {

const Kernels* auto_kernels() {
  static const Kernels* table = [] {
    // ATen's own choice, so ATEN_CPU_CAPABILITY=default|avx2|avx512 steers both.
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && kernels_avx512() != nullptr) {
      return kernels_avx512();
    }
    if ((cap == "AVX512" || cap == "AVX2") && kernels_avx2() != nullptr) {
      return kernels_avx2();
    }
    return kernels_base();
  }();
  return table;
}

// Set by fastres_cpu::set_kernel_isa (tests): a narrower instruction set than the automatic one.
std::atomic<const Kernels*> g_forced{nullptr};

}  // namespace

const Kernels& kernels() {
  const Kernels* forced = g_forced.load(std::memory_order_acquire);
  return forced != nullptr ? *forced : *auto_kernels();
}

namespace {

using at::Tensor;
using std::optional;

// ---------------------------------------------------------------------------------------------
// Checks. Every message names the op, the argument and the offending sizes.

std::string sizes_str(const Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

bool is_act_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fastres::", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.layout() == at::kStrided, "fastres::", op, ": ", name,
              " must be a strided (dense) tensor, got layout ", t.layout());
}

// A 4-D activation in one of the supported dtypes.
void check_act(const char* op, const char* name, const Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.dim() == 4, "fastres::", op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(),
              "-D tensor of size ", sizes_str(t));
  TORCH_CHECK(is_act_dtype(t.scalar_type()), "fastres::", op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastres::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              " (they must match)");
}

void check_same_sizes(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastres::", op, ": ", name, " has size ", sizes_str(t),
              " but ", ref_name, " has size ", sizes_str(ref), " (they must match)");
}

// A per-channel vector: 1-D, `c` elements, floating, on the CPU.
void check_vec(const char* op, const char* name, const Tensor& t, int64_t c, const char* what) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, "fastres::", op, ": ", name, " must be 1-D with ", c,
              " elements (", what, "), got size ", sizes_str(t));
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastres::", op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

void check_opt_vec(const char* op, const char* name, const optional<Tensor>& t, int64_t c,
                   const char* what) {
  if (t.has_value() && t->defined()) {
    check_vec(op, name, *t, c, what);
  }
}

bool has(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Convolution arguments; returns the output size.
std::vector<int64_t> check_conv(const char* op, const Tensor& input, const Tensor& weight,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t groups) {
  check_act(op, "input", input);
  check_cpu(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 4, "fastres::", op, ": weight must be 4-D (K, C/groups, R, S), got ",
              weight.dim(), "-D tensor of size ", sizes_str(weight));
  check_same_dtype(op, "weight", weight, "input", input);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "fastres::", op,
              ": stride, padding and dilation must have 2 elements each, got ", stride, ", ",
              padding, ", ", dilation);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "fastres::", op, ": stride must be positive, got ",
              stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "fastres::", op,
              ": dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "fastres::", op,
              ": padding must be non-negative, got ", padding);
  TORCH_CHECK(groups > 0, "fastres::", op, ": groups must be positive, got ", groups);
  const int64_t k = weight.size(0);
  TORCH_CHECK(k % groups == 0, "fastres::", op, ": weight of size ", sizes_str(weight), " has ", k,
              " output channels, not divisible by groups=", groups);
  TORCH_CHECK(input.size(1) == weight.size(1) * groups, "fastres::", op, ": input of size ",
              sizes_str(input), " has ", input.size(1), " channels but weight of size ",
              sizes_str(weight), " with groups=", groups, " expects ", weight.size(1) * groups);
  std::vector<int64_t> out = {input.size(0), k, 0, 0};
  for (int d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (weight.size(2 + d) - 1) + 1;
    const int64_t padded = input.size(2 + d) + 2 * padding[d];
    TORCH_CHECK(padded >= span, "fastres::", op, ": input of size ", sizes_str(input),
                " padded by ", padding, " is smaller than the dilated kernel of weight ",
                sizes_str(weight), " (dilation ", dilation, ")");
    out[2 + d] = (padded - span) / stride[d] + 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Layout helpers.

// The format an output takes from `ref` (fastres/_meta.py, _like_format).
at::MemoryFormat format_of(const Tensor& ref) {
  return ref.dim() == 4 && ref.is_contiguous(at::MemoryFormat::ChannelsLast) && !ref.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

std::vector<int64_t> dense_strides(at::IntArrayRef sizes, at::MemoryFormat fmt) {
  std::vector<int64_t> st(sizes.size());
  if (fmt == at::MemoryFormat::ChannelsLast) {
    // N, C, H, W -> strides of an NHWC buffer
    st[1] = 1;
    st[3] = sizes[1];
    st[2] = sizes[3] * sizes[1];
    st[0] = sizes[2] * sizes[3] * sizes[1];
    return st;
  }
  int64_t s = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    st[d] = s;
    s *= std::max<int64_t>(sizes[d], 1);
  }
  return st;
}

// Strides must match at::empty(sizes, fmt) exactly (opcheck compares them), including those of
// size-1 dimensions, for which is_contiguous() does not care.
bool has_dense_strides(const Tensor& t, at::MemoryFormat fmt) {
  return t.strides() == at::IntArrayRef(dense_strides(t.sizes(), fmt));
}

Tensor in_format(const Tensor& t, at::MemoryFormat fmt) {
  if (has_dense_strides(t, fmt)) {
    return t;
  }
  return at::empty(t.sizes(), t.options().memory_format(fmt)).copy_(t);
}

Geom geom_of(const Tensor& t, at::MemoryFormat fmt) {
  return Geom{t.size(0), t.size(1), t.size(2), t.size(3), fmt == at::MemoryFormat::ChannelsLast};
}

// A per-channel vector as a contiguous opmath array (`fill` when absent).
Tensor opmath_vec(const optional<Tensor>& t, at::ScalarType act, int64_t c, double fill) {
  const auto m = acc_dtype(act);
  if (!has(t)) {
    return at::full({c}, fill, at::TensorOptions().dtype(m));
  }
  return t->to(m).contiguous();
}

Tensor opmath_vec(const Tensor& t, at::ScalarType act) { return t.to(acc_dtype(act)).contiguous(); }

std::vector<double> double_vec(const Tensor& t) {
  const Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

Tensor from_doubles(const std::vector<double>& v, at::ScalarType dtype) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(dtype);
}

// ---------------------------------------------------------------------------------------------
// oneDNN fused convolutions (mkldnn::_convolution_pointwise): conv + bias + ReLU, or conv + bias
// + residual add + ReLU, in one write of the output.

using PointwiseFn = Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                           c10::List<optional<at::Scalar>>, optional<c10::string_view>);
using PointwiseBinaryFn = Tensor(const Tensor&, const Tensor&, const Tensor&,
                                 const optional<Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, int64_t, c10::string_view, optional<at::Scalar>,
                                 optional<c10::string_view>, c10::List<optional<at::Scalar>>,
                                 optional<c10::string_view>);

struct Pointwise {
  optional<c10::TypedOperatorHandle<PointwiseFn>> unary;
  optional<c10::TypedOperatorHandle<PointwiseBinaryFn>> binary;
};

const Pointwise& pointwise_ops() {
  static const Pointwise ops = [] {
    Pointwise p;
    if (!at::hasMKLDNN()) {
      return p;
    }
    auto& d = c10::Dispatcher::singleton();
    if (auto h = d.findSchema({"mkldnn::_convolution_pointwise", ""})) {
      p.unary = h->typed<PointwiseFn>();
    }
    if (auto h = d.findSchema({"mkldnn::_convolution_pointwise", "binary"})) {
      p.binary = h->typed<PointwiseBinaryFn>();
    }
    return p;
  }();
  return ops;
}

Tensor pointwise_conv(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      int64_t groups, bool relu) {
  return pointwise_ops().unary->call(input, weight, bias, padding, stride, dilation, groups,
                                     relu ? "relu" : "none", c10::List<optional<at::Scalar>>(),
                                     std::nullopt);
}

// Whether oneDNN runs convolutions of this dtype on this CPU (bfloat16 and float16 need AVX-512
// class hardware; the check lives in ATen internals, so a 1x1 convolution asks once per dtype).
bool onednn_supports(at::ScalarType dtype) {
  if (!at::globalContext().userEnabledMkldnn() || !pointwise_ops().unary.has_value()) {
    return false;
  }
  if (dtype == at::kFloat) {
    return true;
  }
  if (dtype != at::kBFloat16 && dtype != at::kHalf) {
    return false;
  }
  static std::atomic<int> state[2] = {-1, -1};  // -1 unknown, 0 no, 1 yes
  std::atomic<int>& s = state[dtype == at::kHalf];
  if (s.load() < 0) {
    bool ok = true;
    try {
      const auto opts = at::TensorOptions().dtype(dtype);
      const Tensor x = at::ones({1, 1, 1, 1}, opts).contiguous(at::MemoryFormat::ChannelsLast);
      (void)pointwise_conv(x, at::ones({1, 1, 1, 1}, opts), std::nullopt, {1, 1}, {0, 0}, {1, 1}, 1,
                           false);
    } catch (const c10::Error&) {
      ok = false;
    }
    s.store(ok ? 1 : 0);
  }
  return s.load() == 1;
}

// Prepacked oneDNN weights (mkldnn::_reorder_convolution_weight) for channels_last inference.
// Without them every call copies the weight to channels_last and reorders it into oneDNN's
// blocked layout: two more parallel regions per convolution. Measured, Bottleneck(256, 64) N=8
// 56x56 fp32 CL, 2 threads, interleaved calls on the 2-core box under load average ~9 from other
// jobs: 134 ms (min) / 199 ms (p50) with plain weights vs 102 / 142 ms prepacked (one thread,
// same load: 112 vs 115 ms, no difference; the saving is the synchronisation).
//
// An entry is valid while the weight's TensorImpl is alive (held weakly, so the cache never keeps
// a model alive and a dead impl's address cannot be reused while the entry exists), its version
// counter, data pointer, sizes, strides and dtype are unchanged, and the convolution and input
// sizes are the same. In-place updates (optimizer steps, load_state_dict, copy_ under no_grad)
// bump the version and repack. Writes that bypass the version counter (through .numpy() or
// .data_ptr()) are not seen: FASTRES_CPU_WEIGHT_CACHE=0 turns the cache off. Inference tensors
// have no version counter and are never cached. At most kMaxPacked entries (least recently used
// evicted); memory cost: one blocked copy of each cached weight.
//
// Only weights that own their values are cached: a leaf that requires grad (an nn.Parameter),
// or a tensor registered with allow() (fastres' modules register the BN-folded weights they keep
// in their fold cache). Any other tensor may be a buffer that torch.compile's Inductor reuses
// for the next convolution's weight, written by its own kernel without a version bump: the same
// TensorImpl, data pointer, version and sizes with other values. Measured before this rule: a
// converted BasicBlock(64, 64) under torch.compile (channels_last, eval) ran conv2 with conv1's
// packed weight, max error 2.09 against eager (Inductor's `buf3 = buf0; del buf0  # reuse`).
class PackedWeights {
 public:
  static PackedWeights& get() {
    static PackedWeights* cache = new PackedWeights();  // leaked: used until exit
    return *cache;
  }

  optional<Tensor> lookup(const Tensor& weight, const Tensor& input, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    if (!enabled_ || weight.is_inference() || !weight.is_non_overlapping_and_dense() ||
        !reorder_.has_value()) {
      return std::nullopt;
    }
    const bool parameter = weight.requires_grad() && weight.is_leaf();
    Entry key = make_entry(weight, input, stride, padding, dilation, groups);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!parameter && !is_allowed_locked(weight)) {
        return std::nullopt;
      }
      for (size_t i = 0; i < entries_.size();) {
        Entry& e = entries_[i];
        if (e.owner.expired()) {
          entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
          continue;
        }
        if (e.same_as(key)) {
          e.used = ++clock_;
          return e.packed;
        }
        ++i;
      }
    }
    torch::jit::Stack stack = {weight,         padding.vec(), stride.vec(),
                               dilation.vec(), groups,        input.sizes().vec()};
    try {
      reorder_->callBoxed(stack);
    } catch (const c10::Error&) {
      return std::nullopt;  // this weight stays unpacked: oneDNN reorders it per call
    }
    key.packed = stack.at(0).toTensor();
    std::lock_guard<std::mutex> lock(mu_);
    key.used = ++clock_;
    // An older packing of this same weight (before an in-place update) can never match again.
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [&](const Entry& e) { return e.impl == key.impl; }),
                   entries_.end());
    if (entries_.size() >= kMaxPacked) {
      auto lru = std::min_element(entries_.begin(), entries_.end(),
                                  [](const Entry& a, const Entry& b) { return a.used < b.used; });
      entries_.erase(lru);
    }
    entries_.push_back(std::move(key));
    return entries_.back().packed;
  }

  int64_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(entries_.size());
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.clear();
    allowed_.clear();
  }

  // Let lookup() cache ``weight`` although it is not a parameter: its owner promises that nobody
  // writes it without bumping its version counter. Held weakly (a dead tensor drops out).
  void allow(const Tensor& weight) {
    std::lock_guard<std::mutex> lock(mu_);
    if (is_allowed_locked(weight)) {
      return;
    }
    allowed_.push_back(
        {c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()),
         weight.unsafeGetTensorImpl()});
  }

 private:
  static constexpr size_t kMaxPacked = 256;

  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> owner{c10::intrusive_ptr<c10::TensorImpl>()};
    const c10::TensorImpl* impl = nullptr;
    const void* data = nullptr;
    int64_t version = 0;
    at::ScalarType dtype = at::kFloat;
    std::vector<int64_t> shape;  // sizes, strides, input sizes, stride, padding, dilation, groups
    Tensor packed;
    uint64_t used = 0;

    bool same_as(const Entry& k) const {
      return impl == k.impl && data == k.data && version == k.version && dtype == k.dtype &&
             shape == k.shape;
    }
  };

  PackedWeights() {
    const char* env = std::getenv("FASTRES_CPU_WEIGHT_CACHE");
    enabled_ = env == nullptr || std::string(env) != "0";
    if (at::hasMKLDNN()) {
      reorder_ =
          c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_convolution_weight", ""});
    }
  }

  static Entry make_entry(const Tensor& weight, const Tensor& input, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    Entry e;
    e.owner = c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr());
    e.impl = weight.unsafeGetTensorImpl();
    e.data = weight.data_ptr();
    e.version =
        static_cast<int64_t>(weight.unsafeGetTensorImpl()->version_counter().current_version());
    e.dtype = weight.scalar_type();
    for (auto list : {weight.sizes(), weight.strides(), input.sizes(), stride, padding, dilation}) {
      e.shape.insert(e.shape.end(), list.begin(), list.end());
      e.shape.push_back(-1);
    }
    e.shape.push_back(groups);
    return e;
  }

  // Drops dead entries of allowed_ on the way (a dead impl's address may be reused).
  bool is_allowed_locked(const Tensor& weight) {
    const c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    bool found = false;
    for (size_t i = 0; i < allowed_.size();) {
      if (allowed_[i].first.expired()) {
        allowed_.erase(allowed_.begin() + static_cast<std::ptrdiff_t>(i));
        continue;
      }
      found = found || allowed_[i].second == impl;
      ++i;
    }
    return found;
  }

  bool enabled_ = true;
  optional<c10::OperatorHandle> reorder_;
  std::mutex mu_;
  std::vector<Entry> entries_;
  std::vector<std::pair<c10::weak_intrusive_ptr<c10::TensorImpl>, const c10::TensorImpl*>>
      allowed_;
  uint64_t clock_ = 0;
};

Tensor conv_nobias(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0},
                         groups);
}

// ---------------------------------------------------------------------------------------------
// The ops.

// One epilogue pass, out = relu?(in * scale[c] + shift[c] + r), r = residual * res_scale[j] +
// res_shift[j] on output channel res_c0 + j (any strided residual view); out may be in (in
// place). scale/shift: C opmath values, or none (1 and 0); res_scale/res_shift likewise.
void run_epilogue(const Tensor& out, const Tensor& in, at::MemoryFormat fmt,
                  const optional<Tensor>& scale, const optional<Tensor>& shift,
                  const optional<Tensor>& residual, const optional<Tensor>& res_scale,
                  const optional<Tensor>& res_shift, int64_t res_c0, bool relu) {
  const auto dtype = in.scalar_type();
  const int64_t c = in.size(1);
  const Tensor s = opmath_vec(scale, dtype, c, 1.0), b = opmath_vec(shift, dtype, c, 0.0);
  EpilogueArgs a;
  a.dtype = dtype;
  a.g = geom_of(in, fmt);
  a.out = out.data_ptr();
  a.in = in.data_ptr();
  a.scale = s.data_ptr();
  a.shift = b.data_ptr();
  Tensor rs, rb;
  if (has(residual)) {
    const int64_t cr = residual->size(1);
    rs = opmath_vec(res_scale, dtype, cr, 1.0);
    rb = opmath_vec(res_shift, dtype, cr, 0.0);
    a.res = residual->data_ptr();
    for (int d = 0; d < 4; ++d) {
      a.rs[d] = residual->stride(d);
    }
    a.res_c0 = res_c0;
    a.res_cn = cr;
    a.res_scale = rs.data_ptr();
    a.res_shift = rb.data_ptr();
  }
  a.relu = relu;
  kernels().epilogue(a);
}

Tensor conv_bias_act_cpu(const Tensor& input, const Tensor& weight, const optional<Tensor>& bias,
                         const optional<Tensor>& residual, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         bool relu) {
  constexpr const char* op = "conv_bias_act";
  const auto out_sizes = check_conv(op, input, weight, stride, padding, dilation, groups);
  const auto dtype = input.scalar_type();
  const int64_t k = weight.size(0);
  if (has(bias)) {
    check_vec(op, "bias", *bias, k, "one per output channel of weight");
    TORCH_CHECK(bias->scalar_type() == dtype || bias->scalar_type() == acc_dtype(dtype),
                "fastres::", op, ": bias has dtype ", bias->scalar_type(), " but input has dtype ",
                dtype, " (bias must have the input's dtype or ", acc_dtype(dtype), ")");
  }
  if (has(residual)) {
    check_cpu(op, "residual", *residual);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_sizes), "fastres::", op,
                ": residual must have the output's size ", at::IntArrayRef(out_sizes), ", got ",
                sizes_str(*residual));
    check_same_dtype(op, "residual", *residual, "input", input);
  }
  const auto fmt = format_of(input);

  if (onednn_supports(dtype)) {
    // Measured on a 2-core Xeon (AVX-512), fp32 channels_last, torchvision Bottleneck(256, 64),
    // N=8, 56x56, eval with BN folded: 3 fused oneDNN convolutions take 13.4 ms; eager PyTorch
    // (conv + separate bias/ReLU/add passes) takes 30 ms. The binary post-op fuses only for
    // groups == 1 and channels_last (ATen falls back to conv + add_relu_ otherwise, which
    // asserts for bf16/fp16), and wants a bias of the input's dtype. NCHW fp32 (same block,
    // load ~7): oneDNN unary fusion + the epilogue pass for the residual 78 ms (min) vs
    // at::convolution + one fused pass 76 ms, a tie, so both layouts take this path. bf16 CL:
    // 11 ms (min) vs eager 40 ms.
    const bool binary = has(residual) && pointwise_ops().binary.has_value() && groups == 1 &&
                        fmt == at::MemoryFormat::ChannelsLast &&
                        (!has(bias) || bias->scalar_type() == dtype);
    // A prepacked weight makes oneDNN compute in channels_last: only for channels_last input.
    optional<Tensor> packed;
    if (fmt == at::MemoryFormat::ChannelsLast) {
      packed = PackedWeights::get().lookup(weight, input, stride, padding, dilation, groups);
    }
    const Tensor& w = packed.has_value() ? *packed : weight;
    // oneDNN's ReLU post-op returns 0 for NaN (measured, torch 2.14.1 on AVX-512: relu, and
    // leaky_relu / hardtanh with bound 0, all map NaN to 0; torch.relu keeps NaN), so the ReLU
    // runs in our epilogue pass (at::vec::clamp_min, which keeps NaN), in place: one more read
    // and write of the output than the fused post-op, the price of the non-finite rule.
    if (binary) {
      Tensor out = in_format(
          pointwise_ops().binary->call(input, *residual, w, bias, padding, stride, dilation, groups,
                                       "add", std::nullopt, std::nullopt,
                                       c10::List<optional<at::Scalar>>(), std::nullopt),
          fmt);
      if (relu) {
        run_epilogue(out, out, fmt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                     std::nullopt, 0, true);
      }
      return out;
    }
    Tensor out = in_format(
        pointwise_conv(input, w, bias, stride, padding, dilation, groups, false), fmt);
    if (has(residual) || relu) {
      // relu?(y + residual), in place, one pass
      run_epilogue(out, out, fmt, std::nullopt, std::nullopt, residual, std::nullopt, std::nullopt,
                   0, relu);
    }
    return out;
  }

  // float64, or no oneDNN for this dtype: ATen's convolution, then bias + residual + ReLU in one
  // pass over its output, in place.
  Tensor out = in_format(conv_nobias(input, weight, stride, padding, dilation, groups), fmt);
  run_epilogue(out, out, fmt, std::nullopt, bias, residual, std::nullopt, std::nullopt, 0, relu);
  return out;
}

std::tuple<Tensor, Tensor> relu_bias_bwd_cpu(const Tensor& grad_out, const optional<Tensor>& out) {
  constexpr const char* op = "relu_bias_bwd";
  check_act(op, "grad_out", grad_out);
  if (has(out)) {
    check_cpu(op, "out", *out);
    check_same_sizes(op, "out", *out, "grad_out", grad_out);
    check_same_dtype(op, "out", *out, "grad_out", grad_out);
  }
  const auto dtype = grad_out.scalar_type();
  const auto fmt = format_of(grad_out);
  const Tensor go = in_format(grad_out, fmt);
  const Tensor o = has(out) ? in_format(*out, fmt) : Tensor();
  Tensor grad_z = at::empty(grad_out.sizes(), grad_out.options().memory_format(fmt));
  const int64_t c = grad_out.size(1);
  std::vector<double> sum_g(c);
  BnBwdArgs a;
  a.dtype = dtype;
  a.g = geom_of(go, fmt);
  a.mask = has(out) ? Mask::kOut : Mask::kNone;
  a.grad_out = go.data_ptr();
  a.out = has(out) ? o.data_ptr() : nullptr;
  a.sum_g = sum_g.data();
  a.g_out = grad_z.data_ptr();
  kernels().bn_bwd_reduce(a);
  return {grad_z, from_doubles(sum_g, acc_dtype(dtype))};
}

// a = relu?(input * scale + shift) in the input's dtype and format, as reference._prologue.
Tensor apply_prologue(const Tensor& x, at::MemoryFormat fmt, const optional<Tensor>& scale,
                      const optional<Tensor>& shift, bool relu) {
  const auto dtype = x.scalar_type();
  const int64_t c = x.size(1);
  const Tensor s = opmath_vec(scale, dtype, c, 1.0);
  const Tensor b = opmath_vec(shift, dtype, c, 0.0);
  Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  PrologueArgs a;
  a.dtype = dtype;
  a.g = geom_of(x, fmt);
  a.out = out.data_ptr();
  a.in = x.data_ptr();
  a.scale = s.data_ptr();
  a.shift = b.data_ptr();
  a.relu = relu;
  kernels().prologue(a);
  return out;
}

bool has_prologue(const optional<Tensor>& scale, const optional<Tensor>& shift, bool relu) {
  return has(scale) || has(shift) || relu;
}

std::tuple<Tensor, Tensor, Tensor> conv_stats_cpu(const Tensor& input, const Tensor& weight,
                                                  const optional<Tensor>& pre_scale,
                                                  const optional<Tensor>& pre_shift, bool pre_relu,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv_stats";
  check_conv(op, input, weight, stride, padding, dilation, groups);
  const int64_t c = input.size(1);
  check_opt_vec(op, "pre_scale", pre_scale, c, "one per channel of input");
  check_opt_vec(op, "pre_shift", pre_shift, c, "one per channel of input");
  const auto dtype = input.scalar_type();
  const auto fmt = format_of(input);
  // The prologue goes into a temporary in one vectorised pass (oneDNN has no input-side
  // fusion); the zero padding of the convolution then applies to the transformed tensor.
  const Tensor a = has_prologue(pre_scale, pre_shift, pre_relu)
                       ? apply_prologue(in_format(input, fmt), fmt, pre_scale, pre_shift, pre_relu)
                       : input;
  Tensor out = in_format(conv_nobias(a, weight, stride, padding, dilation, groups), fmt);
  const int64_t k = weight.size(0);
  std::vector<double> sum(k), sumsq(k);
  StatsArgs s;
  s.dtype = dtype;
  s.g = geom_of(out, fmt);
  s.in = out.data_ptr();
  s.sum = sum.data();
  s.sumsq = sumsq.data();
  kernels().channel_stats(s);
  return {out, from_doubles(sum, acc_dtype(dtype)), from_doubles(sumsq, acc_dtype(dtype))};
}

// Checks shared by bn_finalize and bn_finalize_count; returns the number of channels.
int64_t check_finalize(const char* op, const Tensor& sum, const Tensor& sumsq,
                       const optional<Tensor>& weight, const optional<Tensor>& bias,
                       const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                       const optional<Tensor>& num_batches_tracked, optional<double> momentum) {
  check_cpu(op, "sum", sum);
  TORCH_CHECK(sum.dim() == 1, "fastres::", op,
              ": sum must be 1-D (one value per channel), got size ", sizes_str(sum));
  TORCH_CHECK(sum.scalar_type() == at::kFloat || sum.scalar_type() == at::kDouble, "fastres::", op,
              ": sum must be float32 or float64 (the accumulation dtype), got ", sum.scalar_type());
  const int64_t c = sum.size(0);
  check_vec(op, "sumsq", sumsq, c, "one per channel of sum");
  check_same_dtype(op, "sumsq", sumsq, "sum", sum);
  check_opt_vec(op, "weight", weight, c, "one per channel of sum");
  check_opt_vec(op, "bias", bias, c, "one per channel of sum");
  check_opt_vec(op, "running_mean", running_mean, c, "one per channel of sum");
  check_opt_vec(op, "running_var", running_var, c, "one per channel of sum");
  if (has(num_batches_tracked)) {
    check_cpu(op, "num_batches_tracked", *num_batches_tracked);
    TORCH_CHECK(num_batches_tracked->numel() == 1, "fastres::", op,
                ": num_batches_tracked must have one element, got size ",
                sizes_str(*num_batches_tracked));
  }
  const bool update = has(running_mean) || has(running_var);
  TORCH_CHECK_VALUE(!update || momentum.has_value() || has(num_batches_tracked), "fastres::", op,
                    ": momentum=None (cumulative average) needs num_batches_tracked");
  return c;
}

// bn_finalize's arithmetic over n values per channel (checked by the caller), in double.
std::tuple<Tensor, Tensor, Tensor, Tensor> finalize(
    const Tensor& sum, const Tensor& sumsq, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, double n,
    optional<double> momentum, double eps) {
  const int64_t c = sum.size(0);
  const auto s = double_vec(sum), ss = double_vec(sumsq);
  const auto w = has(weight) ? double_vec(*weight) : std::vector<double>(c, 1.0);
  const auto b = has(bias) ? double_vec(*bias) : std::vector<double>(c, 0.0);
  std::vector<double> mean(c), invstd(c), scale(c), shift(c), var(c);
  for (int64_t i = 0; i < c; ++i) {
    mean[i] = s[i] / n;
    var[i] = std::max(ss[i] / n - mean[i] * mean[i], 0.0);
    invstd[i] = 1.0 / std::sqrt(var[i] + eps);
    scale[i] = w[i] * invstd[i];
    shift[i] = b[i] - mean[i] * scale[i];
  }
  if (has(num_batches_tracked)) {
    num_batches_tracked->add_(1);
  }
  if (has(running_mean) || has(running_var)) {
    const double factor =
        momentum.has_value() ? *momentum : 1.0 / num_batches_tracked->item<double>();
    if (has(running_mean)) {
      auto rm = double_vec(*running_mean);
      for (int64_t i = 0; i < c; ++i) {
        rm[i] = (1.0 - factor) * rm[i] + factor * mean[i];
      }
      running_mean->copy_(from_doubles(rm, running_mean->scalar_type()));
    }
    if (has(running_var)) {
      auto rv = double_vec(*running_var);
      const double unbias = n / (n - 1.0);
      for (int64_t i = 0; i < c; ++i) {
        rv[i] = (1.0 - factor) * rv[i] + factor * var[i] * unbias;
      }
      running_var->copy_(from_doubles(rv, running_var->scalar_type()));
    }
  }
  const auto t = sum.scalar_type();
  return {from_doubles(mean, t), from_doubles(invstd, t), from_doubles(scale, t),
          from_doubles(shift, t)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_cpu(
    const Tensor& sum, const Tensor& sumsq, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked, int64_t count,
    optional<double> momentum, double eps) {
  check_finalize("bn_finalize", sum, sumsq, weight, bias, running_mean, running_var,
                 num_batches_tracked, momentum);
  // nn.BatchNorm2d's message and exception type (ValueError).
  TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got ", count,
                    " values");
  return finalize(sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked,
                  static_cast<double>(count), momentum, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_count_cpu(
    const Tensor& sum, const Tensor& sumsq, const Tensor& count, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& running_mean,
    const optional<Tensor>& running_var, const optional<Tensor>& num_batches_tracked,
    optional<double> momentum, double eps) {
  constexpr const char* op = "bn_finalize_count";
  check_finalize(op, sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked,
                 momentum);
  check_cpu(op, "count", count);
  TORCH_CHECK(count.numel() == 1 && count.is_floating_point(), "fastres::", op,
              ": count must be one floating-point value (the all-reduced count), got ",
              count.scalar_type(), " of size ", sizes_str(count));
  // On the CPU reading it costs nothing, so the contract's caller check is repeated here.
  const double n = count.item<double>();
  TORCH_CHECK_VALUE(n > 1, "Expected more than 1 value per channel when training, got ", n,
                    " values");
  return finalize(sum, sumsq, weight, bias, running_mean, running_var, num_batches_tracked, n,
                  momentum, eps);
}

Tensor bn_add_relu_cpu(const Tensor& input, const Tensor& scale, const Tensor& shift,
                       const optional<Tensor>& residual, const optional<Tensor>& res_scale,
                       const optional<Tensor>& res_shift, int64_t res_channel_offset, bool relu) {
  constexpr const char* op = "bn_add_relu";
  check_act(op, "input", input);
  const int64_t c = input.size(1);
  check_vec(op, "scale", scale, c, "one per channel of input");
  check_vec(op, "shift", shift, c, "one per channel of input");
  const auto dtype = input.scalar_type();
  const auto fmt = format_of(input);
  int64_t cr = 0;
  if (has(residual)) {
    check_act(op, "residual", *residual);
    check_same_dtype(op, "residual", *residual, "input", input);
    cr = residual->size(1);
    TORCH_CHECK(residual->size(0) == input.size(0) && residual->size(2) == input.size(2) &&
                    residual->size(3) == input.size(3),
                "fastres::", op, ": residual of size ", sizes_str(*residual),
                " must match input of size ", sizes_str(input), " in N, H and W");
    TORCH_CHECK(res_channel_offset >= 0 && res_channel_offset + cr <= c, "fastres::", op,
                ": residual's ", cr, " channels at res_channel_offset=", res_channel_offset,
                " do not fit in input's ", c, " channels (input ", sizes_str(input), ", residual ",
                sizes_str(*residual), ")");
    check_opt_vec(op, "res_scale", res_scale, cr, "one per channel of residual");
    check_opt_vec(op, "res_shift", res_shift, cr, "one per channel of residual");
  }
  const Tensor x = in_format(input, fmt);
  Tensor out = at::empty(input.sizes(), input.options().memory_format(fmt));
  run_epilogue(out, x, fmt, scale, shift, residual, res_scale, res_shift, res_channel_offset, relu);
  return out;
}

// ---------------------------------------------------------------------------------------------
// BatchNorm backward: a reduction pass (sum g, sum g*(x - mean)) then an elementwise pass
// grad_x = a*g + b*(x - mean) + d. bn_add_relu_bwd / bn_relu_bwd run both; SyncBatchNorm runs
// them as separate ops (_reduce, _elemt) with an all-reduce of the sums in between.

// Per-channel coefficients of the elementwise pass from the means of g and g*xhat:
// a = weight*invstd, b = -a*invstd*mean_g_xhat, d = -a*mean_g.
struct BnCoef {
  Tensor a, b, d;
};

BnCoef bn_coef(const std::vector<double>& mean_g, const std::vector<double>& mean_g_xhat,
               const Tensor& invstd, const optional<Tensor>& weight, at::ScalarType opmath) {
  const int64_t c = static_cast<int64_t>(mean_g.size());
  const auto is = double_vec(invstd);
  const auto w = has(weight) ? double_vec(*weight) : std::vector<double>(c, 1.0);
  std::vector<double> a(c), b(c), d(c);
  for (int64_t i = 0; i < c; ++i) {
    a[i] = w[i] * is[i];
    b[i] = -a[i] * is[i] * mean_g_xhat[i];
    d[i] = -a[i] * mean_g[i];
  }
  return {from_doubles(a, opmath), from_doubles(b, opmath), from_doubles(d, opmath)};
}

// The identity map as coefficients: grad_x2 = g (exact: 1*g + 0 and 0*(x - mean)).
BnCoef identity_coef(int64_t c, at::ScalarType opmath) {
  return {from_doubles(std::vector<double>(c, 1.0), opmath),
          from_doubles(std::vector<double>(c, 0.0), opmath),
          from_doubles(std::vector<double>(c, 0.0), opmath)};
}

// sum g*xhat = invstd * sum g*(x - mean).
std::vector<double> times(const std::vector<double>& v, const Tensor& invstd) {
  const auto s = double_vec(invstd);
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    r[i] = v[i] * s[i];
  }
  return r;
}

std::vector<double> divided(const std::vector<double>& v, double div) {
  std::vector<double> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    r[i] = v[i] / div;
  }
  return r;
}

void check_bn_stats(const char* op, const char* prefix, const Tensor& input, const Tensor& mean,
                    const Tensor& invstd, const optional<Tensor>& weight) {
  const int64_t c = input.size(1);
  const std::string p(prefix);
  check_vec(op, (p + "mean").c_str(), mean, c, "one per channel");
  check_vec(op, (p + "invstd").c_str(), invstd, c, "one per channel");
  check_opt_vec(op, (p + "weight").c_str(), weight, c, "one per channel");
}

// The tensors of one BatchNorm backward in a single working format (the input's; others are
// copied to it) and the kernel arguments both passes share.
struct BnBwd {
  at::MemoryFormat fmt;
  at::TensorOptions opts;
  Tensor go, o, x, x2, m, m2, ps, pb;
  BnBwdArgs args;
  int64_t c = 0, count = 0;
  at::ScalarType opmath;
};

void check_grad_pair(const char* op, const Tensor& grad_out, const Tensor& input) {
  check_act(op, "grad_out", grad_out);
  check_act(op, "input", input);
  check_same_sizes(op, "input", input, "grad_out", grad_out);
  check_same_dtype(op, "input", input, "grad_out", grad_out);
}

// bn_add_relu_bwd and its split: checks, then the working tensors. weight/res_weight are
// checked when given (the reduce op has none).
BnBwd add_relu_bwd_tensors(const char* op, const Tensor& grad_out, const optional<Tensor>& out,
                           const Tensor& input, const Tensor& mean, const Tensor& invstd,
                           const optional<Tensor>& weight, const optional<Tensor>& res_input,
                           const optional<Tensor>& res_mean, const optional<Tensor>& res_invstd,
                           const optional<Tensor>& res_weight) {
  check_grad_pair(op, grad_out, input);
  if (has(out)) {
    check_cpu(op, "out", *out);
    check_same_sizes(op, "out", *out, "grad_out", grad_out);
    check_same_dtype(op, "out", *out, "grad_out", grad_out);
  }
  check_bn_stats(op, "", input, mean, invstd, weight);
  const bool res_bn = has(res_input);
  if (res_bn) {
    check_act(op, "res_input", *res_input);
    check_same_sizes(op, "res_input", *res_input, "grad_out", grad_out);
    check_same_dtype(op, "res_input", *res_input, "grad_out", grad_out);
    TORCH_CHECK_VALUE(has(res_mean) && has(res_invstd), "fastres::", op,
                      ": res_input needs res_mean and res_invstd");
    check_bn_stats(op, "res_", *res_input, *res_mean, *res_invstd, res_weight);
  }
  BnBwd t;
  const auto dtype = input.scalar_type();
  t.fmt = format_of(input);
  t.opts = input.options().memory_format(t.fmt);
  t.opmath = acc_dtype(dtype);
  t.c = input.size(1);
  t.count = input.numel() / std::max<int64_t>(t.c, 1);
  t.go = in_format(grad_out, t.fmt);
  t.x = in_format(input, t.fmt);
  t.m = opmath_vec(mean, dtype);
  t.args.dtype = dtype;
  t.args.g = geom_of(t.x, t.fmt);
  t.args.mask = has(out) ? Mask::kOut : Mask::kNone;
  t.args.grad_out = t.go.data_ptr();
  if (has(out)) {
    t.o = in_format(*out, t.fmt);
    t.args.out = t.o.data_ptr();
  }
  t.args.x = t.x.data_ptr();
  t.args.mean = t.m.data_ptr();
  if (res_bn) {
    t.x2 = in_format(*res_input, t.fmt);
    t.m2 = opmath_vec(*res_mean, dtype);
    t.args.x2 = t.x2.data_ptr();
    t.args.mean2 = t.m2.data_ptr();
  }
  return t;
}

// bn_relu_bwd and its split.
BnBwd relu_bwd_tensors(const char* op, const Tensor& grad_out, const Tensor& input,
                       const Tensor& mean, const Tensor& invstd, const optional<Tensor>& weight,
                       const Tensor& scale, const Tensor& shift, bool relu) {
  check_grad_pair(op, grad_out, input);
  check_bn_stats(op, "", input, mean, invstd, weight);
  const int64_t c = input.size(1);
  check_vec(op, "scale", scale, c, "one per channel");
  check_vec(op, "shift", shift, c, "one per channel");
  BnBwd t;
  const auto dtype = input.scalar_type();
  t.fmt = format_of(input);
  t.opts = input.options().memory_format(t.fmt);
  t.opmath = acc_dtype(dtype);
  t.c = c;
  t.count = input.numel() / std::max<int64_t>(c, 1);
  t.go = in_format(grad_out, t.fmt);
  t.x = in_format(input, t.fmt);
  t.m = opmath_vec(mean, dtype);
  t.ps = opmath_vec(scale, dtype);
  t.pb = opmath_vec(shift, dtype);
  t.args.dtype = dtype;
  t.args.g = geom_of(t.x, t.fmt);
  t.args.mask = relu ? Mask::kPre : Mask::kNone;
  t.args.grad_out = t.go.data_ptr();
  t.args.pre_scale = t.ps.data_ptr();
  t.args.pre_shift = t.pb.data_ptr();
  t.args.x = t.x.data_ptr();
  t.args.mean = t.m.data_ptr();
  return t;
}

// The reduction pass: sum_g, sum_g*(x - mean) (and with x2, sum_g*(x2 - mean2)) in double; g
// itself written to g_out when given (an identity residual's gradient).
struct BnSums {
  std::vector<double> g, gx, gx2;
};

BnSums reduce_pass(const BnBwd& t, void* g_out = nullptr) {
  BnSums s{std::vector<double>(t.c), std::vector<double>(t.c),
           std::vector<double>(t.x2.defined() ? t.c : 0)};
  BnBwdArgs a = t.args;
  a.sum_g = s.g.data();
  a.sum_gx = s.gx.data();
  a.sum_gx2 = t.x2.defined() ? s.gx2.data() : nullptr;
  a.g_out = g_out;
  kernels().bn_bwd_reduce(a);
  return s;
}

// The elementwise pass: grad_x from (x, k) and, when k2 is given, grad_x2 from (x2 or, for an
// identity residual, x with identity coefficients, k2). Returns them in the working format.
std::pair<Tensor, Tensor> apply_pass(const BnBwd& t, const BnCoef& k, const BnCoef* k2) {
  Tensor grad_x = at::empty(t.x.sizes(), t.opts);
  BnBwdArgs p = t.args;
  p.a = k.a.data_ptr();
  p.b = k.b.data_ptr();
  p.d = k.d.data_ptr();
  p.grad_x = grad_x.data_ptr();
  Tensor grad_x2;
  if (k2 != nullptr) {
    grad_x2 = at::empty(t.x.sizes(), t.opts);
    if (!t.x2.defined()) {
      p.x2 = p.x;
      p.mean2 = p.mean;
    }
    p.a2 = k2->a.data_ptr();
    p.b2 = k2->b.data_ptr();
    p.d2 = k2->d.data_ptr();
    p.grad_x2 = grad_x2.data_ptr();
  } else {
    p.x2 = nullptr;
  }
  kernels().bn_bwd_apply(p);
  return {grad_x, grad_x2};
}

// Two distinct empty tensors when needed: outputs of an op must not alias each other (opcheck).
Tensor empty_vec(const Tensor& like) { return at::empty({0}, like.options()); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_bwd_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& weight, const optional<Tensor>& res_input,
    const optional<Tensor>& res_mean, const optional<Tensor>& res_invstd,
    const optional<Tensor>& res_weight) {
  const BnBwd t = add_relu_bwd_tensors("bn_add_relu_bwd", grad_out, out, input, mean, invstd,
                                       weight, res_input, res_mean, res_invstd, res_weight);
  const auto vdtype = mean.scalar_type();
  const double n = static_cast<double>(std::max<int64_t>(t.count, 1));
  if (!has(res_input)) {
    // Identity residual: grad_res = g, written by the reduction and read by the apply pass.
    Tensor g = at::empty(input.sizes(), t.opts);
    const BnSums s = reduce_pass(t, g.data_ptr());
    const auto gw = times(s.gx, invstd);
    const BnCoef k = bn_coef(divided(s.g, n), divided(gw, n), invstd, weight, t.opmath);
    BnBwd ti = t;
    ti.args.mask = Mask::kNone;
    ti.args.grad_out = g.data_ptr();
    auto [grad_input, unused] = apply_pass(ti, k, nullptr);
    return {grad_input,
            from_doubles(gw, vdtype),
            from_doubles(s.g, vdtype),
            in_format(g, format_of(grad_out)),
            empty_vec(mean),
            empty_vec(mean)};
  }
  const BnSums s = reduce_pass(t);
  const auto gw = times(s.gx, invstd), gw2 = times(s.gx2, *res_invstd);
  const auto mg = divided(s.g, n);
  const BnCoef k = bn_coef(mg, divided(gw, n), invstd, weight, t.opmath);
  const BnCoef k2 = bn_coef(mg, divided(gw2, n), *res_invstd, res_weight, t.opmath);
  auto [grad_input, grad_res] = apply_pass(t, k, &k2);
  const auto rdtype = res_mean->scalar_type();
  return {grad_input,
          from_doubles(gw, vdtype),
          from_doubles(s.g, vdtype),
          in_format(grad_res, format_of(*res_input)),
          from_doubles(gw2, rdtype),
          from_doubles(s.g, rdtype)};
}

std::tuple<Tensor, Tensor, Tensor> bn_add_relu_bwd_reduce_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& res_input, const optional<Tensor>& res_mean,
    const optional<Tensor>& res_invstd) {
  const BnBwd t = add_relu_bwd_tensors("bn_add_relu_bwd_reduce", grad_out, out, input, mean, invstd,
                                       std::nullopt, res_input, res_mean, res_invstd, std::nullopt);
  const BnSums s = reduce_pass(t);
  const auto vdtype = mean.scalar_type();
  return {from_doubles(s.g, vdtype), from_doubles(times(s.gx, invstd), vdtype),
          has(res_input) ? from_doubles(times(s.gx2, *res_invstd), vdtype) : empty_vec(mean)};
}

std::tuple<Tensor, Tensor> bn_add_relu_bwd_elemt_cpu(
    const Tensor& grad_out, const optional<Tensor>& out, const Tensor& input, const Tensor& mean,
    const Tensor& invstd, const optional<Tensor>& weight, const Tensor& mean_g,
    const Tensor& mean_g_xhat, const optional<Tensor>& res_input, const optional<Tensor>& res_mean,
    const optional<Tensor>& res_invstd, const optional<Tensor>& res_weight,
    const optional<Tensor>& res_mean_g_xhat) {
  constexpr const char* op = "bn_add_relu_bwd_elemt";
  const BnBwd t = add_relu_bwd_tensors(op, grad_out, out, input, mean, invstd, weight, res_input,
                                       res_mean, res_invstd, res_weight);
  check_vec(op, "mean_g", mean_g, t.c, "one per channel");
  check_vec(op, "mean_g_xhat", mean_g_xhat, t.c, "one per channel");
  const auto mg = double_vec(mean_g);
  const BnCoef k = bn_coef(mg, double_vec(mean_g_xhat), invstd, weight, t.opmath);
  if (!has(res_input)) {
    const BnCoef id = identity_coef(t.c, t.opmath);
    auto [grad_input, g] = apply_pass(t, k, &id);
    return {grad_input, in_format(g, format_of(grad_out))};
  }
  TORCH_CHECK_VALUE(has(res_mean_g_xhat), "fastres::", op, ": res_input needs res_mean_g_xhat");
  check_vec(op, "res_mean_g_xhat", *res_mean_g_xhat, t.c, "one per channel");
  const BnCoef k2 = bn_coef(mg, double_vec(*res_mean_g_xhat), *res_invstd, res_weight, t.opmath);
  auto [grad_input, grad_res] = apply_pass(t, k, &k2);
  return {grad_input, in_format(grad_res, format_of(*res_input))};
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_bwd_cpu(const Tensor& grad_out, const Tensor& input,
                                                   const Tensor& mean, const Tensor& invstd,
                                                   const optional<Tensor>& weight,
                                                   const Tensor& scale, const Tensor& shift,
                                                   bool relu) {
  const BnBwd t =
      relu_bwd_tensors("bn_relu_bwd", grad_out, input, mean, invstd, weight, scale, shift, relu);
  const BnSums s = reduce_pass(t);
  const double n = static_cast<double>(std::max<int64_t>(t.count, 1));
  const auto gw = times(s.gx, invstd);
  const BnCoef k = bn_coef(divided(s.g, n), divided(gw, n), invstd, weight, t.opmath);
  auto [grad_input, unused] = apply_pass(t, k, nullptr);
  return {grad_input, from_doubles(gw, mean.scalar_type()), from_doubles(s.g, mean.scalar_type())};
}

std::tuple<Tensor, Tensor> bn_relu_bwd_reduce_cpu(const Tensor& grad_out, const Tensor& input,
                                                  const Tensor& mean, const Tensor& invstd,
                                                  const Tensor& scale, const Tensor& shift,
                                                  bool relu) {
  const BnBwd t = relu_bwd_tensors("bn_relu_bwd_reduce", grad_out, input, mean, invstd,
                                   std::nullopt, scale, shift, relu);
  const BnSums s = reduce_pass(t);
  return {from_doubles(s.g, mean.scalar_type()),
          from_doubles(times(s.gx, invstd), mean.scalar_type())};
}

Tensor bn_relu_bwd_elemt_cpu(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                             const Tensor& invstd, const optional<Tensor>& weight,
                             const Tensor& scale, const Tensor& shift, bool relu,
                             const Tensor& mean_g, const Tensor& mean_g_xhat) {
  constexpr const char* op = "bn_relu_bwd_elemt";
  const BnBwd t = relu_bwd_tensors(op, grad_out, input, mean, invstd, weight, scale, shift, relu);
  check_vec(op, "mean_g", mean_g, t.c, "one per channel");
  check_vec(op, "mean_g_xhat", mean_g_xhat, t.c, "one per channel");
  const BnCoef k = bn_coef(double_vec(mean_g), double_vec(mean_g_xhat), invstd, weight, t.opmath);
  return apply_pass(t, k, nullptr).first;
}

std::tuple<Tensor, Tensor> conv_bwd_cpu(const Tensor& grad_out, const Tensor& input,
                                        const Tensor& weight, const optional<Tensor>& pre_scale,
                                        const optional<Tensor>& pre_shift, bool pre_relu,
                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, int64_t groups,
                                        std::array<bool, 2> output_mask) {
  constexpr const char* op = "conv_bwd";
  const auto out_sizes = check_conv(op, input, weight, stride, padding, dilation, groups);
  check_act(op, "grad_out", grad_out);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_sizes), "fastres::", op,
              ": grad_out must have the convolution's output size ", at::IntArrayRef(out_sizes),
              ", got ", sizes_str(grad_out));
  check_same_dtype(op, "grad_out", grad_out, "input", input);
  const int64_t c = input.size(1);
  check_opt_vec(op, "pre_scale", pre_scale, c, "one per channel of input");
  check_opt_vec(op, "pre_shift", pre_shift, c, "one per channel of input");
  const auto fmt = format_of(input);
  // The prologue's output is needed for grad_weight only (grad_input depends on the weight);
  // it is recomputed here rather than stored by the forward.
  const Tensor a = output_mask[1] && has_prologue(pre_scale, pre_shift, pre_relu)
                       ? apply_prologue(in_format(input, fmt), fmt, pre_scale, pre_shift, pre_relu)
                       : input;
  auto [gi, gw, gb] =
      at::convolution_backward(grad_out, a, weight, std::nullopt, stride, padding, dilation, false,
                               {0, 0}, groups, {output_mask[0], output_mask[1], false});
  Tensor grad_input = output_mask[0] ? in_format(gi, fmt) : at::empty({0}, input.options());
  Tensor grad_weight;
  if (output_mask[1]) {
    // torch.empty_like(weight) in the fake: the weight's own strides when it is dense.
    grad_weight = gw;
    if (weight.is_non_overlapping_and_dense() && gw.strides() != weight.strides()) {
      grad_weight = at::empty_like(weight).copy_(gw);
    }
  } else {
    grad_weight = at::empty({0}, weight.options());
  }
  return {grad_input, grad_weight};
}

}  // namespace
}  // namespace fastres::cpu

// Introspection for the tests and fastres.info; not part of the op contract (csrc/ops.cpp).
TORCH_LIBRARY(fastres_cpu, m) {
  // The instruction set of the kernels in use: "avx512", "avx2" or "base".
  m.def("kernel_isa() -> str", [] { return std::string(fastres::cpu::kernels().isa); });
  // Run the kernels of a narrower instruction set than the automatic choice ("base", "avx2"), or
  // go back to it ("auto"); returns the previous one. For testing every ISA in one process.
  m.def("set_kernel_isa(str isa) -> str", [](c10::string_view isa) {
    const std::string previous = fastres::cpu::kernels().isa;
    const fastres::cpu::Kernels* order[] = {
        fastres::cpu::kernels_base(), fastres::cpu::kernels_avx2(), fastres::cpu::kernels_avx512()};
    const fastres::cpu::Kernels* chosen = nullptr;
    if (isa != "auto") {
      for (const auto* k : order) {
        if (k != nullptr && isa == k->isa) {
          chosen = k;
        }
        if (k == fastres::cpu::auto_kernels()) {
          break;  // nothing wider than what ATen found this CPU runs
        }
      }
      TORCH_CHECK(chosen != nullptr, "fastres_cpu::set_kernel_isa: '", isa,
                  "' is not available; this build and CPU run '", fastres::cpu::auto_kernels()->isa,
                  "' and narrower ones");
    }
    fastres::cpu::g_forced.store(chosen, std::memory_order_release);
    return previous;
  });
  // Entries of the prepacked-weight cache of conv_bias_act, and a way to empty it.
  m.def("weight_cache_size() -> int", [] { return fastres::cpu::PackedWeights::get().size(); });
  m.def("weight_cache_clear() -> ()", [] { fastres::cpu::PackedWeights::get().clear(); });
  // Mark a weight that is not a parameter as safe to prepack (see PackedWeights).
  m.def("weight_cache_allow(Tensor weight) -> ()",
        [](const at::Tensor& w) { fastres::cpu::PackedWeights::get().allow(w); });
  // How many distinct threads an at::parallel_for over n one-element chunks ran on: proves the
  // extension's OpenMP regions really fork (compiled with -fopenmp, torch's libgomp).
  m.def("parallel_threads(int n) -> int", [](int64_t n) {
    std::vector<std::atomic<int>> seen(static_cast<size_t>(std::max(at::get_num_threads(), 1)));
    at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
      const int t = at::get_thread_num();
      if (t >= 0 && t < static_cast<int>(seen.size())) {
        seen[t].store(1);
      }
      // Keep each chunk busy for a moment so one thread cannot drain them all.
      volatile double x = 0;
      for (int i = 0; i < 200000; ++i) {
        x = x + 1.0;
      }
    });
    int64_t used = 0;
    for (auto& s : seen) {
      used += s.load();
    }
    return used;
  });
}

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("conv_bias_act", &fastres::cpu::conv_bias_act_cpu);
  m.impl("relu_bias_bwd", &fastres::cpu::relu_bias_bwd_cpu);
  m.impl("conv_stats", &fastres::cpu::conv_stats_cpu);
  m.impl("bn_finalize", &fastres::cpu::bn_finalize_cpu);
  m.impl("bn_add_relu", &fastres::cpu::bn_add_relu_cpu);
  m.impl("bn_add_relu_bwd", &fastres::cpu::bn_add_relu_bwd_cpu);
  m.impl("bn_relu_bwd", &fastres::cpu::bn_relu_bwd_cpu);
  m.impl("conv_bwd", &fastres::cpu::conv_bwd_cpu);
  m.impl("bn_finalize_count", &fastres::cpu::bn_finalize_count_cpu);
  m.impl("bn_add_relu_bwd_reduce", &fastres::cpu::bn_add_relu_bwd_reduce_cpu);
  m.impl("bn_add_relu_bwd_elemt", &fastres::cpu::bn_add_relu_bwd_elemt_cpu);
  m.impl("bn_relu_bwd_reduce", &fastres::cpu::bn_relu_bwd_reduce_cpu);
  m.impl("bn_relu_bwd_elemt", &fastres::cpu::bn_relu_bwd_elemt_cpu);
}
