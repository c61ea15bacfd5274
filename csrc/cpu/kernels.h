// The interface between the ATen-level CPU ops (ops_common.cpp, ops_infer.cpp, ops_train.cpp)
// and the vectorised single-pass kernels (kernels_impl.h, compiled once per instruction set by
// kernels_<isa>.cpp).
//
// Kernels see raw pointers and sizes only, never at::Tensor: the per-ISA translation units are
// compiled with wider instruction sets than the baseline, and keeping ATen's inline functions out
// of them keeps AVX-512 code from leaking into functions the linker may share with baseline code.
//
// Activations are dense 4-D tensors in NCHW (contiguous) or NHWC (channels_last) order, described
// by Geom. Per-channel vectors are arrays of the "opmath" type: float for float32, bfloat16 and
// float16 activations, double for float64. Per-channel sums are returned in double (every
// reduction accumulates in double, in an order that depends on the shape only, never on the
// number of threads, so results are bitwise reproducible).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastres::cpu {

struct Geom {
  int64_t n = 0, c = 0, h = 0, w = 0;
  bool channels_last = false;
};

// out = relu?(in * scale[c] + shift[c] + r), where r = res * res_scale[j] + res_shift[j] for
// output channel c = res_c0 + j, j < res_cn (no residual on the other channels). The residual is
// any strided view: element (n, j, h, w) lives at res + n*rs[0] + j*rs[1] + h*rs[2] + w*rs[3].
struct EpilogueArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  Geom g;
  void* out = nullptr;          // dense, g's order
  const void* in = nullptr;     // dense, g's order; may alias out (in place)
  const void* scale = nullptr;  // C opmath
  const void* shift = nullptr;  // C opmath
  const void* res = nullptr;    // null: no residual
  int64_t rs[4] = {0, 0, 0, 0};
  int64_t res_c0 = 0, res_cn = 0;
  const void* res_scale = nullptr;  // res_cn opmath
  const void* res_shift = nullptr;  // res_cn opmath
  bool relu = false;
};

// out = relu?(in * scale[c] + shift[c]) rounded to the activations' dtype, computed exactly as
// fastres.reference._prologue does (a product rounded to opmath, then the sum; no FMA).
struct PrologueArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  Geom g;
  void* out = nullptr;
  const void* in = nullptr;
  const void* scale = nullptr;  // C opmath
  const void* shift = nullptr;  // C opmath
  bool relu = false;
};

// sum[c] and sumsq[c] of a dense tensor over N, H, W.
struct StatsArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  Geom g;
  const void* in = nullptr;
  double* sum = nullptr;
  double* sumsq = nullptr;
};

// Where the ReLU mask of a backward pass comes from.
enum class Mask : int {
  kNone = 0,  // g = grad_out
  kOut = 1,   // g = grad_out * (out > 0)
  kPre = 2,   // g = grad_out * (dtype(x * pre_scale[c] + pre_shift[c]) > 0), the prologue's mask
};

// The two passes of a BatchNorm backward (and of relu_bias_bwd, which is the first pass with no x).
//   reduce: g as per mask; optionally g -> g_out; sum_g[c] = sum g, sum_gx[c] = sum g*(x-mean[c]),
//           sum_gx2[c] = sum g*(x2-mean2[c]) when x2 is given.
//   apply:  grad_x = a[c]*g + b[c]*(x-mean[c]) + d[c] (and grad_x2 likewise from x2).
struct BnBwdArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  Geom g;
  Mask mask = Mask::kNone;
  const void* grad_out = nullptr;
  const void* out = nullptr;        // kOut
  const void* pre_scale = nullptr;  // kPre, C opmath
  const void* pre_shift = nullptr;  // kPre, C opmath
  const void* x = nullptr;          // null: reduce sum_g only
  const void* mean = nullptr;       // C opmath
  const void* x2 = nullptr;
  const void* mean2 = nullptr;
  // reduce
  double* sum_g = nullptr;
  double* sum_gx = nullptr;
  double* sum_gx2 = nullptr;
  void* g_out = nullptr;
  // apply
  const void* a = nullptr;
  const void* b = nullptr;
  const void* d = nullptr;
  void* grad_x = nullptr;
  const void* a2 = nullptr;
  const void* b2 = nullptr;
  const void* d2 = nullptr;
  void* grad_x2 = nullptr;
};

// max |x| over n dense values of dtype: NaN when any value is NaN, else +Inf when any is +-Inf.
struct AbsMaxArgs {
  c10::ScalarType dtype = c10::ScalarType::Float;
  const void* in = nullptr;
  int64_t n = 0;
};

struct Kernels {
  const char* isa;
  void (*epilogue)(const EpilogueArgs&);
  void (*prologue)(const PrologueArgs&);
  void (*channel_stats)(const StatsArgs&);
  void (*bn_bwd_reduce)(const BnBwdArgs&);
  void (*bn_bwd_apply)(const BnBwdArgs&);
  double (*absmax)(const AbsMaxArgs&);
};

// One table per instruction set; null where that set was not compiled (non-x86 builds).
const Kernels* kernels_base();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

// The table for the instruction set ATen itself uses (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY=default|avx2|avx512), chosen once.
const Kernels& kernels();

}  // namespace fastres::cpu
