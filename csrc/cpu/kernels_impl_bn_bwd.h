// The BatchNorm backward family of the CPU kernels (and relu_bias_bwd): the ReLU-masked gradient
// (from out, or recomputed from the prologue's x * scale + shift), its per-channel sums
// (bn_bwd_reduce) and the elementwise apply (bn_bwd_apply).
// A part of kernels_impl.h, which includes it inside the ISA target region: internal linkage.
#pragma once

#ifndef FASTRES_KERNELS_IMPL_PART
#error "kernels_impl_bn_bwd.h is a part of kernels_impl.h: include kernels_impl.h"
#endif

namespace fastres::cpu::FASTRES_ISA {
namespace {

// ---------------------------------------------------------------------------------------------
// BatchNorm backward (and relu_bias_bwd): the masked gradient, its reductions, and the apply.

// The largest opmath value that rounds to zero in T (round to nearest even): the ReLU mask of the
// reference is computed after rounding to T.
template <typename T>
constexpr opmath_t<T> zero_threshold() {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return 2.98023223876953125e-08f;  // 2^-25, half of float16's smallest subnormal
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return 4.59177480789956e-41f;  // 2^-134, half of bfloat16's smallest subnormal
  } else {
    return opmath_t<T>(0);
  }
}

template <typename T, Mask MASK, typename Prm>
inline Vectorized<opmath_t<T>> masked_grad(const BnBwdArgs& a, int64_t i, int64_t n,
                                           const Prm& prm) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  const V go = io::load(static_cast<const T*>(a.grad_out) + i, n);
  if constexpr (MASK == Mask::kOut) {
    // threshold_backward: 0 where out <= 0, else grad_out, so a NaN out passes the gradient
    // (go & (out > 0) would zero it). The comparison is all-ones or all-zeros bits per lane.
    return V::blendv(go, V(M(0)), io::load(static_cast<const T*>(a.out) + i, n) <= V(M(0)));
  } else if constexpr (MASK == Mask::kPre) {
    const V z = mul_add_exact(io::load(static_cast<const T*>(a.x) + i, n), prm(a.pre_scale),
                              prm(a.pre_shift));
    return V::blendv(go, V(M(0)), z <= V(zero_threshold<T>()));  // NaN z passes, as above
  } else {
    return go;
  }
}

template <typename T, Mask MASK, bool HAS_X, bool HAS_X2, bool WRITE_G>
void bn_reduce_impl(const BnBwdArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  constexpr int NS = 1 + int(HAS_X) + int(HAS_X2);
  const T* x = static_cast<const T*>(a.x);
  const T* x2 = static_cast<const T*>(a.x2);
  T* g_out = static_cast<T*>(a.g_out);
  double* outs[3] = {a.sum_g, a.sum_gx, a.sum_gx2};
  if constexpr (!HAS_X) {
    outs[1] = outs[2] = nullptr;
  }
  reduce_dense<M, NS>(a.g, outs, [&](int64_t i, int64_t n, const auto& prm, V* vals) {
    const V g = masked_grad<T, MASK>(a, i, n, prm);
    if constexpr (WRITE_G) {
      io::store(g_out + i, g, n);
    }
    vals[0] = g;
    if constexpr (HAS_X) {
      vals[1] = g * (io::load(x + i, n) - prm(a.mean));
    }
    if constexpr (HAS_X2) {
      vals[2] = g * (io::load(x2 + i, n) - prm(a.mean2));
    }
  });
}

void bn_bwd_reduce(const BnBwdArgs& a) {
  if (is_empty(a.g)) {
    zero(a.sum_g, a.g.c);
    zero(a.sum_gx, a.g.c);
    zero(a.sum_gx2, a.g.c);
    return;
  }
  const bool has_x = a.x != nullptr, has_x2 = a.x2 != nullptr, write_g = a.g_out != nullptr;
  TORCH_INTERNAL_ASSERT(has_x || !has_x2);
  TORCH_INTERNAL_ASSERT(a.mask != Mask::kPre || (has_x && !has_x2 && !write_g));
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.mask == Mask::kPre) {
      return bn_reduce_impl<T, Mask::kPre, true, false, false>(a);
    }
    FASTRES_BOOL_SWITCH(a.mask == Mask::kOut, kOut, [&] {
      constexpr Mask m = kOut ? Mask::kOut : Mask::kNone;
      if (!has_x) {
        TORCH_INTERNAL_ASSERT(write_g);
        bn_reduce_impl<T, m, false, false, true>(a);
      } else if (has_x2) {
        TORCH_INTERNAL_ASSERT(!write_g);
        bn_reduce_impl<T, m, true, true, false>(a);
      } else {
        FASTRES_BOOL_SWITCH(write_g, kWrite, [&] { bn_reduce_impl<T, m, true, false, kWrite>(a); });
      }
    });
  });
}

template <typename T, Mask MASK, bool HAS_X2>
void bn_apply_impl(const BnBwdArgs& a) {
  using M = opmath_t<T>;
  using V = Vectorized<M>;
  using io = IO<T>;
  const T* x = static_cast<const T*>(a.x);
  const T* x2 = static_cast<const T*>(a.x2);
  T* gx = static_cast<T*>(a.grad_x);
  T* gx2 = static_cast<T*>(a.grad_x2);
  map_dense<M>(a.g, [&](int64_t i, int64_t n, const auto& prm) {
    const V g = masked_grad<T, MASK>(a, i, n, prm);
    const V v = at::vec::fmadd(prm(a.b), io::load(x + i, n) - prm(a.mean),
                               at::vec::fmadd(prm(a.a), g, prm(a.d)));
    io::store(gx + i, v, n);
    if constexpr (HAS_X2) {
      const V v2 = at::vec::fmadd(prm(a.b2), io::load(x2 + i, n) - prm(a.mean2),
                                  at::vec::fmadd(prm(a.a2), g, prm(a.d2)));
      io::store(gx2 + i, v2, n);
    }
  });
}

void bn_bwd_apply(const BnBwdArgs& a) {
  if (is_empty(a.g)) {
    return;
  }
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.mask == Mask::kPre) {
      TORCH_INTERNAL_ASSERT(a.x2 == nullptr);
      return bn_apply_impl<T, Mask::kPre, false>(a);
    }
    FASTRES_BOOL_SWITCH(a.mask == Mask::kOut, kOut, [&] {
      constexpr Mask m = kOut ? Mask::kOut : Mask::kNone;
      FASTRES_BOOL_SWITCH(a.x2 != nullptr, kX2, [&] { bn_apply_impl<T, m, kX2>(a); });
    });
  });
}

}  // namespace
}  // namespace fastres::cpu::FASTRES_ISA
