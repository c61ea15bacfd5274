// Argument checks, layout helpers and the epilogue pass shared by the CPU ops (ops_common.h).

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
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

#include "ops_common.h"

namespace fastres::cpu {

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

bool nhwc_dense(const Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Tensor in_format(const Tensor& t, at::MemoryFormat fmt) {
  if (has_dense_strides(t, fmt)) {
    return t;
  }
  return empty_act(t.sizes(), t.options(), fmt).copy_(t);
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

// A per-channel vector read into doubles, and doubles written as a new vector of a dtype: read and
// converted in place, where .to() would dispatch an op and allocate (a ResNet-50 training step
// made ~1400 such conversions, ~5 ms; measured on the 2-CPU AMD EPYC). The conversions are
// ATen's copy's (static_cast, through float for 16-bit types), so the bits are the same.
std::vector<double> double_vec(const Tensor& t) {
  if (t.dim() == 1 && t.layout() == c10::kStrided && t.device().is_cpu() &&
      at::isFloatingType(t.scalar_type())) {
    const int64_t n = t.size(0), st = t.stride(0);
    std::vector<double> out(static_cast<size_t>(n));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "double_vec", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<double>(p[i * st]);
    });
    return out;
  }
  const Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

Tensor from_doubles(const std::vector<double>& v, at::ScalarType dtype) {
  const auto n = static_cast<int64_t>(v.size());
  if (at::isFloatingType(dtype)) {
    Tensor t = at::empty({n}, at::TensorOptions().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "from_doubles", [&] {
      scalar_t* p = t.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(v[static_cast<size_t>(i)]);
    });
    return t;
  }
  Tensor t = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(dtype);
}


Tensor conv_nobias(const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0},
                         groups);
}

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


}  // namespace fastres::cpu
